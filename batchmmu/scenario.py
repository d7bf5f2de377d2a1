"""The runner behind ``batchmmu run``: a scenario (``batchmmu.spec``; the file format is in
docs/scenarios.md) on shards of VMs, phase by phase, into a Report that says exactly what ran."""

import json
import os
import platform
import re
import sys
import time as _clock
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np

from . import guestos, hostops, migrate, nestedops, warm
from .errors import BatchMMUError, HostMemoryExhausted
from .kernels.state import GAUGE_STATS, STAT_NAMES
from .progress import PhaseProgress
from .spec import (  # noqa: F401 - the scenario API, re-exported
    COLLECT_OPS,
    OPS,
    VERIFY_MODES,
    Prepared,
    apply_overrides,
    list_scenarios,
    load_scenario,
    param_docs,
    prepare,
    region_bytes,
    region_label,
    resolve,
    resolved_view,
    truthy,
    vm_groups,
)
from .timemodel import cost_model_arg, merge, phase_record, timed_kernels_cold
from .units import format_size

# phase-record keys that every shard reports alike (a count per VM or per host, not a sum over shards)
SHARED_EXTRAS = ("memslot_ops", "nx_recovery_passes")
LEGEND = {"phases.stats": "cumulative: every statistic after the phase (since the VMs were created)",
          "phases.delta": "the change during the phase (for a gauge, the change of its level)",
          "gauges": sorted(GAUGE_STATS)}


class Report(NamedTuple):
    """The result of a run: what ``--json`` writes."""
    scenario: str
    params: dict
    resolved: dict
    provenance: dict
    totals: dict
    per_vm: dict
    vm_groups: list
    phases: list
    footprint: dict
    legend: dict = LEGEND

    def to_json(self):
        return json.dumps(self._asdict(), indent=1)

    def to_dataframe(self, kind="per_vm"):
        """A pandas DataFrame (extra ``batchmmu[analysis]``): ``per_vm`` (a row per VM, with its group) or
        ``phases`` (a row per phase, cumulative and ``delta_`` columns)."""
        from .report import to_dataframe
        return to_dataframe(self._asdict(), kind)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``partial`` is the Report of the phases that finished (or None)."""

    def __init__(self, partial, phases_total):
        super().__init__()
        self.partial, self.phases_total = partial, phases_total


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
    """Refuse a run whose arenas would not fit in this machine's memory, saying what it needs (O(VM groups))."""
    from .shard import estimate_groups, vm_count
    need = estimate_groups(spec, len(parts))
    if backend != "serial":
        need += len(parts) * (200 << 20)  # a Python interpreter with numpy and numba per worker
    refuse_memory(need, vm_count(spec))
    return need


def refuse_memory(need, nvm):
    """BatchMMUError when ``need`` bytes exceed what this machine has available."""
    have = available_memory()
    if have is not None and need > have:
        raise BatchMMUError(
            f"this run ({nvm:,} VMs) needs about {format_size(need)} of memory for its arenas but the machine has "
            f"{format_size(have)} available; use fewer or smaller VMs (--set vms=...), or run on a larger "
            "machine (--backend ray --ray-address ...)", field="memory", value=need)


