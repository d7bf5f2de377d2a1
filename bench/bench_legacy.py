"""The legacy TDP MMU (kvm.tdp_mmu=N) and an L2 guest under nested EPT beside the TDP MMU, in one run.

    python bench/bench_legacy.py [--quick] [--repeats N] [--json PATH]

Per case (4K backing, so every first touch of a page is a 4K fault unless the legacy MMU prefetched it), median
of ``--repeats`` runs after an untimed warm-up, the MMUs rotated run by run:

* first touch: one ``host.access`` of every page of every VM (writes, random order) on a fresh Host built
  outside the timer: touches/s and faults/s (pf_fixed / s: the legacy MMU prefetches up to 7 neighbours of a
  4K fault, so it takes fewer faults for the same touches);
* HITs: random reads of the populated Host;
* nested: the same touches by an L2 guest (paging off) of each VM under nested EPT with L0 on the legacy MMU
  (``nested``) or on the TDP MMU (``nested_tdp``: both MMUs in one VM), L1's EPT12 mapping L2's memory 1:1 with
  4K entries (A/D on), built outside the timer: every touch is an EPT02 miss, an EPT12 walk and a shadow-page
  fault in L0.
The issue's targets: legacy first touch >= 0.25x the TDP MMU's, nested >= 0.15x.  Results: a table on stdout,
JSON in ``bench/results/legacy-latest.json``.
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
TARGET_NESTED = 0.15
MODES = ("tdp", "legacy", "nested", "nested_tdp")   # nested: L0 on the legacy TDP MMU; nested_tdp: on the TDP MMU


def cases(quick):
    if quick:
        return [("1vm-256m", 1, 256 * MiB), ("64vm-4m", 64, 4 * MiB)]
    return [("1vm-1g", 1, 1024 * MiB), ("64vm-16m", 64, 16 * MiB)]


def host_for(nvm, mem, mode):
    """A Host of ``nvm`` VMs; with ``mode`` "nested" each VM's vCPU 0 runs an L2 whose memory EPT12 maps 1:1
    onto the first ``mem`` bytes of L1 (the tables above them)."""
    h = bm.Host(memory=nvm * (mem + 8 * MiB) + 256 * MiB, backing="4k", tdp_mmu=mode in ("tdp", "nested_tdp"))
    if not mode.startswith("nested"):
        return h, h.create_vms(nvm, memory=mem)
    vms = h.create_vms(nvm, memory=mem + 4 * MiB, nested=True)
    root, ngb, npt = mem, -(-mem // (1 << 30)), -(-mem // (2 * MiB))   # EPT12 above L2's memory
    pd0, pt0 = 2, 2 + ngb                             # pages after the root: PDPT, PDs, PTs
    words = np.zeros((pt0 + npt) * 512, np.int64)
    words[0] = (root + 4096) | 7
    words[512:512 + ngb] = (root + 4096 * (pd0 + np.arange(ngb))) | 7
    words[pd0 * 512:pd0 * 512 + npt] = (root + 4096 * (pt0 + np.arange(npt))) | 7
    words[pt0 * 512:pt0 * 512 + (mem >> 12)] = (np.arange(mem >> 12, dtype=np.int64) << 12) | 7 | (6 << 3)
    for vm in vms:
        h.write_guest_memory(int(vm), root, words.view(np.uint64))
        h.nested_enter(int(vm), 0, eptp=root | 6 | (3 << 3) | 0x40, cr0=0x11, cr3=0, cr4=0, efer=0)
    return h, vms


def events(vms, mem, rng):
    vm = np.repeat(np.asarray(vms, np.int64), mem >> 12)
    addr = np.tile(np.arange(0, mem, 4096, dtype=np.int64), len(vms))
    perm = rng.permutation(vm.size)
    return vm[perm], addr[perm]


def measure(nvm, mem, repeats, seed):
    out = {mode: {"touch": [], "faults": [], "hit": []} for mode in MODES}
    for r in range(repeats):
        for k in range(len(MODES)):
            mode = MODES[(k + r) % len(MODES)]
            h, vms = host_for(nvm, mem, mode)
            vm, addr = events(vms, mem, np.random.default_rng(seed + r))
            t = time.perf_counter()
            h.access(vm, 0, addr, bm.ACC_WRITE)
            dt = time.perf_counter() - t
            faults = int(h.stats()["pf_fixed"].sum())
            out[mode]["touch"].append(vm.size / dt)
            out[mode]["faults"].append(faults / dt)
            vm2, addr2 = events(vms, mem, np.random.default_rng(seed + 100 + r))
            t = time.perf_counter()
            h.access(vm2, 0, addr2, 0)
            out[mode]["hit"].append(vm2.size / (time.perf_counter() - t))
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    a = ap.parse_args()
    t = time.perf_counter()
    bm.warmup()
    for mode in MODES:   # untimed: the first Host of each kind
        h, vms = host_for(1, 4 * MiB, mode)
        h.access(vms[0], 0, np.arange(0, 4 * MiB, 4096), bm.ACC_WRITE)
    print(f"warm-up {time.perf_counter() - t:.1f} s")
    res = {}
    print(f"{'case':<10} {'MMU':<10} {'touches/s':>12} {'faults/s':>12} {'HITs/s':>12}  touches / TDP's (targets: "
          f"legacy >= {TARGET}, nested >= {TARGET_NESTED})")
    for name, nvm, mem in cases(a.quick):
        r = measure(nvm, mem, a.repeats, 7)
        res[name] = r
        for mmu in MODES[1:]:
            r[f"{mmu}_vs_tdp_touch"] = r[mmu]["touch"] / r["tdp"]["touch"]
        for mmu in MODES:
            m = r[mmu]
            ratio = r.get(f"{mmu}_vs_tdp_touch")
            target = TARGET if mmu == "legacy" else TARGET_NESTED
            tail = f"  {ratio:.2f}x {'met' if ratio >= target else 'MISSED'}" if ratio is not None else ""
            print(f"{name:<10} {mmu:<10} {m['touch'] / 1e6:>10.2f} M {m['faults'] / 1e6:>10.2f} M "
                  f"{m['hit'] / 1e6:>10.2f} M{tail}")
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
           platform.machine(), "python": platform.python_version(), "repeats": a.repeats, "quick": a.quick,
           "target_legacy_vs_tdp": TARGET, "target_nested_vs_tdp": TARGET_NESTED, "cases": res}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
