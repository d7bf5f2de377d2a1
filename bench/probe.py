"""Memory probe: how fast can this machine do the loads a page-table simulator needs?

Two numba kernels over an int64 array of a given size (the size of the simulated
page tables):

* ``gather``: independent random u64 loads (indices precomputed), summed.  The CPU
  overlaps the misses (memory-level parallelism); this is the ceiling for one
  random table lookup per event.
* ``chase``: a dependent pointer chase around one random cycle (Sattolo), i.e. the
  latency of one load whose address depends on the previous one.

``probe(nbytes, n_loads)`` returns loads/s for both (median of ``repeats`` runs).
Run as a script for a quick table: ``python bench/probe.py [MiB ...]``.
"""

import statistics
import sys
import time

import numpy as np
from numba import njit


@njit(cache=True)
def gather(arr, idx):
    s = 0
    for i in range(idx.shape[0]):
        s += arr[idx[i]]
    return s


@njit(cache=True)
def chase(nxt, start, steps):
    p = start
    for _ in range(steps):
        p = nxt[p]
    return p


@njit(cache=True)
def sattolo_cycle(n, seed):
    """A single random cycle over 0..n-1 (Sattolo's algorithm): nxt[i] is i's successor."""
    np.random.seed(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = np.random.randint(0, i)
        perm[i], perm[j] = perm[j], perm[i]
    nxt = np.empty(n, np.int64)
    for i in range(n):
        nxt[perm[i]] = perm[(i + 1) % n]
    return nxt


def _median_rate(fn, n, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def warmup():
    a = np.arange(64, dtype=np.int64)
    gather(a, np.zeros(4, np.int64))
    chase(sattolo_cycle(64, 0), 0, 4)


def probe(nbytes, n_loads=4_000_000, n_chase=None, repeats=5, seed=0):
    """Loads/s of independent random gathers and of a dependent chase over ``nbytes``.

    Returns ``{"bytes", "gather_loads_per_s", "chase_loads_per_s", "chase_ns"}``.
    """
    warmup()
    n = max(64, int(nbytes) // 8)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 1 << 20, n, dtype=np.int64)
    idx = rng.integers(0, n, n_loads, dtype=np.int64)
    gather(arr, idx)  # first touch of both arrays, untimed
    g = _median_rate(lambda: gather(arr, idx), n_loads, repeats)
    nxt = sattolo_cycle(n, seed)
    steps = n_chase if n_chase is not None else max(100_000, n_loads // 8)
    chase(nxt, 0, min(steps, n))  # touch the cycle once
    c = _median_rate(lambda: chase(nxt, 0, steps), steps, repeats)
    return {"bytes": int(nbytes), "gather_loads_per_s": g, "chase_loads_per_s": c, "chase_ns": 1e9 / c}


def main(argv):
    sizes = [float(a) for a in argv] or [1, 4, 16, 64, 256]
    print(f"{'MiB':>8} {'gather M/s':>12} {'chase M/s':>10} {'chase ns':>9}")
    for mib in sizes:
        r = probe(int(mib * (1 << 20)))
        print(f"{mib:8g} {r['gather_loads_per_s'] / 1e6:12.1f} {r['chase_loads_per_s'] / 1e6:10.1f} "
              f"{r['chase_ns']:9.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
