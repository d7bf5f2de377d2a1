"""The legacy TDP MMU (kvm.tdp_mmu=N): TDP tables built by the shadow MMU's code (direct shadow pages found in
the (gfn, role) hash, rmaps, parent lists, n_max_mmu_pages), beside the TDP MMU.

The guest cannot tell them apart: on random streams of accesses, stores, memslot changes, dirty logging,
notifier zaps and aging, both give the same outcomes (HIT / FIXED / SPURIOUS are one class to the guest), guest
memory, dirty bitmaps and young maps.  Where KVM's two MMUs differ, so do these: the legacy MMU prefetches
neighbours of a 4K fault (direct_pte_prefetch), does not split huge pages (eagerly or under a fault: it drops
them) and zaps collapsible SPTEs where the TDP MMU rebuilds huge ones in place; on the same stream without those
their SPTEs and statistics are equal but for the hash (``mmu_cache_miss``) and the rmaps (``rmap_entries``,
``max_mmu_rmap_size``).
"""

import numpy as np
import pytest
from batchmmu.kernels import state as S
from batchmmu.kernels.spte import ROLE_INVALID, SPTE_BASE_ADDR_MASK, is_accessed_spte
from reference.shadow_model import RefShadowHost
from test_mmu_differential import CPU_STATES, run_random
from test_shadow_reference_diff import Pair, RngDraw, get_and_clear

import batchmmu as bm

MiB = 1 << 20
HVA0 = 1 << 40                   # slot 0's hva (memslot.HVA_BASE)
SLOT1_GPA, SLOT1_HVA = 1 << 30, 1 << 42
MMIO = 512 * MiB                 # no memslot there
# statistics only the legacy MMU keeps (the TDP MMU has no hash or rmaps)
LEGACY_ONLY = {"mmu_cache_miss", "rmap_entries", "max_mmu_rmap_size"}


def pair(tdp_format="ept", ept_ad=True, vcpus=2, memory=16 * MiB, backing="thp", **host):
    """The same VM on the TDP MMU and on the legacy one: [(host, vm), (host, vm)]."""
    out = []
    for tdp_mmu in (True, False):
        h = bm.Host(memory="1GiB", backing=backing, tdp_mmu=tdp_mmu, **host)
        out.append((h, int(h.create_vms(1, memory=memory, vcpus=vcpus, tdp_format=tdp_format, ept_ad=ept_ad)[0])))
    return out


def seen(res):
    """What the guest sees of each access: translated (HIT, FIXED, SPURIOUS: one class) or its outcome."""
    o = res.outcome.astype(np.int64)
    return np.where(np.isin(o, (bm.HIT, bm.FIXED, bm.SPURIOUS)), -1, o)


def _stat_diff(p):
    a, b = (h.stats(vm) for h, vm in p)
    return {k for k in a if a[k] != b[k]}


