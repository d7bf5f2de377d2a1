"""Scenario files (TOML): loading, ``--set`` overrides, checks and resolution, without loading a kernel.

A scenario names its parameters in ``[params]`` (overridable with ``--set name=value``);
any other value written as ``"${name}"`` takes the parameter's value.  Sections:

``[host]``         Host(...) keyword arguments (``memory`` may be ``"auto"``: what the VMs need).
``[[vm_group]]``   create_vms(...) arguments: count, memory (slot 0 at gpa 0), vcpus, mmu, tdp_format,
                   tdp_levels, maxphyaddr, backing, ept_ad, tdp_mmu (false: the legacy TDP MMU; the
                   default is ``[host] tdp_mmu``, true unless set), nested (true: VMX or SVM for the guest;
                   with ``l2 = "identity"``, the default, every vCPU runs an L2 guest under nested EPT that L1
                   maps 1:1 with 1G pages, as memstress ``-n`` does; with ``l2 = "none"`` L1 runs and the
                   nested ops, batchmmu/nestedops.py, enter L2 themselves).
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
                  batchmmu.migrate (on simulated time: ``--time``): ``dirty_rate`` (``seconds``: the window,
                  ``sample_pages_per_gib``, ``guest_ns``), ``migrate`` (``bandwidth``, ``max_downtime``,
                  ``max_iterations``, ``auto_converge``, ``throttle_after`` / ``throttle_initial`` /
                  ``throttle_step`` / ``throttle_max``, ``clear_chunk``, ``guest_ns``);
                   ``when`` / ``unless`` (a value, usually ``"${param}"``) keep or drop a phase;
                   ``repeat = N`` (or ``iterations = N``) with sub-phases ``[[phase.phase]]`` runs them N
                   times; ``{i}`` in their names is the iteration (1..N);
                   ``guest_os`` (batchmmu.guestos: ``stage`` boot | run | exit, ``slices``, ``forks``; the guest
                   OS's settings in a ``[guest_os]`` section; prints the shadow/TDP comparison).
"""

import copy
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from . import guestos, hostops, migrate, nestedops, trace
from .errors import BatchMMUError
from .memstress import GUEST_RANDOM_SEED
from .units import format_size, parse_size

_VAR = re.compile(r"^\$\{(\w+)\}$")


# ----------------------------------------------------------------------------- loading
def list_scenarios():
    """Bundled scenarios: list of (name, description)."""
    out = []
    for f in sorted(resources.files("batchmmu.scenarios").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".toml"):
            data = tomllib.loads(f.read_text())
            out.append((f.name[:-5], data.get("description", "")))
    return out


def _find_line(text, key, section=False):
    """Line number of ``key = ...`` (or of the ``[key]`` / ``[[key]]`` header) in ``text``."""
    pat = rf"\s*(\[\[?\s*{re.escape(key)}\s*\]\]?|{re.escape(key)}\s*=)" if section else rf"\s*{re.escape(key)}\s*="
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(pat, line):
            return i
    return None


