"""Host memory overcommit: LRU aging, reclaim to swap, THP splits, refaults, MADV_DONTNEED; the
victim rule against an independent implementation; determinism across workers and backends."""

import numpy as np
import pytest
from batchmmu.kernels.spte import is_shadow_present_pte
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference.model import RefHost
from reference.model import plan_reclaim as ref_plan
from test_reference_diff import HYP, HypDraw, NpDraw, Pair, op_access, op_age, op_invalidate, op_memslot

import batchmmu as bm
from batchmmu.reclaim import NAGES, plan_reclaim

MiB = 1 << 20
HVA = 1 << 40          # slot 0 of every VM is mapped here
W = bm.ACC_WRITE


def _host(memory, backing="4k", **kw):
    return bm.Host(memory=memory, backing=backing, overcommit=True, **kw)


def _touch(h, vm, pages, kind=W, base=0):
    pages = np.asarray(pages, np.int64)
    return h.access(vm, 0, base + pages * 4096, kind)


# ----------------------------------------------------------------------------- the rule
def test_plan_takes_oldest_first_then_shares_the_threshold_age():
    hist = np.zeros((3, NAGES), np.int64)
    hist[0, 3], hist[1, 1], hist[2, 0] = 100, 50, 200
    t, at = plan_reclaim(hist, 120)
    assert t == 1 and at.tolist() == [0, 20, 0]            # all 100 of age 3, then 20 of age 1
    hist = np.zeros((3, NAGES), np.int64)
    hist[:, 0] = 10
    t, at = plan_reclaim(hist, 10)
    assert t == 0 and at.tolist() == [4, 3, 3]             # equal remainders: the lower VM id first
    t, at = plan_reclaim(hist, 1000)
    assert t == 0 and at.tolist() == [10, 10, 10]          # not enough: everything
    assert plan_reclaim(hist, 0)[0] == NAGES


@settings(deadline=None, max_examples=200, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.integers(0, 255), st.integers(0, 5000), max_size=4), min_size=1, max_size=6),
       st.integers(-5, 30000))
def test_plan_matches_the_reference_rule(rows, need):
    hist = np.zeros((len(rows), NAGES), np.int64)
    for v, row in enumerate(rows):
        for age, n in row.items():
            hist[v, age] = n
    t, at = plan_reclaim(hist, need)
    rt, rat = ref_plan(hist.tolist(), need)
    assert (t, at.tolist()) == (rt, rat)
    if need > 0:
        assert (at <= hist[:, min(t, NAGES - 1)]).all()
        taken = int(hist[:, t + 1:].sum() + at.sum()) if t < NAGES else 0
        assert taken == min(need, int(hist.sum()))


# ----------------------------------------------------------------------------- one host
@pytest.mark.parametrize("mmu", ["tdp", "legacy", "shadow"])
def test_lru_takes_the_idle_vm_and_refaults_are_major(mmu):
    """The same on every MMU: the TDP MMU's notifier walks its tables; the legacy TDP MMU and shadow paging
    (here with paging off) age and zap through the rmaps."""
    h = _host(640 * 4096)
    a, b, c = (int(v) for v in h.create_vms(3, memory="1MiB", mmu="shadow" if mmu == "shadow" else "tdp",
                                            tdp_mmu=mmu != "legacy"))
    _touch(h, a, range(256))
    _touch(h, b, range(256))
    h.reclaim(force=False)                     # below the low watermark: nothing happens
    assert h.host_memory()[0] == 512 * 4096 and h.stats(a)["pages_aged"] == 0
    h.reclaim_scan()                           # both VMs' pages are young now and made old
    _touch(h, b, range(256), 0)                # B keeps working; A is idle
    _touch(h, c, range(256))                   # C fills the host: direct reclaim takes A's pages
    sa, sb, sc = h.stats(a), h.stats(b), h.stats(c)
    assert sb["host_pages_reclaimed"] == sc["host_pages_reclaimed"] == 0
    assert sa["host_pages_reclaimed"] == sa["host_pages_swapped"] > 0
    assert sa["pages_4k"] == 256 - sa["host_pages_swapped"]    # reclaim zapped their SPTEs
    assert h.host_memory()[0] <= 640 * 4096 and h.swapped_bytes() == 4096 * sa["host_pages_swapped"]
    swapped = h.host_pages(a, 0)["swapped"]
    h.discard_hva_range(c, HVA, HVA + MiB)     # room, so that touching A again reclaims nothing
    back = np.arange(0, 256, 3)                # touch a third of A again
    r = _touch(h, a, back, 0)
    assert (r.outcome == bm.FIXED).sum() == swapped[back].sum()
    assert h.stats(a)["host_major_faults"] == swapped[back].sum()
    assert h.host_pages(a, 0)["resident"][back].all()
    assert h.footprint(a)["guest_swapped"] == 4096 * h.stats(a)["host_pages_swapped"]


