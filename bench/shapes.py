"""Shape of the kernel layer: the widest compiled signature and the longest modules.

    python bench/shapes.py [--no-warmup] [--top N]

Runs ``bm.warmup()`` (loads every kernel group from the cache, or compiles it), then, for every numba
dispatcher in ``batchmmu.kernels``, counts the arrays each compiled signature passes (tuples flattened:
numba passes every member of a tuple argument as its own machine arguments) and prints the widest
signatures, the signatures per kernel, and the line counts of the longest modules.
"""

import argparse
import importlib
import pkgutil
from pathlib import Path

import batchmmu.kernels as K
from numba.core import types
from numba.core.registry import CPUDispatcher

import batchmmu as bm

REPO = Path(__file__).resolve().parents[1]


def arrays_in(ty):
    """Arrays a value of numba type ``ty`` passes to a compiled call (tuples flattened)."""
    if isinstance(ty, types.Array):
        return 1
    if isinstance(ty, types.BaseTuple):
        return sum(arrays_in(t) for t in ty.types)
    return 0


def dispatchers():
    seen = {}
    for info in pkgutil.iter_modules(K.__path__):
        mod = importlib.import_module(f"batchmmu.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == mod.__name__:
                seen[f"{info.name}.{name}"] = obj
    return seen


def widths():
    """{kernel: [arrays per compiled signature]} for every kernel compiled or loaded in this process."""
    out = {}
    for name, d in dispatchers().items():
        sigs = [sum(arrays_in(t) for t in sig) for sig in d.signatures]
        if sigs:
            out[name] = sigs
    return out


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
    w = widths()
    flat = sorted(((max(v), k, len(v)) for k, v in w.items()), reverse=True)
    print(f"{len(w)} kernels compiled, {sum(len(v) for v in w.values())} signatures; "
          f"kernels with more than one signature: {[k for k, v in w.items() if len(v) > 1]}")
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
