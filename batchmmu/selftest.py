"""``batchmmu selftest NAME [flags]``: a KVM selftest's own command line, run as the bundled scenario.

The selftest's flags (parsed with getopt, as the selftests do) and its defaults (1 vCPU, 1 GiB per vCPU,
...) map onto the scenario's parameters; backing names (``-s anonymous_thp`` ...) onto batchmmu's.
Flags about the host process (CPU pinning, verbosity) are accepted and reported as ignored; flags whose
behaviour is not modelled are errors, as are unknown flags.  The equivalent ``batchmmu run`` line is
printed first.
"""

import getopt
import sys
from typing import NamedTuple

from .errors import BatchMMUError
from .units import parse_size

BACKINGS = {"anonymous": "4k", "anonymous_thp": "thp", "anonymous_hugetlb": "hugetlb-2m",
            "anonymous_hugetlb_2mb": "hugetlb-2m", "anonymous_hugetlb_1gb": "hugetlb-1g", "shmem": "4k",
            "shared_hugetlb": "hugetlb-2m"}
_NO_X86 = ("16kb", "64kb", "512kb", "1mb", "8mb", "16mb", "32mb", "256mb", "512mb", "2gb", "16gb")
MEMSLOT_TESTS = ("map", "unmap", "unmap chunked", "move active area", "move inactive area", "RW")


class Run(NamedTuple):
    scenario: str
    sets: list
    label: str = ""
    phases: tuple = ()          # only these phases (memslot_perf_test -f/-e); empty: all


def _backing(v, flag):
    if v in BACKINGS:
        return BACKINGS[v]
    if v.startswith("anonymous_hugetlb_") and v[len("anonymous_hugetlb_"):] in _NO_X86:
        raise BatchMMUError(f"{flag} {v}: x86 has 2 MiB and 1 GiB huge pages only", field=flag, value=v)
    raise BatchMMUError(f"{flag} {v}: unknown backing source (known: {', '.join(BACKINGS)})", field=flag, value=v)


def _size(v, flag):
    return str(parse_size(v, flag))


def _int(v, flag, lo=None):
    try:
        n = int(v, 0)
    except ValueError:
        raise BatchMMUError(f"{flag} {v!r}: not an integer", field=flag, value=v) from None
    if lo is not None and n < lo:
        raise BatchMMUError(f"{flag} {v}: must be at least {lo}", field=flag, value=v)
    return str(n)


def _const(value):
    return lambda v, f: value


_IGNORE = {"c": "CPU pinning has no meaning here", "m": "x86 has one guest mode", "p": "the physical offset "
           "is not modelled (the test region sits at the top of guest memory)"}
