"""``batchmmu report``: tables and standard plots from ``--json`` results."""

import json

from .errors import BatchMMUError
from .kernels.state import STAT_NAMES
from .units import format_size

PHASE_STATS = ("pf_taken", "pf_fixed", "pf_emulate", "pf_fast", "pages_4k", "pages_2m", "pages_1g", "mmu_pages",
               "remote_tlb_flush")


def load(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BatchMMUError(f"result={path!r}: cannot read a batchmmu JSON result ({e})", field="result",
                            value=path) from None
    missing = {"scenario", "params", "totals", "per_vm", "phases", "footprint"} - set(d)
    if missing:
        raise BatchMMUError(f"result={path!r}: not a batchmmu result (missing {', '.join(sorted(missing))})",
                            field="result", value=path)
    return d


def table(d):
    """The result as text: parameters, phases with their statistics, totals, footprint."""
    nvm = len(next(iter(d["per_vm"].values()), []))
    out = [f"{d['scenario']}: {nvm} VMs; " + ", ".join(f"{k}={v}" for k, v in d["params"].items())]
    shown = [s for s in PHASE_STATS if any(p["stats"].get(s, 0) for p in d["phases"])]
    head = f"{'phase':<16}{'seconds':>10}{'events':>14}{'M ev/s':>9}" + "".join(f"{s:>13}" for s in shown)
    out += ["", head, "-" * len(head)]
    for p in d["phases"]:
        rate = p["events"] / p["seconds"] / 1e6 if p["seconds"] and p["events"] else 0.0
        out.append(f"{p['name']:<16}{p['seconds']:>10.3f}{p['events']:>14,}{rate:>9.2f}"
                   + "".join(f"{p['stats'].get(s, 0):>13,}" for s in shown))
    out += ["", f"{'statistic':<26}{'total':>16}{'per VM mean':>14}{'per VM max':>14}"]
    for s in STAT_NAMES:
        v = d["totals"].get(s, 0)
        if v:
            col = d["per_vm"][s]
            out.append(f"{s:<26}{v:>16,}{v / max(1, nvm):>14,.1f}{max(col):>14,}")
    out += ["", "footprint: " + ", ".join(f"{k} {format_size(v)}" for k, v in d["footprint"].items() if v)]
    return "\n".join(out)


def plot(results, path):
    """Stats per phase, page-table bytes per VM and, with several results, throughput scaling."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BatchMMUError("--plot needs matplotlib: pip install 'batchmmu[plot]'", field="plot",
                            value=path) from None
    n = 3 if len(results) > 1 else 2
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5))
    d = results[0]
    shown = [s for s in PHASE_STATS if any(p["stats"].get(s, 0) for p in d["phases"])]
    names = [p["name"] for p in d["phases"]]
    ax = axes[0]
    width = 0.8 / max(1, len(shown))
    for k, s in enumerate(shown):
        ax.bar([i + k * width for i in range(len(names))], [p["stats"].get(s, 0) for p in d["phases"]],
               width, label=s)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_yscale("symlog")
    ax.set_title(f"{d['scenario']}: statistics after each phase")
    ax.legend(fontsize=7)
    ax = axes[1]
    pt = [4096 * v for v in d["per_vm"]["mmu_pages"]]
    ax.hist(pt, bins=min(50, max(5, len(pt) // 4)))
    ax.set_xlabel("TDP page-table bytes per VM")
    ax.set_ylabel("VMs")
    ax.set_title("page-table footprint per VM")
    if n == 3:
        ax = axes[2]
        xs, ys, labels = [], [], []
        for r in results:
            main = max(r["phases"], key=lambda p: p["events"])
            xs.append(len(r["per_vm"]["accesses"]))
            ys.append(main["events"] / main["seconds"] / 1e6 if main["seconds"] else 0)
            labels.append(r["params"].get("workers", ""))
        ax.plot(xs, ys, "o-")
        ax.set_xscale("log")
        ax.set_xlabel("VMs")
        ax.set_ylabel("M events/s (largest phase)")
        ax.set_title("scaling")
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
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BatchMMUError("--plot needs matplotlib: pip install 'batchmmu[plot]'", field="plot",
                            value=path) from None
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
    ax2.legend(fontsize=8)
    names = [(e["step"], e["phase"]) for i, e in enumerate(tl) if i == 0 or tl[i - 1]["phase"] != e["phase"]]
    for step, name in names:
        for ax in (ax1, ax2):
            ax.axvline(step - 0.5, color="grey", lw=0.5)
        ax1.annotate(name, (step, 0.02), xycoords=("data", "axes fraction"), fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