def load_scenario(name_or_path):
    """Parse a bundled scenario (by name) or a TOML file.  Returns (dict, source text, origin)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or "/" in str(name_or_path):
        if p.is_dir():
            raise BatchMMUError(f"scenario={name_or_path!r}: is a directory; name a scenario TOML file or a "
                                "bundled scenario (batchmmu list)", field="scenario", value=name_or_path)
        try:
            text, origin = p.read_text(), str(p)
        except (OSError, UnicodeDecodeError) as e:
            why = "no such file" if isinstance(e, FileNotFoundError) else f"cannot read it ({e})"
            raise BatchMMUError(f"scenario={name_or_path!r}: {why}", field="scenario", value=name_or_path) from None
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
    bad = [k for k in data if k not in SECTIONS]
    if bad:
        line = _find_line(text, bad[0], section=True)
        at = f" (line {line})" if line else ""
        raise BatchMMUError(f"{origin}{at}: unknown section or key {bad[0]!r}; known: {', '.join(SECTIONS)}",
                            field=bad[0], value=data[bad[0]])
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


def split_set(s):
    """``KEY=VALUE`` of one ``--set`` -> (key, typed value)."""
    if not isinstance(s, str) or "=" not in s:
        raise BatchMMUError(f"--set {s!r}: expected name=value", field="set", value=s)
    key, value = s.split("=", 1)
    return key.strip(), _coerce(value.strip())


def apply_overrides(data, sets, seed=None):
    """``name=value`` sets a [params] entry; ``section.key=value`` sets a key of that section (of every
    table of an array section such as [[vm_group]]).  ``seed`` is a parameter of every scenario (its
    default 0 where [params] has none); ``seed`` given here is ``--seed``, the same as ``--set seed=``."""
    data = copy.deepcopy(data)
    params = data.setdefault("params", {})
    given = {}
    for s in sets:
        key, value = split_set(s)
        if "." in key:
            sec, k = key.split(".", 1)
            target = data.get(sec)
            if sec not in _KNOWN or target is None:
                have = [x for x in _KNOWN if x in data]
                raise BatchMMUError(f"--set {s!r}: no section [{sec}] in this scenario (it has {', '.join(have)})",
                                    field="set", value=s)
            if k not in _KNOWN[sec]:
                raise BatchMMUError(f"--set {s!r}: unknown key {sec}.{k}; known: {', '.join(sorted(_KNOWN[sec]))}",
                                    field="set", value=s)
            for t in (target if isinstance(target, list) else [target]):
                t[k] = value
        else:
            if key not in params and key != "seed":
                raise BatchMMUError(f"--set {s!r}: unknown parameter {key!r} (known: {', '.join(params)}, seed)",
                                    field="set", value=s)
            params[key] = given[key] = value
    if seed is not None:
        if "seed" in given and given["seed"] != seed:
            raise BatchMMUError(f"--seed {seed} and --set seed={given['seed']}: give the seed once", field="seed",
                                value=seed)
        params["seed"] = seed
    return data


def _resolve(obj, params, where, used=None):
    """Substitute ``"${name}"`` values; ``used`` collects {field: parameter name} of every substitution."""
    if isinstance(obj, dict):
        return {k: _resolve(v, params, f"{where}.{k}" if where else k, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, params, where, used) for v in obj]
    if isinstance(obj, str):
        m = _VAR.match(obj)
        if m:
            if m.group(1) not in params:
                raise BatchMMUError(f"{where}={obj!r}: unknown parameter {m.group(1)!r}", field=where, value=obj)
            if used is not None:
                used.setdefault(where, m.group(1))
            return params[m.group(1)]
    return obj


SECTIONS = ("name", "description", "params", "host", "vm_group", "workload", "phase", "guest_os")
_KNOWN = {
    "host": {"memory", "backing", "mmio_caching", "nx_huge_pages", "tdp_huge_page_level", "eager_page_split",
             "pml", "nx_huge_pages_recovery_ratio", "nx_huge_pages_recovery_period_ms", "overcommit", "watermarks",
             "tdp_mmu", "huge_page_split_on_fault"},
    "vm_group": {"count", "memory", "vcpus", "mmu", "tdp_format", "tdp_levels", "maxphyaddr", "backing",
                 "ept_ad", "tdp_mmu", "nested", "l2"},
    "workload": {"pattern", "bytes_per_vcpu", "region", "region_bytes", "region_pages", "slots", "slot_backing",
                 "write_percent", "stride", "seed", "random_access", "overlap", "manual_protect", "initially_set",
                 "dirty_ring", "verify"} | trace.KEYS,
    "phase": {"name", "op", "passes", "enable", "when", "unless", "repeat", "iterations", "phase",
              "write_percent", "random_access", "writes", "stage", "kind", "offsets", "seconds", "epochs",
              "groups"} | hostops.KEYS | guestos.PHASE_KEYS | migrate.KEYS,
    "guest_os": set(guestos.DEFAULTS),
}

OPS = ("access", "populate", "dirty_pass", "random_writes", "kvm_page_table", "dirty_log", "enable_logging",
       "disable_logging", "get_dirty_log", "clear_dirty_log", "harvest_dirty_ring", "collect_dirty_log", "stats",
       "touch", "mark_idle", "check_idle", "advance_time") + hostops.OPS + guestos.OPS + migrate.OPS + nestedops.OPS
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
        if op in migrate.OPS:
            migrate.check(ph)
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
_BACKINGS = ("4k", "thp", "hugetlb-2m", "hugetlb-1g")   # kernels/state.py BACKING_NAMES (checked by a test)
_HUGETLB = {"hugetlb-2m": 2 << 20, "hugetlb-1g": 1 << 30}
_GROUP_CHOICES = {"mmu": ("tdp", "shadow"), "tdp_format": ("ept", "npt"), "tdp_levels": (4, 5),
                  "backing": _BACKINGS, "l2": ("identity", "none")}


def _check_group(g):
    """The create_vms arguments of a [[vm_group]] that can be checked without a Host."""
    _int(g.get("count", 1), "vm_group.count", 1)
    _int(g.get("vcpus", 1), "vm_group.vcpus", 1, 4096)
    if "memory" in g:
        m = parse_size(g["memory"], "vm_group.memory")
        if m <= 0 or m % 4096:
            raise BatchMMUError(f"vm_group.memory={g['memory']!r}: must be a positive multiple of 4096",
                                field="vm_group.memory", value=g["memory"])
    for k in ("tdp_mmu", "ept_ad", "nested"):
        if k in g and not isinstance(g[k], bool):
            raise BatchMMUError(f"vm_group.{k}={g[k]!r}: use true or false", field=f"vm_group.{k}", value=g[k])
    for k, choices in _GROUP_CHOICES.items():
        if k in g and (isinstance(g[k], bool) or g[k] not in choices):
            raise BatchMMUError(f"vm_group.{k}={g[k]!r}: use one of {', '.join(map(str, choices))}",
                                field=f"vm_group.{k}", value=g[k])


def resolve(data, text="", origin="<dict>", used=None):
    """Check a parsed scenario and resolve it into the plain spec every shard runs.  ``used`` (a dict)
    receives {field: parameter} for every value that came from a ``"${parameter}"``."""
    params = data.get("params", {})
    r = _resolve({k: v for k, v in data.items() if k != "params"}, params, "", used)
    for sec in ("host", "workload", "guest_os"):
        _check_keys(sec, r.get(sec, {}), text, origin)
    groups = r.get("vm_group", [])
    if isinstance(groups, dict):
        groups = [groups]
    if not groups:
        raise BatchMMUError(f"{origin}: needs at least one [[vm_group]]", field="vm_group", value=None)
    for g in groups:
        _check_keys("vm_group", g, text, origin)
        _check_group(g)
        if g.get("nested") and group_mmu(r, g) == "shadow":
            raise BatchMMUError("vm_group.nested=true: KVM offers nested EPT/NPT only on a TDP host (mmu = \"tdp\")",
                                field="vm_group.nested", value=True)
        if g.get("nested") and g.get("l2", "identity") == "identity" and g.get("tdp_format", "ept") != "ept":
            raise BatchMMUError("vm_group.nested=true with l2=\"identity\" (memstress -n): an L2 on an identity "
                                "EPT12, so an EPT VM; an NPT VM takes l2=\"none\"", field="vm_group.l2",
                                value="identity")
        if "l2" in g and not g.get("nested"):
            raise BatchMMUError(f"vm_group.l2={g['l2']!r}: only for nested = true", field="vm_group.l2", value=g["l2"])
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
    if pattern not in ("sequential", "random", "memstress", "trace"):
        raise BatchMMUError(f"workload.pattern={pattern!r}: use 'sequential', 'random', 'memstress' or 'trace'",
                            field="workload.pattern", value=pattern)
    tr = trace.resolve(wl, groups, r.get("host", {})) if pattern == "trace" else None  # batchmmu/trace.py
    rbytes = tr["region_bytes"] if tr else rbytes
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
    for sec, d in (("host", host), ("workload", wl)):
        key = "backing" if sec == "host" else "slot_backing"
        if key in d and d[key] not in _BACKINGS:
            raise BatchMMUError(f"{sec}.{key}={d[key]!r}: use one of {', '.join(_BACKINGS)}", field=f"{sec}.{key}",
                                value=d[key])
    for g in groups:   # hugetlb memslots are whole huge pages (the Host refuses others, after the compile)
        backing = wl.get("slot_backing", g.get("backing", host.get("backing", "thp")))
        per = region_bytes(mem_spec, g) // slots
        if region == "top" and per % _HUGETLB.get(backing, 1):
            field = "workload.slot_backing" if "slot_backing" in wl else "vm_group.backing" if "backing" in g \
                else "host.backing"
            raise BatchMMUError(f"{field}={backing!r}: each test memslot ({format_size(per)}) must be a whole "
                                f"number of {format_size(_HUGETLB[backing])} pages; raise the test region "
                                "(bytes_per_vcpu)", field=field, value=backing)
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
            "verify": verify, "guest_os": guestos.resolve(r.get("guest_os", {})), "trace": tr}



# ----------------------------------------------------------------------------- preparing a run
class Prepared(NamedTuple):
    """A scenario checked and resolved for a run, before anything is built or compiled."""
    data: dict          # the parsed scenario after the overrides
    text: str           # its TOML source ("" for a dict)
    origin: str         # "bundled:NAME", a path, or "<dict>"
    spec: dict          # what every shard runs (resolve())
    seed: int           # the run's seed (parameter ``seed``)
    used: dict          # {field: parameter} of every "${parameter}" value
    overrides: list     # the ``section.key=value`` overrides given


def _int_text(v):
    """An integer given as text (``--set seed=0x10``), else ``v`` unchanged."""
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            return v
    return v


def _name_parameter(e, used, params):
    """An error about a field that came from a parameter, reworded to name the parameter the user typed."""
    p = used.get(e.field)
    if p is None or p not in params:
        return e
    msg = str(e)
    rest = msg.split(": ", 1)[1] if msg.startswith(f"{e.field}=") and ": " in msg else msg
    return type(e)(f"{p}={params[p]!r}: {rest} (it sets {e.field})", field=p, value=params[p], errno=e.errno)


def prepare(scenario, sets=(), seed=None):
    """Load, override and resolve a scenario (bundled name, TOML path or parsed dict); raise
    BatchMMUError naming what the user typed.  Nothing is built and no kernel is loaded.

    The seed story: ``seed`` is a parameter of every scenario (default 0 unless its [params] gives one);
    ``seed=`` here is ``--seed``, the same as ``--set seed=``.  It seeds random access orders (per seed, VM,
    vCPU and pass) and the guest-OS model; the memstress guest's LCG (vCPU i starts at seed + i) takes it
    through ``workload.seed = "${seed}"`` (without one: the selftests' 0x6b8b4567)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BatchMMUError(f"seed={seed!r}: must be an integer", field="seed", value=seed)
    if isinstance(scenario, dict):
        data, text, origin = scenario, "", "<dict>"
    else:
        data, text, origin = load_scenario(scenario)
    keys = [split_set(s)[0] for s in sets]
    data = apply_overrides(data, sets, seed)
    params = data["params"]
    if "seed" in params:
        params["seed"] = _int_text(params["seed"])
    run_seed = params.get("seed", 0)
    if isinstance(run_seed, bool) or not isinstance(run_seed, int) or run_seed < 0:
        raise BatchMMUError(f"seed={run_seed!r}: must be a non-negative integer", field="seed", value=run_seed)
    used = {}
    try:
        spec = resolve(data, text, origin, used)
    except BatchMMUError as e:
        raise _name_parameter(e, used, params) from None
    overrides = [s for s, k in zip(sets, keys, strict=True) if "." in k]
    return Prepared(data, text, origin, spec, run_seed, used, overrides)


def group_mmu(spec, g):
    """The MMU that builds a [[vm_group]]'s tables: "tdp", "legacy" (kvm.tdp_mmu=N) or "shadow"."""
    if g.get("mmu", "tdp") == "shadow":
        return "shadow"
    return "tdp" if g.get("tdp_mmu", spec.get("host", {}).get("tdp_mmu", True)) is not False else "legacy"


def group_labels(spec):
    """One label per [[vm_group]]: its MMU ("tdp", "legacy", "shadow"), numbered where two groups share one."""
    mmus = [group_mmu(spec, g) for g in spec["groups"]]
    return [m if mmus.count(m) == 1 else f"{m}{i}" for i, m in enumerate(mmus)]


def vm_groups(spec):
    """The VM groups of a run: label, first global VM id, count, and what their VMs are."""
    out, first = [], 0
    for g, label in zip(spec["groups"], group_labels(spec), strict=True):
        n = int(g.get("count", 1))
        out.append({"label": label, "first": first, "count": n, "mmu": g.get("mmu", "tdp"),
                    "vcpus": int(g.get("vcpus", 1)),
                    **{k: v for k, v in g.items() if k not in ("count", "vcpus", "mmu")}})
        first += n
    return out


def region_label(spec):
    """What each VM's guest touches, in words (the header of a run)."""
    if spec["region_bytes"]:
        return f"{format_size(spec['region_bytes'])} test region per VM"
    if spec["region"] == "slot0" and not any(ph["op"] in _ACCESS_OPS for ph in spec["phases"]):
        return "no memstress test region"
    return f"{format_size(spec['bpv'])} per vCPU"


_ACCESS_OPS = ("access", "populate", "dirty_pass", "random_writes", "kvm_page_table")


def resolved_view(prep):
    """Every parameter and section after the overrides (gem5's config.ini): what the run ran."""
    sp = prep.spec
    wl = {"pattern": sp["pattern"], "bytes_per_vcpu": sp["bpv"], "stride": sp["stride"], "region": sp["region"],
          "region_bytes": sp["region_bytes"], "slots": sp["slots"], "write_percent": sp["write_percent"],
          "seed": sp["seed"], "random_access": sp["random_access"], "overlap": sp["overlap"],
          "manual_protect": sp["manual_protect"], "initially_set": sp["initially_set"],
          "dirty_ring": sp["dirty_ring"], "verify": sp["verify"]}
    wl.update({k: v for k, v in sp["workload"].items() if k not in wl and k != "region_pages"})
    out = {"name": sp["name"], "origin": prep.origin, "seed": prep.seed, "params": dict(sp["params"]),
           "host": dict(sp["host"], memory=sp["host_memory"]),
           "vm_group": [dict(g, count=int(g.get("count", 1)), vcpus=int(g.get("vcpus", 1))) for g in sp["groups"]],
           "workload": wl, "phase": [dict(ph) for ph in sp["phases"]]}
    if "guest_os" in prep.data or any(ph["op"] in guestos.OPS for ph in sp["phases"]):
        out["guest_os"] = dict(sp["guest_os"])
    if prep.overrides:
        out["overrides"] = list(prep.overrides)
        out["params_replaced"] = shadowed_params(prep)   # parameters an override took out of a section
    return out


def _comment(rest):
    """The ``# comment`` of the rest of a TOML line (not a # inside a string)."""
    quote = None
    for i, c in enumerate(rest):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#":
            return rest[i + 1:].strip()
    return ""


def param_docs(text):
    """{parameter: its one-line doc}: the comments on the [params] lines of a scenario's TOML."""
    out, inside = {}, False
    for line in text.splitlines():
        st = line.strip()
        if st.startswith("["):
            inside = st == "[params]"
        elif inside and (m := re.match(r"(\w+)\s*=\s*(.*)$", st)):
            out[m.group(1)] = _comment(m.group(2))
    return out


def shadowed_params(prep):
    """{parameter: [section overrides]}: parameters that no longer reach a key a ``section.key=``
    override replaced (``--set vm_group.vcpus=1`` shadows ``vcpus`` there)."""
    if prep.origin == "<dict>" or not prep.overrides:
        return {}
    raw = load_scenario(prep.origin.removeprefix("bundled:"))[0]
    out = {}
    for s in prep.overrides:
        key, _ = split_set(s)
        sec, k = key.split(".", 1)
        tables = raw.get(sec, [])
        for t in tables if isinstance(tables, list) else [tables]:
            m = _VAR.match(str(t.get(k, "")))
            if m and s not in out.setdefault(m.group(1), []):
                out[m.group(1)].append(s)
    return out