# name -> (scenario, getopt string, {flag: (parameter or None, converter)}, defaults, unsupported, ignored)
TESTS = {
    "dirty_log_perf_test": ("dirty_log_perf", "ab:c:eghi:m:nop:r:s:v:x:w:", {
        "a": ("random_access", _const("true")), "b": ("bytes_per_vcpu", _size), "g": ("manual_protect",
        _const("false")), "i": ("iterations", lambda v, f: _int(v, f, 2)), "o": ("overlap", _const("true")),
        "r": ("seed", _int), "s": ("backing", _backing), "v": ("vcpus", lambda v, f: _int(v, f, 1)),
        "x": ("slots", lambda v, f: _int(v, f, 1)), "w": ("write_percent", _int)},
        {"vcpus": "1", "bytes_per_vcpu": str(1 << 30), "iterations": "2", "backing": "4k", "slots": "1",
         "write_percent": "100", "seed": "1", "manual_protect": "true", "random_access": "false",
         "overlap": "false"},
        {"e": "vCPUs running while logging is disabled", "n": "nested (L2) vCPUs"}, _IGNORE),
    "demand_paging_test": ("demand_paging", "ahom:u:d:b:s:v:c:r:", {
        "b": ("bytes_per_vcpu", _size), "s": ("backing", _backing), "v": ("vcpus", lambda v, f: _int(v, f, 1))},
        {"vcpus": "1", "bytes_per_vcpu": str(1 << 30), "backing": "4k", "passes": "1", "write_percent": "100",
         "access_order": "sequential"},
        {"o": "overlapping vCPU regions in demand_paging", "a": "one userfaultfd for all memory"},
        {**_IGNORE, "u": "userfaultfd resolves the host fault; KVM's faults are the same",
         "d": "the userfaultfd handler's delay is not modelled", "r": "userfaultfd reader threads"}),
    "access_tracking_perf_test": ("access_tracking_perf", "hm:b:v:os:w:c:", {
        "b": ("bytes_per_vcpu", _size), "v": ("vcpus", lambda v, f: _int(v, f, 1)), "s": ("backing", _backing),
        "o": ("workload.overlap", _const("true"))},
        {"vcpus": "1", "bytes_per_vcpu": str(1 << 30), "backing": "4k"}, {},
        {**_IGNORE, "w": "no idle-page assertion here: the counts are printed"}),
    "memslot_perf_test": ("memslot_perf", "hvdqs:f:e:l:r:", {"s": ("slots", _int)},
                          {"slots": "-1"}, {"q": "the slot zap-all quirk off", "l": "a time limit per run "
                                            "(the scenario runs `loops` iterations: --set loops=N)"},
                          {"v": "verbose output", "d": "data verification", "r": "runs: one run per test"}),
    "dirty_log_test": ("dirty_log", "c:hi:I:p:m:M:", {"i": ("iterations", lambda v, f: _int(v, f, 1))},
                       {"pages": str((1 << 18) + 3), "iterations": "32"}, {},
                       {"m": _IGNORE["m"], "p": _IGNORE["p"],
                        "I": "the interval: each half iteration makes `writes` writes (--set writes)"}),
    "kvm_page_table_test": ("kvm_page_table", "hp:m:b:v:s:", {
        "b": ("test_mem_size", _size), "v": ("vcpus", lambda v, f: _int(v, f, 1)), "s": ("backing", _backing)},
        {"vcpus": "1", "test_mem_size": str(1 << 30), "backing": "4k"}, {}, _IGNORE),
    "memslot_modification_stress_test": ("memslot_modification_stress", "hm:d:b:v:oi:", {
        "b": ("bytes_per_vcpu", _size), "v": ("vcpus", lambda v, f: _int(v, f, 1)),
        "o": ("workload.overlap", _const("true")), "i": ("ops", lambda v, f: _int(v, f, 0))},
        {"vcpus": "1", "bytes_per_vcpu": str(1 << 30), "ops": "10"}, {},
        {**_IGNORE, "d": "the delay between memslot operations is not modelled"}),
}
_RING_DEFAULT = 65536


