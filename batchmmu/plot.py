"""``batchmmu plot``: a metric against a swept parameter, from a ``batchmmu sweep`` table.

One line per ``--hue`` value, the mean over repeats with error bars (one standard deviation), units on
both axes, a log x axis when the x values span two decades or more.  Every other swept parameter must be
fixed (``--where key=value``) so that a point never silently averages different configurations.
"""

import csv
import difflib
import math
import sys
from pathlib import Path

from .errors import BatchMMUError
from .units import parse_size

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
_BINARY = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "bytes"))
_COUNT_UNITS = {"pages_4k": "4 KiB mappings", "pages_2m": "2 MiB mappings", "pages_1g": "1 GiB mappings",
                "mmu_pages": "MMU pages", "rmap_entries": "rmap entries", "walk_refs": "memory references",
                "accesses": "accesses", "events": "events", "n_vms": "VMs", "vms": "VMs", "vcpus": "vCPUs per VM",
                "nx_lpage_splits": "splits", "mmu_shadow_zapped": "pages zapped", "mmu_pte_write": "writes",
                "mmu_recycled": "pages", "mmu_unsync": "pages", "mmu_flooded": "pages", "mmu_cache_miss": "misses",
                "iterations": "iterations", "workers": "workers", "slots": "memslots", "repeat": "repeats",
                "dirty_pages": "pages", "cleared_pages": "pages", "writes": "writes"}


def load_table(path):
    """Rows (dicts of typed values) and columns of a sweep table (.csv, or .parquet with pyarrow)."""
    p = Path(path)
    if p.is_dir() or not p.exists():
        raise BatchMMUError(f"table={path!r}: {'is a directory' if p.is_dir() else 'no such file'}", field="table",
                            value=str(path))
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BatchMMUError(f"table={path!r}: reading Parquet needs pyarrow; give the .csv", field="table",
                                value=str(path)) from None
        t = pq.read_table(p)
        return t.to_pylist(), t.column_names
    with open(p, newline="") as f:
        rd = csv.DictReader(f)
        cols = rd.fieldnames or []
        rows = [{k: _typed(v) for k, v in r.items()} for r in rd]
    if not cols or not rows:
        raise BatchMMUError(f"table={path!r}: no rows (not a batchmmu sweep table?)", field="table", value=str(path))
    return rows, cols


