"""mmu.c's rmap-driven operations over memslots and gfn ranges (slot_rmap_walk): zap all, write-protect
and dirty logging (with PML for the legacy TDP MMU: dirty bits cleared instead), zap collapsible / gfn range,
aging, NX huge page recovery, the footprint of rmaps and shadow pages."""

import numpy as np
from numba import njit

from .dirty import ring_mask_target, tdp_clear_dirty_pt_masked, tdp_try_split_huge_pages
from .jit import helper, kernel
from .memslot import (
    kvm_mmu_max_mapping_level,
)
from .rmap import kvm_mmu_slot_lpages, pte_list_count, pte_list_next, rmap_get_next, rmap_index, sptep_idx, sptep_row
from .shadow_mmu import (
    commit_zap_page,
    drop_spte,
    mmu_spte_update_no_track,
    prepare_zap_page,
    role_level,
    slot_gfn_write_protect,
    sp_has_gptes,
)
from .spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    PT_WRITABLE_MASK,
    ROLE_DIRECT,
    ROLE_INVALID,
    is_accessed_spte,
    mark_spte_for_access_track,
    shadow_dirty_mask,
    spte_ad_need_write_protect,
)
from .state import (
    CFG_EAGER_SPLIT,
    CFG_PML,
    CFG_TDP_MAX_LEVEL,
    DM_INITIALLY_SET,
    DM_MANUAL_PROTECT,
    MMU_SHADOW,
    MMU_TDP,
    RM_COUNT,
    RM_HEAD,
    SL_BASE_GFN,
    SL_DIRTY_OFF,
    SL_NPAGES,
    SL_RMAP_OFF,
    SL_VM,
    SP_APREV,
    SP_FLAGS,
    SP_GEN,
    SP_GFN,
    SP_PARENT_HEAD,
    SP_ROLE,
    SP_VM,
    SPF_TDP_MMU,
    ST_MMU_NOTIFIER_ZAPPED,
    ST_PAGES_AGED,
    ST_PAGES_WRITE_PROTECTED,
    VM_ACT_TAIL,
    VM_DIRTY_MODE,
    VM_FMT,
    VM_MMU,
    VM_VALID_GEN,
)


@kernel
def shadow_zap_all_fast(m, vm):
    """kvm_mmu_zap_all_fast: new generation, zap every now-obsolete page (oldest first)."""
    m.vt.rec[vm, VM_VALID_GEN] ^= 1
    row = m.vt.rec[vm, VM_ACT_TAIL]
    while row >= 0:
        prv = m.pa.meta[row, SP_APREV]
        if not (m.pa.meta[row, SP_ROLE] & ROLE_INVALID):
            prepare_zap_page(m, vm, row)
        row = prv if prv >= 0 and m.pa.meta[prv, SP_GEN] != m.vt.rec[vm, VM_VALID_GEN] else -1
        if row < 0:
            row = m.vt.rec[vm, VM_ACT_TAIL]
            if row >= 0 and m.pa.meta[row, SP_GEN] == m.vt.rec[vm, VM_VALID_GEN]:
                row = -1
    commit_zap_page(m, vm)


@kernel
def shadow_slot_wrprot(m, vm, rec, min_level):
    """slot_rmap_write_protect over a whole slot (kvm_mmu_slot_remove_write_access): True if changed."""
    flush = False
    for level in range(min_level, KVM_MAX_HUGEPAGE_LEVEL + 1):
        off = m.st.rec[rec, SL_RMAP_OFF + (level - 1)]
        if off < 0:
            continue
        shift = (level - 1) * 9
        n_heads = kvm_mmu_slot_lpages(m.st.rec[rec, SL_BASE_GFN], m.st.rec[rec, SL_NPAGES], shift)
        for h in range(off, off + n_heads):
            n = m.sh.rmap[h, RM_HEAD]
            while n >= 0:
                row, idx, n = rmap_get_next(m.sh.rn, n)
                spte = m.pa.spt[row, idx]
                if spte & PT_WRITABLE_MASK:
                    mmu_spte_update_no_track(m.pa.spt, row, idx, spte & ~PT_WRITABLE_MASK)  # spte_write_protect
                    m.vt.stats[vm, ST_PAGES_WRITE_PROTECTED] += 1
                    flush = True
    return flush


