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
