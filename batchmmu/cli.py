"""The ``batchmmu`` command line: ``run``, ``report``, ``validate``, ``warmup``, ``list``."""

import argparse
import sys
import time

from .errors import BatchMMUError


def _numba_cache_cold():
    """True if the kernels' on-disk numba cache is missing (first run compiles them)."""
    from .kernels import CACHE_DIR
    return not any(CACHE_DIR.rglob("*.nbi")) if CACHE_DIR.exists() else True


def cmd_run(args):
    from . import scenario as sc
    from . import warmup
    cold = _numba_cache_cold()
    if not args.quiet:
        print("compiling kernels (first run only, about a minute) ..." if cold else "loading kernels ...",
              file=sys.stderr, flush=True)
    t = time.perf_counter()
    warmup()
    if not args.quiet:
        print(f"kernels ready in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rep = sc.run_scenario(args.scenario, workers=args.workers, backend=args.backend, seed=args.seed,
                          sets=args.set, quiet=args.quiet, progress=True, ray_address=args.ray_address)
    if args.json:
        with open(args.json, "w") as f:
            f.write(rep.to_json())
    if args.plot:
        from . import report
        report.plot_host_memory(rep._asdict(), args.plot)
    if not args.quiet:
        print(sc.summary(rep))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def cmd_report(args):
    from . import report
    results = [report.load(p) for p in args.results]
    for i, d in enumerate(results):
        if i:
            print()
        print(report.table(d))
    if args.plot:
        report.plot(results, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


def cmd_validate(args):
    from . import realkvm, validate
    if args.calibrate:
        pr = realkvm.probe_guest()
        if not pr["guest"]:
            print(f"batchmmu: validate: kernel side skipped: {pr['reason']}", file=sys.stderr)
            return 0
        cal = realkvm.calibrate()
        if args.json:
            with open(args.json, "w") as f:
                f.write(validate.to_json(cal))
        print(validate.format_calibration(cal))
        return 0
    if args.workload is None:
        from .workload import list_workloads
        names = ", ".join(n for n, _ in list_workloads())
        raise BatchMMUError(f"workload=None: name a workload file, a bundled workload ({names}) or random:SEED",
                            field="workload")
    sides = "kernel" if args.kernel_only else "sim" if args.sim_only else "both"
    if sides != "kernel" and _numba_cache_cold():
        print("compiling kernels (first run only, about a minute) ...", file=sys.stderr, flush=True)
    rep = validate.validate(args.workload, sides=sides)
    if args.json:
        with open(args.json, "w") as f:
            f.write(validate.to_json(rep))
    print(validate.format_report(rep, full=args.steps))
    if rep["kernel_skipped"]:
        print(f"batchmmu: validate: kernel side skipped: {rep['kernel_skipped']}", file=sys.stderr)
    return validate.exit_code(rep)


def cmd_warmup(args):
    from . import warmup
    from .kernels import CACHE_DIR
    print(f"{'compiling' if _numba_cache_cold() else 'loading'} kernels (cache {CACHE_DIR}) ...", flush=True)
    t = warmup(lambda done, total, name, s: print(f"[{done}/{total}] {name}: {s:.1f} s", flush=True))
    print(f"kernels ready in {t:.1f} s")
    return 0


def cmd_list(args):
    from .scenario import list_scenarios
    for name, desc in list_scenarios():
        print(f"{name:<24} {desc}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="batchmmu", description="Simulate the KVM x86 MMU for many VMs at once.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a scenario (bundled name or TOML file)")
    r.add_argument("scenario")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--backend", choices=("serial", "process", "ray"), default="serial")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (backend ray)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario parameter (repeatable)")
    r.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    r.add_argument("--plot", metavar="PATH", help="write a plot (footprint and refaults over time with overcommit)")
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="print (and plot) one or more --json results")
    rp.add_argument("results", nargs="+", metavar="RESULT.json")
    rp.add_argument("--plot", metavar="PATH", help="write the standard plots (PNG/PDF/SVG) here")
    rp.set_defaults(func=cmd_report)
    v = sub.add_parser("validate", help="run a workload on this machine's KVM and on the simulator, compare")
    v.add_argument("workload", nargs="?", help="bundled workload name, .toml/.json file, or random:SEED[:STEPS]")
    v.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    only = v.add_mutually_exclusive_group()
    only.add_argument("--sim-only", action="store_true", help="run the simulator side only")
    only.add_argument("--kernel-only", action="store_true", help="run the kernel side only")
    v.add_argument("--steps", action="store_true", help="list every compared stat of every step, zeros included")
    v.add_argument("--calibrate", action="store_true", help="measure the kernel's µs per fault and per "
                   "emulated instruction instead")
    v.set_defaults(func=cmd_validate)
    w = sub.add_parser("warmup", help="compile every kernel now (or load them from the cache), with progress")
    w.set_defaults(func=cmd_warmup)
    ls = sub.add_parser("list", help="list bundled scenarios")
    ls.set_defaults(func=cmd_list)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except BatchMMUError as e:
        print(f"batchmmu: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
