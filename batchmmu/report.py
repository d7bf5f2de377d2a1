"""``batchmmu report``: tables and standard plots from ``--json`` results."""

import json

from .errors import BatchMMUError
from .kernels.state import GAUGE_STATS, STAT_NAMES
from .units import format_size

PHASE_STATS = ("pf_taken", "pf_fixed", "pf_emulate", "pf_fast", "pages_4k", "pages_2m", "pages_1g", "mmu_pages",
               "remote_tlb_flush")


def load(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BatchMMUError(f"result={path!r}: cannot read a batchmmu JSON result ({e})", field="result",
                            value=path) from None
    missing = {"scenario", "params", "totals", "per_vm", "phases", "footprint"} - set(d) if isinstance(d, dict) \
        else {"everything"}
    if missing:
        raise BatchMMUError(f"result={path!r}: not a batchmmu result (missing {', '.join(sorted(missing))})",
                            field="result", value=path)
    return d


def _nvm(d):
    return len(next(iter(d["per_vm"].values()), []))


def groups(d):
    """The VM groups of a result (one group "all" for results written before groups were recorded)."""
    return d.get("vm_groups") or [{"label": "all", "first": 0, "count": _nvm(d)}]


def _delta(d, i):
    """Phase ``i``'s change of every statistic (recorded, or from the cumulative values)."""
    p = d["phases"][i]
    if "delta" in p:
        return p["delta"]
    prev = d["phases"][i - 1]["stats"] if i else {}
    return {k: v - prev.get(k, 0) for k, v in p["stats"].items()}


def table(d):
    """The result as text: parameters, each phase's changes, totals (per VM group), footprint."""
    gs = groups(d)
    nvm = _nvm(d)
    parts = ", ".join(f"{g['count']} {g['label']}" for g in gs)
    head = f"{d['scenario']}: {nvm} VMs" + (f" ({parts})" if len(gs) > 1 else "")
    out = [head + "; " + ", ".join(f"{k}={v}" for k, v in d["params"].items())]
    pv = d.get("provenance")
    if pv:
        out.append(f"batchmmu {pv['version']} (kernels {pv['source_hash']}), seed {pv['seed']}, {pv['workers']} "
                   f"{pv['backend']} worker(s), {pv['cpu']} ({pv['cores']} cores), {pv['timestamp']}, "
                   f"{pv['wall_seconds']:.2f} s wall")
    deltas = [_delta(d, i) for i in range(len(d["phases"]))]
    shown = [s for s in PHASE_STATS if any(x.get(s, 0) for x in deltas)]
    w = [max(12, len(s) + 2) for s in shown]
    out += ["", "changes during each phase (the JSON's phase 'stats' are cumulative):"]
    hdr = f"{'phase':<20}{'seconds':>10}{'events':>14}{'M ev/s':>9}" + "".join(f"{s:>{k}}" for s, k in zip(shown, w,
                                                                                                      strict=True))
    out += [hdr, "-" * len(hdr)]
    for p, x in zip(d["phases"], deltas, strict=True):
        rate = p["events"] / p["seconds"] / 1e6 if p["seconds"] and p["events"] else 0.0
        out.append(f"{p['name'][:19]:<20}{p['seconds']:>10.3f}{p['events']:>14,}{rate:>9.2f}"
                   + "".join(f"{x.get(s, 0):>{k},}" for s, k in zip(shown, w, strict=True)))
    cols = [("per VM mean", "per VM max", g) for g in gs] if len(gs) == 1 else \
        [(f"mean {g['label']}", f"max {g['label']}", g) for g in gs]
    out += ["", f"{'statistic (whole run)':<30}{'total':>16}" + "".join(f"{a:>16}{b:>16}" for a, b, _ in cols)]
    for s in STAT_NAMES:
        v = d["totals"].get(s, 0)
        if v:
            col = d["per_vm"][s]
            cells = ""
            for _, _, g in cols:
                part = col[g["first"]:g["first"] + g["count"]] or [0]
                cells += f"{sum(part) / len(part):>16,.1f}{max(part):>16,}"
            out.append(f"{s + (' (gauge)' if s in GAUGE_STATS else ''):<30}{v:>16,}" + cells)
    out += ["", "footprint: " + ", ".join(f"{k} {format_size(v)}" for k, v in d["footprint"].items() if v)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- tidy rows
def rows(d, kind="per_vm", name=None):
    """Tidy rows (dicts) of one result: ``per_vm`` (one per VM: vm, group, every statistic) or ``phases``
    (one per phase: name, op, seconds, events, every statistic after it and ``delta_`` its change)."""
    pv = d.get("provenance") or {}
    base = {"result": name or d["scenario"], "scenario": d["scenario"], "seed": d["params"].get("seed"),
            "source_hash": pv.get("source_hash")}
    if kind == "per_vm":
        label = []
        for g in groups(d):
            label += [g["label"]] * g["count"]
        return [dict(base, vm=v, group=label[v] if v < len(label) else "",
                     **{s: col[v] for s, col in d["per_vm"].items()}) for v in range(_nvm(d))]
    if kind == "phases":
        out = []
        for i, p in enumerate(d["phases"]):
            r = dict(base, phase=i, name=p["name"], op=p["op"], seconds=p["seconds"], events=p["events"])
            r.update(p["stats"])
            r.update({f"delta_{k}": v for k, v in _delta(d, i).items()})
            out.append(r)
        return out
    raise BatchMMUError(f"kind={kind!r}: use per_vm or phases", field="kind", value=kind)


def write_csv(results, path, kind="per_vm", names=None):
    """Tidy rows of every result into one CSV (csv module; no pandas needed).  Returns the row count."""
    import csv
    allrows = [r for i, d in enumerate(results) for r in rows(d, kind, names[i] if names else None)]
    fields = list(dict.fromkeys(k for r in allrows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(allrows)
    return len(allrows)


def to_dataframe(d, kind="per_vm"):
    """``rows(d, kind)`` as a pandas DataFrame (extra ``batchmmu[analysis]``)."""
    try:
        import pandas as pd
    except ImportError:
        raise BatchMMUError("to_dataframe needs pandas: pip install 'batchmmu[analysis]'", field="pandas",
                            value=None) from None
    return pd.DataFrame(rows(d, kind))


# ----------------------------------------------------------------------------- compare
def _means(d):
    """{unit label: {stat: value}}: totals of the whole result and the per-VM mean of each VM group."""
    out = {"total": dict(d["totals"])}
    gs = groups(d)
    if len(gs) > 1:
        for g in gs:
            out[f"{g['label']} (mean/VM)"] = {s: sum(col[g["first"]:g["first"] + g["count"]]) / max(1, g["count"])
                                              for s, col in d["per_vm"].items()}
    return out


def _fmt(v):
    return f"{v:,.1f}" if isinstance(v, float) and not v.is_integer() else f"{int(v):,}"


def _compare_block(title, a, b, show_all, keys=STAT_NAMES, what="statistic"):
    out = [title, f"  {what:<28}{'before':>16}{'after':>16}{'delta':>16}{'ratio':>9}"]
    for s in keys:
        x, y = a.get(s, 0), b.get(s, 0)
        if x == y and not (show_all and (x or y)):
            continue
        ratio = f"{y / x:>9.3f}" if x else f"{'new' if y else '':>9}"
        mark = "" if x == y else " +" if y > x else " -"
        out.append(f"  {s:<28}{_fmt(x):>16}{_fmt(y):>16}{_fmt(y - x):>16}{ratio}{mark}")
    if len(out) == 2:
        out.append("  (no statistic differs)")
    return out


def compare(results, names=None, show_all=False, phases=False):
    """Per-statistic before/after/delta/ratio (``asv compare``-like): every result against the first;
    VM groups with the same label against each other; one result with several VM groups compares its
    groups with the first group (shadow against TDP in ``guest_os``)."""
    names = names or [d["scenario"] for d in results]
    out = []
    if len(results) == 1:
        d = results[0]
        gs = groups(d)
        if len(gs) < 2:
            raise BatchMMUError("compare: give two or more results, or one with several VM groups", field="results",
                                value=names)
        m = _means(d)
        base = gs[0]["label"]
        for g in gs[1:]:
            out += _compare_block(f"{names[0]}: VM group {g['label']} against {base} (mean per VM)",
                                  m[f"{base} (mean/VM)"], m[f"{g['label']} (mean/VM)"], show_all) + [""]
        return "\n".join(out).rstrip()
    a = results[0]
    for name, b in zip(names[1:], results[1:], strict=True):
        out.append(f"{names[0]} (before) -> {name} (after)")
        diff = sorted(k for k in set(a["params"]) | set(b["params"]) if a["params"].get(k) != b["params"].get(k))
        if diff:
            out.append("  parameters: " + ", ".join(f"{k} {a['params'].get(k)} -> {b['params'].get(k)}" for k in diff))
        pa, pb = a.get("provenance") or {}, b.get("provenance") or {}
        for k in ("version", "source_hash", "backend", "workers"):
            if pa.get(k) != pb.get(k):
                out.append(f"  {k}: {pa.get(k)} -> {pb.get(k)}")
        ma, mb = _means(a), _means(b)
        for unit in ma:
            if unit in mb:
                out += _compare_block(f" {unit}:", ma[unit], mb[unit], show_all)
        cats = list(dict.fromkeys([*a["footprint"], *b["footprint"]]))
        out += _compare_block(" footprint:", a["footprint"], b["footprint"], show_all, cats, "bytes")
        if phases:
            for i, p in enumerate(a["phases"]):
                j = next((j for j, q in enumerate(b["phases"]) if q["name"] == p["name"]), None)
                if j is not None:
                    out += _compare_block(f" phase {p['name']!r} (change during it):", _delta(a, i), _delta(b, j),
                                          show_all)
        out.append("")
    return "\n".join(out).rstrip()


def _pyplot(path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BatchMMUError("--plot needs matplotlib: pip install 'batchmmu[plot]'", field="plot",
                            value=path) from None
    return plt


def _phase_bars(ax, d, title):
    deltas = [_delta(d, i) for i in range(len(d["phases"]))]
    shown = [s for s in PHASE_STATS if any(x.get(s, 0) for x in deltas)]
    names = [p["name"] for p in d["phases"]]
    width = 0.8 / max(1, len(shown))
    for k, s in enumerate(shown):
        ax.bar([i + k * width for i in range(len(names))], [x.get(s, 0) for x in deltas], width, label=s)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("symlog", linthresh=1)
    vals = [x.get(s, 0) for x in deltas for s in shown] or [0]
    ax.set_ylim(min(0, min(vals) * 3), max(1, max(vals)) * 100)     # gauges can fall; room for the legend
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("change during the phase (count)")
    ax.set_title(title, fontsize=9)
    if shown:
        ax.legend(fontsize=7, ncol=min(4, len(shown)), loc="upper center")


def _page_tables(ax, d):
    """MMU page-table bytes per VM (mmu_pages x 4 KiB: TDP tables or shadow pages), one colour per group,
    on common bins from 0 (identical values give one bar, not a histogram on an offset axis)."""
    col = d["per_vm"].get("mmu_pages", [])
    top = 4 * max(col or [0]) * 1.25 or 1.0
    bins = [top * i / 40 for i in range(41)]
    for g in groups(d):
        kib = [4 * v for v in col[g["first"]:g["first"] + g["count"]]]
        if kib:
            same = f": all {kib[0]:,} KiB" if min(kib) == max(kib) else f": {min(kib):,}-{max(kib):,} KiB"
            ax.hist(kib, bins=bins, alpha=0.75, label=f"{g['label']} ({len(kib)} VMs){same}")
    ax.set_xlim(0, top)
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_xlabel("MMU page tables per VM, KiB (mmu_pages x 4 KiB; TDP tables or shadow pages)")
    ax.set_ylabel("VMs")
    ax.set_title("page-table footprint per VM", fontsize=9)
    ax.legend(fontsize=7)


def _totals(ax, results, names):
    stats = [s for s in PHASE_STATS if any(d["totals"].get(s, 0) for d in results)]
    width = 0.8 / len(results)
    for k, (d, name) in enumerate(zip(results, names, strict=True)):
        ax.bar([i + k * width for i in range(len(stats))], [d["totals"].get(s, 0) for s in stats], width,
               label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(stats))], stats, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(0, max([1] + [d["totals"].get(s, 0) for d in results for s in stats]) * 100)
    ax.set_ylabel("whole run (count; gauges: level at the end)")
    ax.set_title("results side by side", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(results)), loc="upper center")


_PT_CATEGORIES = ("tdp_page_tables", "shadow_page_tables", "mmu_page_headers", "rmaps", "pte_list_descs")


def _footprint_per_vm(ax, results, names):
    """KVM's MMU memory per VM of every result, stacked by footprint category."""
    cats = [c for c in _PT_CATEGORIES if any(d["footprint"].get(c, 0) for d in results)]
    bottom = [0.0] * len(results)
    for c in cats:
        kib = [d["footprint"].get(c, 0) / 1024 / max(1, _nvm(d)) for d in results]
        ax.bar(range(len(results)), kib, 0.6, bottom=bottom, label=c)
        bottom = [b + k for b, k in zip(bottom, kib, strict=True)]
    for i, b in enumerate(bottom):
        ax.annotate(f"{b:,.1f} KiB", (i, b), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), names, fontsize=8)
    ax.set_ylim(0, max([1.0] + bottom) * 1.25)
    ax.set_ylabel("KiB per VM (mean)")
    ax.set_title("KVM's MMU memory per VM, by footprint category", fontsize=9)
    ax.legend(fontsize=7)


def _sim_times(ax, results, names):
    """Simulated time of each phase, one bar per result (the time model's runs)."""
    phases = [p["name"] for p in results[0]["phases"]]
    width = 0.8 / len(results)
    for k, (d, name) in enumerate(zip(results, names, strict=True)):
        sim = {p["name"]: p.get("sim_seconds", 0.0) for p in d["phases"]}
        ax.bar([i + k * width for i in range(len(phases))], [sim.get(n, 0.0) for n in phases], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))], phases, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("simulated seconds")
    ax.set_title("simulated time per phase (docs/time.md)", fontsize=9)
    ax.legend(fontsize=7)