def cpu_model():
    """This machine's CPU model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(seed, backend, workers, argv=None):
    """Who ran what where: versions, kernel source hash, command line, seed, backend, machine."""
    import numba

    from . import __version__
    from .kernels import SOURCE_HASH
    return {"version": __version__, "source_hash": SOURCE_HASH,
            "argv": list(sys.argv if argv is None else argv), "seed": seed, "backend": backend,
            "workers": workers, "python": platform.python_version(), "numba": numba.__version__,
            "numpy": np.__version__, "cpu": cpu_model(), "cores": os.cpu_count(),
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "wall_seconds": None}


def phase_work(spec, k):
    """(total, unit) of the work phase ``k`` does, for its progress bar (0: unknown)."""
    from .shard import total_events
    ph = spec["phases"][k]
    if ph["op"] == "memslot_perf":   # a step per memslot set up and per loop, in every VM
        cap = int(ph.get("slots", -1))
        nslots = (hostops.KVM_USER_MEM_SLOTS if cap == -1 else min(cap, hostops.KVM_USER_MEM_SLOTS)) - 1
        return sum(int(g.get("count", 1)) for g in spec["groups"]) * (nslots + int(ph.get("loops", 10))), \
            "slots + loops"
    return total_events(spec, k), "accesses"


def _merge_extras(rec, results):
    for r in results:
        for key, v in r["extra"].items():
            if isinstance(v, list):   # per-VM records: in VM order, whatever the shards
                rec[key] = sorted(rec.get(key, []) + v, key=lambda x: x["vm"])
            else:
                rec[key] = max(rec.get(key, 0), v) if key in SHARED_EXTRAS else rec.get(key, 0) + v


def _vector(stats):
    return {n: int(stats[:, i].sum()) for i, n in enumerate(STAT_NAMES)}


def _report(prep, stats, phases, footprint, prov, t0):
    spec = prep.spec
    prov = dict(prov, wall_seconds=round(_clock.perf_counter() - t0, 6))
    return Report(spec["name"], dict(spec["params"], seed=prep.seed), resolved_view(prep), prov,
                  _vector(stats), {n: stats[:, i].tolist() for i, n in enumerate(STAT_NAMES)}, vm_groups(spec),
                  phases, footprint)


def run_scenario(scenario, workers=1, backend="serial", seed=None, sets=(), quiet=True, progress=False,
                 ray_address=None, argv=None, time=None):
    """Run a scenario (bundled name, path, parsed dict, or a ``spec.prepare()`` result) on ``workers``
    shards; returns a Report.  ``seed`` is ``--seed`` (see ``spec.prepare``).  ``time``: the time model
    (True, a ``bm.CostModel`` or a cost-model TOML path; docs/time.md): every phase then has ``sim_seconds``.

    The same scenario and seed give identical totals, per-VM statistics and phase records (but for
    timings) for any worker count and backend.  Ctrl-C raises ``Interrupted`` with the finished phases.
    """
    from .backends import BACKENDS, RayBackend
    from .reclaim import run_phase
    from .shard import split
    if backend not in BACKENDS:
        raise BatchMMUError(f"backend={backend!r}: use serial, process or ray", field="backend", value=backend)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BatchMMUError(f"workers={workers!r}: must be a positive integer", field="workers", value=workers)
    prep = scenario if isinstance(scenario, Prepared) else prepare(scenario, sets, seed)
    cm = cost_model_arg(time)
    timed_ops = [ph["op"] for ph in prep.spec["phases"] if ph["op"] in migrate.OPS]
    if timed_ops and cm is None:
        raise BatchMMUError(f"phase.op={timed_ops[0]!r}: runs on simulated time: use --time (or time=True)",
                            field="phase.op", value=timed_ops[0])
    if cm is not None:
        prep = prep._replace(spec=dict(prep.spec, time={"values": cm.to_dict(), "source": cm.source}))
    spec = prep.spec
    parts = split(spec, workers)
    nvm = sum(len(p) for p in parts)
    if backend != "ray" or ray_address is None:
        check_memory(spec, parts, backend)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if not warm.READY:  # compile here, never inside a timed phase or in each process worker at once
        tw = _clock.perf_counter()
        warm.warmup()
        say(f"kernels ready in {_clock.perf_counter() - tw:.1f} s")
    if cm is not None and timed_kernels_cold():   # before any phase, and never in each process worker at once
        say("compiling the time model's kernels (first timed run only: up to a minute on 2 cores) ...")
        tw = _clock.perf_counter()
        warm.warmup(time_model=True)
        say(f"time model's kernels ready in {_clock.perf_counter() - tw:.1f} s")
    bar = PhaseProgress(not quiet and progress)
    t0 = _clock.perf_counter()
    prov = provenance(prep.seed, backend, len(parts), argv)
    if cm is not None:
        prov["cost_model"] = {"source": cm.source, "changed": repr(cm)}
    kw = {"address": ray_address} if backend == "ray" else {}
    stats = np.zeros((nvm, len(STAT_NAMES)), np.int64)
    phases = []
    be = None
    try:
        be = (RayBackend if backend == "ray" else BACKENDS[backend])(spec, prep.seed, parts, bar, **kw)
        say(f"{spec['name']}: {_vms_label(spec)} on {len(parts)} {backend} worker(s), {region_label(spec)} "
            f"(setup {_clock.perf_counter() - t0:.2f} s)")
        for k, ph in enumerate(spec["phases"]):
            name = ph["name"]
            bar.start(name, *phase_work(spec, k))
            tp = _clock.perf_counter()
            try:
                results, host_rec = run_phase(be, spec, parts, k)
            except HostMemoryExhausted as e:
                raise _out_of_memory(spec, name, e) from None
            finally:
                bar.close()
            dt = _clock.perf_counter() - tp
            used = sum(r["host_used"] for r in results)
            if used > spec["host_memory"] and not spec["host"].get("overcommit"):
                raise BatchMMUError(f"host.memory={spec['host_memory']}: the VMs use {used} bytes of host memory "
                                    f"after phase {name!r}; give the host more memory (--set host.memory=SIZE)",
                                    field="host.memory", value=spec["host_memory"])
            before = _vector(stats)
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
            _merge_extras(rec, results)
            if "sim" in results[0]:
                rec.update(phase_record(merge([r["sim"] for r in results], parts)))
            rec["stats"] = _vector(stats)
            rec["delta"] = {n: rec["stats"][n] - before[n] for n in STAT_NAMES}
            rec.update(host_rec)
            if "max_slots" in rec:
                rec["skipped"] = _memslot_skip_reason(rec)
            phases.append(rec)
            say(_phase_line(rec))
            for line in (hostops.report_lines(rec) + guestos.report_lines(rec) + migrate.report_lines(rec)
                         + nestedops.report_lines(rec)):
                say(line)
        for line in _iteration_totals(phases) + hostops.closing_lines(phases):
            say(line)
        fps = be.footprints()
    except KeyboardInterrupt:
        partial = _report(prep, stats, phases, {}, prov, t0) if phases else None
        raise Interrupted(partial, len(spec["phases"])) from None
    finally:
        bar.close()
        if be is not None:
            be.close()
    footprint = {k: sum(f[k] for f in fps) for k in fps[0]}
    return _report(prep, stats, phases, footprint, prov, t0)


def _out_of_memory(spec, phase, e):
    """HostMemoryExhausted from a run, said in the words of the scenario's settings."""
    m = re.search(r"exhausted at ([^;.]+)", str(e))
    at = f" at {m.group(1)}" if m else ""
    return BatchMMUError(f"host.memory={format_size(spec['host_memory'])}: the host ran out of memory{at} in phase "
                         f"{phase!r}; give it more with --set host.memory=SIZE, or let it reclaim with "
                         "--set host.overcommit=true", field="host.memory", value=spec["host_memory"])