def random_stream(seed, tdp_format, ept_ad, manual, pml=False):
    """One random stream on both MMUs; returns the divergences (empty when the guest cannot tell).

    With 4K backing the SPTEs and statistics must be equal too (but for LEGACY_ONLY and what zapping whole
    pages counts); with THP they may differ as KVM's do: the TDP MMU splits huge pages (eagerly when logging
    starts, or under a 4K fault) and recovers them in place when logging stops, where the legacy MMU
    write-protects, drops and zaps them, so later accesses fault differently (never with another outcome)."""
    rng = np.random.default_rng(seed)
    p = []
    backing = "4k" if seed % 2 else "thp"
    for tdp_mmu in (True, False):
        h = bm.Host(memory="1GiB", backing=backing, tdp_mmu=tdp_mmu, pml=pml, mmio_caching=bool(seed % 3))
        vm = int(h.create_vms(1, memory=16 * MiB, vcpus=2, tdp_format=tdp_format, ept_ad=ept_ad)[0])
        if manual:
            h.enable_manual_dirty_log_protect(vm, initially_set=bool(seed % 2))
        p.append((h, vm))
    bad = []
    slot1 = None   # (gpa, npages, flags) while slot 1 exists

    log = []

    def call(name, *args, **kw):
        return [getattr(h, name)(vm, *args, **kw) for h, vm in p]

    def same(what, vals):
        log.append(what)
        a, b = vals
        eq = all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) if isinstance(a, tuple) else \
            np.array_equal(a, b)
        if not eq:
            bad.append((what, a, b, log[-8:]))

    def gpas(n):
        lo = rng.integers(0, 16 * MiB, n)
        if slot1 is not None:
            hi = slot1[0] + rng.integers(0, slot1[1] << 12, n)
            lo = np.where(rng.random(n) < 0.4, hi, lo)
        return np.where(rng.random(n) < 0.03, MMIO + rng.integers(0, 64, n) * 4096, lo) & ~7

    for _ in range(60):
        x = rng.random()
        if x < 0.45:
            n = int(rng.integers(1, 200))
            addr, vcpu = gpas(n), rng.integers(0, 2, n)
            kind = rng.choice([0, bm.ACC_WRITE, bm.ACC_FETCH], n, p=[0.5, 0.4, 0.1])
            same("access", [seen(r) for r in call("access", vcpu, addr, kind)])
        elif x < 0.55:
            addr, val = gpas(4), rng.integers(0, 1 << 62, 4)
            same("store", [seen(r) for r in call("store", 0, addr, val)])
        elif x < 0.67:
            # slot 1: create, change flags, move or delete
            r = rng.random()
            if slot1 is None or r < 0.3:
                npages = int(rng.integers(1, 4)) * 512 + int(rng.integers(0, 2)) * 17
                flags = int(rng.choice([0, bm.MEM_LOG_DIRTY_PAGES, bm.MEM_READONLY]))
                if slot1 is not None:
                    call("set_memslot", 1, slot1[0], 0)
                slot1 = (SLOT1_GPA, npages, flags)
            elif r < 0.7:
                slot1 = (slot1[0], slot1[1], slot1[2] ^ bm.MEM_LOG_DIRTY_PAGES if not slot1[2] & bm.MEM_READONLY
                         else slot1[2])
            elif r < 0.85:
                call("set_memslot", 1, slot1[0], 0)
                slot1 = (SLOT1_GPA + (2 << 30) if slot1[0] == SLOT1_GPA else SLOT1_GPA, slot1[1], slot1[2])
            else:
                call("set_memslot", 1, slot1[0], 0)
                slot1 = None
            log.append(f"slot1 {slot1}")
            if slot1 is not None:
                s = slot1
                call("set_memslot", 1, s[0], s[1] << 12, flags=s[2], hva=SLOT1_HVA)
        elif x < 0.77 and slot1 is not None and slot1[2] & bm.MEM_LOG_DIRTY_PAGES:
            if manual:
                words = (slot1[1] + 63) // 64
                same("dirty", call("get_dirty_log", 1))
                first = 64 * int(rng.integers(0, words))
                same("clear", call("clear_dirty_log", 1, first, slot1[1] - first, [-1] * words))
            else:
                same("dirty", call("get_dirty_log", 1))
        elif x < 0.87:
            lo = HVA0 + int(rng.integers(0, 4096)) * 4096
            hi = lo + int(rng.integers(1, 1024)) * 4096
            if rng.random() < 0.5:
                call("invalidate_hva_range", lo, hi)   # counts differ: prefetched SPTEs
            else:
                same("young", call("age_hva_range", lo, hi))
        else:
            same("test_young", call("test_young", HVA0, HVA0 + 16 * MiB))
    same("memory", call("read_guest_memory", 0, 16 * MiB // 8))
    if slot1 is not None:
        same("memory1", call("read_guest_memory", slot1[0], slot1[1] * 512))
    if backing != "4k":
        return bad
    # every gfn the TDP MMU maps, the legacy MMU maps to the same page at the same level (a prefetched SPTE
    # that a read then made young lacks W without A/D bits, as KVM's does: access tracking saves only R and X);
    # the legacy MMU maps more only where it prefetched (direct_pte_prefetch: never accessed since)
    (ht, vt), (hl, vl) = p
    dt, dl = ht.spte_dump(vt), hl.spte_dump(vl)
    fmt = int(hl.vt.fmt[vl])
    for g, (lv, v) in dt.items():
        if g not in dl or dl[g][0] != lv or (dl[g][1] ^ v) & SPTE_BASE_ADDR_MASK:
            bad.append(("spte", g, (lv, hex(v)), dl.get(g)))
    for g, (_lv, v) in dl.items():
        if g not in dt and is_accessed_spte(fmt, np.uint64(v).view(np.int64)):
            bad.append(("extra spte", g, hex(v)))
    return bad


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tdp_format,ept_ad", [("ept", True), ("npt", True), ("ept", False)])
def test_random_host_streams_cannot_tell_the_mmus_apart(seed, tdp_format, ept_ad):
    assert random_stream(300 + seed, tdp_format, ept_ad, manual=seed >= 3) == []


@pytest.mark.parametrize("seed", range(3))
def test_random_streams_with_pml(seed):
    """Under PML the legacy MMU clears dirty bits through the rmaps instead of write-protecting."""
    assert random_stream(400 + seed, "ept", True, manual=bool(seed % 2), pml=True) == []


@pytest.mark.parametrize("seed", range(6))
def test_random_paging_guests_on_the_legacy_mmu(seed):
    """The 2D walk of test_mmu_differential's random guests (every paging mode): the TDP MMU against the legacy
    one instead of shadow paging."""
    fmt, ad = [("ept", True), ("npt", True), ("ept", False)][seed % 3]
    state = CPU_STATES[(5 * seed) % len(CPU_STATES)]
    assert run_random(3000 + seed, *state, n_events=250, tdp_format=fmt, ept_ad=ad, second="legacy") == []


@pytest.mark.nojit
def test_direct_pages_come_from_the_hash_and_carry_rmaps():
    (ht, vt), (hl, vl) = pair(vcpus=3, backing="4k")
    gpas = np.arange(0, 4 * MiB, 4096)
    for h, vm in ((ht, vt), (hl, vl)):
        h.access(vm, 0, gpas, bm.ACC_WRITE)
        h.access(vm, [1, 2], 0, 0)
    st, sl = ht.stats(vt), hl.stats(vl)
    assert st["pages_4k"] == sl["pages_4k"] == gpas.size
    assert st["rmap_entries"] == 0 and sl["rmap_entries"] == gpas.size   # one rmap entry per leaf
    # the root, a PDPT, a PD, two PTs: each was a hash miss once; vCPUs 1 and 2 found the root in the hash
    assert sl["mmu_pages"] == st["mmu_pages"] == 5 and sl["mmu_cache_miss"] == 5
    roots = {int(hl.vr.root[int(hl.vt.vcpu_off[vl]) + c]) for c in range(3)}
    assert len(roots) == 1 and int(hl.pa.root_count[roots.pop()]) == 3
    # footprint: the legacy MMU's tables are shadow pages, with rmap heads; the TDP MMU's have none
    ft, fl = ht.footprint(vt), hl.footprint(vl)
    assert ft["tdp_page_tables"] == fl["shadow_page_tables"] and fl["tdp_page_tables"] == 0
    assert ft["rmaps"] == 0 < fl["rmaps"] and fl["write_track"] == 0   # no gfn_write_track under TDP


def test_memslot_deletion_obsoletes_the_root_and_every_vcpu_reloads():
    (ht, vt), (hl, vl) = pair(vcpus=2)
    for h, vm in ((ht, vt), (hl, vl)):
        h.set_memslot(vm, 1, SLOT1_GPA, 4 * MiB, hva=SLOT1_HVA)
        h.access(vm, [0, 1], [0x1000, SLOT1_GPA], bm.ACC_WRITE)
    miss = hl.stats(vl)["mmu_cache_miss"]
    for h, vm in ((ht, vt), (hl, vl)):
        h.set_memslot(vm, 1, SLOT1_GPA, 0)   # kvm_mmu_zap_all_fast
    # every page zapped; the root, invalid, stays while the two vCPUs hold it
    old = int(hl.vr.root[int(hl.vt.vcpu_off[vl])])
    assert hl.stats(vl)["mmu_pages"] == 1 and int(hl.pa.root_count[old]) == 2
    assert int(hl.pa.sp_role[old]) & int(ROLE_INVALID)
    res = [h.access(vm, [0, 1], [0x1000, SLOT1_GPA], bm.ACC_WRITE) for h, vm in ((ht, vt), (hl, vl))]
    assert list(res[0].outcome) == list(res[1].outcome) == [bm.FIXED, bm.MMIO]
    # both vCPUs put the old root (its last put zaps it again: mmu_shadow_zapped 4 + 1); one loaded a new root,
    # the other found it in the hash; PDPT, PD and (for the MMIO SPTE) a PD and a PT below it: 5 misses
    s = hl.stats(vl)
    assert s["mmu_cache_miss"] == miss + 5 and s["mmu_shadow_zapped"] == 5
    assert s["mmu_pages"] == ht.stats(vt)["mmu_pages"] == 5
    assert ht.spte_dump(vt) == hl.spte_dump(vl)


def test_n_max_mmu_pages_recycles_legacy_tables():
    (ht, vt), (hl, vl) = pair(memory=256 * MiB, backing="4k")
    hl.set_nr_mmu_pages(vl, 64)
    gpas = np.arange(0, 256 * MiB, 2 * MiB)    # one PT each: more tables than the budget
    rt, rl = ht.access(vt, 0, gpas, bm.ACC_WRITE), hl.access(vl, 0, gpas, bm.ACC_WRITE)
    assert list(rt.outcome) == list(rl.outcome)
    s = hl.stats(vl)
    assert s["mmu_pages"] <= 64 < ht.stats(vt)["mmu_pages"] and s["mmu_recycled"] > 0
    # the guest still reads what it wrote, through tables rebuilt on demand
    again = hl.access(vl, 0, gpas, 0)
    assert set(again.outcome) <= {bm.HIT, bm.FIXED}
    assert hl.shrink_count() == hl.stats(vl)["mmu_pages"] and ht.shrink_count() == 0
    assert hl.shrink(10) > 0


def test_nx_huge_pages_and_recovery_on_the_legacy_mmu():
    p = pair(memory=64 * MiB, nx_huge_pages=True, nx_huge_pages_recovery_ratio=1)
    gpas = np.arange(0, 16 * MiB, 2 * MiB)
    for h, vm in p:
        h.access(vm, 0, gpas, bm.ACC_FETCH)   # executable: 4K, the PT splits a possible huge page
        h.access(vm, 0, gpas + 4096, 0)
    (ht, vt), (hl, vl) = p
    assert ht.stats(vt)["nx_lpage_splits"] == hl.stats(vl)["nx_lpage_splits"] == gpas.size
    dt, dl = ht.spte_dump(vt), hl.spte_dump(vl)
    assert {g: dl[g] for g in dt} == dt and len(dl) > len(dt)   # the legacy MMU also prefetched neighbours
    for h, _vm in p:
        h.advance_time(2 * h.nx_recovery_period())
    assert ht.stats(vt)["nx_lpage_recovered"] == hl.stats(vl)["nx_lpage_recovered"] == gpas.size
    assert ht.stats(vt)["nx_lpage_splits"] == hl.stats(vl)["nx_lpage_splits"] == 0
    for h, vm in p:
        h.access(vm, 0, gpas + 8192, 0)     # a read maps the 2M page again
    assert ht.spte_dump(vt) == hl.spte_dump(vl)
    assert ht.stats(vt)["pages_2m"] == hl.stats(vl)["pages_2m"] == gpas.size


def test_pml_logs_legacy_writes_without_write_protection():
    p = pair(pml=True, backing="4k")
    for h, vm in p:
        h.set_memslot(vm, 1, SLOT1_GPA, 2 * MiB, hva=SLOT1_HVA)
        h.access(vm, 0, SLOT1_GPA + np.arange(0, 2 * MiB, 4096), bm.ACC_WRITE)
        h.set_memslot(vm, 1, SLOT1_GPA, 2 * MiB, hva=SLOT1_HVA, flags=bm.MEM_LOG_DIRTY_PAGES)
        h.access(vm, 0, SLOT1_GPA + np.arange(0, 2 * MiB, 8192), bm.ACC_WRITE)
    (ht, vt), (hl, vl) = p
    dt, dl = ht.get_dirty_log(vt, 1), hl.get_dirty_log(vl, 1)
    assert np.array_equal(dt, dl) and int(np.unpackbits(dl.view(np.uint8)).sum()) == 256
    st, sl = ht.stats(vt), hl.stats(vl)
    assert sl["pf_fixed"] == st["pf_fixed"] and sl["pml_flushes"] > 0   # no write faults: PML logged them
    assert _stat_diff(p) <= LEGACY_ONLY


@pytest.mark.nojit
def test_a_vm_takes_the_host_default_or_its_own_choice():
    h = bm.Host(memory="1GiB", tdp_mmu=False)
    a, b, c = (int(h.create_vms(1, memory="4MiB", **kw)[0]) for kw in ({}, {"tdp_mmu": True}, {"mmu": "shadow"}))
    assert [int(h._mmu_kind[v]) for v in (a, b, c)] == [S.MMU_LEGACY, S.MMU_TDP, S.MMU_SHADOW]
    with pytest.raises(bm.BatchMMUError, match="tdp_mmu"):
        h.create_vms(1, memory="4MiB", tdp_mmu=1.5)
    with pytest.raises(bm.BatchMMUError, match="tdp_mmu"):
        bm.Host(tdp_mmu="no")


# ---------------------------------------------------------------------------- against the reference model
class LegacyPair(Pair):
    """A legacy-TDP VM (NPT, MMIO caching off) and the reference shadow model in its legacy-TDP mode
    (tests/reference/shadow_model.py ``legacy_tdp_levels``), driven by the same calls."""

    def __init__(self, memory, backing, levels):
        self.h = bm.Host(memory="1GiB", backing=backing, mmio_caching=False, tdp_mmu=False)
        self.vm = int(self.h.create_vms(1, memory=memory, tdp_format="npt", tdp_levels=levels)[0])
        self.m = RefShadowHost(memory, backing, legacy_tdp_levels=levels)
        self.log = [f"Host(backing={backing!r}, tdp_mmu=False), memory={memory:#x}, {levels}-level NPT"]


def legacy_reference_stream(seed, nops=150):
    """Random gpa accesses and stores (slot 0, a second slot, no slot), dirty logging on / off / GET / CLEAR,
    the second slot created and deleted (a fast zap), host memory touched: after every operation the
    outcome, the #NPF error code and every statistic the model keeps agree; the written pages at the end."""
    draw = RngDraw(seed)
    rng = draw.rng
    memory = int(rng.choice([8 * MiB, 32 * MiB]))
    backing = str(rng.choice(["4k", "thp"]))
    pair = LegacyPair(memory, backing, int(rng.choice([4, 5])))
    npages = memory >> 12
    manual = [None, False, True][seed % 3]
    if manual is not None:
        pair.call("enable_manual_dirty_log_protect", initially_set=manual, vcpu=False)
    if rng.integers(0, 2):
        pair.call("touch_host_memory", 0, memory // 2, vcpu=False)
    state = {"log": 0, "slot1": 0}

    def gpa():
        r = int(rng.integers(0, 10))
        if r < 7:
            return int(rng.integers(0, memory))
        if r < 9:
            return SLOT1_GPA + int(rng.integers(0, 2 * MiB)) if state["slot1"] else int(rng.integers(0, memory))
        return MMIO + int(rng.integers(0, 16)) * 4096

    for _ in range(nops):
        r = int(rng.integers(0, 100))
        if r < 55:
            kind = bm.ACC_USER | int(rng.choice([0, 0, bm.ACC_WRITE, bm.ACC_FETCH]))
            pair.outcome("access", gpa(), kind)
        elif r < 70:
            pair.outcome("store", gpa() & ~7, int(rng.integers(0, 1 << 62)), kind=bm.ACC_USER)
        elif r < 80:
            state["log"] ^= 1
            pair.call("set_memslot", 0, 0, memory, flags=bm.MEM_LOG_DIRTY_PAGES * state["log"], vcpu=False)
            pair.check()
        elif r < 90 and state["log"]:
            get_and_clear(draw, pair, npages, manual is not None)
        elif r < 96:
            state["slot1"] ^= 1   # 4K host pages (the model's slots other than 0 have no THP)
            size = (2 * MiB) * state["slot1"]
            pair.log.append(f"set_memslot(1, {SLOT1_GPA:#x}, {size:#x}, backing='4k')")
            pair.h.set_memslot(pair.vm, 1, SLOT1_GPA, size, **({"backing": "4k"} if size else {}))
            pair.m.set_memslot(1, SLOT1_GPA, size)
            pair.check()
    pair.check({g >> 12 for g in pair.m.mem})
    return pair


@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.nojit) if s < 2 else s for s in range(12)])
def test_legacy_mmu_against_the_reference_model(seed):
    legacy_reference_stream(500 + seed)


