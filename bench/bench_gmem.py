"""Guest-memory hash (kernels/gmem.py): probes per lookup and lookups/s at 1, 64 and 1,000 VMs.

    python bench/bench_gmem.py [--vms 1,64,1000] [--mem 16MiB] [--repeats N]

Each VM gets the guest page tables of ``bench_shadow.py`` (a 4-level identity map of its RAM: 3 upper
tables and one PT per 2 MiB), written with ``write_guest_memory``; that is what a shadow fault or a 2D walk
looks up (13 lookups per shadow fault).  Reported per VM count: keys stored, key-table load, mean and
maximum probes of a lookup that finds its page (every stored page once), mean probes of one that does not
(a data page never written: the walker reads it as zeros), and warm hit lookups/s in a numba loop.
"""

import argparse
import time

import numpy as np
from batchmmu.kernels.gmem import gm_find, gm_hash
from numba import njit

import batchmmu as bm
from batchmmu.units import parse_size

P, W, U, A = 1, 2, 4, 0x20
TBL = 0x10000


def build(nvm, mem):
    """``nvm`` TDP VMs of ``mem`` bytes with identity-mapping 4-level tables in guest memory."""
    host = bm.Host(memory=nvm * mem + (256 << 20), backing="4k")
    vms = host.create_vms(nvm, memory=mem)
    nl = P | W | U | A
    pd = TBL + 0x3000 + 0x1000 * np.arange(mem >> 21, dtype=np.int64)
    ptes = (np.arange(mem >> 12, dtype=np.int64) << 12) | nl
    for vm in vms.tolist():
        host.write_guest_memory(vm, TBL, [(TBL + 0x1000) | nl])
        host.write_guest_memory(vm, TBL + 0x1000, [(TBL + 0x2000) | nl])
        host.write_guest_memory(vm, TBL + 0x2000, pd | nl)
        host.write_guest_memory(vm, TBL + 0x3000, ptes)
    return host


@njit(cache=True)
def probe_lengths(key, absent, hit_out, miss_out):
    """Probes of a successful lookup of every stored key, and of an unsuccessful one of each ``absent`` key."""
    mask = key.shape[0] - 1
    n = 0
    for i in range(key.shape[0]):
        if key[i] != -1:
            hit_out[n] = ((i - gm_hash(key[i], mask)) & mask) + 1
            n += 1
    for j in range(absent.shape[0]):
        h = gm_hash(absent[j], mask)
        p = 1
        while key[h] != -1:
            h = (h + 1) & mask
            p += 1
        miss_out[j] = p
    return n


@njit(cache=True)
def lookup_loop(ht, keys, rounds):
    s = 0
    for _ in range(rounds):
        for i in range(keys.shape[0]):
            s += gm_find(ht, keys[i])
    return s


def measure(nvm, mem, repeats):
    t = time.perf_counter()
    host = build(nvm, mem)
    built = time.perf_counter() - t
    gm = host.gm
    stored = gm.key[gm.key != -1]
    # data pages nobody wrote: the keys of each VM's pages from 4 MiB on (hva page = 2**28 + gfn)
    rng = np.random.default_rng(0)
    vm = rng.integers(0, nvm, 4096)
    gfn = rng.integers(1024, mem >> 12, 4096)
    absent = (vm << 35) | ((1 << 28) + gfn)
    absent = absent[~np.isin(absent, stored)]
    hit = np.zeros(stored.size, np.int64)
    miss = np.zeros(absent.size, np.int64)
    probe_lengths(np.ascontiguousarray(gm.key), absent, hit, miss)
    rounds = max(1, (1 << 22) // stored.size)
    lookup_loop(gm.hash, stored[:1], 1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        lookup_loop(gm.hash, stored, rounds)
        times.append(time.perf_counter() - t)
    return {"vms": nvm, "keys": int(stored.size), "load": stored.size / gm.key.size, "hit_mean": hit.mean(),
            "hit_max": int(hit.max()), "miss_mean": miss.mean(),
            "lookups_per_s": rounds * stored.size / float(np.median(times)), "build_s": built}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", default="1,64,1000")
    ap.add_argument("--mem", default="16MiB")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    mem = parse_size(a.mem, "mem")
    print(f"{'VMs':>6}{'keys':>9}{'load':>7}{'probes/hit':>12}{'max':>6}{'probes/miss':>13}{'M lookups/s':>13}")
    for nvm in (int(x) for x in a.vms.split(",")):
        r = measure(nvm, mem, a.repeats)
        print(f"{r['vms']:>6}{r['keys']:>9}{r['load']:>7.2f}{r['hit_mean']:>12.2f}{r['hit_max']:>6}"
              f"{r['miss_mean']:>13.2f}{r['lookups_per_s'] / 1e6:>13.1f}")


if __name__ == "__main__":
    main()
