"""The ``batchmmu`` command line: ``run``, ``show``, ``list``, ``report``, ``compare``, ``validate``, ``warmup``,
``sweep``, ``plot``, ``selftest``.

Each command is a ``_cmd_NAME(args)`` and an ``_add_NAME(sub)`` that declares its arguments; ``COMMANDS``
lists them in the order ``--help`` shows.  Everything a user typed is checked before a kernel loads.
"""

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from .errors import BatchMMUError

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _say(args, msg):
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def output_path(path, flag, suffixes=None):
    """Refuse an output path that cannot be written (before any work), naming the option."""
    if path is None:
        return None
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise BatchMMUError(f"{flag} {path!r}: use a {', '.join(suffixes)} file", field=flag, value=path)
    if p.is_dir():
        raise BatchMMUError(f"{flag} {path!r}: is a directory; give a file name", field=flag, value=path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise BatchMMUError(f"{flag} {path!r}: directory {str(parent)!r} does not exist", field=flag, value=path)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BatchMMUError(f"{flag} {path!r}: not writable", field=flag, value=path)
    return p


def _need_module(module, flag, extra):
    if importlib.util.find_spec(module) is None:
        raise BatchMMUError(f"{flag} needs {module}: pip install 'batchmmu[{extra}]'", field=flag, value=module)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- run
def check_run(args):
    """Every check of ``batchmmu run`` that needs no kernel: the scenario, --set, --seed, the output
    paths and the memory estimate.  Returns (prepared scenario, shard parts, estimate, available)."""
    from .scenario import available_memory, check_memory
    from .shard import split
    from .spec import prepare
    if args.workers < 1:
        raise BatchMMUError(f"--workers {args.workers}: must be at least 1", field="workers", value=args.workers)
    prep = prepare(args.scenario, args.set, args.seed)
    args.time_model = None
    cm_path = getattr(args, "cost_model", None)
    if cm_path is not None or getattr(args, "time", False):
        from .timemodel import CostModel
        args.time_model = CostModel.load(cm_path) if cm_path is not None else CostModel()
    output_path(args.json, "--json")
    if args.plot:
        output_path(args.plot, "--plot", PLOT_SUFFIXES)
        _need_module("matplotlib", "--plot", "plot")
    if args.backend == "ray":
        _need_module("ray", "--backend ray", "cluster")
    parts = split(prep.spec, args.workers)
    need = check_memory(prep.spec, parts, args.backend) if args.backend != "ray" or not args.ray_address else None
    return prep, parts, need, available_memory()


def _cmd_run(args):
    if args.all or args.scenario is None:
        from .suite import cmd_run_all
        return cmd_run_all(args)
    if args.small:
        raise BatchMMUError("run --small: applies to --all only (docs/workbench.md)", field="small", value=True)
    from . import report
    from . import scenario as sc
    from .show import describe
    prep, parts, need, have = check_run(args)
    if args.dry_run:
        print(describe(prep, need, have, run=(len(parts), args.backend)))
        return 0
    from . import warmup
    from .warm import cache_is_cold
    _say(args, "compiling kernels (first run only; a few minutes on 2 cores) ..." if cache_is_cold()
         else "loading kernels ...")
    t = time.perf_counter()
    warmup()
    _say(args, f"kernels ready in {time.perf_counter() - t:.1f} s")
    try:
        rep = sc.run_scenario(prep, workers=args.workers, backend=args.backend, quiet=args.quiet, progress=True,
                              ray_address=args.ray_address, argv=args.argv, time=args.time_model)
    except sc.Interrupted as e:
        done = len(e.partial.phases) if e.partial else 0
        where = ""
        if args.json and e.partial:
            _write(f"{args.json}.partial", e.partial.to_json())
            where = f"; the finished phases are in {args.json}.partial"
        print(f"batchmmu: interrupted after {done} of {e.phases_total} phases{where}", file=sys.stderr)
        return 130
    if args.json:
        _write(args.json, rep.to_json())
    if args.plot:
        report.plot_host_memory(rep._asdict(), args.plot)
    if not args.quiet:
        print(sc.summary(rep))
        if args.plot:
            print(f"plot written to {args.plot}")
    skipped = [p for p in rep.phases if p.get("skipped")]
    for p in skipped:
        print(f"batchmmu: error: phase {p['name']!r} did not run: {p['skipped']}", file=sys.stderr)
    return 1 if skipped else 0


def _add_run(sub):
    r = sub.add_parser("run", help="run a scenario (bundled name or TOML file)")
    r.add_argument("scenario", nargs="?")
    r.add_argument("--all", action="store_true", help="run every bundled scenario as a suite (TAP lines)")
    r.add_argument("--small", action="store_true", help="with --all: small sizes (docs/workbench.md)")
    r.add_argument("--workers", type=int, default=1, help="shards of VMs (same statistics for any number)")
    r.add_argument("--backend", choices=("serial", "process", "ray"), default="serial")
    r.add_argument("--seed", type=int, default=None, help="the run's seed; the same as --set seed=S")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (backend ray)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter (name=value) or a section key (vm_group.vcpus=1); repeatable")
    r.add_argument("--json", metavar="PATH", help="write the full report (with provenance) as JSON")
    r.add_argument("--plot", metavar="PATH", help="write a plot (.png/.pdf/.svg; host memory over time with "
                   "overcommit)")
    r.add_argument("--dry-run", action="store_true", help="check everything, print what would run, run nothing")
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")
    r.add_argument("--time", action="store_true", help="simulated time with the default cost table: vCPUs "
                   "interleave by their clocks, mmu_lock contention, sim_seconds per phase (docs/time.md)")
    r.add_argument("--cost-model", metavar="FILE", default=None, help="simulated time with this cost table (TOML; "
                   "implies --time)")
    r.set_defaults(func=_cmd_run)


# ----------------------------------------------------------------------------- show, list
def _cmd_show(args):
    from .scenario import available_memory, check_memory
    from .shard import split
    from .show import describe
    from .spec import prepare
    prep = prepare(args.scenario, args.set)
    try:
        need = check_memory(prep.spec, split(prep.spec, 1), "serial")
    except BatchMMUError as e:   # show it anyway: the estimate is part of the answer
        need = e.value
    print(describe(prep, need, available_memory()))
    return 0


def _add_show(sub):
    s = sub.add_parser("show", help="a scenario's parameters (defaults, meaning), VM groups, phases, memory")
    s.add_argument("scenario")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="show it with these overrides")
    s.set_defaults(func=_cmd_show)


