"""Scenario files (TOML) and the runner behind ``batchmmu run``.

A scenario names its parameters in ``[params]`` (overridable with ``--set name=value``);
any other value written as ``"${name}"`` takes the parameter's value.  Sections:

``[host]``         Host(...) keyword arguments (``memory`` may be ``"auto"``: what the VMs need).
``[[vm_group]]``   create_vms(...) arguments: count, memory (slot 0 at gpa 0), vcpus, tdp_format,
                   tdp_levels, maxphyaddr, backing, ept_ad.
``[workload]``     the test region and the guest that runs on it: ``bytes_per_vcpu``, ``region`` "top"
                   (memstress: test memslots at the top of guest physical memory) or "slot0",
                   ``region_bytes`` or ``region_pages`` (the whole region, instead of vCPUs x
                   bytes_per_vcpu), ``slots``
                   (test memslots 1..slots, equal parts), ``slot_backing``; the ``access`` op's
                   ``pattern`` sequential | random | memstress, ``write_percent``, ``stride``; memstress
                   (``batchmmu.memstress``): ``seed`` (guest seed; vCPU i seeds seed + i), ``random_access``,
                   ``overlap``; VM capabilities ``manual_protect``, ``initially_set``, ``dirty_ring``
                   (entries per vCPU, 0 = off); ``verify`` off | writes | exact (check every collection
                   of the dirty log against the writes the guest made; fail on a lost write; "exact" also
                   on a reported page that was not written).
``[[phase]]``      ``name`` and ``op``: ``access`` (``passes`` over every vCPU's pages), ``populate``
                   (a memstress pass, 100 % writes, sequential), ``dirty_pass`` (a memstress pass;
                   ``write_percent`` / ``random_access`` override the workload's), ``random_writes``
                   (dirty_log_test's guest, ``writes`` per vCPU), ``kvm_page_table`` (``stage`` create |
                   update | adjust), ``enable_logging`` / ``disable_logging`` (every test slot; the old
                   ``dirty_log`` with ``enable`` still works), ``get_dirty_log``, ``clear_dirty_log``
                   (whole slots, with the bitmap of the last GET), ``harvest_dirty_ring`` (every vCPU's
                   ring, then reset), ``collect_dirty_log`` (whatever the VM's mode needs: ring harvest,
                   or GET and, with manual protect, CLEAR), ``stats`` (nothing: a stats snapshot).
                   ``touch`` (vCPU 0 of each VM accesses ``offsets`` of its test region, ``kind`` read |
                   write | fetch), ``mark_idle`` / ``check_idle`` (page_idle: age the test memory without a
                   flush / count pages still idle), ``advance_time`` (``seconds``: periodic host work such
                   as NX huge page recovery);
                   ``epochs = N`` (access, populate, dirty_pass: each pass in N slices, the same slices
                   of every VM; with ``[host] overcommit = true`` the host reclaims between epochs,
                   ``watermarks = [low, high]``), ``groups`` (only the VMs of these vm_group indices);
                   batchmmu.hostops: ``add_slots``, ``sweep``, ``toggle_cr0_wp``, ``delete_slots``,
                   ``discard``, ``release`` (max_guest_memory), ``memslot_perf`` (``test``, ``loops``,
                   ``slots``), ``memslot_stress`` (``ops``, ``passes``);
                   ``when`` / ``unless`` (a value, usually ``"${param}"``) keep or drop a phase;
                   ``repeat = N`` (or ``iterations = N``) with sub-phases ``[[phase.phase]]`` runs them N
                   times; ``{i}`` in their names is the iteration (1..N);
                   ``guest_os`` (batchmmu.guestos: ``stage`` boot | run | exit, ``slices``, ``forks``; the guest
                   OS's settings in a ``[guest_os]`` section; prints the shadow/TDP comparison).
"""

