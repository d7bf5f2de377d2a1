"""The legacy TDP MMU (kvm.tdp_mmu=N) beside the TDP MMU, in one run.

    python bench/bench_legacy.py [--quick] [--repeats N] [--json PATH]

Per case (4K backing, so every first touch of a page is a 4K fault unless the legacy MMU prefetched it), median
of ``--repeats`` runs after an untimed warm-up, the two MMUs alternated run by run:

* first touch: one ``host.access`` of every page of every VM (writes, random order) on a fresh Host built
  outside the timer: touches/s and faults/s (pf_fixed / s: the legacy MMU prefetches up to 7 neighbours of a
  4K fault, so it takes fewer faults for the same touches);
* HITs: random reads of the populated Host.
The issue's target: legacy first touch >= 0.25x the TDP MMU's.  Results: a table on stdout, JSON in
``bench/results/legacy-latest.json``.
"""

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import batchmmu as bm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "legacy-latest.json"
MiB = 1 << 20
TARGET = 0.25


def cases(quick):
    if quick:
        return [("1vm-256m", 1, 256 * MiB), ("64vm-4m", 64, 4 * MiB)]
    return [("1vm-1g", 1, 1024 * MiB), ("64vm-16m", 64, 16 * MiB)]


def host_for(nvm, mem, tdp_mmu):
    h = bm.Host(memory=nvm * mem + 256 * MiB, backing="4k", tdp_mmu=tdp_mmu)
    vms = h.create_vms(nvm, memory=mem)
    return h, vms


def events(vms, mem, rng):
    vm = np.repeat(np.asarray(vms, np.int64), mem >> 12)
    addr = np.tile(np.arange(0, mem, 4096, dtype=np.int64), len(vms))
    perm = rng.permutation(vm.size)
    return vm[perm], addr[perm]


def measure(nvm, mem, repeats, seed):
    out = {True: {"touch": [], "faults": [], "hit": []}, False: {"touch": [], "faults": [], "hit": []}}
    for r in range(repeats):
        for tdp_mmu in ((True, False) if r % 2 == 0 else (False, True)):
            h, vms = host_for(nvm, mem, tdp_mmu)
            vm, addr = events(vms, mem, np.random.default_rng(seed + r))
            t = time.perf_counter()
            h.access(vm, 0, addr, bm.ACC_WRITE)
            dt = time.perf_counter() - t
            faults = int(h.stats()["pf_fixed"].sum())
            out[tdp_mmu]["touch"].append(vm.size / dt)
            out[tdp_mmu]["faults"].append(faults / dt)
            vm2, addr2 = events(vms, mem, np.random.default_rng(seed + 100 + r))
            t = time.perf_counter()
            h.access(vm2, 0, addr2, 0)
            out[tdp_mmu]["hit"].append(vm2.size / (time.perf_counter() - t))
    return {("tdp" if k else "legacy"): {m: statistics.median(v) for m, v in d.items()} for k, d in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    a = ap.parse_args()
    t = time.perf_counter()
    bm.warmup()
    for tdp_mmu in (True, False):   # untimed: the first Host of each kind
        h, vms = host_for(1, 4 * MiB, tdp_mmu)
        h.access(vms[0], 0, np.arange(0, 4 * MiB, 4096), bm.ACC_WRITE)
    print(f"warm-up {time.perf_counter() - t:.1f} s")
    res = {}
    print(f"{'case':<10} {'MMU':<7} {'touches/s':>12} {'faults/s':>12} {'HITs/s':>12}  legacy/TDP touches (target "
          f">= {TARGET})")
    for name, nvm, mem in cases(a.quick):
        r = measure(nvm, mem, a.repeats, 7)
        res[name] = r
        ratio = r["legacy"]["touch"] / r["tdp"]["touch"]
        r["legacy_vs_tdp_touch"] = ratio
        for mmu in ("tdp", "legacy"):
            m = r[mmu]
            tail = f"  {ratio:.2f}x {'met' if ratio >= TARGET else 'MISSED'}" if mmu == "legacy" else ""
            print(f"{name:<10} {mmu:<7} {m['touch'] / 1e6:>10.2f} M {m['faults'] / 1e6:>10.2f} M "
                  f"{m['hit'] / 1e6:>10.2f} M{tail}")
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
           platform.machine(), "python": platform.python_version(), "repeats": a.repeats, "quick": a.quick,
           "target_legacy_vs_tdp": TARGET, "cases": res}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
