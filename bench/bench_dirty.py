"""Dirty-logging throughput: enable (write-protect), dirty pass, GET (+ re-protect), manual GET+CLEAR.

python bench/bench_dirty.py [--quick] [--json PATH]

Cases: 1 VM x 16 vCPUs x 1 GiB and 1000 VMs x 1 vCPU x 16 MiB, 4K backing, eager split on, no PML,
and the 1-VM case again with PML.  Every number is the median of 5 runs on fresh state (state is
rebuilt outside the timer).  Rates are pages (SPTEs or bitmap bits) per second.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import batchmmu as bm

MiB, GiB = 1 << 20, 1 << 30


def build(nvm, vcpus, bpv, pml=False, manual=False):
    h = bm.Host(memory=f"{nvm * vcpus * bpv * 2 + GiB}", backing="4k", pml=pml)
    vms = h.create_vms(nvm, memory="2MiB", vcpus=vcpus)
    size = vcpus * bpv
    for vm in vms:
        if manual:
            h.enable_manual_dirty_log_protect(int(vm), initially_set=False)
        h.set_memslot(int(vm), 1, 4 * GiB, size)
    pages = size // 4096
    vm = np.repeat(vms, pages)
    vcpu = np.tile(np.repeat(np.arange(vcpus), bpv // 4096), nvm)
    addr = 4 * GiB + np.tile(np.arange(pages), nvm) * 4096
    h.reserve_tables(nvm * (pages // 512 + 8))
    h.access(vm, vcpu, addr, bm.ACC_WRITE)                        # populate
    return h, vms, (vm, vcpu, addr), size


def set_logging(h, vms, size, on):
    for vm in vms:
        h.set_memslot(int(vm), 1, 4 * GiB, size, flags=bm.MEM_LOG_DIRTY_PAGES if on else 0)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def case(name, nvm, vcpus, bpv, pml, repeats):
    npages = nvm * vcpus * bpv // 4096
    res = {"case": name, "pages": npages}
    enable, dirty, get, clear = [], [], [], []
    for _ in range(repeats):
        h, vms, ev, size = build(nvm, vcpus, bpv, pml=pml)
        enable.append(timed(lambda h=h, vms=vms, size=size: set_logging(h, vms, size, True)))
        dirty.append(timed(lambda h=h, ev=ev: h.access(*ev, bm.ACC_WRITE)))
        get.append(timed(lambda h=h, vms=vms: [h.get_dirty_log(int(v), 1) for v in vms]))
        s = h.stats()
        assert int(s["pages_write_protected"].sum()) >= 2 * npages
    for _ in range(repeats):
        h, vms, ev, size = build(nvm, vcpus, bpv, pml=pml, manual=True)
        set_logging(h, vms, size, True)
        h.access(*ev, bm.ACC_WRITE)
        words = np.full((size // 4096 + 63) // 64, -1, np.int64)

        def get_clear(h=h, vms=vms, words=words, size=size):
            for v in vms:
                h.get_dirty_log(int(v), 1)
                h.clear_dirty_log(int(v), 1, 0, size // 4096, words)
        clear.append(timed(get_clear))
    for key, xs in (("enable_pages_per_s", enable), ("dirty_pass_per_s", dirty), ("get_pages_per_s", get),
                    ("get_clear_pages_per_s", clear)):
        res[key] = npages / statistics.median(xs)
    res["get_clear_1gib_ms"] = statistics.median(clear) * 1e3 * (262144 / npages)
    return res


def reference_rates(pages=4096, repeats=3):
    """The same three operations on tests/reference/model.py's RefHost (1 VM, 4K, no PML): pages/s."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from tests.reference.model import RefHost
    except ImportError:
        return None
    size = pages * 4096
    out = {"enable_pages_per_s": [], "dirty_pass_per_s": [], "get_pages_per_s": []}
    for _ in range(repeats):
        h = RefHost(memory=4 * GiB, backing="4k")
        vm = h.create_vms(1, memory=2 * MiB)[0]
        h.set_memslot(vm, 1, 4 * GiB, size)
        addrs = [4 * GiB + i * 4096 for i in range(pages)]
        h.access([vm] * pages, 0, addrs, bm.ACC_WRITE)
        t = time.perf_counter()
        h.set_memslot(vm, 1, 4 * GiB, size, flags=bm.MEM_LOG_DIRTY_PAGES)
        t1 = time.perf_counter()
        h.access([vm] * pages, 0, addrs, bm.ACC_WRITE)
        t2 = time.perf_counter()
        h.get_dirty_log(vm, 1)
        t3 = time.perf_counter()
        out["enable_pages_per_s"].append(pages / (t1 - t))
        out["dirty_pass_per_s"].append(pages / (t2 - t1))
        out["get_pages_per_s"].append(pages / (t3 - t2))
    return {k: statistics.median(v) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "dirty-latest.json"))
    a = ap.parse_args()
    bm.warmup()
    case("warm", 2, 1, MiB, False, 1)
    case("warm-pml", 2, 1, MiB, True, 1)
    reps = 3 if a.quick else 5
    cases = [("1 VM x 16 vCPU x 1 GiB", 1, 16, GiB, False), ("1000 VMs x 16 MiB", 1000, 1, 16 * MiB, False),
             ("1 VM x 16 vCPU x 1 GiB, PML", 1, 16, GiB, True)]
    if a.quick:
        cases = [("1 VM x 4 vCPU x 256 MiB", 1, 4, 256 * MiB, False), ("250 VMs x 4 MiB", 250, 1, 4 * MiB, False),
                 ("1 VM x 4 vCPU x 256 MiB, PML", 1, 4, 256 * MiB, True)]
    rows = [case(n, *c, reps) for n, *c in cases]
    print(f"{'case':<32}{'enable M/s':>12}{'dirty pass M/s':>16}{'GET M/s':>10}{'GET+CLEAR M/s':>15}"
          f"{'1 GiB GET+CLEAR ms':>20}")
    for r in rows:
        print(f"{r['case']:<32}{r['enable_pages_per_s'] / 1e6:>12.1f}{r['dirty_pass_per_s'] / 1e6:>16.1f}"
              f"{r['get_pages_per_s'] / 1e6:>10.1f}{r['get_clear_pages_per_s'] / 1e6:>15.1f}"
              f"{r['get_clear_1gib_ms']:>20.2f}")
    ref = reference_rates()
    if ref:
        print(f"\nreference model (1 VM, 4096 pages): enable {ref['enable_pages_per_s'] / 1e6:.3f} M/s, "
              f"dirty pass {ref['dirty_pass_per_s'] / 1e6:.3f} M/s, GET {ref['get_pages_per_s'] / 1e6:.3f} M/s")
        r = rows[0]
        print("ratio (first case / reference): " + ", ".join(
            f"{k.split('_per_s')[0]} {r[k] / ref[k]:.0f}x" for k in ref))
        rows.append({"case": "reference", **ref})
    Path(a.json).parent.mkdir(exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
