"""Parameter sweeps: ``batchmmu sweep`` and ``bm.sweep`` -> one tidy table, one row per run.

Columns (see docs/workbench.md): ``run``, ``scenario``, one column per grid key, ``repeat``, ``seed``,
``backend``, ``workers``, ``n_vms``, ``wall_seconds``, ``events``, every statistic's total (KVM's names),
``<category>_bytes`` for every footprint category, and per phase ``phase.<slug>.seconds``,
``phase.<slug>.events``, ``phase.<slug>.<stat>`` (what the phase added: its delta, not the cumulative value,
for the statistics some run changed in that phase) and the phase's own figures (``dirty_pages`` ...).
"""

import csv
import itertools
import re
import sys
import time as _clock
from pathlib import Path

from .errors import BatchMMUError

OUT_SUFFIXES = (".csv", ".parquet")
_KEY = re.compile(r"^[A-Za-z_]\w*(\.\w+)?$")
_PHASE_SKIP = {"name", "op", "seconds", "worker_seconds", "events", "events_per_s", "iteration", "stats", "host",
               "epochs", "delta", "sim_seconds"}


def parse_grid(specs):
    """``["vms=1,10", "backing=4k,thp"]`` -> ``{"vms": ["1", "10"], "backing": ["4k", "thp"]}``."""
    grid = {}
    for s in specs:
        key, sep, values = str(s).partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise BatchMMUError(f"--grid {s!r}: expected name=v1,v2,... (a parameter or section.key)", field="grid",
                                value=s)
        if key in grid:
            raise BatchMMUError(f"--grid {key}: given twice", field="grid", value=s)
        vals = [v.strip() for v in values.split(",")]
        if not values.strip() or any(v == "" for v in vals):
            raise BatchMMUError(f"--grid {s!r}: empty value", field="grid", value=s)
        grid[key] = vals
    return grid


def _text(v):
    """A grid value as ``--set`` takes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _check_count(v, field, lo):
    import numbers
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise BatchMMUError(f"{field}={v!r}: must be an integer >= {lo}", field=field, value=v)
    return int(v)


def plan(scenario, grid, repeat=1, sets=(), seed=0, workers=1, backend="serial", ray_address=None):
    """Check every run of the sweep (names, values, the memory it needs) before any kernel loads; returns
    the runs as dicts (``params``: grid key -> value as typed, ``sets``, ``seed``, ``repeat``)."""
    from . import scenario as sc
    from . import spec as sp
    from .shard import split
    if not isinstance(grid, dict) or not grid:
        raise BatchMMUError(f"grid={grid!r}: give at least one key with a list of values", field="grid", value=grid)
    repeat = _check_count(repeat, "repeat", 1)
    seed = _check_count(seed, "seed", 0)
    keys = list(grid)
    lists = []
    for k in keys:
        vals = grid[k]
        if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
            vals = [vals]
        vals = [_text(v) for v in vals]
        if not vals:
            raise BatchMMUError(f"grid.{k}: no values", field=f"grid.{k}", value=grid[k])
        lists.append(vals)
    if isinstance(scenario, dict):
        data = scenario
    else:
        data = sp.load_scenario(scenario)[0]
    runs = []
    for combo in itertools.product(*lists):
        point = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        # names, values, sections and the seed story (spec.prepare); a "seed" grid key is the run's seed
        prep = sp.prepare(data, list(sets) + point, None if "seed" in keys else seed)
        if backend != "ray" or ray_address is None:
            try:
                sc.check_memory(prep.spec, split(prep.spec, workers), backend)
            except BatchMMUError as e:
                label = " ".join(point)
                raise BatchMMUError(f"sweep run {label}: {e}", field=e.field, value=e.value) from None
        run_sets = list(sets) + [s for s in point if not s.startswith("seed=")]
        for r in range(repeat):
            runs.append({"params": {k: sp._coerce(v) for k, v in zip(keys, combo, strict=True)}, "sets": run_sets,
                         "seed": prep.seed + r, "repeat": r})
    return data, runs


def slug(name):
    """A phase name as a column-name part: ``"Iteration 1 dirty memory"`` -> ``iteration_1_dirty_memory``."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "phase"


