"""Multi-core scaling of the process backend: the same scenario on 1, 2, 4, ... workers.

Usage: python bench/bench_scaling.py [--workers 1,2,4,8,16] [--repeat 3] [--vms N]

Two workloads, each shardable by VM (results must be equal for every worker count, and are checked):
- ``demand_paging``: first-touch faults, ``vms`` VMs x 2 vCPUs x 16 MiB (4K), sequential;
- ``dirty_log_perf``: ``vms // 4`` VMs x 2 vCPUs x 32 MiB, random order, 4 dirty-logging iterations.

Prints, per worker count, the median wall time of the phases (the report's own timings, compile and
process start excluded), the wall time of the whole call, the speedup over 1 worker and the efficiency.
Kernels are compiled (or loaded) once before any timing.
"""

import argparse
import os
import platform
import statistics
import time

import batchmmu as bm

CASES = {
    "demand_paging": lambda vms: ("demand_paging", (f"vms={vms}", "vcpus=2", "bytes_per_vcpu=16MiB")),
    "dirty_log_perf": lambda vms: ("dirty_log_perf", (f"vms={max(1, vms // 4)}", "vcpus=2", "bytes_per_vcpu=32MiB",
                                                      "iterations=4", "random_access=true")),
}


def machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def one(name, sets, workers):
    t = time.perf_counter()
    rep = bm.run_scenario(name, workers=workers, backend="process" if workers > 1 else "serial", sets=sets)
    wall = time.perf_counter() - t
    phases = sum(p["seconds"] for p in rep.phases)
    return phases, wall, rep.totals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2,4,8,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vms", type=int, default=256)
    a = ap.parse_args()
    counts = [int(w) for w in a.workers.split(",")]
    print(f"machine: {machine()}")
    bm.warmup()
    for case, make in CASES.items():
        name, sets = make(a.vms)
        one(name, sets, 1)   # warm the caches and the page cache
        print(f"\n{case} ({', '.join(sets)}), median of {a.repeat}")
        print(f"{'workers':>8} {'phases s':>9} {'call s':>8} {'speedup':>8} {'efficiency':>10}")
        base, ref = None, None
        for w in counts:
            runs = [one(name, sets, w) for _ in range(a.repeat)]
            ph = statistics.median(r[0] for r in runs)
            wall = statistics.median(r[1] for r in runs)
            if ref is None:
                ref, base = runs[0][2], ph
            elif runs[0][2] != ref:
                raise SystemExit(f"{case}: totals differ at {w} workers")
            print(f"{w:>8} {ph:>9.3f} {wall:>8.3f} {base / ph:>8.2f} {base / ph / w:>10.2f}")


if __name__ == "__main__":
    main()
