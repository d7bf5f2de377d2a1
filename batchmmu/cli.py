"""The ``batchmmu`` command line: ``run``, ``list``."""

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
    if not args.quiet:
        print(sc.summary(rep))
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
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="print (and plot) one or more --json results")
    rp.add_argument("results", nargs="+", metavar="RESULT.json")
    rp.add_argument("--plot", metavar="PATH", help="write the standard plots (PNG/PDF/SVG) here")
    rp.set_defaults(func=cmd_report)
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