def test_thp_reclaim_splits_and_refaults_4k():
    h = _host(8 * MiB, backing="thp")
    vm = int(h.create_vms(1, memory="8MiB")[0])
    _touch(h, vm, np.arange(4) * 512)          # four 2M faults fill the host
    assert h.reclaim_scan()[vm, 0] == 2048     # all young, now old
    flushes = h.stats(vm)["remote_tlb_flush"]
    assert h.reclaim_evict(0, [512]).tolist() == [512]   # the first folio in page order: a whole THP
    s = h.stats(vm)
    assert (s["pages_2m"], s["host_thp_splits"], s["host_pages_reclaimed"], s["mmu_notifier_zapped"]) == (3, 1, 512, 1)
    assert s["remote_tlb_flush"] == flushes + 1
    state = h.host_pages(vm, 0)
    assert state["swapped"][:512].all() and state["split"][:512].all() and state["resident"][512:].all()
    r = _touch(h, vm, [7], 0)                  # swap-in is 4K and the range stays split: a 4K SPTE
    s = h.stats(vm)
    assert r.outcome[0] == bm.FIXED and (s["host_major_faults"], s["pages_4k"], s["pages_2m"]) == (1, 1, 3)


def test_thp_across_the_reclaim_target_is_split_and_partly_kept():
    h = _host(8 * MiB, backing="thp")
    vm = int(h.create_vms(1, memory="8MiB")[0])
    _touch(h, vm, np.arange(4) * 512)
    need = -(-(8 * MiB - int(0.9 * 8 * MiB)) // 4096)          # kswapd: down to the low watermark
    assert h.reclaim(force=True) == {"scanned": 2048, "reclaimed": need}
    state = h.host_pages(vm, 0)
    assert state["swapped"][:need].all() and state["resident"][need:].all() and state["split"][:512].all()
    r = _touch(h, vm, [300, 7], 0)             # 300: resident, its 2M SPTE gone: a minor 4K fault
    s = h.stats(vm)
    assert r.outcome.tolist() == [bm.FIXED, bm.FIXED] and (s["host_major_faults"], s["pages_4k"]) == (1, 2)


def test_hugetlb_is_never_reclaimed():
    h = _host(4 * MiB, backing="hugetlb-2m")
    vm = int(h.create_vms(1, memory="8MiB")[0])
    _touch(h, vm, [0, 512])
    with pytest.raises(bm.HostMemoryExhausted):
        _touch(h, vm, [1024])
    assert h.stats(vm)["host_pages_reclaimed"] == 0


def test_aging_without_ad_bits_access_tracks():
    h = _host(64 * MiB)
    vm = int(h.create_vms(1, memory="1MiB", ept_ad=False)[0])
    _touch(h, vm, range(256), 0)
    hist = h.reclaim_scan()
    assert hist[vm, 0] == 256
    r = _touch(h, vm, range(256), 0)            # access-tracked: every page refaults (fast path)
    assert (r.outcome == bm.FIXED).all() and h.stats(vm)["pf_fast"] == 256
    assert h.reclaim_scan()[vm, 0] == 256


def test_discard_frees_without_swap_and_splits_partial_thps():
    h = bm.Host(memory="64MiB", backing="thp")
    vm = int(h.create_vms(1, memory="8MiB")[0])
    _touch(h, vm, np.arange(4) * 512)
    freed = h.discard_hva_range(vm, HVA, HVA + 2 * MiB + 4096)   # one THP whole, one partly
    s = h.stats(vm)
    assert freed == 2 * MiB + 4096 and h.host_memory()[0] == 8 * MiB - freed
    assert (s["pages_2m"], s["host_thp_splits"], h.swapped_bytes()) == (2, 1, 0)
    state = h.host_pages(vm, 0)
    assert not state["split"][0] and state["split"][512:1024].all() and state["resident"][513:1024].all()
    _touch(h, vm, [0, 513], 0)                   # a fresh THP; the split one maps 4K
    s = h.stats(vm)
    assert (s["pages_2m"], s["pages_4k"], s["host_major_faults"]) == (3, 1, 0)


def test_aliased_slots_share_host_pages():
    h = bm.Host(memory="64MiB", backing="4k")
    vm = int(h.create_vms(1, memory="2MiB")[0])
    for s in (1, 2):
        h.set_memslot(vm, s, (1 << 32) * s, 4 * MiB, hva=HVA + (1 << 32))
    h.access(vm, 0, [1 << 32, 2 << 32, (2 << 32) + 4096], W)
    assert h.host_memory()[0] == 2 * 4096
    h.set_memslot(vm, 1, 1 << 32, 0)             # the other alias still maps the pages
    assert h.host_memory()[0] == 2 * 4096
    h.set_memslot(vm, 2, 2 << 32, 0)
    assert h.host_memory()[0] == 0


# ----------------------------------------------------------------------------- invariants
def _recount(h, vm):
    """Gauges recomputed from the arenas, and the SPTE / residency invariant."""
    dump = h.spte_dump(vm)
    levels = {1: 0, 2: 0, 3: 0}
    slots = {m["slot"]: m for m in h.memslots(vm)}
    resident_pages, swapped_pages, seen = 0, 0, set()
    for sl, m in slots.items():
        state = h.host_pages(vm, sl)
        key = (m["hva"], m["size"], m["backing"])
        if key not in seen:
            seen.add(key)
            resident_pages += int(state["resident"].sum())
            swapped_pages += int(state["swapped"].sum())
        assert not (state["resident"] & state["swapped"]).any()
    for gfn, (level, spte) in dump.items():
        if not is_shadow_present_pte(np.uint64(spte).view(np.int64)):
            continue                            # an MMIO SPTE
        m = next((m for m in slots.values() if m["slot"] >> 16 == 0
                  and m["gpa"] >> 12 <= gfn < (m["gpa"] + m["size"]) >> 12), None)
        levels[level] += 1
        assert m is not None, f"VM {vm}: a present SPTE at gfn {gfn:#x} outside every memslot"
        state = h.host_pages(vm, m["slot"])
        first = gfn - (m["gpa"] >> 12)
        span = state["resident"][first:first + 512 ** (level - 1)]
        assert span.all(), f"VM {vm}: L{level} SPTE at gfn {gfn:#x} maps pages that are not resident"
    s = h.stats(vm)
    assert (s["pages_4k"], s["pages_2m"], s["pages_1g"]) == (levels[1], levels[2], levels[3])
    assert s["mmu_pages"] == int((h.pa.sp_vm == vm).sum())
    assert s["host_pages_swapped"] == swapped_pages
    return resident_pages


@settings(HYP, max_examples=40)
@given(data=st.data())
def test_invariants_after_any_events(data):
    """Accesses, invalidations, aging, MADV_DONTNEED, memslot changes and reclaim in any order: no SPTE
    maps a page that is not resident (reclaimed, discarded) nor survives an invalidation of its range,
    and recounting the arenas gives every gauge."""
    d = HypDraw(data)
    h = _host(d.pick([3, 4, 6]) * MiB, backing=d.pick(["4k", "thp"]))
    vms = [int(v) for v in h.create_vms(2, memory="4MiB", ept_ad=d.pick([True, False]))]
    for _ in range(d.int(3, 25)):
        vm = d.pick(vms)
        what = d.pick(["access"] * 4 + ["invalidate", "discard", "reclaim", "evict", "slot"])
        if what == "access":
            p0 = d.int(0, 1023)
            pages = np.concatenate([np.arange(p0, min(1024, p0 + d.pick([1, 64, 400]))), [d.int(0, 1023)]])
            h.access(vm, 0, pages * 4096, d.pick([0, W]))
        elif what in ("invalidate", "discard"):
            p0 = d.int(0, 1023)
            p1 = min(1024, p0 + d.pick([1, 7, 512, 600]))
            (h.invalidate_hva_range if what == "invalidate" else h.discard_hva_range)(vm, HVA + p0 * 4096,
                                                                                     HVA + p1 * 4096)
            assert not [g for g, (lv, _) in h.spte_dump(vm).items() if g < p1 and g + 512 ** (lv - 1) > p0]
        elif what == "reclaim":
            h.reclaim(force=d.pick([True, False]))
        elif what == "evict":
            hist = h.reclaim_scan()
            h.reclaim_evict(d.int(0, 3), [d.int(0, 700) for _ in range(h.nvm)])
            assert hist.sum() >= 0
        else:   # add or delete a second slot (a delete zaps everything)
            h.set_memslot(vm, 1, 1 << 30, 0 if any(m["slot"] == 1 for m in h.memslots(vm)) else 2 * MiB)
        total = sum(_recount(h, v) for v in vms)
        assert total * 4096 == h.host_memory()[0]
        assert sum(h.stats(v)["host_pages_swapped"] for v in vms) * 4096 == h.swapped_bytes()


# ----------------------------------------------------------------------------- against the reference model
def _cmp_pages(p, vm):
    for m in p.h.memslots(vm):
        a = {k: v.tolist() for k, v in p.h.host_pages(vm, m["slot"]).items()}
        if a != p.m.host_pages(vm, m["slot"]):
            p.fail(f"VM {vm} slot {m['slot']}: host pages differ")
    if p.h.swapped_bytes() != p.m.swapped_bytes():
        p.fail(f"swapped {p.h.swapped_bytes()} != model {p.m.swapped_bytes()}")


def op_reclaim(d, p):
    how = d.pick(["reclaim", "reclaim", "scan_evict", "discard"])
    if how == "reclaim":
        p._both("reclaim", (), {"force": d.pick([True, False])})
    elif how == "scan_evict":
        a, b, _ = p._both("reclaim_scan", (), {})
        if np.asarray(a).tolist() != [list(r) for r in b]:
            p.fail("reclaim_scan histograms differ")
        at = [d.int(0, 600) for _ in p.vms]
        p._both("reclaim_evict", (d.pick([0, 0, 1, 2]), at), {})
    else:
        vm = d.pick(p.vms)
        p0 = d.int(0, 2047)
        p._both("discard_hva_range", (vm, HVA + p0 * 4096, HVA + (p0 + d.pick([1, 9, 512, 700])) * 4096), {})
    p.check(p.vms)
    for vm in p.vms:
        _cmp_pages(p, vm)


def _reclaim_stream(d, n_ops):
    p = Pair(memory=d.pick([2, 3, 5]) * MiB, backing=d.pick(["4k", "thp", "thp"]), overcommit=True,
             watermarks=d.pick([(0.9, 0.95), (0.5, 0.8)]), tdp_huge_page_level=d.pick([3, 2]))
    for _ in range(d.int(1, 3)):
        p.create_vms(1, memory=d.pick([2 * MiB, 4 * MiB, 8 * MiB]), ept_ad=d.pick([True, False]))
    for _ in range(n_ops):
        d.pick([op_access] * 6 + [op_reclaim] * 3 + [op_memslot, op_invalidate, op_age])(d, p)
    p.check(p.vms, all_dumps=True)
    for vm in p.vms:
        _cmp_pages(p, vm)


@settings(HYP, max_examples=30)
@given(data=st.data())
def test_reclaim_matches_the_reference_model(data):
    _reclaim_stream(HypDraw(data), data.draw(st.integers(5, 40)))


@pytest.mark.parametrize("seed", [1, 2])
def test_reclaim_long_streams(seed):
    _reclaim_stream(NpDraw(seed), 250)


def test_reference_model_epoch_mode_never_fails():
    m = RefHost(memory=1 * MiB, backing="4k", overcommit="epoch")
    h = bm.Host(memory=1 * MiB, backing="4k", overcommit="epoch")
    for host in (m, h):
        vm = host.create_vms(1, memory=4 * MiB)[0]
        host.access([int(vm)] * 1024, 0, [i * 4096 for i in range(1024)], W)
        assert host.host_memory() == (4 * MiB, 1 * MiB)


# ----------------------------------------------------------------------------- scenarios across shards
SMALL = ["busy_vms=2", "idle_vms=3", "bytes_per_vcpu=4MiB", "memory=14MiB", "epochs=4", "passes=2"]


def _sig(rep):
    return rep.totals, rep.per_vm, [(p["stats"], p.get("epochs"), p.get("host")) for p in rep.phases]


@pytest.mark.parametrize("backing", ["thp", "4k"])
def test_overcommit_same_for_any_worker_count(backing):
    sets = SMALL + [f"backing={backing}", "access_order=random"]
    a = bm.run_scenario("overcommit", workers=1, seed=5, sets=sets)
    assert a.totals["host_pages_reclaimed"] > 0 and a.totals["host_major_faults"] > 0
    for w in (2, 3):
        assert _sig(bm.run_scenario("overcommit", workers=w, seed=5, sets=sets)) == _sig(a)


def test_overcommit_same_on_process_and_ray_backends():
    a = bm.run_scenario("overcommit", workers=1, sets=SMALL)
    assert _sig(bm.run_scenario("overcommit", workers=2, backend="process", sets=SMALL)) == _sig(a)
    pytest.importorskip("ray", reason="Ray is an optional extra (batchmmu[cluster])")
    assert _sig(bm.run_scenario("overcommit", workers=2, backend="ray", sets=SMALL)) == _sig(a)


def test_overcommit_scenario_reclaims_to_the_low_watermark_and_the_working_set_settles():
    rep = bm.run_scenario("overcommit", sets=SMALL)
    mem = 14 * MiB
    reclaims = [e for p in rep.phases for e in p["epochs"] if e.get("reclaimed_pages")]
    assert reclaims and all(e["host_resident"] <= 0.90 * mem for e in reclaims)
    assert all(e["host_resident"] + e["host_swapped"] <= 20 * MiB for p in rep.phases for e in p["epochs"])
    busy = [e["host_major_faults"] for e in rep.phases[1]["epochs"]]
    start = rep.phases[0]["host"]["host_major_faults"]
    # the busy VMs' 8 MiB fit once the idle VMs' pages have aged: their second pass refaults far less
    assert busy[-1] - busy[3] < (busy[3] - start) / 2
    assert rep.phases[2]["host"]["host_major_faults"] > busy[-1]          # the idle VMs come back
    assert rep.totals["host_pages_swapped"] * 4096 == rep.footprint["guest_swapped"]
