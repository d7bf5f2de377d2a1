"""MMU notifier callbacks on the TDP MMU: unmap (zap leaves) and aging.

Models ``tdp_mmu.c`` ``tdp_mmu_zap_leafs`` (kvm_tdp_mmu_unmap_gfn_range), ``age_gfn_range``
(kvm_tdp_mmu_age_gfn_range) and ``test_age_gfn`` (kvm_tdp_mmu_test_age_gfn).
"""

import numpy as np

from .jit import kernel
from .spte import (
    PG_LEVEL_4K,
    SHADOW_NONPRESENT_VALUE,
    is_accessed_spte,
    is_last_spte,
    is_shadow_present_pte,
    mark_spte_for_access_track,
    pages_per_hpage,
    shadow_accessed_mask,
    spte_ad_enabled,
    spte_index,
)
from .state import (
    ST_MMU_NOTIFIER_ZAPPED,
    ST_PAGES_AGED,
    VM_FMT,
    VM_LEVELS,
)
from .tdp import NR_TDP_ROOTS, tdp_clear_spte_bits, tdp_root_field, tdp_set_spte
from .tdp_iter import tdp_iter_next_leaf, tdp_iter_run, tdp_iter_start_leaf


@kernel
def tdp_zap_leafs(pa, vt, vm, start, end):
    """tdp_mmu_zap_leafs: every leaf SPTE (any level) overlapping [start, end) becomes non-present.
    Tables stay.  Returns the number zapped (> 0: the caller flushes)."""
    root_level = np.int64(vt.rec[vm, VM_LEVELS])  # read once: a store to spt may alias the record for LLVM
    spt, meta = pa.spt, pa.meta
    n = 0
    for r in range(NR_TDP_ROOTS):   # the VM's roots (for_each_valid_tdp_mmu_root)
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, start, PG_LEVEL_4K)
        while valid and gfn < end:
            idx = spte_index(gfn, level)
            run = tdp_iter_run(gfn, level, end)
            for k in range(idx, idx + run):
                spte = spt[row, k]
                if is_shadow_present_pte(spte) and is_last_spte(spte, level):
                    tdp_set_spte(pa, vt, vm, row, k, level, SHADOW_NONPRESENT_VALUE)
                    n += 1
            gfn += run - 1
            row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level, PG_LEVEL_4K,
                                                             end)
    vt.stats[vm, ST_MMU_NOTIFIER_ZAPPED] += n
    return n


@kernel
def tdp_age_range(pa, vt, vm, start, end, clear, young):
    """age_gfn_range / test_age_gfn over [start, end): young[g - start] = 1 for every 4K page
    whose leaf was accessed; with ``clear`` the leaf is made old.  Returns True if any was young."""
    fmt = vt.rec[vm, VM_FMT]
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    spt, meta = pa.spt, pa.meta
    any_young = False
    # tdp_root_for_each_leaf_pte
    for r in range(NR_TDP_ROOTS):   # the VM's roots (for_each_valid_tdp_mmu_root)
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, start, PG_LEVEL_4K)
        while valid and gfn < end:
            idx = spte_index(gfn, level)
            run = tdp_iter_run(gfn, level, end)
            for k in range(idx, idx + run):
                spte = spt[row, k]
                if is_shadow_present_pte(spte) and is_last_spte(spte, level) and is_accessed_spte(fmt, spte):
                    any_young = True
                    g = gfn + (k - idx)
                    for y in range(max(g, start), min(g + pages_per_hpage(level), end)):
                        young[y - start] = 1
                    if clear:
                        # kvm_tdp_mmu_age_spte
                        if spte_ad_enabled(spte):
                            tdp_clear_spte_bits(spt, row, k, shadow_accessed_mask(fmt))
                        else:
                            tdp_set_spte(pa, vt, vm, row, k, level, mark_spte_for_access_track(fmt, spte))
                        vt.stats[vm, ST_PAGES_AGED] += 1
            gfn += run - 1
            row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level, PG_LEVEL_4K,
                                                             end)
    return any_young
