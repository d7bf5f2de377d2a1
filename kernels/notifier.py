"""MMU notifier callbacks on the TDP MMU: unmap (zap leaves) and aging.

Models ``tdp_mmu.c`` ``tdp_mmu_zap_leafs`` (kvm_tdp_mmu_unmap_gfn_range), ``age_gfn_range``
(kvm_tdp_mmu_age_gfn_range) and ``test_age_gfn`` (kvm_tdp_mmu_test_age_gfn).
"""

import numpy as np
from numba import njit

from .jit import kernel
from .spte import (
    SHADOW_NONPRESENT_VALUE,
    is_shadow_present_pte,
    mark_spte_for_access_track,
    shadow_accessed_mask,
    spte_ad_enabled,
)
from .state import (
    ST_MMU_NOTIFIER_ZAPPED,
    ST_PAGES_AGED,
    VM_FMT,
    VM_LEVELS,
    VM_ROOT,
)
from .tdp import tdp_clear_spte_bits, tdp_set_spte
from .walk import next_gfn, walk_to_leaf


@kernel
def tdp_zap_leafs(pa, vt, vm, start, end):
    """tdp_mmu_zap_leafs: every leaf SPTE (any level) overlapping [start, end) becomes non-present.
    Tables stay.  Returns the number zapped (> 0: the caller flushes)."""
    root = vt.rec[vm, VM_ROOT]
    if root < 0:
        return 0
    levels = np.int64(vt.rec[vm, VM_LEVELS])  # read once: a store to spt may alias the record for LLVM
    n = 0
    gfn = start
    while gfn < end:
        row, idx, level, spte = walk_to_leaf(pa.spt, root, levels, gfn)
        if is_shadow_present_pte(spte):
            tdp_set_spte(pa, vt, vm, row, idx, level, SHADOW_NONPRESENT_VALUE)
            n += 1
        gfn = next_gfn(gfn, level)
    vt.stats[vm, ST_MMU_NOTIFIER_ZAPPED] += n
    return n


@njit(inline="always", _nrt=False)
def is_accessed_spte(fmt, spte):
    # is_accessed_spte (spte.h)
    if spte_ad_enabled(spte):
        return (spte & shadow_accessed_mask(fmt)) != 0
    return (spte & 7) != 0  # not access-tracked


@kernel
def tdp_age_range(pa, vt, vm, start, end, clear, young):
    """age_gfn_range / test_age_gfn over [start, end): young[g - start] = 1 for every 4K page
    whose leaf was accessed; with ``clear`` the leaf is made old.  Returns True if any was young."""
    root = vt.rec[vm, VM_ROOT]
    if root < 0:
        return False
    fmt = vt.rec[vm, VM_FMT]
    levels = np.int64(vt.rec[vm, VM_LEVELS])
    spt = pa.spt
    any_young = False
    gfn = start
    while gfn < end:
        row, idx, level, spte = walk_to_leaf(spt, root, levels, gfn)
        nxt = next_gfn(gfn, level)
        if is_shadow_present_pte(spte) and is_accessed_spte(fmt, spte):
            any_young = True
            for g in range(gfn, min(nxt, end)):
                young[g - start] = 1
            if clear:
                old = mark_spte_for_access_track(fmt, spte)
                if spte_ad_enabled(spte):
                    tdp_clear_spte_bits(spt, row, idx, shadow_accessed_mask(fmt))
                else:
                    tdp_set_spte(pa, vt, vm, row, idx, level, old)
                vt.stats[vm, ST_PAGES_AGED] += 1
        gfn = nxt
    return any_young