@njit(inline="always", _nrt=False)
def rmap_clear_dirty(m, vm, row, idx):
    """__rmap_clear_dirty for one SPTE: the dirty bit off, so the next write sets it again and PML logs the page;
    the write-protect bit for SPTEs without A/D and for guest_mode ones (spte_ad_need_write_protect: EPT02 under
    PML logs through write-protection faults).  True if it changed."""
    spte = m.pa.spt[row, idx]
    dbit = PT_WRITABLE_MASK if spte_ad_need_write_protect(spte) else shadow_dirty_mask(m.vt.rec[vm, VM_FMT])
    if not spte & dbit:
        return False
    mmu_spte_update_no_track(m.pa.spt, row, idx, spte & ~dbit)
    m.vt.stats[vm, ST_PAGES_WRITE_PROTECTED] += 1
    return True


@njit(inline="always", _nrt=False)
def vm_uses_pml(m, vm):
    # kvm_x86_ops.cpu_dirty_log_size: VMX with PML logs the legacy TDP MMU's writes too (never shadow paging)
    return m.host[CFG_PML] != 0 and m.vt.rec[vm, VM_MMU] != MMU_SHADOW


@kernel
def shadow_slot_leaf_clear_dirty(m, vm, rec):
    """kvm_mmu_slot_leaf_clear_dirty (rmap part, walk_slot_rmaps_4k): clear the dirty bit of every 4K SPTE of
    the slot when PML starts logging it.  True if any changed."""
    flush = False
    off = m.st.rec[rec, SL_RMAP_OFF + 0]
    if off < 0:
        return False
    for h in range(off, off + m.st.rec[rec, SL_NPAGES]):
        n = m.sh.rmap[h, RM_HEAD]
        while n >= 0:
            row, idx, n = rmap_get_next(m.sh.rn, n)
            flush |= rmap_clear_dirty(m, vm, row, idx)
    return flush


@kernel
def shadow_enable_log_dirty_pt_masked(m, vm, rec, first, mask):
    """kvm_arch_mmu_enable_log_dirty_pt_masked (rmap flavour): with INITIALLY_SET, first write-protect
    the huge SPTEs covering the first and last gfn of the mask (a write through them would be lost to
    the log), then the 4K SPTEs of every gfn in it."""
    if (m.vt.rec[vm, VM_DIRTY_MODE] & (DM_MANUAL_PROTECT | DM_INITIALLY_SET)) == DM_MANUAL_PROTECT | DM_INITIALLY_SET:
        lo = 0
        while not (mask >> np.int64(lo)) & 1:
            lo += 1
        hi = 63
        while not (mask >> np.int64(hi)) & 1:
            hi -= 1
        start = m.st.rec[rec, SL_BASE_GFN] + first + lo
        end = m.st.rec[rec, SL_BASE_GFN] + first + hi
        if m.vt.rec[vm, VM_MMU] == MMU_TDP and m.host[CFG_EAGER_SPLIT]:
            # kvm_mmu_try_split_huge_pages: the TDP MMU's (the shadow MMU's split of guest_mmu's huge SPTEs,
            # kvm_shadow_mmu_try_split_huge_pages, is not modelled)
            tdp_try_split_huge_pages(m.pa, m.vt, m.host, vm, start, end + 1, 1)
        slot_gfn_write_protect(m, vm, rec, start, 2, True)  # kvm_mmu_slot_gfn_write_protect(PG_LEVEL_2M)
        if (start + 511) >> 9 != (end + 511) >> 9:  # ALIGN(start, PMD_SIZE) != ALIGN(end, PMD_SIZE)
            slot_gfn_write_protect(m, vm, rec, end, 2, True)
    shadow_wrprot_masked(m, vm, rec, first, mask)


@kernel
def shadow_ring_reset_masks(m, vm, masks, n, slot_recs):
    """kvm_reset_dirty_gfn for the coalesced masks of a dirty-ring reset (kernels/dirty.py)."""
    for k in range(n):
        rec, offset, mask = ring_mask_target(m.st, masks, k, slot_recs)
        if rec >= 0:
            shadow_enable_log_dirty_pt_masked(m, vm, rec, offset, mask)