def _latency_cdf(ax, results, names):
    """Fault latency CDF of each result's phases that took faults."""
    for d, name in zip(results, names, strict=True):
        for p in d["phases"]:
            h = p.get("sim", {}).get("fault_latency_hist")
            if not h:
                continue
            total = sum(c for _, c in h)
            acc, xs, ys = 0, [], []
            for edge, c in h:
                acc += c
                xs.append(edge / 1e3)
                ys.append(acc / total)
            ax.step(xs, ys, where="post", label=f"{name}: {p['name']}" if len(results) > 1 else p["name"])
    ax.set_xscale("log")
    ax.set_xlabel("fault latency, us (exit to resume, lock waits included)")
    ax.set_ylabel("fraction of faults")
    ax.set_title("fault latency CDF", fontsize=9)
    ax.legend(fontsize=6)


def plot(results, path, names=None):
    """Per result: each phase's changes and the page-table bytes per VM (by VM group); with several
    results a panel puts their totals side by side; with simulated time a last row shows time per phase and
    the fault-latency CDF."""
    plt = _pyplot(path)
    names = [str(n) for n in (names or [d["scenario"] for d in results])]
    timed = any("sim_seconds" in p for d in results for p in d["phases"])
    rows = len(results) + (1 if len(results) > 1 else 0) + int(timed)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.2 * rows), squeeze=False)
    for r, (d, name) in enumerate(zip(results, names, strict=True)):
        _phase_bars(axes[r][0], d, f"{name}: changes during each phase")
        _page_tables(axes[r][1], d)
    if len(results) > 1:
        _totals(axes[len(results)][0], results, names)
        _footprint_per_vm(axes[len(results)][1], results, names)
    if timed:
        _sim_times(axes[-1][0], results, names)
        _latency_cdf(axes[-1][1], results, names)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline(d):
    """The host-memory figures after every epoch of every phase (scenarios with an overcommitted
    host): list of dicts with ``phase`` and ``step`` (0, 1, ... across the run) added."""
    out = []
    for p in d["phases"]:
        for e in p.get("epochs") or ([p["host"]] if p.get("host") else []):
            out.append(dict(e, phase=p["name"], step=len(out)))
    return out