import copy
import json
import re
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import guestos, hostops, warm
from .errors import BatchMMUError
from .kernels.state import GAUGE_STATS, STAT_NAMES
from .memstress import GUEST_RANDOM_SEED
from .units import format_size, parse_size

_VAR = re.compile(r"^\$\{(\w+)\}$")


class Report(NamedTuple):
    """The result of a run: what ``--json`` writes."""
    scenario: str
    params: dict
    totals: dict
    per_vm: dict
    phases: list
    footprint: dict

    def to_json(self):
        return json.dumps(self._asdict(), indent=1)


# ----------------------------------------------------------------------------- loading
def list_scenarios():
    """Bundled scenarios: list of (name, description)."""
    out = []
    for f in sorted(resources.files("batchmmu.scenarios").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".toml"):
            data = tomllib.loads(f.read_text())
            out.append((f.name[:-5], data.get("description", "")))
    return out


def _find_line(text, key):
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return i
    return None


def load_scenario(name_or_path):
    """Parse a bundled scenario (by name) or a TOML file.  Returns (dict, source text, origin)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise BatchMMUError(f"scenario={name_or_path!r}: no such file", field="scenario", value=name_or_path)
        text, origin = p.read_text(), str(p)
    else:
        f = resources.files("batchmmu.scenarios") / f"{name_or_path}.toml"
        if not f.is_file():
            names = ", ".join(n for n, _ in list_scenarios())
            raise BatchMMUError(f"scenario={name_or_path!r}: no bundled scenario of that name ({names})",
                                field="scenario", value=name_or_path)
        text, origin = f.read_text(), f"bundled:{name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BatchMMUError(f"{origin}: {e}", field="scenario", value=origin) from None
    return data, text, origin


def _coerce(value):
    """Type a --set value: int, float, bool, or string."""
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def apply_overrides(data, sets):
    """``name=value`` sets a [params] entry; ``section.key=value`` sets a key directly."""
    data = copy.deepcopy(data)
    params = data.setdefault("params", {})
    for s in sets:
        if "=" not in s:
            raise BatchMMUError(f"--set {s!r}: expected name=value", field="set", value=s)
        key, value = s.split("=", 1)
        key = key.strip()
        if "." in key:
            sec, k = key.split(".", 1)
            target = data.get(sec)
            if isinstance(target, list):
                for t in target:
                    t[k] = _coerce(value)
            elif isinstance(target, dict):
                target[k] = _coerce(value)
            else:
                raise BatchMMUError(f"--set {s!r}: no section [{sec}] in this scenario", field="set", value=s)
        else:
            if key not in params:
                raise BatchMMUError(f"--set {s!r}: unknown parameter {key!r} (known: {', '.join(params)})",
                                    field="set", value=s)
            params[key] = _coerce(value)
    return data


def _resolve(obj, params, where):
    if isinstance(obj, dict):
        return {k: _resolve(v, params, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, params, where) for v in obj]
    if isinstance(obj, str):
        m = _VAR.match(obj)
        if m:
            if m.group(1) not in params:
                raise BatchMMUError(f"{where}={obj!r}: unknown parameter {m.group(1)!r}", field=where, value=obj)
            return params[m.group(1)]
    return obj


_KNOWN = {
    "host": {"memory", "backing", "mmio_caching", "nx_huge_pages", "tdp_huge_page_level", "eager_page_split",
             "pml", "nx_huge_pages_recovery_ratio", "nx_huge_pages_recovery_period_ms", "overcommit", "watermarks"},
    "vm_group": {"count", "memory", "vcpus", "mmu", "tdp_format", "tdp_levels", "maxphyaddr", "backing",
                 "ept_ad"},
    "workload": {"pattern", "bytes_per_vcpu", "region", "region_bytes", "region_pages", "slots", "slot_backing",
                 "write_percent", "stride", "seed", "random_access", "overlap", "manual_protect", "initially_set",
                 "dirty_ring", "verify"},
    "phase": {"name", "op", "passes", "enable", "when", "unless", "repeat", "iterations", "phase",
              "write_percent", "random_access", "writes", "stage", "kind", "offsets", "seconds", "epochs",
              "groups"} | hostops.KEYS | guestos.PHASE_KEYS,
    "guest_os": set(guestos.DEFAULTS),
}

OPS = ("access", "populate", "dirty_pass", "random_writes", "kvm_page_table", "dirty_log", "enable_logging",
       "disable_logging", "get_dirty_log", "clear_dirty_log", "harvest_dirty_ring", "collect_dirty_log", "stats",
       "touch", "mark_idle", "check_idle", "advance_time") + hostops.OPS + guestos.OPS
# ops that collect the dirty log (their phase records carry ``dirty_pages``)
COLLECT_OPS = ("get_dirty_log", "harvest_dirty_ring", "collect_dirty_log")
VERIFY_MODES = ("off", "writes", "exact")


def _check_keys(section, d, text, origin):
    if not isinstance(d, dict):
        raise BatchMMUError(f"{origin}: [{section}] must be a table", field=section, value=d)
    for k in d:
        if k not in _KNOWN[section]:
            line = _find_line(text, k)
            at = f" (line {line})" if line else ""
            raise BatchMMUError(f"{origin}{at}: unknown key {section}.{k}; known: {', '.join(sorted(_KNOWN[section]))}",
                                field=f"{section}.{k}", value=d[k])


def truthy(v):
    """A ``when`` / ``unless`` / flag value: false, 0, "", "false", "off", "no", "0" are false."""
    if isinstance(v, str):
        return v.strip().lower() not in ("", "false", "off", "no", "0", "none")
    return bool(v)


def _int(v, field, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in {lo}..{hi}" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise BatchMMUError(f"{field}={v!r}: must be an integer{rng}", field=field, value=v)
    return v


def _bool(v, field):
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "on", "off", "yes", "no"):
        return v.strip().lower() in ("true", "on", "yes")
    raise BatchMMUError(f"{field}={v!r}: must be true or false", field=field, value=v)


def _flatten_phases(phases, text, origin, out, iteration=None, depth=0):
    """Expand ``repeat`` blocks and drop phases whose ``when`` is false or ``unless`` is true."""
    if depth > 4:
        raise BatchMMUError(f"{origin}: phases nested too deeply", field="phase", value=None)
    if isinstance(phases, dict):
        phases = [phases]
    for ph in phases:
        _check_keys("phase", ph, text, origin)
        ph = dict(ph)
        if "when" in ph and not truthy(ph.pop("when")):
            continue
        if "unless" in ph and truthy(ph.pop("unless")):
            continue
        ph.pop("when", None)
        ph.pop("unless", None)
        if "repeat" in ph or "iterations" in ph:
            if "repeat" in ph and "iterations" in ph:
                raise BatchMMUError(f"{origin}: a phase has both repeat and iterations", field="phase.repeat",
                                    value=ph["repeat"])
            key = "repeat" if "repeat" in ph else "iterations"
            n = _int(ph[key], f"phase.{key}", 0)
            subs = ph.get("phase")
            if not subs:
                raise BatchMMUError(f"{origin}: phase.{key} needs sub-phases ([[phase.phase]])", field="phase.phase",
                                    value=None)
            other = set(ph) - {key, "phase", "name"}
            if other:
                raise BatchMMUError(f"{origin}: a {key} phase takes only name and [[phase.phase]] (not "
                                    f"{', '.join(sorted(other))})", field=f"phase.{min(other)}", value=None)
            for i in range(1, n + 1):
                _flatten_phases(subs, text, origin, out, i, depth + 1)
            continue
        if "phase" in ph:
            raise BatchMMUError(f"{origin}: sub-phases need repeat = N", field="phase.phase", value=None)
        op = ph.get("op", "access")
        if op not in OPS:
            raise BatchMMUError(f"phase.op={op!r}: use one of {', '.join(OPS)}", field="phase.op", value=op)
        ph["op"] = op
        name = str(ph.get("name", op))
        if iteration is not None:
            name = name.replace("{i}", str(iteration)) if "{i}" in name else f"{name} {iteration}"
            ph["iteration"] = iteration
        ph["name"] = name
        if "passes" in ph:
            _int(ph["passes"], "phase.passes", 0)
        if "write_percent" in ph:
            _int(ph["write_percent"], "phase.write_percent", 0, 100)
        if "random_access" in ph:
            ph["random_access"] = _bool(ph["random_access"], "phase.random_access")
        if op == "random_writes":
            _int(ph.get("writes", 0x100), "phase.writes", 0)
        if "epochs" in ph:
            _int(ph["epochs"], "phase.epochs", 1)
            if op not in ("access", "populate", "dirty_pass"):
                raise BatchMMUError(f"phase.epochs: {op} phases do not run in epochs (access, populate, dirty_pass do)",
                                    field="phase.epochs", value=ph["epochs"])
        if "groups" in ph and (not isinstance(ph["groups"], list)
                               or not all(isinstance(g, int) and not isinstance(g, bool) for g in ph["groups"])):
            raise BatchMMUError(f"phase.groups={ph['groups']!r}: must be a list of vm_group indices",
                                field="phase.groups", value=ph["groups"])
        if op == "kvm_page_table" and ph.get("stage") not in ("create", "update", "adjust"):
            raise BatchMMUError(f"phase.stage={ph.get('stage')!r}: use create, update or adjust",
                                field="phase.stage", value=ph.get("stage"))
        out.append(ph)
    return out


def region_bytes(spec, g):
    """Bytes of the test region of a VM of group ``g``."""
    if spec["region_bytes"]:
        return spec["region_bytes"]
    return int(g.get("vcpus", 1)) * spec["bpv"]


# ----------------------------------------------------------------------------- running
def resolve(data, text="", origin="<dict>"):
    """Check a parsed scenario and resolve it into the plain spec every shard runs."""
    params = data.get("params", {})
    r = _resolve({k: v for k, v in data.items() if k != "params"}, params, "scenario")
    for sec in ("host", "workload", "guest_os"):
        _check_keys(sec, r.get(sec, {}), text, origin)
    groups = r.get("vm_group", [])
    if isinstance(groups, dict):
        groups = [groups]
    if not groups:
        raise BatchMMUError(f"{origin}: needs at least one [[vm_group]]", field="vm_group", value=None)
    for g in groups:
        _check_keys("vm_group", g, text, origin)
        c = g.get("count", 1)
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise BatchMMUError(f"vm_group.count={c!r}: must be a positive integer", field="vm_group.count", value=c)
    raw = r.get("phase", [])
    if not raw:
        raise BatchMMUError(f"{origin}: needs at least one [[phase]]", field="phase", value=None)
    phases = _flatten_phases(raw, text, origin, [])
    wl = dict(r.get("workload", {}))
    bpv = parse_size(wl.get("bytes_per_vcpu", "1MiB"), "workload.bytes_per_vcpu")
    stride = parse_size(wl.get("stride", 4096), "workload.stride")
    if bpv <= 0 or bpv % 4096:
        raise BatchMMUError(f"workload.bytes_per_vcpu={bpv!r}: must be a positive multiple of 4096",
                            field="workload.bytes_per_vcpu", value=bpv)
    if stride <= 0 or stride % 4096:
        raise BatchMMUError(f"workload.stride={stride!r}: must be a positive multiple of 4096",
                            field="workload.stride", value=stride)
    rbytes = parse_size(wl.get("region_bytes", 0), "workload.region_bytes")
    if "region_pages" in wl:
        if "region_bytes" in wl:
            raise BatchMMUError("workload: give region_bytes or region_pages, not both",
                                field="workload.region_pages", value=wl["region_pages"])
        rbytes = 4096 * _int(wl["region_pages"], "workload.region_pages", 1)
    if rbytes % 4096:
        raise BatchMMUError(f"workload.region_bytes={rbytes!r}: must be a multiple of 4096",
                            field="workload.region_bytes", value=rbytes)
    region = wl.get("region", "top")
    if region not in ("top", "slot0"):
        raise BatchMMUError(f"workload.region={region!r}: use 'top' or 'slot0'", field="workload.region",
                            value=region)
    pattern = wl.get("pattern", "sequential")
    if pattern not in ("sequential", "random", "memstress"):
        raise BatchMMUError(f"workload.pattern={pattern!r}: use 'sequential', 'random' or 'memstress'",
                            field="workload.pattern", value=pattern)
    wp = _int(wl.get("write_percent", 100), "workload.write_percent", 0, 100)
    slots = _int(wl.get("slots", 1), "workload.slots", 1, 32000)
    if region == "slot0" and slots != 1:
        raise BatchMMUError(f"workload.slots={slots}: region 'slot0' is one slot", field="workload.slots",
                            value=slots)
    seed = wl.get("seed", GUEST_RANDOM_SEED)
    if isinstance(seed, str):   # the selftests print it in hex: --set seed=0x6b8b4567
        try:
            seed = int(seed, 0)
        except ValueError:
            pass
    seed = _int(seed, "workload.seed", 0, 0xFFFFFFFF)
    verify = wl.get("verify", "off")
    if isinstance(verify, bool):
        verify = "writes" if verify else "off"
    if verify not in VERIFY_MODES:
        raise BatchMMUError(f"workload.verify={verify!r}: use off, writes or exact", field="workload.verify",
                            value=verify)
    mem_spec = {"bpv": bpv, "region_bytes": rbytes}
    for g in groups:
        rb = region_bytes(mem_spec, g)
        if rb // 4096 % slots:
            raise BatchMMUError(f"workload.slots={slots}: the test region's {rb // 4096} pages do not split evenly "
                                "into that many slots", field="workload.slots", value=slots)
    manual = _bool(wl.get("manual_protect", False), "workload.manual_protect")
    ring = _int(wl.get("dirty_ring", 0), "workload.dirty_ring", 0)
    if manual and ring:
        raise BatchMMUError(f"workload.dirty_ring={ring}: a VM with dirty rings has no dirty bitmap to GET or CLEAR, "
                            "and with manual protect + INITIALLY_SET KVM would not write-protect the slot when "
                            "logging starts; set manual_protect=false", field="workload.dirty_ring", value=ring)
    host = dict(r.get("host", {}))
    mem = host.pop("memory", "auto")
    if mem == "auto":
        need = 0
        for g in groups:
            slot0 = parse_size(g.get("memory", "2MiB"), "vm_group.memory")
            need += int(g.get("count", 1)) * (region_bytes(mem_spec, g) + (slot0 if region == "top" else 0))
        mem = max(need, 1 << 30)
    return {"name": r.get("name", Path(origin).stem), "params": params, "host": host,
            "host_memory": parse_size(mem, "host.memory"), "groups": groups, "workload": wl,
            "phases": phases, "bpv": bpv, "stride": stride, "region": region, "pattern": pattern,
            "write_percent": wp, "region_bytes": rbytes, "slots": slots, "seed": seed,
            "random_access": _bool(wl.get("random_access", False), "workload.random_access"),
            "overlap": _bool(wl.get("overlap", False), "workload.overlap"),
            "manual_protect": manual,
            "initially_set": _bool(wl.get("initially_set", False), "workload.initially_set"),
            "dirty_ring": ring,
            "verify": verify, "guest_os": guestos.resolve(r.get("guest_os", {}))}


class _Progress:
    def __init__(self, quiet):
        self.enabled = not quiet and sys.stderr.isatty()
        self.name, self.total, self.done, self.t0 = "", 1, 0, time.perf_counter()

    def start(self, name, total):
        self.name, self.total, self.done, self.t0 = name, max(1, total), 0, time.perf_counter()

    def __call__(self, n):
        self.done += n
        if not self.enabled:
            return
        frac = min(1.0, self.done / self.total)
        rate = self.done / max(1e-9, time.perf_counter() - self.t0)
        print(f"\r  {self.name:<14} [{'#' * int(30 * frac):<30}] {100 * frac:5.1f}%  {rate / 1e6:7.2f} M ev/s",
              end="", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print("\r" + " " * 80 + "\r", end="", file=sys.stderr, flush=True)


def available_memory():
    """Bytes this machine can still give (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(spec, parts, backend):
    """Refuse a run whose arenas would not fit in this machine's memory, saying what it needs."""
    from .shard import estimate_memory
    need = sum(estimate_memory(spec, p) for p in parts)
    if backend != "serial":
        need += len(parts) * (200 << 20)  # a Python interpreter with numpy and numba per worker
    have = available_memory()
    if have is not None and need > have:
        raise BatchMMUError(
            f"this run needs about {format_size(need)} of memory for its arenas but the machine has "
            f"{format_size(have)} available; use fewer or smaller VMs, or run on a larger machine "
            "(--backend ray --ray-address ...)", field="memory", value=need)
    return need


def run_scenario(scenario, workers=1, backend="serial", seed=0, sets=(), quiet=True, progress=False,
                 ray_address=None):
    """Run a scenario (bundled name, path, or a parsed dict) on ``workers`` shards; returns a Report.

    The same scenario and seed give identical totals and per-VM statistics for any worker count
    and backend.
    """
    from .backends import BACKENDS, RayBackend
    from .reclaim import run_phase
    from .shard import split, total_events
    if backend not in BACKENDS:
        raise BatchMMUError(f"backend={backend!r}: use serial, process or ray", field="backend", value=backend)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BatchMMUError(f"workers={workers!r}: must be a positive integer", field="workers", value=workers)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BatchMMUError(f"seed={seed!r}: must be an integer", field="seed", value=seed)
    if isinstance(scenario, dict):
        data, text, origin = scenario, "", "<dict>"
    else:
        data, text, origin = load_scenario(scenario)
    data = apply_overrides(data, sets)
    spec = resolve(data, text, origin)
    parts = split(spec, workers)
    nvm = sum(len(p) for p in parts)
    if backend != "ray" or ray_address is None:
        check_memory(spec, parts, backend)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if not warm.READY:  # compile here, never inside a timed phase or in each process worker at once
        tw = time.perf_counter()
        warm.warmup()
        say(f"kernels ready in {time.perf_counter() - tw:.1f} s")
    bar = _Progress(quiet or not progress)
    t0 = time.perf_counter()
    kw = {"address": ray_address} if backend == "ray" else {}
    be = (RayBackend if backend == "ray" else BACKENDS[backend])(spec, seed, parts, bar, **kw)
    try:
        say(f"{spec['name']}: {nvm} VMs on {len(parts)} {backend} worker(s), "
            f"{format_size(spec['bpv'])} per vCPU (setup {time.perf_counter() - t0:.2f} s)")
        stats = np.zeros((nvm, len(STAT_NAMES)), np.int64)
        phases = []
        for k, ph in enumerate(spec["phases"]):
            name = ph["name"]
            bar.start(name, total_events(spec, k))
            tp = time.perf_counter()
            results, host_rec = run_phase(be, spec, parts, k)
            dt = time.perf_counter() - tp
            bar.close()
            used = sum(r["host_used"] for r in results)
            if used > spec["host_memory"] and not spec["host"].get("overcommit"):
                raise BatchMMUError(f"host.memory={spec['host_memory']}: the VMs use {used} bytes of host memory "
                                    f"after phase {name!r}; give the host more memory", field="host.memory",
                                    value=spec["host_memory"])
            for part, r in zip(parts, results, strict=True):
                stats[part] = r["stats"]
            events = sum(r["events"] for r in results)
            rec = {"name": name, "op": ph["op"], "seconds": round(dt, 6),
                   "worker_seconds": [round(r["seconds"], 6) for r in results], "events": events,
                   "events_per_s": round(events / dt) if dt > 0 and events else 0}
            if "iteration" in ph:
                rec["iteration"] = ph["iteration"]
            if ph["op"] in COLLECT_OPS:
                rec["dirty_pages"] = 0
            for r in results:
                for key, v in r["extra"].items():
                    rec[key] = rec.get(key, 0) + v
            rec["stats"] = {n: int(stats[:, i].sum()) for i, n in enumerate(STAT_NAMES)}
            rec.update(host_rec)
            phases.append(rec)
            say(_phase_line(rec))
            for line in hostops.report_lines(rec) + guestos.report_lines(rec):
                say(line)
        for line in _iteration_totals(phases) + hostops.closing_lines(phases):
            say(line)
        fps = be.footprints()
    finally:
        be.close()
    footprint = {k: sum(f[k] for f in fps) for k in fps[0]}
    totals = {n: int(stats[:, i].sum()) for i, n in enumerate(STAT_NAMES)}
    per_vm = {n: stats[:, i].tolist() for i, n in enumerate(STAT_NAMES)}
    params = dict(spec["params"])
    # the run seed (--seed); a scenario parameter named "seed" (memstress's guest seed) keeps its name
    params["run_seed" if "seed" in spec["params"] else "seed"] = seed
    return Report(spec["name"], params, totals, per_vm, phases, footprint)


def _ts(sec):
    """A duration the way the selftests print one (``%ld.%.9lds``)."""
    ns = int(round(sec * 1e9))
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


_LINE_STATS = ("pf_fixed", "pf_fast", "pages_4k", "pages_2m", "pages_1g")


def _phase_line(rec):
    line = f"  {rec['name'] + ' time:':<36} {_ts(rec['seconds'])}"
    if rec["events"]:
        line += f"  {rec['events']:>12,} events"
        if rec["seconds"] > 0:
            line += f" {rec['events'] / rec['seconds'] / 1e6:8.2f} M/s"
    for key in ("dirty_pages", "cleared_pages", "ring_entries", "ring_full_exits", "writes"):
        if key in rec:
            line += f"  {key}={rec[key]:,}"
    line += "  [" + " ".join(f"{k}={rec['stats'][k]:,}" for k in _LINE_STATS) + "]"
    return line


def _iteration_totals(phases):
    """dirty_log_perf_test's closing lines: GET / CLEAR time over the iterations."""
    out = []
    for op, what in (("get_dirty_log", "Get dirty log"), ("clear_dirty_log", "Clear dirty log"),
                     ("harvest_dirty_ring", "Harvest dirty ring")):
        recs = [p for p in phases if p["op"] == op and "iteration" in p]
        if recs:
            n = len({p["iteration"] for p in recs})
            tot = sum(p["seconds"] for p in recs)
            out.append(f"  {what} over {n} iterations took {_ts(tot)}. (Avg {_ts(tot / n)}/iteration)")
    return out


def summary(report):
    """Human-readable summary of a Report."""
    lines = [f"scenario {report.scenario}  params: " + ", ".join(f"{k}={v}" for k, v in report.params.items())]
    lines.append(f"{'stat':<26}{'total':>16}{'per VM (mean)':>16}")
    nvm = max(1, len(next(iter(report.per_vm.values()), [])))
    for k in STAT_NAMES:
        v = report.totals.get(k, 0)
        if v:
            kind = " (gauge)" if k in GAUGE_STATS else ""
            lines.append(f"{k + kind:<26}{v:>16,}{v / nvm:>16,.1f}")
    lines.append("footprint: " + ", ".join(f"{k}={format_size(v)}" for k, v in report.footprint.items() if v))
    return "\n".join(lines)