@helper
def shadow_wrprot_masked(m, vm, rec, first, mask):
    """kvm_mmu_write_protect_pt_masked, or with PML kvm_mmu_clear_dirty_pt_masked: re-arm the 4K SPTEs of the
    gfns in a 64-page mask (a TDP-MMU VM's own SPTEs first, then the rmaps)."""
    pml = vm_uses_pml(m, vm)
    if m.vt.rec[vm, VM_MMU] == MMU_TDP:
        tdp_clear_dirty_pt_masked(m.pa, m.vt, vm, m.st.rec[rec, SL_BASE_GFN] + first, mask, not pml)
    for b in range(64):
        if (mask >> np.int64(b)) & 1:
            gfn = m.st.rec[rec, SL_BASE_GFN] + first + b
            n = m.sh.rmap[rmap_index(m.sh, m.st, rec, 1, gfn), RM_HEAD]
            while n >= 0:
                row, idx, n = rmap_get_next(m.sh.rn, n)
                if pml:
                    rmap_clear_dirty(m, vm, row, idx)
                    continue
                spte = m.pa.spt[row, idx]
                if spte & PT_WRITABLE_MASK:   # rmap_write_protect(pt_protect=false)
                    mmu_spte_update_no_track(m.pa.spt, row, idx, spte & ~PT_WRITABLE_MASK)
                    m.vt.stats[vm, ST_PAGES_WRITE_PROTECTED] += 1


@kernel
def shadow_get_dirty_log(m, vm, rec, out):
    """kvm_get_dirty_log_protect without manual protect (rmap flavour): True if any bit was set."""
    st = m.st
    off = st.rec[rec, SL_DIRTY_OFF]
    words = (st.rec[rec, SL_NPAGES] + 63) >> 6
    flush = False
    for w in range(words):
        mask = st.dirty[off + w]
        out[w] = mask
        if mask == 0:
            continue
        flush = True
        st.dirty[off + w] = 0
        shadow_wrprot_masked(m, vm, rec, w * 64, mask)
    return flush


@kernel
def shadow_clear_dirty_log(m, vm, rec, first_page, num_pages, bitmap):
    """kvm_clear_dirty_log_protect (rmap flavour): pages cleared."""
    st = m.st
    off = st.rec[rec, SL_DIRTY_OFF]
    cleared = 0
    npages = st.rec[rec, SL_NPAGES]
    for k in range((num_pages + 63) >> 6):
        i = (first_page >> 6) + k
        mask = bitmap[k] & st.dirty[off + i]
        if i * 64 + 64 > npages:
            mask &= (np.int64(1) << np.int64(npages - i * 64)) - 1
        if mask == 0:
            continue
        st.dirty[off + i] &= ~mask
        for b in range(64):
            cleared += (mask >> np.int64(b)) & 1
        shadow_enable_log_dirty_pt_masked(m, vm, rec, i * 64, mask)
    return cleared


@kernel
def shadow_zap_collapsible(m, vm, rec):
    """kvm_rmap_zap_collapsible_sptes: drop the 4K and 2M SPTEs of direct pages that could map a larger page
    (kvm_mmu_max_mapping_level of the page's gfn, up to max_huge_page_level: the TDP one on a TDP host)."""
    flush = False
    cap = KVM_MAX_HUGEPAGE_LEVEL
    if m.vt.rec[vm, VM_MMU] != MMU_SHADOW:   # a TDP host (the legacy TDP MMU, guest_mmu beside the TDP MMU)
        cap = min(cap, m.host[CFG_TDP_MAX_LEVEL])
    for level in range(1, KVM_MAX_HUGEPAGE_LEVEL):
        off = m.st.rec[rec, SL_RMAP_OFF + (level - 1)]
        if off < 0:
            continue
        n_heads = kvm_mmu_slot_lpages(m.st.rec[rec, SL_BASE_GFN], m.st.rec[rec, SL_NPAGES], (level - 1) * 9)
        for h in range(off, off + n_heads):
            n = m.sh.rmap[h, RM_HEAD]
            while n >= 0:
                sptep, n = pte_list_next(m.sh.rn, n)
                row = sptep_row(sptep)
                role = m.pa.meta[row, SP_ROLE]
                if (role & ROLE_DIRECT) and \
                        role_level(role) < kvm_mmu_max_mapping_level(m.st, rec, m.pa.meta[row, SP_GFN], cap):
                    drop_spte(m, vm, row, sptep_idx(sptep))
                    flush = True
    return flush