def plot_host_memory(d, path):
    """Footprint over time (resident, swapped, page tables) and refaults / reclaim per epoch."""
    plt = _pyplot(path)
    tl = timeline(d)
    if not tl:
        return plot([d], path)
    x = [e["step"] for e in tl]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    mib = 1 << 20
    ax1.plot(x, [e["host_resident"] / mib for e in tl], label="guest memory resident")
    ax1.plot(x, [e["host_swapped"] / mib for e in tl], label="guest memory swapped")
    ax1.set_ylabel("MiB")
    ax1b = ax1.twinx()
    ax1b.plot(x, [e["page_table_bytes"] / mib for e in tl], "k--", label="MMU page tables")
    ax1b.set_ylabel("page tables, MiB")
    for ax in (ax1, ax1b):      # headroom for the legends above the lines
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + (hi - lo) * 0.35)
    ax1.legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"{d['scenario']}: host memory after each epoch")

    def per_step(key):
        prev, out = 0, []
        for e in tl:
            out.append(e[key] - prev)
            prev = e[key]
        return out

    ax2.bar(x, per_step("host_major_faults"), label="major faults (refaults from swap)")
    ax2.plot(x, per_step("host_pages_reclaimed"), "r.-", label="pages reclaimed")
    ax2.plot(x, per_step("mmu_notifier_zapped"), "g.:", label="SPTEs zapped by the notifier")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("per epoch")
    lo, hi = ax2.get_ylim()
    ax2.set_ylim(lo, hi + (hi - lo) * 0.35)
    ax2.legend(fontsize=8, loc="upper right")
    names = [(e["step"], e["phase"]) for i, e in enumerate(tl) if i == 0 or tl[i - 1]["phase"] != e["phase"]]
    for step, name in names:
        for ax in (ax1, ax2):
            ax.axvline(step - 0.5, color="grey", lw=0.5)
        ax1.annotate(name, (step, 0.02), xycoords=("data", "axes fraction"), fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
