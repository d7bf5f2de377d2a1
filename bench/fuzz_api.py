"""Fuzz the public Host API at length (the suite's tests/test_api_fuzz.py runs a few hundred cases).

Usage: python bench/fuzz_api.py [--cases N] [--seed S] [--boundscheck]
Prints the counts: cases, escapes (non-BatchMMUError exceptions), state changes on rejection, bad
arguments accepted, errors naming another argument; exits 1 if any property failed.
``--boundscheck`` re-runs itself with BATCHMMU_BOUNDSCHECK=1 (every kernel compiled with bounds
checks: an out-of-range index raises IndexError, counted as an escape).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boundscheck", action="store_true")
    args = ap.parse_args()
    if args.boundscheck and os.environ.get("BATCHMMU_BOUNDSCHECK") != "1":
        env = dict(os.environ, BATCHMMU_BOUNDSCHECK="1")
        argv = [a for a in sys.argv[1:] if a != "--boundscheck"]
        sys.exit(subprocess.call([sys.executable, __file__, *argv], env=env))
    import apifuzz
    t = time.perf_counter()
    counts = apifuzz.Counts()
    chunk = 500
    for k in range(0, args.cases, chunk):
        apifuzz.run(args.seed * 1_000_003 + k, min(chunk, args.cases - k), counts)
    print(f"{counts} in {time.perf_counter() - t:.0f} s"
          f"{' (boundscheck)' if os.environ.get('BATCHMMU_BOUNDSCHECK') == '1' else ''}")
    for f in counts.failures[:20]:
        print("  ", f[:400])
    sys.exit(1 if counts.failures else 0)


if __name__ == "__main__":
    main()
