"""Scenario files (TOML) and the runner behind ``batchmmu run``.

A scenario names its parameters in ``[params]`` (overridable with ``--set name=value``);
any other value written as ``"${name}"`` takes the parameter's value.  Sections:

``[host]``         Host(...) keyword arguments (``memory`` may be ``"auto"``: what the VMs need).
``[[vm_group]]``   create_vms(...) arguments: count, memory (slot 0 at gpa 0), vcpus, tdp_format,
                   tdp_levels, maxphyaddr, backing, ept_ad.
``[workload]``     the access stream each vCPU runs: ``pattern`` sequential | random, ``bytes_per_vcpu``,
                   ``region`` "top" (memstress: a test memslot at the top of guest physical memory)
                   or "slot0", ``slot_backing``, ``write_percent``, ``stride``.
``[[phase]]``      ``name`` and ``op``: ``access`` (``passes`` over every vCPU's pages),
                   ``dirty_log`` (``enable = true|false`` on the test slot), ``get_dirty_log``.
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

from .constants import ACC_WRITE, MEM_LOG_DIRTY_PAGES
from .errors import BatchMMUError
from .host import Host
from .kernels.state import GAUGE_STATS, STAT_NAMES
from .units import format_size, parse_size

TEST_SLOT = 1
CHUNK_EVENTS = 1 << 22
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
    "host": {"memory", "backing", "mmio_caching", "nx_huge_pages", "tdp_huge_page_level"},
    "vm_group": {"count", "memory", "vcpus", "mmu", "tdp_format", "tdp_levels", "maxphyaddr", "backing",
                 "ept_ad"},
    "workload": {"pattern", "bytes_per_vcpu", "region", "slot_backing", "write_percent", "stride"},
    "phase": {"name", "op", "passes", "enable"},
}


def _check_keys(section, d, text, origin):
    if not isinstance(d, dict):
        raise BatchMMUError(f"{origin}: [{section}] must be a table", field=section, value=d)
    for k in d:
        if k not in _KNOWN[section]:
            line = _find_line(text, k)
            at = f" (line {line})" if line else ""
            raise BatchMMUError(f"{origin}{at}: unknown key {section}.{k}; known: {', '.join(sorted(_KNOWN[section]))}",
                                field=f"{section}.{k}", value=d[k])


# ----------------------------------------------------------------------------- running
class _Run:
    def __init__(self, spec, text, origin, seed, quiet, progress):
        self.origin, self.text = origin, text
        self.params = spec.get("params", {})
        r = _resolve({k: v for k, v in spec.items() if k != "params"}, self.params, "scenario")
        for sec in ("host", "workload"):
            _check_keys(sec, r.get(sec, {}), text, origin)
        groups = r.get("vm_group", [])
        if isinstance(groups, dict):
            groups = [groups]
        if not groups:
            raise BatchMMUError(f"{origin}: needs at least one [[vm_group]]", field="vm_group", value=None)
        for g in groups:
            _check_keys("vm_group", g, text, origin)
        phases = r.get("phase", [])
        if not phases:
            raise BatchMMUError(f"{origin}: needs at least one [[phase]]", field="phase", value=None)
        for ph in phases:
            _check_keys("phase", ph, text, origin)
        self.name = r.get("name", Path(origin).stem)
        self.host_kw, self.wl = dict(r.get("host", {})), dict(r.get("workload", {}))
        self.groups, self.phases = groups, phases
        self.rng = np.random.default_rng(seed)
        self.quiet, self.progress = quiet, progress

    def log(self, msg):
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def build(self):
        wl = self.wl
        self.bpv = parse_size(wl.get("bytes_per_vcpu", "1MiB"), "workload.bytes_per_vcpu")
        self.stride = parse_size(wl.get("stride", 4096), "workload.stride")
        if self.bpv <= 0 or self.bpv % 4096 or self.stride <= 0 or self.stride % 4096:
            raise BatchMMUError("workload.bytes_per_vcpu and workload.stride must be positive multiples of 4096",
                                field="workload.bytes_per_vcpu", value=self.bpv)
        self.region = wl.get("region", "top")
        if self.region not in ("top", "slot0"):
            raise BatchMMUError(f"workload.region={self.region!r}: use 'top' or 'slot0'", field="workload.region",
                                value=self.region)
        self.pattern = wl.get("pattern", "sequential")
        if self.pattern not in ("sequential", "random"):
            raise BatchMMUError(f"workload.pattern={self.pattern!r}: use 'sequential' or 'random'",
                                field="workload.pattern", value=self.pattern)
        wp = wl.get("write_percent", 100)
        if not isinstance(wp, int) or not 0 <= wp <= 100:
            raise BatchMMUError(f"workload.write_percent={wp!r}: must be an integer 0..100",
                                field="workload.write_percent", value=wp)
        self.write_percent = wp
        kw = dict(self.host_kw)
        need = 0
        for g in self.groups:
            per_vm = g.get("vcpus", 1) * self.bpv
            slot0 = parse_size(g.get("memory", "2MiB"), "vm_group.memory")
            need += int(g.get("count", 1)) * (per_vm + (slot0 if self.region == "top" else 0))
        if kw.get("memory", "auto") == "auto":
            kw["memory"] = max(need, 1 << 30)
        self.host = Host(**kw)
        self.vm_vcpus = []
        self.test_base = []   # per VM: gpa of the test region
        for g in self.groups:
            g = dict(g)
            count = g.pop("count", 1)
            vcpus = g.get("vcpus", 1)
            if self.region == "slot0":
                g["memory"] = max(parse_size(g.get("memory", 0), "vm_group.memory"), vcpus * self.bpv)
            vms = self.host.create_vms(count, **g)
            size = vcpus * self.bpv
            for vm in vms:
                vm = int(vm)
                if self.region == "top":
                    # memstress: test memory at the top of guest physical memory, aligned to the backing
                    maxphy = g.get("maxphyaddr", 46)
                    backing = wl.get("slot_backing", g.get("backing", self.host_kw.get("backing", "thp")))
                    align = {"hugetlb-1g": 1 << 30}.get(backing, 1 << 21)
                    gpa = ((1 << maxphy) - size) & ~(align - 1)
                    self.host.set_memslot(vm, TEST_SLOT, gpa, size, backing=backing)
                else:
                    gpa = 0
                self.vm_vcpus.append(vcpus)
                self.test_base.append(gpa)
        self.nvm = self.host.nvm

    def _events(self, chunk_pages, pass_no):
        """Yield (vm, vcpu, addr, kind) arrays: every vCPU touches its own partition once."""
        pages = self.bpv // self.stride
        vm_ids, vcpu_ids, bases = [], [], []
        for vm in range(self.nvm):
            for c in range(self.vm_vcpus[vm]):
                vm_ids.append(vm)
                vcpu_ids.append(c)
                bases.append(self.test_base[vm] + c * self.bpv)
        vm_ids, vcpu_ids, bases = (np.array(x, np.int64) for x in (vm_ids, vcpu_ids, bases))
        nthreads = vm_ids.size
        if self.pattern == "random":
            order = np.stack([self.rng.permutation(pages) for _ in range(nthreads)])
        else:
            order = None
        step = max(1, chunk_pages // max(1, nthreads))
        for p0 in range(0, pages, step):
            p1 = min(pages, p0 + step)
            idx = np.arange(p0, p1, dtype=np.int64) if order is None else order[:, p0:p1]
            if order is None:
                offs = np.broadcast_to(idx, (nthreads, p1 - p0))
            else:
                offs = idx
            # round-robin over vCPUs (threads run concurrently; partitions are disjoint)
            addr = (bases[:, None] + offs * self.stride).T.ravel()
            vm = np.broadcast_to(vm_ids, (p1 - p0, nthreads)).ravel()
            vc = np.broadcast_to(vcpu_ids, (p1 - p0, nthreads)).ravel()
            if self.write_percent >= 100:
                kind = np.full(addr.size, ACC_WRITE, np.int64)
            elif self.write_percent <= 0:
                kind = np.zeros(addr.size, np.int64)
            else:
                kind = np.where(self.rng.integers(0, 100, addr.size) < self.write_percent, ACC_WRITE, 0)
            yield vm, vc, addr, kind

    def run_phase(self, ph):
        op = ph.get("op", "access")
        name = ph.get("name", op)
        t0 = time.perf_counter()
        events = 0
        extra = {}
        if op == "access":
            passes = int(ph.get("passes", 1))
            total = passes * sum(self.vm_vcpus) * (self.bpv // self.stride)
            bar = _Progress(name, total, self.progress and not self.quiet)
            for p in range(passes):
                for vm, vc, addr, kind in self._events(CHUNK_EVENTS, p):
                    self.host.access(vm, vc, addr, kind)
                    events += addr.size
                    bar.update(events)
            bar.close()
        elif op == "dirty_log":
            enable = bool(ph.get("enable", True))
            for vm in range(self.nvm):
                slot = TEST_SLOT if self.region == "top" else 0
                info = [m for m in self.host.memslots(vm) if m["slot"] == slot][0]
                flags = (info["flags"] | MEM_LOG_DIRTY_PAGES) if enable else (info["flags"] & ~MEM_LOG_DIRTY_PAGES)
                self.host.set_memslot(vm, slot, info["gpa"], info["size"], flags)
        elif op == "get_dirty_log":
            dirty = 0
            for vm in range(self.nvm):
                bm = self.host.get_dirty_log(vm, TEST_SLOT if self.region == "top" else 0)
                dirty += int(np.unpackbits(bm.view(np.uint8)).sum())
            extra["dirty_pages"] = dirty
        else:
            raise BatchMMUError(f"phase.op={op!r}: use access, dirty_log or get_dirty_log", field="phase.op",
                                value=op)
        dt = time.perf_counter() - t0
        totals = {k: int(v.sum()) for k, v in self.host.stats().items()}
        rec = {"name": name, "op": op, "seconds": round(dt, 6), "events": events,
               "events_per_s": round(events / dt) if dt > 0 and events else 0, **extra, "stats": totals}
        self.log(f"  phase {name:<14} {dt:8.3f} s  {events:>12,} events"
                 + (f"  {events / dt / 1e6:8.2f} M/s" if events and dt > 0 else ""))
        return rec


class _Progress:
    def __init__(self, name, total, enabled):
        self.name, self.total = name, max(1, total)
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, done):
        if not self.enabled:
            return
        frac = min(1.0, done / self.total)
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        bar = "#" * int(30 * frac)
        print(f"\r  {self.name:<14} [{bar:<30}] {100 * frac:5.1f}%  {rate / 1e6:7.2f} M ev/s", end="",
              file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print("\r" + " " * 80 + "\r", end="", file=sys.stderr, flush=True)


def run_scenario(scenario, workers=1, backend="serial", seed=0, sets=(), quiet=True, progress=False):
    """Run a scenario (bundled name, path, or an already-parsed dict) and return a Report."""
    if backend != "serial" or workers != 1:
        raise BatchMMUError(f"backend={backend!r} workers={workers!r}: only the serial backend with one worker "
                            "exists so far", field="backend", value=backend)
    if isinstance(scenario, dict):
        data, text, origin = scenario, "", "<dict>"
    else:
        data, text, origin = load_scenario(scenario)
    data = apply_overrides(data, sets)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BatchMMUError(f"seed={seed!r}: must be an integer", field="seed", value=seed)
    run = _Run(data, text, origin, seed, quiet, progress)
    t0 = time.perf_counter()
    run.build()
    run.log(f"{run.name}: {run.nvm} VMs, {sum(run.vm_vcpus)} vCPUs, {format_size(run.bpv)} per vCPU "
            f"(setup {time.perf_counter() - t0:.2f} s)")
    phases = [run.run_phase(ph) for ph in run.phases]
    stats = run.host.stats()
    totals = {k: int(v.sum()) for k, v in stats.items()}
    per_vm = {k: v.tolist() for k, v in stats.items()}
    params = dict(run.params)
    params["seed"] = seed
    return Report(run.name, params, totals, per_vm, phases, run.host.footprint())


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