def _memslot_skip_reason(rec):
    if rec["max_slots"]:
        return (f"memslot count too high for this test: at most {rec['max_slots']} slots "
                f"(--set slots={rec['max_slots']})")
    return "memslot count may be too high for this test: try a smaller --set slots="


def _vms_label(spec):
    groups = vm_groups(spec)
    n = sum(g["count"] for g in groups)
    vcpus = {g["vcpus"] for g in groups}
    each = f", {vcpus.pop()} vCPU(s) each" if len(vcpus) == 1 else ""
    if len(groups) == 1:
        return f"{n} {groups[0]['mmu']} VMs{each}"
    parts = " + ".join(f"{g['count']} {g['label']}" for g in groups)
    return f"{n} VMs ({parts}){each}"


def _ts(sec):
    """A duration the way the selftests print one (``%ld.%.9lds``)."""
    ns = int(round(sec * 1e9))
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


# the order in which a phase line shows what changed (then any other changed statistic)
_LINE_FIRST = ("pf_fixed", "pf_fast", "pf_emulate", "pf_guest", "pages_4k", "pages_2m", "pages_1g", "mmu_pages",
               "pages_write_protected", "pages_split", "remote_tlb_flush")
_LINE_MAX = 6


def _phase_line(rec):
    """One line per phase: time, events, what it collected, and the statistics it changed (deltas)."""
    if "sim_seconds" in rec:   # the selftest's line gives simulated time; the simulator's own comes apart
        line = f"  {rec['name'] + ' time:':<36} {_ts(rec['sim_seconds'])} (simulated; ran {rec['seconds']:.3f} s)"
    else:
        line = f"  {rec['name'] + ' time:':<36} {_ts(rec['seconds'])}"
    if rec["events"]:
        line += f"  {rec['events']:>12,} events"
        if rec["seconds"] > 0:
            line += f" {rec['events'] / rec['seconds'] / 1e6:8.2f} M/s"
    for key in ("dirty_pages", "cleared_pages", "ring_entries", "ring_full_exits", "writes"):
        if key in rec:
            line += f"  {key}={rec[key]:,}"
    d = rec["delta"]
    changed = [k for k in _LINE_FIRST if d.get(k)] + [k for k in STAT_NAMES if d[k] and k not in _LINE_FIRST
                                                       and k != "accesses"]
    if changed:
        line += "  [" + " ".join(f"{k}={d[k]:+,}" for k in changed[:_LINE_MAX]) \
            + (f" +{len(changed) - _LINE_MAX} more" if len(changed) > _LINE_MAX else "") + "]"
    if rec.get("skipped"):
        line += f"  SKIPPED: {rec['skipped']}"
    return line