@pytest.mark.parametrize("ept_ad", [True, False])
def test_prefetch_maps_resident_neighbours_only_with_accessed_bits(ept_ad):
    """direct_pte_prefetch: the resident pages of the fault's aligned group of 8, and none on an SP without A/D
    bits (sp_ad_disabled): a prefetched SPTE there could never be told apart from an accessed one."""
    h = bm.Host(memory="1GiB", backing="4k", tdp_mmu=False)
    vm = int(h.create_vms(1, memory="4MiB", ept_ad=ept_ad)[0])
    h.touch_host_memory(vm, 0, 8 * 4096)
    h.access(vm, 0, 3 * 4096, 0)
    assert h.stats(vm)["pages_4k"] == (8 if ept_ad else 1)


@pytest.mark.nojit
def test_prefetch_stops_where_the_run_leaves_its_memslot():
    """kvm_prefetch_pages: a run of empty SPTEs longer than what is left of the slot prefetches nothing."""
    h = bm.Host(memory="1GiB", backing="4k", tdp_mmu=False)
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.set_memslot(vm, 1, SLOT1_GPA, 4 * 4096, hva=SLOT1_HVA)      # 4 pages: the group of 8 runs past its end
    h.touch_host_memory(vm, SLOT1_GPA, 4 * 4096)
    h.access(vm, 0, SLOT1_GPA, 0)
    assert h.stats(vm)["pages_4k"] == 1
    h.access(vm, 0, 3 * 4096, 0)                                    # slot 0: the whole group is inside
    assert h.stats(vm)["pages_4k"] == 1 + 1                         # (slot 0 pages are not resident)
    h.touch_host_memory(vm, 0, 8 * 4096)
    h.access(vm, 0, 5 * 4096, 0)
    assert h.stats(vm)["pages_4k"] == 2 + 7                         # 5 and its 6 resident empty neighbours


