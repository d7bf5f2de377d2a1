"""MMU notifiers: invalidation (with faults retrying while it is in progress) and aging."""

import numpy as np
import pytest

import batchmmu as bm

MiB, GiB, HVA = 1 << 20, 1 << 30, 1 << 40   # slot 0 of a VM sits at hva 1 TiB (gpa 0)
W = bm.ACC_WRITE


def _vm(backing="4k", ept_ad=True):
    h = bm.Host(memory="4GiB", backing=backing)
    return h, int(h.create_vms(1, memory="16MiB", ept_ad=ept_ad)[0])


def test_invalidate_zaps_every_level_and_faults_retry_until_end():
    h, vm = _vm("thp")
    h.access(vm, 0, [0, 2 * MiB + 4096, 8 * MiB], W)          # three 2M mappings
    s = h.stats(vm)
    assert s["pages_2m"] == 3
    # an hva range inside the second 2M page zaps the whole huge SPTE
    assert h.invalidate_range_start(vm, HVA + 2 * MiB + 8192, HVA + 2 * MiB + 3 * 4096) == 1
    s2 = h.stats(vm)
    assert (s2["pages_2m"], s2["remote_tlb_flush"]) == (2, s["remote_tlb_flush"] + 1)
    assert s2["mmu_pages"] == s["mmu_pages"]                        # tables stay
    r = h.access(vm, 0, [2 * MiB + 8192, 0], W)
    assert sorted(r.outcome.tolist()) == sorted([bm.RETRY, bm.HIT])  # the gfn is being invalidated
    assert r.outcome[0] == bm.RETRY
    assert h.stats(vm)["pf_retry"] == 1 and h.stats(vm)["pf_taken"] == s2["pf_taken"] + 1
    h.invalidate_range_end(vm)
    assert h.access(vm, 0, 2 * MiB + 8192, W).outcome[0] == bm.FIXED
    assert h.stats(vm)["pages_2m"] == 3
    assert h.invalidate_hva_range(vm, HVA, HVA + 16 * MiB) == 3
    assert h.stats(vm)["pages_2m"] == 0
    with pytest.raises(bm.BatchMMUError):
        h.invalidate_range_end(vm)


@pytest.mark.parametrize("ept_ad", [True, False])
def test_aging_clears_accessed_and_access_tracks(ept_ad):
    h, vm = _vm(ept_ad=ept_ad)
    h.access(vm, 0, np.arange(4) * 4096, 0)
    young = h.test_young(vm, HVA, HVA + 8 * 4096)
    assert young.tolist() == [True] * 4 + [False] * 4
    assert h.age_hva_range(vm, HVA, HVA + 8 * 4096).tolist() == [True] * 4 + [False] * 4
    assert not h.test_young(vm, HVA, HVA + 8 * 4096).any()         # made old
    s = h.stats(vm)
    r = h.access(vm, 0, 4096, 0)
    if ept_ad:
        assert r.outcome[0] == bm.HIT                               # the CPU sets A again
    else:
        # access-tracked SPTE: an EPT violation fixed by fast_page_fault restoring R/X
        assert r.outcome[0] == bm.FIXED and h.stats(vm)["pf_fast"] == s["pf_fast"] + 1
    assert h.test_young(vm, HVA, HVA + 8 * 4096).tolist() == [False, True] + [False] * 6


def test_nx_huge_pages_selftest_sequence():
    # x86/nx_huge_pages_test with nx_huge_pages=1, recovery ratio 1, period 100 ms: the stats the
    # selftest asserts after each guest step (TDP: the guest maps 4K, KVM decides the level)
    h = bm.Host(memory="4GiB", backing="4k", nx_huge_pages=True, nx_huge_pages_recovery_ratio=1,
                nx_huge_pages_recovery_period_ms=100)
    vm = int(h.create_vms(1, memory="2MiB")[0])
    h.set_memslot(vm, 10, 4 * GiB, 6 * MiB, backing="hugetlb-2m")
    hp = [4 * GiB + i * 2 * MiB for i in range(3)]

    def step(addr, kind):
        h.access(vm, 0, addr, kind)
        s = h.stats(vm)
        return s["pages_2m"], s["nx_lpage_splits"]

    assert step(hp[0], 0) == (1, 0)                 # 1 read hpage1
    assert step(hp[1], 0) == (2, 0)                 # 2 read hpage2
    assert step(hp[0], bm.ACC_FETCH) == (1, 1)      # 3 execute hpage1: split, 4K exec mapping
    assert step(hp[2], bm.ACC_FETCH) == (1, 2)      # 4 execute hpage3 (never touched)
    assert step(hp[0], 0) == (1, 2)                 # 5 read hpage1: stays 4K (disallowed_hugepage_adjust)
    assert h.advance_time(0.5) == 5                 # sleep 5 x period: the recovery worker runs
    s = h.stats(vm)
    assert (s["pages_2m"], s["nx_lpage_splits"], s["nx_lpage_recovered"]) == (1, 0, 2)
    assert step(hp[2], 0) == (2, 0)                 # 6 read hpage3: a huge page again
    assert bm.Host(nx_huge_pages=False).advance_time(100) == 0
