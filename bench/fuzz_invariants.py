"""Run the security-invariant fuzzer (tests/invariant_fuzz.py) over many seeds.

    python bench/fuzz_invariants.py --cases 500 --steps 80 [--first 1000]

Prints the cases run, the checks made and the violations found (the first one in full); exits 1 on a
violation.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from invariant_fuzz import InvariantViolation, run_case  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--first", type=int, default=1000, help="first seed")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    checks, bad = 0, []
    for seed in range(a.first, a.first + a.cases):
        try:
            checks += run_case(seed, a.steps)
        except InvariantViolation as e:
            bad.append((seed, e))
    print(f"cases {a.cases} (seeds {a.first}..{a.first + a.cases - 1}), steps/VM {a.steps}, checks {checks}, "
          f"violations {len(bad)}, {time.perf_counter() - t0:.1f} s")
    if bad:
        print(f"first violation (seed {bad[0][0]}):\n{bad[0][1]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