@kernel
def shadow_zap_gfn_range(m, vm, rec, start, end):
    """kvm_unmap_gfn_range over the rmaps (MMU notifier): every SPTE of [start, end) at every level.  Returns
    how many were zapped (mmu_notifier_zapped; > 0: a flush)."""
    n_zapped = 0
    for level in range(1, KVM_MAX_HUGEPAGE_LEVEL + 1):
        if m.st.rec[rec, SL_RMAP_OFF + (level - 1)] < 0:
            continue
        shift = (level - 1) * 9
        g = (start >> shift) << shift
        while g < end:
            if g >= m.st.rec[rec, SL_BASE_GFN] or level > 1:
                gg = max(g, m.st.rec[rec, SL_BASE_GFN])
                n = m.sh.rmap[rmap_index(m.sh, m.st, rec, level, gg), RM_HEAD]
                while n >= 0:
                    row, idx, n = rmap_get_next(m.sh.rn, n)
                    drop_spte(m, vm, row, idx)
                    n_zapped += 1
            g += np.int64(1) << np.int64(shift)
    m.vt.stats[vm, ST_MMU_NOTIFIER_ZAPPED] += n_zapped
    return n_zapped


@kernel
def shadow_age_gfn_range(m, vm, rec, start, end, clear, young):
    """kvm_age_gfn / kvm_test_age_gfn over the rmaps (kvm_rmap_age_gfn_range: clear the accessed bit, or
    access-track an SPTE without A/D bits).  ``young[gfn - start]`` is set for each accessed 4K page.  Returns
    True if any was young."""
    fmt = m.vt.rec[vm, VM_FMT]
    any_young = False
    for level in range(1, KVM_MAX_HUGEPAGE_LEVEL + 1):
        if m.st.rec[rec, SL_RMAP_OFF + (level - 1)] < 0:
            continue
        shift = (level - 1) * 9
        g = (start >> shift) << shift
        while g < end:
            gg = max(g, m.st.rec[rec, SL_BASE_GFN])
            n = m.sh.rmap[rmap_index(m.sh, m.st, rec, level, gg), RM_HEAD]
            hit = False
            while n >= 0:
                row, idx, n = rmap_get_next(m.sh.rn, n)
                spte = m.pa.spt[row, idx]
                if is_accessed_spte(fmt, spte):
                    hit = True
                    if clear:
                        mmu_spte_update_no_track(m.pa.spt, row, idx, mark_spte_for_access_track(fmt, spte))
                        m.vt.stats[vm, ST_PAGES_AGED] += 1
            if hit:
                any_young = True
                lo = max(g, start)
                hi = min(g + (np.int64(1) << np.int64(shift)), end)
                for k in range(lo, hi):
                    young[k - start] = 1
            g += np.int64(1) << np.int64(shift)
    return any_young


@kernel
def shadow_footprint_counts(m, vm, out):
    """Objects KVM allocates for a shadow VM: out[0] pages with gptes (shadowed_translation arrays),
    out[1] pte_list_desc blocks of rmaps, out[2] of parent lists, out[3] rmap heads, out[4] write-track
    entries (only the slots of ``vm``)."""
    for k in range(5):
        out[k] = 0
    for row in range(m.pa.meta.shape[0]):
        if m.pa.meta[row, SP_VM] != vm or m.pa.meta[row, SP_FLAGS] & SPF_TDP_MMU:
            continue
        if sp_has_gptes(m.pa.meta[row, SP_ROLE]):
            out[0] += 1
        c = pte_list_count(m.sh.pl, m.pa.meta[row, SP_PARENT_HEAD])
        if c >= 2:
            out[2] += (c + 13) // 14  # PTE_LIST_EXT = 14 pointers per descriptor
    for rec in range(m.st.rec.shape[0]):
        if rec >= m.st.rec.shape[0] or m.st.rec[rec, SL_VM] != vm or m.st.rec[rec, SL_RMAP_OFF + 0] < 0:
            continue
        for level in range(1, KVM_MAX_HUGEPAGE_LEVEL + 1):
            shift = (level - 1) * 9
            nh = kvm_mmu_slot_lpages(m.st.rec[rec, SL_BASE_GFN], m.st.rec[rec, SL_NPAGES], shift)
            out[3] += nh
            off = m.st.rec[rec, SL_RMAP_OFF + (level - 1)]
            for h in range(off, off + nh):
                c = m.sh.rmap[h, RM_COUNT]
                if c >= 2:
                    out[1] += (c + 13) // 14
        out[4] += m.st.rec[rec, SL_NPAGES]
