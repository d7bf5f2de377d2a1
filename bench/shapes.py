"""Shape of the kernel layer: the widest compiled signature and the longest modules.

    python bench/shapes.py [--no-warmup] [--top N]

Runs ``bm.warmup()`` (loads every kernel group from the cache, or compiles it), then, for every numba
dispatcher in ``batchmmu.kernels``, counts the arrays each compiled signature passes (tuples flattened:
numba passes every member of a tuple argument as its own machine arguments) and prints the widest
signatures, the signatures per kernel, and the line counts of the longest modules.
"""

import argparse
from pathlib import Path

import batchmmu as bm
from batchmmu.warm import kernel_signatures

REPO = Path(__file__).resolve().parents[1]


def module_lines():
    files = list((REPO / "batchmmu").glob("*.py")) + list((REPO / "kernels").glob("*.py"))
    return sorted(((sum(1 for _ in open(f)), f.relative_to(REPO).as_posix()) for f in files), reverse=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args()
    if not a.no_warmup:
        bm.warmup()
    w = {k: (n, width) for k, (n, _, width) in kernel_signatures().items() if n}
    flat = sorted(((width, k, n) for k, (n, width) in w.items()), reverse=True)
    print(f"{len(w)} kernels compiled, {sum(n for n, _ in w.values())} signatures; "
          f"kernels with more than one signature: {[k for k, (n, _) in w.items() if n > 1]}")
    print("widest signatures (arrays, tuples flattened):")
    for n, k, nsig in flat[:a.top]:
        print(f"  {n:4d}  {k}" + (f"  ({nsig} signatures)" if nsig > 1 else ""))
    over = [k for n, k, _ in flat if n > 32]
    print(f"kernels over 32 arrays: {len(over)}")
    print("longest modules (lines):")
    for n, f in module_lines()[:a.top]:
        print(f"  {n:5d}  {f}")


if __name__ == "__main__":
    main()
