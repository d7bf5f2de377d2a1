"""Dirty tracking: manual protect and CLEAR, PML, dirty rings, and the no-lost-write property."""

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import batchmmu as bm

MiB, GiB = 1 << 20, 1 << 30
W = bm.ACC_WRITE


def _host(**kw):
    h = bm.Host(memory="8GiB", backing=kw.pop("backing", "thp"), **kw)
    vm = int(h.create_vms(1, memory="2MiB", vcpus=2, backing="4k")[0])
    return h, vm


def _bits(words):
    return {64 * i + b for i, w in enumerate(int(x) for x in words) for b in range(64) if w >> b & 1}


def _spte(h, vm, gfn):
    return h.spte_dump(vm)[gfn][1]


def test_manual_protect_initially_set():
    h, vm = _host()
    h.set_memslot(vm, 1, GiB, 4 * MiB)
    h.access(vm, 0, GiB + np.arange(2) * (2 * MiB), W)         # two 2M mappings
    h.enable_manual_dirty_log_protect(vm, initially_set=True)
    before = h.stats(vm)
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    s = h.stats(vm)
    # enabling protects nothing, splits nothing, flushes nothing: every page counts as dirty
    assert (s["pages_2m"], s["pages_4k"], s["remote_tlb_flush"]) == (2, 0, before["remote_tlb_flush"])
    assert _bits(h.get_dirty_log(vm, 1)) == set(range(1024))
    assert _bits(h.get_dirty_log(vm, 1)) == set(range(1024))  # GET only reads
    # CLEAR the first 64 pages: split the 2M page that holds them, protect those 64 pages
    assert h.clear_dirty_log(vm, 1, 0, 64, np.array([-1], np.int64)) == 64
    s2 = h.stats(vm)
    assert (s2["pages_2m"], s2["pages_4k"]) == (1, 512)
    assert s2["remote_tlb_flush"] == s["remote_tlb_flush"] + 1
    assert _bits(h.get_dirty_log(vm, 1)) == set(range(64, 1024))
    assert not _spte(h, vm, (GiB >> 12) + 5) & 2                  # protected
    assert _spte(h, vm, (GiB >> 12) + 100) & 2                     # not cleared: still writable
    r = h.access(vm, 1, [GiB + 5 * 4096, GiB + 100 * 4096], W)
    assert list(r.outcome) == [bm.FIXED, bm.HIT]                   # fast path re-dirties page 5
    assert h.stats(vm)["pf_fast"] == s2["pf_fast"] + 1
    assert 5 in _bits(h.get_dirty_log(vm, 1))
    # clearing bits that are not set re-protects nothing
    assert h.clear_dirty_log(vm, 1, 0, 64, np.array([1 << 7], np.int64)) == 0


@pytest.mark.nojit
def test_clear_dirty_log_errors():
    h, vm = _host(backing="4k")
    h.set_memslot(vm, 1, GiB, 100 * 4096, flags=bm.MEM_LOG_DIRTY_PAGES)   # 100 pages: last word partial
    h.enable_manual_dirty_log_protect(vm)
    one = np.array([-1, -1], np.int64)
    for args in ((1, 64), (0, 65), (64, 64), (128, 0), (0, 101)):
        with pytest.raises(bm.BatchMMUError) as e:
            h.clear_dirty_log(vm, 1, *args, one)
        assert e.value.errno == errno.EINVAL
    assert h.clear_dirty_log(vm, 1, 64, 36, one) == 0          # reaching the slot end: any length
    with pytest.raises(bm.BatchMMUError) as e:
        h.clear_dirty_log(vm, 0, 0, 64, one)                    # slot 0 does not log
    assert e.value.errno == errno.ENOENT


def test_dirty_log_without_manual_protect_reprotects():
    h, vm = _host(backing="4k")
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    h.access(vm, 0, GiB + np.arange(10) * 4096, W)
    assert _bits(h.get_dirty_log(vm, 1)) == set(range(10))
    assert _bits(h.get_dirty_log(vm, 1)) == set()                 # GET cleared it
    s = h.stats(vm)
    r = h.access(vm, 0, GiB + 3 * 4096, W)                        # protected again: fast path
    assert r.outcome[0] == bm.FIXED and h.stats(vm)["pf_fast"] == s["pf_fast"] + 1
    assert _bits(h.get_dirty_log(vm, 1)) == {3}


