"""The time model against what KVM developers measured: the published ratios beside the simulated ones.

    python bench/bench_time.py [--quick] [--json PATH]

Each comparison reruns the publication's configuration (vCPUs, access pattern, backing) with the default cost
table, memory per vCPU scaled down (the ratios are of per-fault throughputs).  Prints a table (published ratio,
simulated ratio, configuration, simulation run time) and writes JSON to ``bench/results/time-latest.json``.
docs/time.md says which ratios the model reproduces and why the others are not.
"""

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import batchmmu as bm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "time-latest.json"


def _phase(rep, name):
    return next(p for p in rep.phases if p["name"] == name)


def _run(scenario, sets):
    t = time.perf_counter()
    rep = bm.run_scenario(scenario, sets=sets, time=True)
    return rep, time.perf_counter() - t


def comparisons(quick):
    mib = "1MiB" if quick else "32MiB"
    out = []
    # 1. 2021 parallel TDP faults: dirty_log_perf 96 vCPUs x 3 GiB partitioned
    t, wall = {}, 0.0
    for tdp in (True, False):
        rep, w = _run("dirty_log_perf", ["vcpus=96", f"bytes_per_vcpu={mib}", f"tdp_mmu={tdp}"])
        t[tdp] = rep
        wall += w
    pop = {k: _phase(r, "Populate memory")["sim_seconds"] for k, r in t.items()}
    dirty = {k: _phase(r, "Iteration 2 dirty memory")["sim_seconds"] for k, r in t.items()}
    cfg = f"dirty_log_perf vcpus=96 bytes_per_vcpu={mib}, legacy (write lock) / TDP MMU (read lock)"
    out.append(("2021 parallel TDP faults: populate", 110.19 / 16.11, pop[False] / pop[True], cfg, wall))
    out.append(("2021 parallel TDP faults: dirty memory", 3.95 / 0.28, dirty[False] / dirty[True], cfg, 0.0))
    # 2. 2022 eager page splitting: 96 vCPUs x 1 GiB HugeTLB-1G (quick: 16 vCPUs x 64 MiB, one 1G page)
    e, wall = {}, 0.0
    ev, eb = ("16", "64MiB") if quick else ("96", "32MiB")
    for split in (False, True):
        rep, w = _run("dirty_log_perf", [f"vcpus={ev}", f"bytes_per_vcpu={eb}", "backing=hugetlb-1g",
                                         f"host.eager_page_split={split}"])
        e[split] = rep
        wall += w
    it2 = {k: _phase(r, "Iteration 2 dirty memory")["sim_seconds"] for k, r in e.items()}
    clr = {k: _phase(r, "Iteration 1 clear dirty log")["sim_seconds"] for k, r in e.items()}
    cfg = f"dirty_log_perf vcpus={ev} bytes_per_vcpu={eb} backing=hugetlb-1g, eager split off / on"
    out.append(("2022 eager split: iteration-2 dirty time (off / on)", 2.75 / 0.13, it2[False] / it2[True], cfg,
                wall))
    out.append(("2022 eager split: first CLEAR (on / off)", 1.67 / 0.05, clr[True] / clr[False], cfg, 0.0))
    # the split-on-fault commit (v6.2): its zap-on-fault pass, absolute seconds for 96 vCPUs x 1 GiB (scaled)
    zb = "32MiB"
    rep, w = _run("dirty_log_perf", ["vcpus=96", f"bytes_per_vcpu={zb}", "backing=hugetlb-1g", "manual_protect=false",
                                     "write_percent=5", "host.eager_page_split=false",
                                     "host.huge_page_split_on_fault=false"])
    zap = _phase(rep, "Iteration 1 dirty memory")["sim_seconds"] * 1024 / 32
    out.append(("2022 split on fault: zap pass, s per GiB/vCPU (consistency)", 3.0165, zap,
                f"dirty_log_perf vcpus=96 bytes_per_vcpu={zb} (x32) hugetlb-1g manual_protect=false write_percent=5 "
                "huge_page_split_on_fault=false", w))
    en, wall = {}, 0.0
    for split in (False, True):   # without initially_set the split happens when logging starts
        rep, w = _run("dirty_log_perf", [f"vcpus={ev}", f"bytes_per_vcpu={eb}", "backing=hugetlb-1g",
                                         "initially_set=false", f"host.eager_page_split={split}"])
        en[split] = _phase(rep, "Enabling dirty logging")["sim_seconds"]
        wall += w
    gib = int(ev) * (64 if quick else 32) / 1024
    # the enable ioctl's fixed part does not scale with memory, the splits do: compare the split time per GiB
    out.append(("2022 eager split: enable, split ms per GiB", (1.55 - 0.002) / 96 * 1e3,
                (en[True] - en[False]) / gib * 1e3, cfg + ", initially_set=false", wall))
    # 3. 2022 nested dirty logging: -n, 100 % writes, 2 / 16 / 64 vCPUs
    n, wall = {}, 0.0
    for v in (2, 16, 64):
        rep, w = _run("dirty_log_perf", ["nested=true", "tdp_mmu=false", f"vcpus={v}",
                                         f"bytes_per_vcpu={'512KiB' if quick else '8MiB'}"])
        n[v] = _phase(rep, "Iteration 2 dirty memory")["sim_seconds"]
        wall += w
    cfg = "dirty_log_perf nested=true tdp_mmu=false, first dirty pass with write-protection faults"
    out.append(("2022 nested dirty logging: 16 / 2 vCPUs", 4.6 / 0.37, n[16] / n[2], cfg, wall))
    out.append(("2022 nested dirty logging: 64 / 2 vCPUs", 20.4 / 0.37, n[64] / n[2], cfg, 0.0))
    # 4. 2019 direct MMU RFC: demand paging at 416 vCPUs
    d, wall = {}, 0.0
    for tdp in (True, False):
        rep, w = _run("demand_paging", ["vms=1", "vcpus=416", f"bytes_per_vcpu={'256KiB' if quick else '8MiB'}",
                                        f"tdp_mmu={tdp}"])
        d[tdp] = rep.phases[0]
        wall += w
    legacy = d[False]
    waiting = legacy["sim"]["mmu_lock"]["wait_seconds"] / (416 * legacy["sim_seconds"])
    cfg = "demand_paging vcpus=416, legacy / TDP MMU"
    out.append(("2019 416 vCPUs: run time legacy / TDP (-89 %)", 1 / (1 - 0.89),
                legacy["sim_seconds"] / d[True]["sim_seconds"], cfg, wall))
    out.append(("2019 416 vCPUs: legacy time waiting on mmu_lock", 0.98, waiting, cfg, 0.0))
    return out


def _cpu():
    from batchmmu.scenario import cpu_model
    return cpu_model()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args()
    bm.warmup()
    rows = comparisons(args.quick)
    print(f"machine: {_cpu()}, python {platform.python_version()}")
    print(f"{'comparison':<52}{'published':>11}{'simulated':>11}{'within 2x':>11}{'run s':>8}  configuration")
    for name, pub, sim, cfg, wall in rows:
        ok = "yes" if pub / 2 <= sim <= pub * 2 else "NO"
        print(f"{name:<52}{pub:>11.2f}{sim:>11.2f}{ok:>11}{wall:>8.1f}  {cfg}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "quick": args.quick,
        "machine": _cpu(),
        "rows": [{"comparison": r[0], "published": r[1], "simulated": r[2], "config": r[3], "run_seconds": r[4]}
                 for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