def test_tdp_vs_legacy_scenario_is_the_same_for_any_worker_count():
    """The bundled tdp_vs_legacy scenario: its two groups' totals differ only where KVM's MMUs do, and the
    statistics are the same on 1 worker and on 3 (serial) and 2 (process backend)."""
    sets = ["vms=2", "vcpus=2", "bytes_per_vcpu=2MiB", "iterations=2"]
    a = bm.run_scenario("tdp_vs_legacy", workers=1, seed=5, sets=sets)
    for kw in ({"workers": 3}, {"workers": 2, "backend": "process"}):
        b = bm.run_scenario("tdp_vs_legacy", seed=5, sets=sets, **kw)
        assert a.totals == b.totals and a.per_vm == b.per_vm
    tdp, legacy = slice(0, 2), slice(2, 4)
    for name, vals in a.per_vm.items():
        if name not in LEGACY_ONLY | {"mmu_shadow_zapped"}:
            assert vals[tdp] == vals[legacy], name
    assert all(v > 0 for v in a.per_vm["rmap_entries"][legacy]) and not any(a.per_vm["rmap_entries"][tdp])


def _fleet_2d(tdp_mmu):
    """Legacy-TDP VMs of each format, a TDP MMU VM, and a nested VM whose vCPU 0 runs an L2 (paging off) under
    nested EPT mapping L2's first 2 MiB 1:1 with 4K entries (EPT12 at 4 MiB)."""
    h = bm.Host(memory="2GiB", backing="4k", tdp_mmu=tdp_mmu)
    vms = []
    for kw in (dict(tdp_mmu=False), dict(tdp_mmu=False, tdp_format="npt"), dict(tdp_mmu=False, ept_ad=False),
               dict(tdp_mmu=True)):
        vms += [int(v) for v in h.create_vms(2, memory=8 * MiB, vcpus=2, **kw)]
    nv = int(h.create_vms(1, memory=8 * MiB, vcpus=2, nested=True)[0])
    root = 4 * MiB
    words = np.zeros(4 * 512, np.int64)
    words[0] = (root + 4096) | 7                                   # PML4E -> PDPT
    words[512] = (root + 2 * 4096) | 7                             # PDPTE -> PD
    words[1024] = (root + 3 * 4096) | 7                            # PDE -> PT
    words[1536:2048] = (np.arange(512, dtype=np.int64) << 12) | 7 | (6 << 3)
    h.write_guest_memory(nv, root, words.view(np.uint64))
    h.nested_enter(nv, 0, eptp=root | 6 | (3 << 3) | 0x40, cr0=0x11, cr3=0, cr4=0, efer=0)
    return h, vms + [nv]


