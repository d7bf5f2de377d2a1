"""Floors of the guest-paging cases: the same radix work as plain numba loops, on the simulator's own arrays and on
flat arrays, to say how far each kernel is from what numba can do over this memory (issue #11's "what stands in
the way").

    python bench/floors.py [--gib N]

Per case, median of 3-5 runs, ns per event and M events/s, 1 VM x ``--gib`` GiB, the guest of bench_shadow.py
(4-level, tables at 64 KiB, 4K leaves):

* shadow first touch: the guest walk, the A/D write, a shadow radix walk that allocates, one rmap store; through
  the real guest-memory hash, and with guest memory as one flat array (no memslot search, no hash);
* guest walk alone (hash / flat);
* warm 2D walk: the guest walk plus five 4-level TDP radix walks (hash / flat); cold: the radix allocates;
* shadow HIT: a 4-level walk of the simulator's own shadow tables after a first touch, and of a flat radix.
Compare with bench_shadow.py's figures of the same run (the machine drifts: run them back to back).
"""

import argparse
import statistics
import time

import bench_shadow as bs
import numpy as np
from batchmmu.kernels.gmem import gm_read64, gm_write64
from batchmmu.kernels.spte import spte_to_child_row
from batchmmu.kernels.state import VM_VCPU_OFF, VR_ROOT
from bench_radix import radix_touch
from numba import njit

import batchmmu as bm

MASK = np.int64(0x000FFFFFFFFFF000)


@njit(inline="always", _nrt=False)
def radix_hit(t, key):
    row = 0
    for level in range(4, 1, -1):
        row = t[row, (key >> (9 * (level - 1))) & 511]
    return t[row, key & 511]


@njit(inline="always", _nrt=False)
def gwalk(gm, sm, vm, cr3, gva, use_hash, flat):
    """A 4-level guest walk: through the guest-memory hash (memslot search, key, page) or a flat array."""
    pte = cr3
    gpa = np.int64(0)
    for level in range(4, 0, -1):
        gpa = (pte & MASK) + ((gva >> (12 + 9 * (level - 1))) & 511) * 8
        pte = gm_read64(gm, sm, vm, gpa) if use_hash else flat[gpa >> 3]
    return pte, gpa


@njit(_nrt=False)
def shadow_first_touch(gm, sm, cr3, t, rmap, gvas, use_hash, flat):
    top = 1
    for i in range(gvas.shape[0]):
        g = gvas[i]
        pte, gpa = gwalk(gm, sm, 0, cr3, g, use_hash, flat)
        if use_hash:
            gm_write64(gm, sm, 0, gpa, pte | 0x60)
        else:
            flat[gpa >> 3] = pte | 0x60
        top = radix_touch(t, 0, top, g >> 12)
        rmap[(pte & MASK) >> 12] = (top << 9) | ((g >> 12) & 511)
    return top


@njit(_nrt=False)
def walk_2d(gm, sm, cr3, t, gvas, use_hash, flat):
    top = 1
    for i in range(gvas.shape[0]):
        g = gvas[i]
        pte = cr3
        for level in range(4, 0, -1):
            top = radix_touch(t, 0, top, (pte & MASK) >> 12)      # the table's gpa through the TDP
            gpa = (pte & MASK) + ((g >> (12 + 9 * (level - 1))) & 511) * 8
            pte = gm_read64(gm, sm, 0, gpa) if use_hash else flat[gpa >> 3]
        top = radix_touch(t, 0, top, (pte & MASK) >> 12)          # the data gpa
    return top


@njit(_nrt=False)
def guest_walks(gm, sm, cr3, gvas, use_hash, flat):
    s = 0
    for i in range(gvas.shape[0]):
        s += gwalk(gm, sm, 0, cr3, gvas[i], use_hash, flat)[0]
    return s


@njit(_nrt=False)
def shadow_hits(spt, root, gvas):
    s = 0
    for i in range(gvas.shape[0]):
        row = root
        g = gvas[i]
        for level in range(4, 1, -1):
            row = spte_to_child_row(spt[row, (g >> (12 + 9 * (level - 1))) & 511])
        s += spt[row, (g >> 12) & 511] & 1
    return s


@njit(_nrt=False)
def radix_hits(t, gvas):
    s = 0
    for i in range(gvas.shape[0]):
        s += radix_hit(t, gvas[i] >> 12) & 1
    return s


@njit(_nrt=False)
def radix_fill(t, keys):
    top = 1
    for k in keys:
        top = radix_touch(t, 0, top, k)
    return top


def median_ns(fn, n, setup=lambda: None, reps=5):
    ts = []
    for _ in range(reps):
        st = setup()
        t = time.perf_counter()
        fn(st)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / n * 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    mem = int(ap.parse_args().gib * (1 << 30))
    pages = mem >> 12
    rng = np.random.default_rng(0)
    host, vms, gvas = bs.build(1, mem, "shadow", False)
    words = host.read_guest_memory(0, 0, (bs.TBL + 0x3000 + 8 * pages) // 8)
    flat0 = np.zeros(max(words.size, 1 << 20), np.int64)
    flat0[:words.size] = words.view(np.int64)
    order = bs.events(vms, gvas, rng)[1]
    hits = gvas[rng.integers(0, gvas.size, 1 << 22)]

    def fresh():
        h, _, _ = bs.build(1, mem, "shadow", False)
        return h, np.zeros((pages // 512 + 16, 512), np.int64), np.zeros(pages + 4096, np.int64), flat0.copy()

    def tdp():
        return np.zeros((pages // 512 + 64, 512), np.int64)

    sm, gm = host._slot_map(), host.gm
    r = {}
    for use_hash, how in ((True, "hash"), (False, "flat")):
        r[f"shadow first touch, {how}"] = median_ns(
            lambda s, u=use_hash: shadow_first_touch(s[0].gm, s[0]._slot_map(), bs.TBL, s[1], s[2], order, u, s[3]),
            order.size, fresh, 3)
        r[f"guest walk alone, {how}"] = median_ns(lambda _, u=use_hash: guest_walks(gm, sm, bs.TBL, hits, u, flat0),
                                                  hits.size)
        r[f"cold 2D walk, {how}"] = median_ns(lambda t, u=use_hash: walk_2d(gm, sm, bs.TBL, t, order, u, flat0),
                                              order.size, tdp, 3)
        warm = tdp()
        walk_2d(gm, sm, bs.TBL, warm, order, use_hash, flat0)
        r[f"warm 2D walk, {how}"] = median_ns(
            lambda _, u=use_hash, w=warm: walk_2d(gm, sm, bs.TBL, w, hits, u, flat0), hits.size)
    host.access(0, 0, gvas, bm.ACC_USER | bm.ACC_WRITE)
    root = int(host.vr.rec[int(host.vt.rec[0, VM_VCPU_OFF]), VR_ROOT])
    r["shadow HIT, the simulator's shadow tables"] = median_ns(lambda _: shadow_hits(host.pa.spt, root, hits),
                                                               hits.size)
    t = np.zeros((pages // 512 + 16, 512), np.int64)
    radix_fill(t, gvas >> 12)
    r["shadow HIT, flat radix"] = median_ns(lambda _: radix_hits(t, hits), hits.size)
    for k, v in r.items():
        print(f"{k:45s} {v:8.1f} ns/event  {1e3 / v:7.2f} M/s")


if __name__ == "__main__":
    main()