def _typed(v):
    if v is None or v == "":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _column(name, cols, what):
    if name in cols:
        return name
    near = difflib.get_close_matches(name, cols, n=2, cutoff=0.9)
    if len(near) == 1:   # one obvious spelling (tdp_page_table_bytes -> tdp_page_tables_bytes)
        print(f"batchmmu: plot: no column {name!r}; using {near[0]!r}", file=sys.stderr)
        return near[0]
    close = difflib.get_close_matches(name, cols, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BatchMMUError(f"{what}={name!r}: no such column{hint}; the table has: {', '.join(cols)}",
                        field=what, value=name)


def unit_of(col):
    """(kind, label) of a column: kind is 'bytes', 'seconds' or 'count'."""
    last = col.split(".")[-1]
    if last.endswith("bytes") or last in ("bytes_per_vcpu", "memory", "test_mem_size", "slot_size", "max_mem"):
        return "bytes", "bytes"
    if last.endswith("seconds"):
        return "seconds", "s"
    if last.startswith("pf_"):
        return "count", "faults"
    if last.endswith("tlb_flush") or last == "tlb_flush":
        return "count", "flushes"
    return "count", _COUNT_UNITS.get(last, "count")


def _binary(vmax):
    for scale, name in _BINARY:
        if vmax >= scale:
            return scale, name
    return 1, "bytes"


def _swept(rows, cols):
    """The grid parameters of a sweep table: the columns between ``scenario`` and ``repeat``."""
    if "scenario" in cols and "repeat" in cols:
        return cols[cols.index("scenario") + 1:cols.index("repeat")]
    return []


def _x_values(vals, name):
    """Numbers for the x axis: numbers, sizes ("64MiB") as bytes, else None (categorical)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return list(vals), unit_of(name)
    try:
        return [parse_size(v, name) for v in vals], ("bytes", "bytes")
    except BatchMMUError:
        return None, ("category", "")


def aggregate(rows, x, y, hue=None):
    """{hue value: [(x value, mean, sd, n)]} in x order."""
    groups = {}
    for r in rows:
        key = r.get(hue) if hue else None
        groups.setdefault(key, {}).setdefault(r[x], []).append(float(r[y]))
    out = {}
    for key, pts in groups.items():
        line = []
        for xv, ys in pts.items():
            n = len(ys)
            m = sum(ys) / n
            sd = math.sqrt(sum((v - m) ** 2 for v in ys) / (n - 1)) if n > 1 else 0.0
            line.append((xv, m, sd, n))
        out[key] = line
    return out


def plot(table, x, y, hue=None, where=(), out=None, title=None):
    """Draw ``y`` against ``x`` (one line per ``hue`` value) from a sweep table (path or rows); returns the
    path written."""
    out = Path(out or f"{y.replace('.', '_')}_vs_{x}.png")
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise BatchMMUError(f"--out {out}: use a .png, .pdf or .svg file name", field="out", value=str(out))
    if out.is_dir() or not out.parent.is_dir():
        raise BatchMMUError(f"--out {out}: no such directory", field="out", value=str(out))
    fig = draw(table, x, y, hue, where, title)
    fig.savefig(out)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return out


def draw(table, x, y, hue=None, where=(), title=None):
    """The figure of ``plot`` (a matplotlib Figure; its one Axes is ``fig.axes[0]``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BatchMMUError("plot needs matplotlib: pip install 'batchmmu[plot]'", field="plot", value=None) from None
    if isinstance(table, (str, Path)):
        rows, cols = load_table(table)
        source = Path(table).name
    else:
        rows = [dict(r) for r in table]
        cols = list(rows[0]) if rows else []
        source = "sweep"
    x, y = _column(x, cols, "x"), _column(y, cols, "y")
    hue = _column(hue, cols, "hue") if hue else None
    for w in where:
        k, sep, v = str(w).partition("=")
        if not sep:
            raise BatchMMUError(f"--where {w!r}: expected key=value", field="where", value=w)
        k = _column(k.strip(), cols, "where")
        rows = [r for r in rows if str(r.get(k)) == v.strip() or r.get(k) == _typed(v.strip())]
    if "error" in cols:
        rows = [r for r in rows if not r.get("error")]
    rows = [r for r in rows if r.get(y) is not None and r.get(x) is not None]
    if not rows:
        raise BatchMMUError(f"no rows with both {x} and {y} (after --where)", field="y", value=y)
    if not all(isinstance(r[y], (int, float)) for r in rows):
        raise BatchMMUError(f"y={y!r}: not a numeric column", field="y", value=y)
    varying = [c for c in _swept(rows, cols) if c not in (x, hue) and len({str(r.get(c)) for r in rows}) > 1]
    if varying:
        vals = "; ".join(f"{c} = {', '.join(sorted({str(r.get(c)) for r in rows}))}" for c in varying)
        raise BatchMMUError(f"{', '.join(varying)} also varies ({vals}): pick one with --where KEY=VALUE or draw "
                            "it with --hue", field="where", value=varying[0])
    series = aggregate(rows, x, y, hue)
    all_x = sorted({r[x] for r in rows}, key=lambda v: (isinstance(v, str), v))
    xnum, (xkind, xunit) = _x_values(all_x, x)
    ykind, yunit = unit_of(y)
    ymax = max(abs(m) + sd for line in series.values() for _, m, sd, _ in line) or 1.0
    yscale, yname = _binary(ymax) if ykind == "bytes" else (1e-3, "ms") if ykind == "seconds" and ymax < 1 \
        else (1, yunit)
    xscale, xname = _binary(max(xnum)) if xkind == "bytes" else (1, xunit)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    nmax = 1
    for key in sorted(series, key=lambda v: (v is None, str(v))):
        line = series[key]
        pos = {v: i for i, v in enumerate(all_x)}
        line.sort(key=lambda t: pos[t[0]])
        xs = [(xnum[pos[t[0]]] / xscale) if xnum else pos[t[0]] for t in line]
        ms = [t[1] / yscale for t in line]
        sds = [t[2] / yscale for t in line]
        nmax = max(nmax, *(t[3] for t in line))
        label = f"{hue} = {key}" if hue else None
        ax.errorbar(xs, ms, yerr=sds if any(sds) else None, marker="o", capsize=4, label=label)
    logx = bool(xnum) and min(xnum) > 0 and max(xnum) / min(xnum) >= 100
    means = [t[1] for line in series.values() for t in line]
    logy = logx and min(means) > 0 and max(means) / min(means) >= 100    # log-log: a power law is a line
    if logx:
        ax.set_xscale("log")
    elif not xnum:
        ax.set_xticks(range(len(all_x)), [str(v) for v in all_x])
    ax.set_xlabel(f"{x} ({xname})" if xname and xname != "count" else x)
    ax.set_ylabel(f"{y} ({yname})")
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    ax.margins(x=0.08)
    ax.grid(True, alpha=0.3, which="both")
    scen = {str(r.get("scenario")) for r in rows if r.get("scenario")}
    head = title or f"{y} vs {x}" + (f" ({', '.join(sorted(scen))})" if scen else "")
    spread = any(t[2] for line in series.values() for t in line)
    note = "one run per point" if nmax == 1 else f"mean ± 1 sd over {nmax} repeats" if spread \
        else f"{nmax} repeats, all identical"
    ax.set_title(f"{head}\n{note}; {source}", fontsize=10)
    if hue:
        ax.legend(title=None, fontsize=9)
    fig.tight_layout()
    return fig


def add_parser(sub):
    p = sub.add_parser("plot", help="plot a metric against a swept parameter from a sweep table")
    p.add_argument("table", metavar="results.csv")
    p.add_argument("--x", required=True, help="the swept parameter (a column)")
    p.add_argument("--y", required=True, help="the metric (a column: a statistic, <category>_bytes, phase.*)")
    p.add_argument("--hue", help="one line per value of this column")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep only rows with this value (for parameters neither x nor hue)")
    p.add_argument("--title")
    p.add_argument("--out", metavar="plot.png", help="output file (.png, .pdf, .svg); default Y_vs_X.png")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args):
    path = plot(args.table, args.x, args.y, args.hue, args.where, args.out, args.title)
    print(f"plot written to {path}")
    return 0
