"""``batchmmu show`` / ``run --dry-run`` / ``list``: what a scenario is and what a run of it would do,
from the scenario alone (no kernel is loaded)."""

from .spec import (
    _ACCESS_OPS,
    group_labels,
    list_scenarios,
    load_scenario,
    param_docs,
    region_label,
    shadowed_params,
)
from .units import format_size

SEED_DOC = "the run's seed: random access orders, the guest-OS model, the memstress guest (--seed)"


def _value(v):
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def parameters(prep):
    """(name, value, default, doc) of every parameter of a prepared scenario, ``seed`` included."""
    docs = param_docs(prep.text)
    defaults = load_scenario(prep.origin.removeprefix("bundled:"))[0].get("params", {}) \
        if prep.origin != "<dict>" else {}
    out = []
    for k, v in prep.spec["params"].items():
        out.append((k, v, defaults.get(k, 0 if k == "seed" else v), docs.get(k) or (SEED_DOC if k == "seed" else "")))
    if "seed" not in prep.spec["params"]:
        out.append(("seed", prep.seed, 0, SEED_DOC))
    return out


def _phase_detail(ph):
    skip = {"name", "op", "iteration"}
    return " ".join(f"{k}={_value(v)}" for k, v in ph.items() if k not in skip)


def describe(prep, estimate=None, available=None, run=None):
    """The text of ``batchmmu show`` (and of ``run --dry-run`` with ``run`` = (workers, backend))."""
    from .shard import total_events
    sp = prep.spec
    desc = prep.data.get("description", "")
    lines = [f"{sp['name']}: {desc}" if desc else sp["name"], f"  from {prep.origin}", "",
             "parameters (--set NAME=VALUE):"]
    shadowed = shadowed_params(prep)
    for name, v, default, doc in parameters(prep):
        changed = "" if v == default else f" (default {_value(default)})"
        if name in shadowed:
            doc += f"  [replaced by {', '.join(shadowed[name])}]"
        lines.append(f"  {name:<18} {_value(v) + changed:<26} {doc}")
    if prep.overrides:
        lines.append("section overrides: " + ", ".join(prep.overrides))
    lines += ["", "VM groups:"]
    first = 0
    for g, label in zip(sp["groups"], group_labels(sp), strict=True):
        n = int(g.get("count", 1))
        rest = ", ".join(f"{k}={_value(v)}" for k, v in g.items() if k not in ("count", "vcpus", "mmu"))
        lines.append(f"  {label:<8} VMs {first}..{first + n - 1} ({n}), {int(g.get('vcpus', 1))} vCPU(s) each, "
                     f"mmu={g.get('mmu', 'tdp')}" + (f", {rest}" if rest else ""))
        first += n
    guest = f", pattern {sp['pattern']}, memstress guest seed {sp['seed']:#x}" \
        if any(ph["op"] in _ACCESS_OPS for ph in sp["phases"]) else ""
    lines.append(f"  test region: {region_label(sp)}{guest}")
    host = ", ".join(f"{k}={_value(v)}" for k, v in sp["host"].items())
    lines.append(f"  host: memory {format_size(sp['host_memory'])}" + (f", {host}" if host else ""))
    lines += ["", f"phases ({len(sp['phases'])}):"]
    for k, ph in enumerate(sp["phases"]):
        ev = total_events(sp, k)
        lines.append(f"  {k + 1:>3}. {ph['name']:<28} {ph['op']:<18} {_phase_detail(ph):<30}"
                     + (f" {ev:,} accesses" if ev else ""))
    if estimate is not None:
        have = f" of {format_size(available)} available" if available else ""
        lines += ["", f"memory estimate: {format_size(estimate)}{have}"]
    if run is not None:
        workers, backend = run
        lines.append(f"would run on {workers} {backend} worker(s) with seed {prep.seed}; nothing was run "
                     "(--dry-run)")
    return "\n".join(lines)


def listing():
    """``batchmmu list``: every bundled scenario with its description and parameters."""
    out = []
    for name, desc in list_scenarios():
        params = load_scenario(name)[0].get("params", {})
        out.append(f"{name:<28} {desc}")
        out.append("    " + " ".join(f"{k}={_value(v)}" for k, v in params.items()))
    out.append("\n(batchmmu show NAME: every parameter with its meaning, the VM groups and the phases)")
    return "\n".join(out)
