"""``batchmmu run --all``: every bundled scenario as a test suite, TAP lines on stdout.

A scenario passes when it runs to the end and its checks hold: the scenarios that verify themselves
(``dirty_log``, ``dirty_log_page_splitting``: every dirty-log collection against the writes made) fail on
a lost write, and the checks below compare what the selftests assert.  ``--small`` runs each scenario
with the sizes in ``SMALL`` (seconds in all once the kernels are compiled).
"""

import sys
import time

from .errors import BatchMMUError

SMALL = {
    "access_tracking_perf": ["bytes_per_vcpu=4MiB"],
    "demand_paging": ["vms=2", "bytes_per_vcpu=4MiB"],
    "dirty_log": ["pages=4099", "iterations=2", "writes=512"],
    "dirty_log_page_splitting": ["bytes_per_vcpu=8MiB"],
    "dirty_log_perf": ["bytes_per_vcpu=8MiB"],
    "guest_os": ["vms=1", "memory=64MiB", "processes=3", "slices=4", "forks=2", "switch_every=64"],
    "kvm_page_table": ["test_mem_size=8MiB"],
    "max_guest_memory": ["max_mem=8GiB", "slot_size=1GiB"],
    "memslot_modification_stress": ["bytes_per_vcpu=8MiB", "ops=4", "passes=1"],
    "memslot_perf": ["slots=64", "loops=1"],
    "overcommit": ["busy_vms=4", "idle_vms=4", "bytes_per_vcpu=8MiB", "memory=48MiB", "epochs=2", "passes=1"],
    "migrate": ["bytes_per_vcpu=8MiB"],
}
# scenarios with ops on simulated time: the suite runs them with the default cost table
TIMED = {"migrate"}


def _phase_stat(rep, stat):
    return [p["stats"][stat] for p in rep.phases]


def _check_nx(rep):
    # x86/nx_huge_pages_test's asserted stats after each step (NX huge pages on)
    want = {"pages_2m": [1, 2, 1, 1, 1, 1, 2], "nx_lpage_splits": [0, 0, 1, 2, 2, 0, 0]}
    for stat, exp in want.items():
        got = _phase_stat(rep, stat)
        if got != exp:
            return f"{stat} after each step {got}, the selftest asserts {exp}"
    return None


def _check_demand_paging(rep):
    p = rep.params
    from .units import parse_size
    pages = int(p["vms"]) * int(p["vcpus"]) * parse_size(p["bytes_per_vcpu"]) // 4096
    if rep.totals["accesses"] != pages * int(p["passes"]):
        return f"accesses {rep.totals['accesses']}, expected {pages * int(p['passes'])}"
    page = {"4k": 1, "thp": 512, "hugetlb-2m": 512, "hugetlb-1g": 512 * 512}[p["backing"]]
    if rep.totals["pf_fixed"] != pages // page:
        return f"pf_fixed {rep.totals['pf_fixed']}, one fault per backing page is {pages // page}"
    return None


def _check_trace(rep):
    from . import trace
    from .scenario import apply_overrides, load_scenario, resolve
    data, text, origin = load_scenario("trace_replay")
    spec = resolve(apply_overrides(data, []), text, origin)
    want = spec["trace"]["pages"] * int(rep.params["vms"])
    if rep.params.get("backing") == "4k" and rep.totals["pages_4k"] != want:
        return f"pages_4k {rep.totals['pages_4k']}, the trace has {want} distinct pages ({trace.__name__})"
    return None


def _check_migrate(rep):
    bad = [m["vm"] for p in rep.phases for m in p.get("migration", []) if not m["converged"]]
    return f"VMs {bad} did not converge with the scenario's defaults" if bad else None


CHECKS = {"nx_huge_pages": _check_nx, "demand_paging": _check_demand_paging, "trace_replay": _check_trace,
          "migrate": _check_migrate}


def run_all(small=False, workers=1, backend="serial", seed=0, out=sys.stdout, names=None):
    """Run every bundled scenario; prints TAP; returns the number of failures."""
    from .scenario import list_scenarios, run_scenario
    names = names or [n for n, _ in list_scenarios()]
    print("TAP version 13", file=out)
    print(f"1..{len(names)}", file=out, flush=True)
    failed = 0
    for i, name in enumerate(names, 1):
        sets = SMALL.get(name, []) if small else []
        t = time.perf_counter()
        why = None
        try:
            rep = run_scenario(name, workers=workers, backend=backend, seed=seed, sets=sets, quiet=True,
                               time=name in TIMED or None)
            check = CHECKS.get(name)
            why = check(rep) if check else None
        except BatchMMUError as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - a crash is a failed test, the suite goes on
            why = f"{type(e).__name__}: {e}"
        dt = time.perf_counter() - t
        extra = f" ({' '.join(sets)})" if sets else ""
        if why is None:
            print(f"ok {i} - {name}{extra} # {dt:.2f} s", file=out, flush=True)
        else:
            failed += 1
            print(f"not ok {i} - {name}{extra} # {dt:.2f} s", file=out)
            for line in str(why).splitlines() or [""]:
                print(f"  # {line}", file=out)
            out.flush()
    print(f"# {len(names) - failed} passed, {failed} failed", file=out, flush=True)
    return failed


def cmd_run_all(args):
    if args.scenario is not None and args.all:
        raise BatchMMUError(f"run {args.scenario} --all: give a scenario or --all, not both", field="scenario",
                            value=args.scenario)
    if not args.all:
        raise BatchMMUError("run: name a scenario (batchmmu list) or give --all", field="scenario", value=None)
    for opt in ("set", "json", "plot"):
        if getattr(args, opt, None):
            raise BatchMMUError(f"run --all: --{opt} applies to one scenario", field=opt, value=getattr(args, opt))
    from . import warmup
    warmup()
    return 1 if run_all(args.small, args.workers, args.backend, args.seed) else 0