def _iteration_totals(phases):
    """dirty_log_perf_test's closing lines: GET / CLEAR time over the iterations."""
    out = []
    for op, what in (("get_dirty_log", "Get dirty log"), ("clear_dirty_log", "Clear dirty log"),
                     ("harvest_dirty_ring", "Harvest dirty ring")):
        recs = [p for p in phases if p["op"] == op and "iteration" in p]
        if recs:
            n = len({p["iteration"] for p in recs})
            sim = all("sim_seconds" in p for p in recs)
            tot = sum(p["sim_seconds" if sim else "seconds"] for p in recs)
            out.append(f"  {what} over {n} iterations took {_ts(tot)}. (Avg {_ts(tot / n)}/iteration)"
                       + (" (simulated)" if sim else ""))
    return out


def summary(report):
    """Human-readable summary of a Report: totals, and the mean per VM of every VM group."""
    d = report._asdict() if hasattr(report, "_asdict") else report
    lines = [f"scenario {d['scenario']}  params: " + ", ".join(f"{k}={v}" for k, v in d["params"].items())]
    res = d.get("resolved") or {}
    if res.get("overrides"):
        lines.append("section overrides (what ran is under 'resolved' in --json): " + ", ".join(res["overrides"]))
        for p, sets in res.get("params_replaced", {}).items():
            lines.append(f"  parameter {p}={d['params'].get(p)!r} no longer applies where {', '.join(sets)} set it")
    nvm = max(1, len(next(iter(d["per_vm"].values()), [])))
    groups = d.get("vm_groups") or [{"label": "all", "first": 0, "count": nvm}]
    cols = [("per VM" if len(groups) == 1 else f"mean {g['label']}", g) for g in groups]
    lines.append(f"{'statistic (whole run)':<30}{'total':>16}" + "".join(f"{c:>16}" for c, _ in cols))
    for k in STAT_NAMES:
        v = d["totals"].get(k, 0)
        if v:
            col = d["per_vm"][k]
            means = [sum(col[g["first"]:g["first"] + g["count"]]) / max(1, g["count"]) for _, g in cols]
            kind = " (gauge)" if k in GAUGE_STATS else ""
            lines.append(f"{k + kind:<30}{v:>16,}" + "".join(f"{m:>16,.1f}" for m in means))
    lines.append("(gauge): a level at the end of the run; the others count events over the whole run")
    lines.append("footprint: " + ", ".join(f"{k}={format_size(v)}" for k, v in d["footprint"].items() if v))
    return "\n".join(lines)