def _cmd_list(args):
    from .show import listing
    print(listing())
    return 0


def _add_list(sub):
    sub.add_parser("list", help="list bundled scenarios and their parameters").set_defaults(func=_cmd_list)


# ----------------------------------------------------------------------------- report, compare
def _cmd_report(args):
    from . import report
    output_path(args.csv, "--csv", (".csv",))
    output_path(args.csv_phases, "--csv-phases", (".csv",))
    if args.plot:
        output_path(args.plot, "--plot", PLOT_SUFFIXES)
        _need_module("matplotlib", "--plot", "plot")
    results = [report.load(p) for p in args.results]
    for i, d in enumerate(results):
        if i:
            print()
        print(report.table(d))
    for path, kind in ((args.csv, "per_vm"), (args.csv_phases, "phases")):
        if path:
            n = report.write_csv(results, path, kind, names=args.results)
            print(f"\n{n} rows ({kind}) written to {path}")
    if args.plot:
        report.plot(results, args.plot, names=args.results)
        print(f"\nplot written to {args.plot}")
    return 0


def _add_report(sub):
    rp = sub.add_parser("report", help="print, export (CSV) and plot --json results")
    rp.add_argument("results", nargs="+", metavar="RESULT.json")
    rp.add_argument("--csv", metavar="PATH", help="a row per VM: result, group, every statistic")
    rp.add_argument("--csv-phases", metavar="PATH", help="a row per phase: cumulative statistics and delta_ columns")
    rp.add_argument("--plot", metavar="PATH", help="write the standard plots (.png/.pdf/.svg) here")
    rp.set_defaults(func=_cmd_report)


def _cmd_compare(args):
    from . import report
    results = [report.load(p) for p in args.results]
    print(report.compare(results, names=args.results, show_all=args.all, phases=args.phases))
    return 0


def _add_compare(sub):
    c = sub.add_parser("compare", help="per-statistic deltas and ratios between results (or VM groups)")
    c.add_argument("results", nargs="+", metavar="RESULT.json",
                   help="the first is the baseline; one result with several VM groups compares its groups")
    c.add_argument("--all", action="store_true", help="list unchanged statistics too")
    c.add_argument("--phases", action="store_true", help="compare every phase's delta as well")
    c.set_defaults(func=_cmd_compare)