def usage(name):
    scen, opts, flags, defaults, unsupported, ignored = TESTS[name]
    lines = [f"batchmmu selftest {name} [flags]: runs scenario {scen}", "  flags:"]
    letters = sorted({c for c in opts if c.isalpha()} - {"h"}, key=str.lower)
    for c in letters:
        if c in flags:
            lines.append(f"    -{c}  -> {flags[c][0]}")
        elif c in unsupported:
            lines.append(f"    -{c}  not modelled: {unsupported[c]}")
        elif c in ignored:
            lines.append(f"    -{c}  ignored: {ignored[c]}")
    if name == "dirty_log_test":
        lines.append("    -M  dirty-log | clear-log | dirty-ring | all (default: all, one run each)")
        lines.append("    -c  dirty ring entries (dirty-ring mode; default 65536, rounded down to a power of two)")
    if name == "memslot_perf_test":
        lines.append("    -f/-e  first/last test (0..5: " + ", ".join(MEMSLOT_TESTS) + ")")
    lines.append("  selftest defaults: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return "\n".join(lines)


def translate(name, argv):
    """The runs a selftest command line means: a list of Run, and notes (flags ignored)."""
    if name not in TESTS:
        raise BatchMMUError(f"selftest {name!r}: not mapped (known: {', '.join(TESTS)})", field="selftest",
                            value=name)
    scen, opts, flags, defaults, unsupported, ignored = TESTS[name]
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        parsed, rest = getopt.getopt(argv, opts)
    except getopt.GetoptError as e:
        raise BatchMMUError(f"{name}: {e.msg} (flags: {usage(name).split(chr(10), 1)[1]})",
                            field=f"-{e.opt}" if e.opt else "flag", value=e.opt) from None
    if rest:
        raise BatchMMUError(f"{name}: unexpected argument {rest[0]!r}", field="argument", value=rest[0])
    params = {"vms": "1", **defaults}   # a selftest runs one VM
    notes, extra = [], {}
    for opt, val in parsed:
        c = opt[1:]
        if c == "h":
            return None, [usage(name)]
        if c in flags:
            key, conv = flags[c]
            params[key] = conv(val, opt)
        elif c in unsupported:
            raise BatchMMUError(f"{name} {opt}: {unsupported[c]}: not modelled by batchmmu", field=opt, value=val)
        elif c in ignored:
            notes.append(f"{opt}{' ' + val if val else ''} ignored: {ignored[c]}")
        else:
            extra[c] = val
    if name == "memslot_perf_test":
        first = int(_int(extra.get("f", "0"), "-f", 0))
        last = int(_int(extra.get("e", str(len(MEMSLOT_TESTS) - 1)), "-e", 0))
        if first > last or last >= len(MEMSLOT_TESTS):
            raise BatchMMUError(f"{name} -f {first} -e {last}: tests are 0..{len(MEMSLOT_TESTS) - 1}, first <= last",
                                field="-e", value=last)
        phases = MEMSLOT_TESTS[first:last + 1]
        return [Run(scen, _sets(params), "", phases if len(phases) < len(MEMSLOT_TESTS) else ())], notes
    if name == "dirty_log_test":
        mode = extra.get("M", "all")
        modes = ("dirty-log", "clear-log", "dirty-ring") if mode == "all" else (mode,)
        if any(m not in ("dirty-log", "clear-log", "dirty-ring") for m in modes):
            raise BatchMMUError(f"{name} -M {mode}: use dirty-log, clear-log, dirty-ring or all", field="-M",
                                value=mode)
        ring = int(_int(extra.get("c", str(_RING_DEFAULT)), "-c", 1))
        ring = min(1 << (ring.bit_length() - 1), 1 << (int(params["pages"]).bit_length() - 1))
        runs = []
        for m in modes:
            p = dict(params, manual_protect="true" if m == "clear-log" else "false",
                     dirty_ring=str(ring) if m == "dirty-ring" else "0")
            runs.append(Run(scen, _sets(p), m))
        return runs, notes
    return [Run(scen, _sets(params))], notes


def _sets(params):
    return [f"{k}={v}" for k, v in params.items()]


def command_line(run, backend_args=""):
    line = f"batchmmu run {run.scenario} " + " ".join(f"--set {s}" for s in run.sets) + backend_args
    if run.phases:
        line += f"   (phases: {', '.join(run.phases)})"
    return line


def execute(run, workers=1, backend="serial", seed=0, quiet=False):
    """Run one translated selftest run; returns the Report."""
    from . import scenario as sc
    data, _, _ = sc.load_scenario(run.scenario)
    if run.phases:
        data = dict(data, phase=[p for p in data["phase"] if p.get("name") in run.phases])
    return sc.run_scenario(data, workers=workers, backend=backend, seed=seed, sets=run.sets, quiet=quiet,
                           progress=not quiet)


def add_parser(sub):
    import argparse
    p = sub.add_parser("selftest", help="run a KVM selftest's command line (dirty_log_perf_test -v 4 -b 1G ...)",
                       description="batchmmu options go before NAME; everything after NAME is the selftest's.")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backend", choices=("serial", "process", "ray"), default="serial")
    p.add_argument("--json", metavar="PATH", help="write the report (the last run's, with -M all) as JSON")
    p.add_argument("--dry-run", action="store_true", help="print the equivalent batchmmu run line(s) only")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("name", help="selftest: " + ", ".join(TESTS))
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the selftest's own flags")
    p.set_defaults(func=cmd_selftest)


def cmd_selftest(args):
    from pathlib import Path
    runs, notes = translate(args.name, args.flags)
    if runs is None:
        print(notes[0])
        return 0
    if args.json and not Path(args.json).parent.is_dir():
        raise BatchMMUError(f"--json {args.json}: no such directory", field="json", value=args.json)
    be = f" --workers {args.workers} --backend {args.backend}" if args.workers > 1 or args.backend != "serial" else ""
    for n in notes:
        print(f"batchmmu: selftest: {n}", file=sys.stderr)
    for r in runs:
        print(f"{args.name}{' (' + r.label + ')' if r.label else ''}: {command_line(r, be)}", file=sys.stderr)
    if args.dry_run:
        return 0
    from . import scenario as sc
    from . import warmup
    warmup()
    rep = None
    for r in runs:
        rep = execute(r, args.workers, args.backend, quiet=args.quiet)
        if not args.quiet:
            print(sc.summary(rep))
    if args.json:
        with open(args.json, "w") as f:
            f.write(rep.to_json())
    return 0