def row(rep, run, wall, backend="serial", workers=1):
    """One table row of a finished run (a Report)."""
    d = rep._asdict() if hasattr(rep, "_asdict") else dict(rep)
    out = {"scenario": d["scenario"], **run["params"], "repeat": run["repeat"], "seed": run["seed"],
           "backend": backend, "workers": workers, "n_vms": len(next(iter(d["per_vm"].values()), [])),
           "wall_seconds": round(wall, 6), "events": sum(p.get("events", 0) for p in d["phases"])}
    sims = [p["sim_seconds"] for p in d["phases"] if "sim_seconds" in p]
    if sims:
        out["sim_seconds"] = sum(sims)
    out.update({k: int(v) for k, v in d["totals"].items()})
    for k, v in d["footprint"].items():
        out[k if k.endswith("_bytes") else f"{k}_bytes"] = int(v)
    prev, used = {}, set()
    for p in d["phases"]:
        s = slug(p["name"])
        base, n = s, 2
        while s in used:
            s, n = f"{base}_{n}", n + 1
        used.add(s)
        out[f"phase.{s}.seconds"] = p.get("seconds", 0.0)
        out[f"phase.{s}.events"] = p.get("events", 0)
        if "sim_seconds" in p:
            out[f"phase.{s}.sim_seconds"] = p["sim_seconds"]
        for k, v in p["stats"].items():
            out[f"phase.{s}.{k}"] = int(v) - prev.get(k, 0)
        prev = p["stats"]
        for k, v in p.items():
            if k not in _PHASE_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"phase.{s}.{k}"] = v
    return out


def columns(rows):
    """Every column of the rows in first-seen order, without the per-phase statistics no run changed."""
    from .kernels.state import STAT_NAMES
    stats = set(STAT_NAMES)
    cols = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, None)
    keep = []
    for k in cols:
        parts = k.split(".")
        if len(parts) == 3 and parts[0] == "phase" and parts[2] in stats \
                and not any(r.get(k) for r in rows):
            continue
        keep.append(k)
    return keep


def tidy(rows):
    """Rows with one set of columns (missing values None)."""
    cols = columns(rows)
    return [{k: r.get(k) for k in cols} for r in rows], cols