@pytest.mark.parametrize("tdp_mmu", [False, True])
def test_interleaved_2d_batch_equals_each_vm_alone(tdp_mmu):
    """Without the time model a batch of the 2D kernels (legacy-TDP VMs, an L2 on nested EPT, stores) that
    interleaves VMs runs VM by VM, as the TDP MMU's does: outcomes, error codes, fault gpas, statistics, SPTEs and
    dirty bitmaps equal those of each VM's events run alone, and come back in the caller's order."""
    rng = np.random.default_rng(7)
    n = 4000
    h1, vms = _fleet_2d(tdp_mmu)
    h2, _ = _fleet_2d(tdp_mmu)
    for h in (h1, h2):
        for v in vms:
            h.set_memslot(v, 2, SLOT1_GPA, 2 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES, hva=SLOT1_HVA + v * 4 * MiB)
    ev_vm = rng.choice(np.array(vms), n)
    assert np.any(ev_vm[1:] < ev_vm[:-1])
    region = rng.choice(np.array([0, SLOT1_GPA, MMIO]), n)
    addr = region + rng.integers(0, 2 * MiB // 8, n) * 8
    vcpu = rng.integers(0, 2, n)
    kind = rng.choice(np.array([0, bm.ACC_WRITE, bm.ACC_FETCH]), n)
    value = rng.integers(0, 1 << 62, n)
    for op in ("access", "store"):
        if op == "access":
            res = h1.access(ev_vm, vcpu, addr, kind)
        else:
            res = h1.store(ev_vm, vcpu, addr, value)
        for v in vms:
            sel = ev_vm == v
            r = h2.access(v, vcpu[sel], addr[sel], kind[sel]) if op == "access" else \
                h2.store(v, vcpu[sel], addr[sel], value[sel])
            for a, b in ((res.outcome, r.outcome), (res.error_code, r.error_code), (res.fault_gpa, r.fault_gpa)):
                np.testing.assert_array_equal(a[sel], b)
    for v in vms:
        assert h1.stats(v) == h2.stats(v)
        assert h1.spte_dump(v) == h2.spte_dump(v)
        np.testing.assert_array_equal(h1.get_dirty_log(v, 2), h2.get_dirty_log(v, 2))
        np.testing.assert_array_equal(h1.read_guest_memory(v, SLOT1_GPA, 2 * MiB // 8),
                                      h2.read_guest_memory(v, SLOT1_GPA, 2 * MiB // 8))
    s = h1.stats()
    assert s["pf_fixed"].sum() > 0 and s["pf_mmio_spte_created"].sum() > 0 and s["nested_run"].sum() > 0
    assert s["rmap_entries"][vms[0]] > 0


def test_budget_exhausted_in_an_interleaved_2d_batch_applies_vm_by_vm():
    """HostMemoryExhausted from the 2D kernel of an interleaved batch: each VM's events ran in order, VM by VM,
    and ``applied`` marks them in the caller's order."""
    h = bm.Host(memory="64KiB", backing="4k", tdp_mmu=False)       # 16 host pages
    v0, v1 = (int(v) for v in h.create_vms(2, memory="1MiB"))
    vms = np.array([v1, v0] * 10)
    addrs = np.repeat(np.arange(10) * 4096, 2)
    with pytest.raises(bm.HostMemoryExhausted) as ei:
        h.access(vms, 0, addrs, bm.ACC_WRITE)
    # v0 (the lower id) runs first and takes ten pages, v1 the six left
    for v, k in ((v0, 10), (v1, 6)):
        assert h.stats(v)["pf_fixed"] == k
    assert list(ei.value.applied) == [True, True] * 6 + [False, True] * 4
    assert list(ei.value.outcome) == [bm.FIXED, bm.FIXED] * 6 + [0, bm.FIXED] * 4
    assert "events were applied" in str(ei.value)