# ----------------------------------------------------------------------------- validate
def _cmd_validate(args):
    from . import realkvm, validate
    from .workload import list_workloads
    if args.list:
        for name, desc in list_workloads():
            print(f"{name:<20} {desc}")
        print("random:SEED[:STEPS]  seeded random steps (default 100)")
        return 0
    output_path(args.json, "--json")
    if args.calibrate:
        pr = realkvm.probe_guest()
        if not pr["guest"]:
            print(f"batchmmu: validate: kernel side skipped: {pr['reason']}", file=sys.stderr)
            return 0
        cal = realkvm.calibrate()
        if args.json:
            _write(args.json, validate.to_json(cal))
        print(validate.format_calibration(cal))
        return 0
    if args.workload is None:
        names = ", ".join(n for n, _ in list_workloads())
        raise BatchMMUError(f"workload=None: name a workload file, a bundled workload ({names}) or random:SEED",
                            field="workload")
    sides = "kernel" if args.kernel_only else "sim" if args.sim_only else "both"
    from .warm import cache_is_cold
    if sides != "kernel" and cache_is_cold():
        print("compiling kernels (first run only; a few minutes on 2 cores) ...", file=sys.stderr, flush=True)
    rep = validate.validate(args.workload, sides=sides)
    if args.json:
        _write(args.json, validate.to_json(rep))
    print(validate.format_report(rep, full=args.steps))
    if rep["kernel_skipped"]:
        print(f"batchmmu: validate: kernel side skipped: {rep['kernel_skipped']}", file=sys.stderr)
    return validate.exit_code(rep)


def _add_validate(sub):
    v = sub.add_parser("validate", help="run a workload on this machine's KVM and on the simulator, compare")
    v.add_argument("workload", nargs="?", help="bundled workload name, .toml/.json file, or random:SEED[:STEPS]")
    v.add_argument("--list", action="store_true", help="list the bundled workloads")
    v.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    only = v.add_mutually_exclusive_group()
    only.add_argument("--sim-only", action="store_true", help="run the simulator side only")
    only.add_argument("--kernel-only", action="store_true", help="run the kernel side only")
    v.add_argument("--steps", action="store_true", help="list every compared stat of every step, zeros included")
    v.add_argument("--calibrate", action="store_true", help="measure the kernel's µs per fault and per "
                   "emulated instruction instead")
    v.set_defaults(func=_cmd_validate)


# ----------------------------------------------------------------------------- warmup
def _cmd_warmup(args):
    from . import warmup
    from .kernels import CACHE_DIR
    from .warm import cache_is_cold, warm_jobs
    cold = cache_is_cold()
    jobs = warm_jobs(args.jobs)
    how = f"compiling kernels in {jobs} process{'es' if jobs > 1 else ''}" if cold else "loading kernels"
    print(f"{how} (cache {CACHE_DIR}) ...", flush=True)
    t = warmup(lambda done, total, name, s: print(f"[{done}/{total}] {name}: {s:.1f} s", flush=True), jobs=jobs,
               time_model=args.time)
    print(f"kernels ready in {t:.1f} s")
    return 0


def _add_warmup(sub):
    w = sub.add_parser("warmup", help="compile every kernel now (or load them from the cache), with progress")
    w.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="compile an empty cache in N processes at once (default: the usable CPUs, at most 3)")
    w.add_argument("--time", action="store_true", help="the time model's kernels too (--time runs need them)")
    w.set_defaults(func=_cmd_warmup)


# ----------------------------------------------------------------------------- main
def _add_workbench(sub):
    """sweep, plot, selftest: each module declares its own subcommand (batchmmu/sweep.py, plot.py, selftest.py)."""
    for mod in ("sweep", "plot", "selftest"):
        importlib.import_module(f"batchmmu.{mod}").add_parser(sub)


COMMANDS = [_add_run, _add_show, _add_list, _add_report, _add_compare, _add_validate, _add_warmup, _add_workbench]


def parser():
    p = argparse.ArgumentParser(prog="batchmmu", description="Simulate the KVM x86 MMU for many VMs at once.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    args.argv = ["batchmmu", *argv] if argv is not None else list(sys.argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("batchmmu: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:    # output piped into head and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BatchMMUError as e:
        print(f"batchmmu: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