def write(rows, out):
    """Write the table: CSV (always) and Parquet (when pyarrow is installed); returns the paths written."""
    out = Path(out)
    table, cols = tidy(rows)
    csv_path = out.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in table:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    written = [csv_path]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        if out.suffix == ".parquet":
            raise BatchMMUError(f"--out {out}: Parquet needs pyarrow (pip install pyarrow); the CSV is at "
                                f"{csv_path}", field="out", value=str(out)) from None
        return written
    data = {}
    for k in cols:
        vals = [r[k] for r in table]
        kinds = {type(v) for v in vals if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            vals = [None if v is None else str(v) for v in vals]
        data[k] = vals
    pq.write_table(pa.table(data), out.with_suffix(".parquet"))
    written.append(out.with_suffix(".parquet"))
    return written


def check_out(out):
    """An output path must end in .csv or .parquet and its directory must exist (checked before any run)."""
    p = Path(out)
    if p.suffix not in OUT_SUFFIXES:
        raise BatchMMUError(f"--out {out}: use a .csv or .parquet file name", field="out", value=str(out))
    if p.is_dir() or not p.parent.is_dir():
        raise BatchMMUError(f"--out {out}: {'is a directory' if p.is_dir() else 'no such directory'}",
                            field="out", value=str(out))
    return p


def sweep(scenario, grid, repeat=1, workers=1, backend="serial", seed=0, sets=(), out=None, progress=False,
          keep_going=False, ray_address=None, time=None):
    """Run ``scenario`` for every combination of ``grid`` (``{key: [values]}``), ``repeat`` times each
    (seeds ``seed``, ``seed + 1``, ...).  Returns a pandas DataFrame when pandas is installed, else a list
    of dicts; ``out`` (.csv / .parquet) also writes the table, rewritten after every run.  ``time``: the time
    model (True, a ``bm.CostModel`` or a path; docs/time.md) adds ``phase.<slug>.sim_seconds`` columns."""
    from . import scenario as sc
    from .timemodel import cost_model_arg
    time = cost_model_arg(time)
    if out is not None:
        check_out(out)
    data, runs = plan(scenario, grid, repeat, sets, seed, _check_count(workers, "workers", 1), backend, ray_address)
    rows = []
    for i, run in enumerate(runs):
        label = " ".join(f"{k}={v}" for k, v in run["params"].items())
        t = _clock.perf_counter()
        try:
            rep = sc.run_scenario(data, workers=workers, backend=backend, seed=run["seed"], sets=run["sets"],
                                  quiet=True, ray_address=ray_address, time=time)
        except BatchMMUError as e:
            if not keep_going:
                if rows and out is not None:
                    write(rows, out)
                raise BatchMMUError(f"sweep run {i + 1}/{len(runs)} ({label}, repeat {run['repeat']}): {e}",
                                    field=getattr(e, "field", "sweep"), value=getattr(e, "value", None)) from None
            rows.append({"scenario": data.get("name", ""), **run["params"], "repeat": run["repeat"],
                         "seed": run["seed"], "error": str(e)})
            if progress:
                print(f"sweep [{i + 1}/{len(runs)}] {label} repeat {run['repeat']}: FAILED: {e}", file=sys.stderr,
                      flush=True)
            continue
        wall = _clock.perf_counter() - t
        r = row(rep, run, wall, backend, workers)
        r = {"run": i, **r}
        rows.append(r)
        if out is not None:
            write(rows, out)
        if progress:
            print(f"sweep [{i + 1}/{len(runs)}] {label} repeat {run['repeat']} seed {run['seed']}: "
                  f"{wall:.2f} s, {r['events']:,} events, pf_fixed={r.get('pf_fixed', 0):,}, "
                  f"mmu_pages={r.get('mmu_pages', 0):,}", file=sys.stderr, flush=True)
    if out is not None and rows:
        write(rows, out)
    table, cols = tidy(rows)
    try:
        import pandas as pd
    except ImportError:
        return table
    return pd.DataFrame(table, columns=cols)


# ----------------------------------------------------------------------------- command line
def add_parser(sub):
    p = sub.add_parser("sweep", help="run a scenario over a grid of parameters -> one tidy table (CSV/Parquet)")
    p.add_argument("scenario")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                   help="a parameter (or section.key) and its values; repeat for a product grid")
    p.add_argument("--repeat", type=int, default=1, help="runs per grid point, seeds --seed, --seed + 1, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed overrides for every run")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backend", choices=("serial", "process", "ray"), default="serial")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="results.csv",
                   help="table path (.csv; .parquet too when pyarrow is installed)")
    p.add_argument("--keep-going", action="store_true", help="record a failed run in an 'error' column and go on")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--time", action="store_true", help="simulated time (docs/time.md): phase.<slug>.sim_seconds")
    p.add_argument("--cost-model", metavar="FILE", default=None, help="simulated time with this cost table")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args):
    from . import warmup
    from .timemodel import CostModel
    check_out(args.out)
    cm = CostModel.load(args.cost_model) if args.cost_model else (CostModel() if args.time else None)
    grid = parse_grid(args.grid)
    _, runs = plan(args.scenario, grid, args.repeat, args.set, args.seed, args.workers, args.backend,
                   args.ray_address)
    if not args.quiet:
        print(f"sweep: {len(runs)} runs of {args.scenario} ({' x '.join(f'{len(v)} {k}' for k, v in grid.items())}"
              f"{f' x {args.repeat} repeats' if args.repeat > 1 else ''}); loading kernels ...", file=sys.stderr,
              flush=True)
    warmup()
    sweep(args.scenario, grid, args.repeat, args.workers, args.backend, args.seed, args.set, args.out,
          progress=not args.quiet, keep_going=args.keep_going, ray_address=args.ray_address, time=cm)
    if not args.quiet:
        import importlib.util
        paths = [Path(args.out).with_suffix(".csv")]
        if importlib.util.find_spec("pyarrow") is not None:
            paths.append(Path(args.out).with_suffix(".parquet"))
        print("table written to " + ", ".join(map(str, paths)))
    return 0
