"""Why many VMs are slower than one: two small experiments behind the suggestions in README.md.

    python bench/micro_walk.py

1. First touch of the same pages in four event orders (VM-major sequential, VM-major with
   random pages inside each VM, round-robin over VMs with sequential pages, fully random):
   separates the cost of switching VM between events from the cost of random table access.
2. Random HITs on the populated tables: ``host.access`` against a minimal 4-level walk (no
   checks, no stats; the leaf SPTE is stored so the compiler keeps its load) and against the same
   walk entered at a per-VM, per-GiB cached PD row (what a paging-structure cache would give).
3. The same three on 1 VM with only 16 distinct pages (random order): the per-event cost with
   every SPTE in L1, i.e. the instructions of the HIT path.

Medians of 5 runs, ns per event; one core.
"""

import statistics
import time

import numpy as np
from numba import njit

import batchmmu as bm

_PFN = np.int64((1 << 40) - 1)
_ROW_BASE = np.int64(1 << 38)    # non-leaf SPTEs point at arena rows (PT_PFN_BASE + row)
_LARGE = np.int64(1 << 7)


@njit(_nrt=False, cache=True)
def walk4(spt, roots, ev_vm, ev_addr, out):
    for i in range(ev_vm.shape[0]):
        row = roots[ev_vm[i]]
        gfn = ev_addr[i] >> 12
        level = 4
        while True:
            spte = spt[row, (gfn >> ((level - 1) * 9)) & 511]
            if level == 1 or (spte & _LARGE) != 0:
                break
            row = ((spte >> 12) & _PFN) - _ROW_BASE
            level -= 1
        out[i] = spte


@njit(cache=True)
def pd_rows(spt, roots, nvm, ngib):
    """Row of the PD table of each (VM, GiB): what a per-VM paging-structure cache would hold."""
    pd = np.empty(nvm * ngib, np.int64)
    for vm in range(nvm):
        pdpt = ((spt[roots[vm], 0] >> 12) & _PFN) - _ROW_BASE
        for g in range(ngib):
            pd[vm * ngib + g] = ((spt[pdpt, g] >> 12) & _PFN) - _ROW_BASE
    return pd


@njit(_nrt=False, cache=True)
def walk_from_pd(spt, pd, ngib, ev_vm, ev_addr, out):
    for i in range(ev_vm.shape[0]):
        gfn = ev_addr[i] >> 12
        row = pd[ev_vm[i] * ngib + (gfn >> 18)]
        level = 2
        while True:
            spte = spt[row, (gfn >> ((level - 1) * 9)) & 511]
            if level == 1 or (spte & _LARGE) != 0:
                break
            row = ((spte >> 12) & _PFN) - _ROW_BASE
            level -= 1
        out[i] = spte


def median_ns(fn, n, setup=None, repeats=5):
    times = []
    for _ in range(repeats):
        state = setup() if setup else None
        t = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / n * 1e9


def main():
    bm.warmup()
    rng = np.random.default_rng(0)
    configs = ((1, 4 << 30), (1024, 4 << 20), (1024, 16 << 20))
    print("1. first touch, ns per 4K fault, by event order")
    for nvm, mem in configs:
        npg = mem >> 12

        def setup(nvm=nvm, mem=mem):
            h = bm.Host(memory=nvm * mem + (1 << 30), backing="4k")
            h.create_vms(nvm, memory=mem)
            return h
        vm_major = np.repeat(np.arange(nvm, dtype=np.int64), npg)
        pages = np.tile(np.arange(npg, dtype=np.int64), nvm)
        p = rng.permutation(vm_major.size)
        orders = {
            "VM-major sequential": (vm_major, pages),
            "VM-major, random pages in VM": (vm_major, np.concatenate([rng.permutation(npg) for _ in range(nvm)])),
            "round-robin VMs, sequential pages": (np.tile(np.arange(nvm, dtype=np.int64), npg),
                                                  np.repeat(np.arange(npg, dtype=np.int64), nvm)),
            "fully random": (vm_major[p], pages[p]),
        }
        for name, (v, pg) in orders.items():
            a = pg << 12
            ns = median_ns(lambda h, v=v, a=a: h.access(v, 0, a, bm.ACC_WRITE), v.size, setup)
            print(f"  {nvm:5d} VM x {mem >> 20:5d} MiB  {name:<36} {ns:7.1f}")

    print("2. random HITs, ns per event")
    for nvm, mem in configs:
        t_acc, t_w4, t_pd = random_hits(nvm, mem, rng)
        print(f"  {nvm:5d} VM x {mem >> 20:5d} MiB  host.access {t_acc:6.1f}   minimal 4-level walk {t_w4:6.1f}"
              f"   walk from cached PD row {t_pd:6.1f}")
    print("3. random HITs on 16 distinct pages (all cached), ns per event")
    t_acc, t_w4, t_pd = random_hits(1, 4 << 30, rng, distinct=16)
    print(f"      1 VM x  4096 MiB  host.access {t_acc:6.1f}   minimal 4-level walk {t_w4:6.1f}"
          f"   walk from cached PD row {t_pd:6.1f}")


def random_hits(nvm, mem, rng, distinct=None):
    npg = mem >> 12
    h = bm.Host(memory=nvm * mem + (1 << 30), backing="4k")
    h.create_vms(nvm, memory=mem)
    vm = np.repeat(np.arange(nvm, dtype=np.int64), npg)
    addr = np.tile(np.arange(npg, dtype=np.int64) << 12, nvm)
    h.access(vm, 0, addr, bm.ACC_WRITE)
    if distinct is None:
        p = rng.permutation(vm.size)
    else:
        p = rng.choice(vm.size, distinct, replace=False)[rng.integers(0, distinct, vm.size)]
    vr, ar = vm[p], addr[p]
    out = np.zeros(vm.size, np.int64)
    ngib = max(1, mem >> 30)
    pd = pd_rows(h.pa.spt, h.vt.root, nvm, ngib)
    walk4(h.pa.spt, h.vt.root, vr, ar, out)
    ref = out.copy()
    walk_from_pd(h.pa.spt, pd, ngib, vr, ar, out)
    assert np.array_equal(out, ref), "PD-row walk disagrees with the full walk"
    t_acc = median_ns(lambda _: h.access(vr, 0, ar, 0), vm.size)
    t_w4 = median_ns(lambda _: walk4(h.pa.spt, h.vt.root, vr, ar, out), vm.size)
    t_pd = median_ns(lambda _: walk_from_pd(h.pa.spt, pd, ngib, vr, ar, out), vm.size)
    return t_acc, t_w4, t_pd


if __name__ == "__main__":
    main()
