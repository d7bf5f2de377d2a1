"""Host-side throughput: MMU-notifier invalidation and aging, reclaim (scan, evict, refault), and a
1,000-VM overcommit run; each against the pure-Python reference model.

python bench/bench_host.py [--quick] [--json PATH]

Every batchmmu number is the median of 5 runs (3 with --quick) on state rebuilt outside the timer;
the reference model (tests/reference/model.py) runs the same operations on a smaller configuration
(median of 3) and the ratio compares rates (pages or events per second).  The overcommit run is the
same epoch protocol as ``batchmmu run overcommit`` (age above the low watermark, plan, evict above the
high one), driven through the Host API so that both hosts run it; the scenario runner's own time
for the full-size scenario is reported too.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import batchmmu as bm
from batchmmu.reclaim import plan_reclaim

MiB, GiB = 1 << 20, 1 << 30
HVA = 1 << 40
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _ref():
    try:
        from reference.model import RefHost
    except ImportError:
        return None
    return RefHost


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _populated(cls, nvm, vm_bytes, memory=None, overcommit=False, ref=False):
    """``nvm`` VMs with slot 0 of ``vm_bytes``, 4K backing, every page written."""
    h = cls(memory=memory or nvm * vm_bytes + GiB, backing="4k", overcommit=overcommit)
    vms = [int(v) for v in h.create_vms(nvm, memory=vm_bytes)]
    pages = vm_bytes // 4096
    vm = np.repeat(vms, pages)
    addr = np.tile(np.arange(pages, dtype=np.int64) * 4096, nvm)
    if ref:
        h.access(vm.tolist(), 0, addr.tolist(), bm.ACC_WRITE)
    else:
        h.reserve_tables(nvm * (pages // 512 + 8))
        h.access(vm, 0, addr, bm.ACC_WRITE)
    return h, vms, pages


# ----------------------------------------------------------------------------- notifier
def notifier_rates(cls, nvm, vm_bytes, repeats, ref=False):
    """Pages/s of invalidate_hva_range (2 MiB calls) and of aging (clear_young over each VM)."""
    inval, age, test = [], [], []
    for _ in range(repeats):
        h, vms, pages = _populated(cls, nvm, vm_bytes, ref=ref)
        t, _ = _timed(lambda h=h, vms=vms: [h.age_hva_range(v, HVA, HVA + vm_bytes, flush=False) for v in vms])
        age.append(nvm * pages / t)
        t, _ = _timed(lambda h=h, vms=vms: [h.test_young(v, HVA, HVA + vm_bytes) for v in vms])
        test.append(nvm * pages / t)
        chunks = [(v, HVA + o) for v in vms for o in range(0, vm_bytes, 2 * MiB)]
        t, zapped = _timed(lambda h=h, c=chunks: sum(h.invalidate_hva_range(v, a, a + 2 * MiB) for v, a in c))
        assert zapped == nvm * pages
        inval.append(nvm * pages / t)
    return {"invalidate_pages_per_s": statistics.median(inval), "age_pages_per_s": statistics.median(age),
            "test_young_pages_per_s": statistics.median(test)}


# ----------------------------------------------------------------------------- reclaim
def reclaim_rates(cls, nvm, vm_bytes, repeats, ref=False):
    """Scan (aging) pages/s, evict pages/s (a quarter of memory to swap) and refaults/s."""
    scan, evict, refault = [], [], []
    for _ in range(repeats):
        h, vms, pages = _populated(cls, nvm, vm_bytes, memory=nvm * vm_bytes, overcommit="epoch", ref=ref)
        t, hist = _timed(h.reclaim_scan)
        scan.append(nvm * pages / t)
        need = nvm * pages // 4
        th, at = plan_reclaim(np.asarray(hist), need)
        t, got = _timed(lambda h=h, th=th, at=at: h.reclaim_evict(th, at if not ref else at.tolist()))
        assert int(np.sum(got)) == need
        evict.append(need / t)
        vm = np.repeat(vms, pages)
        addr = np.tile(np.arange(pages, dtype=np.int64) * 4096, nvm)
        args = (vm.tolist(), 0, addr.tolist(), 0) if ref else (vm, 0, addr, 0)
        t, _ = _timed(lambda h=h, a=args: h.access(*a))
        refault.append(need / t)   # one major fault per swapped page; the other accesses are HITs
    return {"scan_pages_per_s": statistics.median(scan), "evict_pages_per_s": statistics.median(evict),
            "refault_major_per_s": statistics.median(refault)}


# ----------------------------------------------------------------------------- overcommit run
def overcommit_run(cls, busy, idle, vm_bytes, memory, epochs, passes, ref=False, watermarks=(0.90, 0.95)):
    """The overcommit scenario's protocol through the Host API: populate all VMs, the busy ones make
    ``passes`` passes, the idle ones wake; each pass in ``epochs`` slices with a reclaim step after
    each.  Returns (seconds, events, stats summary)."""
    h = cls(memory=memory, backing="4k", overcommit="epoch")
    vms = [int(v) for v in h.create_vms(busy + idle, memory=vm_bytes)]
    pages = vm_bytes // 4096
    low, high = (w * memory for w in watermarks)
    events = 0
    t0 = time.perf_counter()

    def epoch(group, e):
        nonlocal events
        p0, p1 = pages * e // epochs, pages * (e + 1) // epochs
        vm = np.repeat(group, p1 - p0)
        addr = np.tile(np.arange(p0, p1, dtype=np.int64) * 4096, len(group))
        h.access(*((vm.tolist(), 0, addr.tolist(), bm.ACC_WRITE) if ref else (vm, 0, addr, bm.ACC_WRITE)))
        events += vm.size
        used = h.host_memory()[0]
        if used > low:
            hist = np.asarray(h.reclaim_scan())
            if used > high:
                th, at = plan_reclaim(hist, -(-(used - int(low)) // 4096))
                h.reclaim_evict(th, at.tolist() if ref else at)

    for e in range(epochs):
        epoch(vms, e)
    for _ in range(passes):
        for e in range(epochs):
            epoch(vms[:busy], e)
    for e in range(epochs):
        epoch(vms[busy:], e)
    dt = time.perf_counter() - t0
    names = ("host_major_faults", "host_pages_reclaimed", "pf_fixed", "mmu_notifier_zapped")
    stats = {k: sum(h.stats(v)[k] for v in vms) for k in names}
    return dt, events, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "host-latest.json"))
    a = ap.parse_args()
    reps = 3 if a.quick else 5
    bm.warmup()
    notifier_rates(bm.Host, 2, MiB, 1)
    reclaim_rates(bm.Host, 2, MiB, 1)
    RefHost = _ref()
    out = {"machine": {"python": sys.version.split()[0]}, "cases": []}

    def show(title, ours, theirs, keys):
        print(f"\n{title}")
        for k in keys:
            ratio = f"{ours[k] / theirs[k]:8.0f}x" if theirs else ""
            ref = f"{theirs[k] / 1e6:10.3f}" if theirs else ""
            print(f"  {k:<26}{ours[k] / 1e6:12.2f} M/s   reference {ref} M/s {ratio}")
        out["cases"].append({"case": title, "batchmmu": ours, "reference": theirs})

    big = (1, 256 * MiB) if a.quick else (1, GiB)
    many = (250, 4 * MiB) if a.quick else (1000, 4 * MiB)
    keys = ("invalidate_pages_per_s", "age_pages_per_s", "test_young_pages_per_s")
    ref_n = notifier_rates(RefHost, 1, 16 * MiB, 3, ref=True) if RefHost else None
    show(f"notifier, {big[0]} VM x {big[1] >> 20} MiB (reference: 1 VM x 16 MiB)",
         notifier_rates(bm.Host, *big, reps), ref_n, keys)
    show(f"notifier, {many[0]} VMs x {many[1] >> 20} MiB", notifier_rates(bm.Host, *many, reps), ref_n, keys)
    keys = ("scan_pages_per_s", "evict_pages_per_s", "refault_major_per_s")
    ref_r = reclaim_rates(RefHost, 16, MiB, 3, ref=True) if RefHost else None
    show(f"reclaim, {many[0]} VMs x {many[1] >> 20} MiB, a quarter to swap (reference: 16 VMs x 1 MiB)",
         reclaim_rates(bm.Host, *many, reps), ref_r, keys)

    # the overcommit run: 1,000 VMs (500 busy, 500 idle), a quarter more memory touched than there is
    nb, ni, vmb, epochs, passes = (125, 125, MiB, 4, 2) if a.quick else (500, 500, MiB, 4, 2)
    mem = (nb + ni) * vmb * 3 // 4
    runs = [overcommit_run(bm.Host, nb, ni, vmb, mem, epochs, passes) for _ in range(reps)]
    ours = statistics.median(r[0] for r in runs)
    ev, st = runs[0][1], runs[0][2]
    line = {"vms": nb + ni, "vm_bytes": vmb, "memory": mem, "events": ev, "seconds": ours, **st}
    print(f"\novercommit run, {nb + ni} VMs x {vmb >> 20} MiB on {mem >> 20} MiB, {epochs} epochs/pass: "
          f"{ours:.3f} s ({ev / ours / 1e6:.2f} M events/s), {st}")
    if RefHost:
        t, ev_r, st_r = overcommit_run(RefHost, nb, ni, vmb, mem, epochs, passes, ref=True)
        assert st_r == st, (st_r, st)
        line["reference_seconds"] = t
        print(f"  reference model, same run: {t:.1f} s -> {t / ours:.0f}x (same statistics: {st_r == st})")
    out["cases"].append({"case": "overcommit run", **line})
    sets = [f"busy_vms={nb}", f"idle_vms={ni}", "bytes_per_vcpu=4MiB", f"memory={(nb + ni) * 3}MiB",
            "epochs=8", "passes=3"]
    times = []
    for _ in range(3 if a.quick else reps):
        t, rep = _timed(lambda: bm.run_scenario("overcommit", sets=sets))
        times.append(t)
    t = statistics.median(times)
    ev = sum(p["events"] for p in rep.phases)
    print(f"batchmmu run overcommit --set {' --set '.join(sets)}: {t:.2f} s, {ev:,} events, "
          f"{rep.totals['host_major_faults']:,} major faults, {rep.totals['host_pages_reclaimed']:,} pages "
          "reclaimed")
    out["cases"].append({"case": "scenario overcommit", "sets": sets, "seconds": t, "events": ev,
                         "major_faults": rep.totals["host_major_faults"],
                         "reclaimed": rep.totals["host_pages_reclaimed"]})
    Path(a.json).parent.mkdir(exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