def test_pml_logs_writes_without_faults():
    h = bm.Host(memory="8GiB", backing="4k", pml=True)
    vm = int(h.create_vms(1, memory="2MiB")[0])
    with pytest.raises(bm.BatchMMUError):
        h.create_vms(1, memory="2MiB", tdp_format="npt")       # PML is an Intel EPT feature
    h.set_memslot(vm, 1, GiB, 8 * MiB)
    pages = GiB + np.arange(600) * 4096
    h.access(vm, 0, pages, W)
    h.set_memslot(vm, 1, GiB, 8 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    spte = _spte(h, vm, GiB >> 12)
    assert spte & 2 and not spte & (1 << 9)                      # writable, D cleared
    s = h.stats(vm)
    r = h.access(vm, 0, pages, W)
    assert (r.outcome == bm.HIT).all()                           # no exits but one PML-full
    s2 = h.stats(vm)
    assert s2["pf_taken"] == s["pf_taken"]
    assert s2["pml_full_exits"] - s["pml_full_exits"] == 1       # 600 logs: full at 512
    assert _bits(h.get_dirty_log(vm, 1)) == set(range(600))      # GET flushes the rest first
    assert not _spte(h, vm, GiB >> 12) & (1 << 9)                # re-armed by clearing D, not W
    h.access(vm, 0, GiB + 7 * 4096, W)
    assert _bits(h.get_dirty_log(vm, 1)) == {7}


@pytest.mark.nojit
def test_pml_enable_clears_dirty_on_huge_leaves_too():
    """kvm_mmu_slot_leaf_clear_dirty (clear_dirty_gfn_range) walks every leaf level: a 2M leaf left in place
    (no eager split) loses D, and W (write-protected at >= 2M, so a write splits it)."""
    h = bm.Host(memory="8GiB", backing="thp", pml=True, eager_page_split=False)
    vm = int(h.create_vms(1, memory="2MiB", backing="4k")[0])
    h.set_memslot(vm, 1, GiB, 4 * MiB, backing="thp")
    h.access(vm, 0, [GiB, GiB + 2 * MiB + 4096], W)
    huge = h.spte_dump(vm)
    assert {g: lv for g, (lv, _) in huge.items() if g >= GiB >> 12} == {GiB >> 12: 2, (GiB + 2 * MiB) >> 12: 2}
    assert all(s & (1 << 9) for g, (_, s) in huge.items() if g >= GiB >> 12)    # D set by the writes
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    after = h.spte_dump(vm)
    for g in (GiB >> 12, (GiB + 2 * MiB) >> 12):
        level, spte = after[g]
        assert level == 2 and not spte & (1 << 9) and not spte & 2


def test_dirty_ring_fills_stops_and_resets():
    h, vm = _host(backing="4k")
    h.enable_dirty_ring(vm, 128)                                 # soft limit 128 - 64 = 64
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    r = h.access(vm, 0, GiB + np.arange(70) * 4096, W)
    assert list(r.outcome[:64]) == [bm.FIXED] * 64
    assert list(r.outcome[64:]) == [bm.RING_FULL] * 6           # the vCPU stopped
    assert h.stats(vm)["dirty_ring_full"] == 6
    assert h.access(vm, 1, GiB + 100 * 4096, W).outcome[0] == bm.FIXED   # the other vCPU runs on
    got = h.harvest_dirty_ring(vm, 0)
    assert got.tolist() == [[1, i] for i in range(64)]
    assert h.harvest_dirty_ring(vm, 0).shape == (0, 2)
    with pytest.raises(bm.BatchMMUError) as e:
        h.get_dirty_log(vm, 1)
    assert e.value.errno == errno.ENXIO
    s = h.stats(vm)
    assert h.reset_dirty_rings(vm) == 64
    assert h.stats(vm)["remote_tlb_flush"] == s["remote_tlb_flush"] + 1
    assert h.access(vm, 0, GiB + 64 * 4096, W).outcome[0] == bm.FIXED    # runs again
    assert not _spte(h, vm, (GiB >> 12) + 3) & 2                 # reset re-protected harvested pages
    assert h.access(vm, 0, GiB + 3 * 4096, W).outcome[0] == bm.FIXED     # and the write is logged again
    assert h.harvest_dirty_ring(vm, 0).tolist() == [[1, 64], [1, 3]]


# ----------------------------------------------------------------------------- no lost write
MODES = ("get", "manual", "initially_set", "ring", "pml")
OPS = hs.lists(hs.tuples(hs.sampled_from(["write", "write", "write", "collect", "toggle", "move", "read"]),
                         hs.integers(0, 1), hs.lists(hs.integers(0, 1023), min_size=1, max_size=40)),
               min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=hs.sampled_from(MODES), backing=hs.sampled_from(["4k", "thp"]), eager=hs.booleans(), ops=OPS)
def test_no_write_is_lost(mode, backing, eager, ops):
    h = bm.Host(memory="8GiB", backing="4k", pml=(mode == "pml"), eager_page_split=eager)
    vm = int(h.create_vms(1, memory="2MiB", vcpus=2)[0])
    if mode in ("manual", "initially_set"):
        h.enable_manual_dirty_log_protect(vm, initially_set=(mode == "initially_set"))
    if mode == "ring":
        h.enable_dirty_ring(vm, 4096)
    base = [GiB]
    h.set_memslot(vm, 1, base[0], 4 * MiB, backing=backing)
    h.access(vm, 0, base[0] + np.arange(0, 1024, 7) * 4096, W)   # some mappings (huge with thp)
    logging = [False]
    pending = set()          # pages written while logging since the last collection

    def collect():
        if mode == "ring":
            got = set()
            for c in range(2):
                got |= {int(o) for s, o in h.harvest_dirty_ring(vm, c) if s == 1}
            h.reset_dirty_rings(vm)
            return got
        got = _bits(h.get_dirty_log(vm, 1))
        if mode in ("manual", "initially_set"):
            h.clear_dirty_log(vm, 1, 0, 1024, np.full(16, -1, np.int64))
        return got

    def enable(on):
        h.set_memslot(vm, 1, base[0], 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES if on else 0)
        logging[0] = on
        pending.clear()

    enable(True)
    for op, vcpu, pages in ops:
        if op in ("write", "read"):
            addr = base[0] + np.array(pages) * 4096
            r = h.access(vm, vcpu, addr, W if op == "write" else 0)
            while (r.outcome == bm.RING_FULL).any():             # userspace harvests, the vCPU retries
                full = r.outcome == bm.RING_FULL
                if logging[0]:
                    missing = pending - collect()
                    assert not missing, f"lost writes {sorted(missing)[:8]}"
                    pending.clear()
                addr = addr[full]
                done = [p for p, f in zip(pages, full, strict=True) if not f]
                if op == "write" and logging[0]:
                    pending.update(done)
                pages = [p for p, f in zip(pages, full, strict=True) if f]
                r = h.access(vm, vcpu, addr, W if op == "write" else 0)
            if op == "write" and logging[0]:
                pending.update(pages)
        elif op == "collect" and logging[0]:
            missing = pending - collect()
            assert not missing, f"lost writes {sorted(missing)[:8]}"
            pending.clear()
        elif op == "toggle":
            enable(not logging[0])
        elif op == "move":
            base[0] = 2 * GiB if base[0] == GiB else GiB
            h.set_memslot(vm, 1, base[0], 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES if logging[0] else 0)
    if logging[0]:
        missing = pending - collect()
        assert not missing, f"lost writes {sorted(missing)[:8]}"


@pytest.mark.nojit
def test_footprint_counts_pml_pages_and_rings():
    h = bm.Host(memory="1GiB", backing="4k", pml=True)
    vm = int(h.create_vms(1, memory="4MiB", vcpus=3)[0])
    h.enable_dirty_ring(vm, 1024)
    fp = h.footprint()
    assert fp["pml_buffers"] == 3 * 4096 and fp["dirty_rings"] == 3 * 1024 * 16
    assert fp["kvm_total"] == sum(v for k, v in fp.items() if k not in ("guest_memory", "kvm_total",
                                                                          "simulator_bytes"))
