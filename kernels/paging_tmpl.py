"""``paging_tmpl.h``'s FNAME() code for the shadow MMU (PTTYPE 64 / PAE / 32 through the guest walker):
gpte helpers, sync_spte and the sync of unsync pages, shadow-page lookup and linking, make_spte /
mmu_set_spte, the prefetch, fetch, page_fault, invlpg and the A/D update."""

import numpy as np
from numba import njit

from .gmem import gm_read_group
from .guest_walk import (
    MODE_PG,
    MODE_SMEP,
    MODE_WP,
    PFERR_FETCH,
    PFERR_MASK,
    PFERR_PRESENT,
    PFERR_USER,
    PFERR_WRITE,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    WK_AD_NEEDED,
    WK_GFN,
    WK_LEAF_LEVEL,
    WK_PT_ACCESS,
    WK_PTE_ACCESS,
    WK_PTE_ACCESS_CLEAN,
    WK_PTE_GPA,
    WK_TABLE_GFN,
    gpte_rsvd_mask,
    guest_set_ad,
    guest_walk,
    mode_levels,
    walk_table_row,
)
from .jit import helper
from .memslot import (
    gfn_to_hva,
    gfn_to_memslot,
    host_fault_in,
    host_page_needs_budget,
    invalidation_clamp_level,
    kvm_mmu_max_mapping_level,
    mark_page_dirty,
    slot_dirty_logging,
    slot_map,
    slot_readonly,
)
from .mmu_internal import (
    GFN_MASK_64,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_GUEST,
    RET_PF_MMIO,
    RET_PF_OOM,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    SC_OOM_GPA,
    SC_PREFETCH,
    SC_PVEC_SP,
    SC_RUNNING_VCPU,
    account_nx_huge_page,
    scratch,
)
from .page_track import clear_flood_on_walk
from .paging_ept import MODE_EPT, MODE_NPT, ept_gpte_access, ept_prefetch_invalid, ept_protect_clean_gpte, ept_set_ad
from .rmap import parent_add
from .shadow_mmu import (
    alloc_shadow_page,
    commit_zap_page,
    drop_parent_pte,
    drop_spte,
    flush_remote_tlbs,
    gfn_write_tracked,
    hash_bucket,
    is_writable_spte,
    kvm_unlink_unsync_page,
    make_mmu_pages_available,
    mark_parents_unsync,
    mmu_page_zap_pte,
    mmu_pages_clear_parents,
    mmu_spte_clear_no_track,
    mmu_spte_set,
    mmu_spte_update,
    mmu_unsync_walk,
    page_valid,
    prepare_zap_page,
    rmap_add,
    role_access,
    role_level,
    slot_gfn_write_protect,
    sp_get_access,
    sp_get_gfn,
    sp_gpte,
    sp_has_gptes,
    sp_valid,
    walk_start,
    write_tracked,
)
from .spte import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PT_WRITABLE_MASK,
    ROLE_ACCESS_SHIFT,
    ROLE_AD_DISABLED,
    ROLE_DIRECT,
    ROLE_GUEST_MODE,
    ROLE_HAS_4_BYTE_GPTE,
    ROLE_PASSTHROUGH,
    SPTE_TDP_AD_WRPROT_ONLY,
    get_mmio_spte_gfn,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    make_leaf_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    mark_spte_for_access_track,
    shadow_dirty_mask,
    shadow_host_writable_mask,
    shadow_mmu_writable_mask,
    spte_to_child_row,
    spte_to_pfn,
)
from .state import (
    CFG_MMIO_CACHING,
    CFG_NX_HUGE_PAGES,
    CFG_PML,
    CFG_TDP_MAX_LEVEL,
    KVM_MMU_NUM_PREV_ROOTS,
    MMU_SHADOW,
    PTE_PREFETCH_NUM,
    SL_BASE_GFN,
    SL_HOST_OFF,
    SL_NPAGES,
    SP_FLAGS,
    SP_FLOOD,
    SP_GFN,
    SP_HNEXT,
    SP_PARENT,
    SP_PARENT_INDEX,
    SP_ROLE,
    SP_UBITMAP,
    SP_UNSYNC,
    SP_UNSYNC_CHILDREN,
    SPF_NX_DISALLOWED,
    ST_MAX_MMU_PAGE_HASH_COLLISIONS,
    ST_MMU_CACHE_MISS,
    ST_MMU_UNSYNC,
    ST_PF_MMIO_SPTE_CREATED,
    VM_FMT,
    VM_HASH_OFF,
    VM_INDIRECT,
    VM_INVAL_COUNT,
    VM_INVAL_END,
    VM_INVAL_START,
    VM_MAX_GFN,
    VM_MEMSLOTS_GEN,
    VM_MMU,
    VR_CR3,
    VR_PDPTR,
    VR_PKRU,
    VR_PREV_ROOT,
)


@njit(inline="always", _nrt=False)
def prefetch_invalid_gpte(m, vm, row, idx, gpte, mode, maxphyaddr):
    """FNAME(prefetch_invalid_gpte): drop the SPTE when the gpte is not present, not accessed or reserved."""
    if mode & MODE_EPT:
        bad = ept_prefetch_invalid(mode, maxphyaddr, gpte)
    else:
        bad = (gpte & 1) == 0 or (gpte & PT_ACCESSED_MASK) == 0 or (gpte & gpte_rsvd_mask(mode, maxphyaddr, 1, gpte))
    if bad:
        drop_spte(m, vm, row, idx)
        return True
    return False


@njit(inline="always", _nrt=False)
def gpte_access(gpte, mode):
    # FNAME(gpte_access): 64-bit gptes, or EPT12 entries
    if mode & MODE_EPT:
        return ept_gpte_access(gpte)
    access = gpte & (ACC_WRITE_MASK | ACC_USER_MASK)
    if gpte >= 0:  # NX (bit 63) clear
        access |= ACC_EXEC_MASK
    return access


@njit(inline="always", _nrt=False)
def protect_clean_gpte(access, gpte, mode):
    # FNAME(protect_clean_gpte): write access only once the guest's D bit is set
    if mode & MODE_EPT:
        return ept_protect_clean_gpte(mode, access, gpte)
    if not (gpte & PT_DIRTY_MASK):
        access &= ~ACC_WRITE_MASK
    return access


@helper
def sync_spte(m, vm, vg, row, i, mode, maxphyaddr):
    """FNAME(sync_spte): re-derive SPTE ``i`` of an unsync page from its gpte; 1 = flush, 0, -1 = zap."""
    spte = m.pa.spt[row, i]
    fmt = m.vt.rec[vm, VM_FMT]
    mmio = is_mmio_spte(fmt, spte, m.host[CFG_MMIO_CACHING] != 0)
    if not mmio and not is_shadow_present_pte(spte):
        return 0
    gpte = sp_gpte(m, vm, row, i)
    if prefetch_invalid_gpte(m, vm, row, i, gpte, mode, maxphyaddr):
        return 1
    gfn = (gpte & GFN_MASK_64) >> 12
    access = role_access(m.pa.meta[row, SP_ROLE]) & gpte_access(gpte, mode)
    access = protect_clean_gpte(access, gpte, mode)
    if mmio:
        # sync_mmio_spte: the gpte now maps another gfn: cleared; else marked again with the gpte's access
        if gfn != get_mmio_spte_gfn(spte):
            mmu_spte_clear_no_track(m.pa.spt, row, i)
        else:
            mmu_spte_set(m.pa.spt, row, i, make_mmio_spte(fmt, gfn, access, m.vt.rec[vm, VM_MEMSLOTS_GEN]))
        return 0
    if gfn != sp_get_gfn(m, row, i):
        drop_spte(m, vm, row, i)
        return 1
    if sp_get_access(m, row, i) == access:
        return 0
    m.sh.trans[row, i] = (gfn << 12) | access
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    new, wrprot = make_spte(m, vm, rec, row, access, gfn, spte_to_pfn(spte), spte, True, True,
                            (spte & shadow_host_writable_mask(fmt)) != 0)
    return 1 if mmu_spte_update(m.pa.spt, fmt, row, i, new) else 0


@helper
def kvm_sync_page(m, vm, vg, row, mode, maxphyaddr):
    """kvm_sync_page: sync every SPTE; on failure the page is zapped (onto invalid_list)."""
    flush = 0
    for i in range(512):
        r = sync_spte(m, vm, vg, row, i, mode, maxphyaddr)
        if r < 0:
            prepare_zap_page(m, vm, row)
            return -1
        flush |= r
    return flush


@helper
def mmu_sync_children(m, vm, vg, parent, mode, maxphyaddr):
    """mmu_sync_children: write-protect and sync every unsync page below ``parent``, 16 at a time."""
    sc = scratch(m.sh)
    flush = False
    while True:
        nr = mmu_unsync_walk(m, parent)
        if nr == 0:
            break
        protected = False
        for k in range(nr):
            sp = sc[SC_PVEC_SP + k]
            if role_level(m.pa.meta[sp, SP_ROLE]) == 1:
                rec = gfn_to_memslot(m.vt, m.st, vm, m.pa.meta[sp, SP_GFN])
                if rec >= 0:
                    protected |= slot_gfn_write_protect(m, vm, rec, m.pa.meta[sp, SP_GFN], 1, True)
        if protected:
            # kvm_mmu_remote_flush_or_zap(..., true)
            if not commit_zap_page(m, vm):
                flush_remote_tlbs(m, vm)
            flush = False
        for k in range(nr):
            sp = sc[SC_PVEC_SP + k]
            if role_level(m.pa.meta[sp, SP_ROLE]) == 1:
                kvm_unlink_unsync_page(m, vm, sp)
                if kvm_sync_page(m, vm, vg, sp, mode, maxphyaddr) > 0:
                    flush = True
                mmu_pages_clear_parents(m, k)
    # kvm_mmu_remote_flush_or_zap
    if not commit_zap_page(m, vm) and flush:
        flush_remote_tlbs(m, vm)


@helper
def find_shadow_page(m, vm, vg, gfn, role, mode, maxphyaddr):
    """kvm_mmu_find_shadow_page: the valid page with this gfn and role, or -1 (mmu_cache_miss); the valid pages of
    other gfns met in the bucket before it are its collisions (max_mmu_page_hash_collisions)."""
    sh, pa = m.sh, m.pa
    row = sh.hash[m.vt.rec[vm, VM_HASH_OFF] + hash_bucket(gfn)]
    found = -1
    collisions = 0
    while row >= 0:
        nxt = m.pa.meta[row, SP_HNEXT]
        if not sp_valid(m, vm, row):
            pass
        elif pa.meta[row, SP_GFN] != gfn:
            collisions += 1
        else:
            if pa.meta[row, SP_ROLE] != role:
                # the guest reuses an unsync page as an upper-level table: zap it
                if role_level(role) > 1 and m.pa.meta[row, SP_UNSYNC]:
                    prepare_zap_page(m, vm, row)
            else:
                if (role & ROLE_DIRECT) == 0 and m.pa.meta[row, SP_UNSYNC]:
                    r = kvm_sync_page(m, vm, vg, row, mode, maxphyaddr)
                    if r < 0:
                        break
                    if r > 0:
                        flush_remote_tlbs(m, vm)
                if (role & ROLE_DIRECT) == 0:
                    m.pa.meta[row, SP_FLOOD] = 0
                found = row
                break
        row = nxt
    if found < 0:
        m.vt.stats[vm, ST_MMU_CACHE_MISS] += 1
    commit_zap_page(m, vm)
    if collisions > m.vt.stats[vm, ST_MAX_MMU_PAGE_HASH_COLLISIONS]:
        m.vt.stats[vm, ST_MAX_MMU_PAGE_HASH_COLLISIONS] = collisions
    return found


@helper
def get_shadow_page(m, vm, vg, gfn, role, mode, maxphyaddr):
    # __kvm_mmu_get_shadow_page
    row = find_shadow_page(m, vm, vg, gfn, role, mode, maxphyaddr)
    if row < 0:
        row = alloc_shadow_page(m, vm, gfn, role)
    return row


@helper
def link_shadow_page(m, vm, prow, pidx, child):
    """__link_shadow_page: drop a huge SPTE there, point the entry at ``child``, propagate unsync."""
    old = m.pa.spt[prow, pidx]
    if is_shadow_present_pte(old) and is_large_pte(old):
        drop_spte(m, vm, prow, pidx)  # drop_large_spte
        flush_remote_tlbs(m, vm)
    mmu_spte_set(m.pa.spt, prow, pidx, make_nonleaf_spte(m.vt.rec[vm, VM_FMT], child,
                                                         (m.pa.meta[child, SP_ROLE] & ROLE_AD_DISABLED) != 0))
    parent_add(m.pa, m.sh, child, prow * 512 + pidx)
    m.pa.meta[child, SP_PARENT] = prow   # the last link (a direct page has one: the legacy TDP MMU's iterators)
    m.pa.meta[child, SP_PARENT_INDEX] = pidx
    if m.pa.meta[child, SP_UNSYNC_CHILDREN] or m.pa.meta[child, SP_UNSYNC]:
        # mark_unsync(sptep)
        w = pidx >> 6
        bit = np.int64(1) << np.int64(pidx & 63)
        if not (m.pa.meta[prow, SP_UBITMAP + w] & bit):
            m.pa.meta[prow, SP_UBITMAP + w] |= bit
            c = m.pa.meta[prow, SP_UNSYNC_CHILDREN]
            m.pa.meta[prow, SP_UNSYNC_CHILDREN] = c + 1
            if c == 0:
                mark_parents_unsync(m.pa, m.sh, prow)


@njit(inline="always", _nrt=False)
def kvm_mmu_faultin_pfn(m, vm, rec, gfn, write, mode):
    """kvm_mmu_faultin_pfn for the shadow MMU: (RET_PF_CONTINUE, pfn, host_writable) once the host page is in;
    RET_PF_MMIO without a memslot (emulated: MMIO caching is off on shadow hosts we model) except for guest_mmu
    on a TDP host with MMIO caching (kvm_handle_noslot_fault: pfn -1, and mmu_set_spte makes an MMIO SPTE);
    RET_PF_RETRY while an invalidation covers gfn, RET_PF_EMULATE for a write to a read-only slot."""
    if rec < 0:
        if (mode & (MODE_EPT | MODE_NPT)) != 0 and m.host[CFG_MMIO_CACHING] != 0 and \
                gfn <= m.vt.rec[vm, VM_MAX_GFN]:
            return RET_PF_CONTINUE, np.int64(-1), False
        return RET_PF_MMIO, np.int64(0), False
    if m.vt.rec[vm, VM_INVAL_COUNT] > 0 and m.vt.rec[vm, VM_INVAL_START] <= gfn < m.vt.rec[vm, VM_INVAL_END]:
        return RET_PF_RETRY, np.int64(0), False
    if write and slot_readonly(m.st, rec):
        return RET_PF_EMULATE, np.int64(0), False
    host_fault_in(m.st, m.vt, m.host, rec, gfn, vm)
    return RET_PF_CONTINUE, gfn_to_hva(m.st, rec, gfn) >> 12, not slot_readonly(m.st, rec)


@njit(inline="always", _nrt=False)
def kvm_mmu_child_role(parent_role, idx, direct, access):
    """kvm_mmu_child_role: the parent's role one level down, with ``access`` and ``direct``, passthrough off; a
    4-byte-gpte table takes its quadrant from the PDE index."""
    role = (parent_role & ~np.int32(0xF) & ~np.int32(7 << ROLE_ACCESS_SHIFT) & ~np.int32(ROLE_DIRECT)
            & ~np.int32(ROLE_PASSTHROUGH)) | np.int32((parent_role & 0xF) - 1) | np.int32(access << ROLE_ACCESS_SHIFT)
    if direct:
        role |= np.int32(ROLE_DIRECT)
    if role & ROLE_HAS_4_BYTE_GPTE:
        role = (role & ~np.int32(3 << 5)) | np.int32((idx & 1) << 5)
    return np.int64(role)


@njit(inline="always", _nrt=False)
def disallowed_hugepage_adjust(m, spte, level, goal_level):
    """disallowed_hugepage_adjust: one level lower where a table made for an executable (NX huge page) fault
    would be replaced by a huge SPTE.  Returns the goal level."""
    if m.host[CFG_NX_HUGE_PAGES] and level > 1 and level == goal_level and is_shadow_present_pte(spte) \
            and not is_large_pte(spte) and m.pa.meta[spte_to_child_row(spte), SP_FLAGS] & SPF_NX_DISALLOWED:
        return goal_level - 1
    return goal_level


@njit(inline="always", _nrt=False)
def mmu_try_to_unsync_pages(m, vm, rec, gfn, synchronizing, prefetch):
    return try_to_unsync_pages(m.pa, m.vt, m.st, m.sh, vm, rec, gfn, synchronizing, prefetch)


@njit(inline="always", _nrt=False)
def try_to_unsync_pages(pa, vt, st, sh, vm, rec, gfn, synchronizing, prefetch):
    """mmu_try_to_unsync_pages (also the TDP MMU's make_spte's, kernels/fault.py): 0 = may be writable; 1 = must
    stay write-protected."""
    if write_tracked(st, sh, rec, gfn):
        return 1
    if vt.rec[vm, VM_INDIRECT] == 0:
        return 0   # no page with gptes anywhere (the legacy TDP MMU): the bucket holds none
    row = sh.hash[vt.rec[vm, VM_HASH_OFF] + hash_bucket(gfn)]
    while row >= 0:
        if page_valid(pa, vt, vm, row) and pa.meta[row, SP_GFN] == gfn and sp_has_gptes(pa.meta[row, SP_ROLE]):
            if synchronizing:
                return 1
            if not pa.meta[row, SP_UNSYNC]:
                if prefetch:
                    return 1
                # kvm_unsync_page
                vt.stats[vm, ST_MMU_UNSYNC] += 1
                pa.meta[row, SP_UNSYNC] = 1
                mark_parents_unsync(pa, sh, row)
        row = pa.meta[row, SP_HNEXT]
    return 0


@njit(inline="always", _nrt=False)
def make_spte(m, vm, rec, row, pte_access, gfn, pfn, old_spte, prefetch, synchronizing, host_writable):
    """make_spte (spte.c) for a shadow page, in the VM's SPTE format (x86 for shadow paging, EPT or NPT for
    the legacy TDP MMU and guest_mmu): (spte, wrprot).  The bits are make_leaf_spte's; a fault's SPTE is accessed, a
    prefetched one is not (mark_spte_for_access_track), and a gfn that is shadowed stays write-protected."""
    fmt = m.vt.rec[vm, VM_FMT]
    role = m.pa.meta[row, SP_ROLE]
    level = role_level(role)
    ad_disabled = (role & ROLE_AD_DISABLED) != 0
    spte = make_leaf_spte(fmt, level, pte_access, pfn, host_writable, ad_disabled, m.host[CFG_NX_HUGE_PAGES] != 0)
    if not ad_disabled and (role & ROLE_GUEST_MODE) and m.host[CFG_PML]:
        # kvm_mmu_page_ad_need_write_protect: with PML the CPU would log L2 gpas, so guest_mode SPTEs (EPT02) log
        # dirty pages through write protection (the D bit is preset on a writable one: PML never sees them)
        spte |= SPTE_TDP_AD_WRPROT_ONLY
    wrprot = False
    if (spte & PT_WRITABLE_MASK) and (not is_last_spte(old_spte, level) or not is_writable_spte(old_spte)) and \
            mmu_try_to_unsync_pages(m, vm, rec, gfn, synchronizing, prefetch):
        wrprot = True
        spte &= ~(PT_WRITABLE_MASK | shadow_mmu_writable_mask(fmt) | shadow_dirty_mask(fmt))
    if prefetch and not synchronizing:
        spte = mark_spte_for_access_track(fmt, spte)
    if (spte & PT_WRITABLE_MASK) and rec >= 0 and slot_dirty_logging(m.st, rec):
        mark_page_dirty(m.st, m.ct, scratch(m.sh)[SC_RUNNING_VCPU], rec, gfn)
    return spte, wrprot


@helper
def mmu_set_spte(m, vm, rec, row, idx, pte_access, gfn, pfn, is_fault, write_fault, host_writable):
    """mmu_set_spte: install a leaf SPTE; RET_PF_FIXED / SPURIOUS / EMULATE (write-protected write)."""
    level = role_level(m.pa.meta[row, SP_ROLE])
    ret = RET_PF_FIXED
    flush = False
    was_rmapped = False
    prefetch = not is_fault
    old = m.pa.spt[row, idx]
    if is_shadow_present_pte(old):
        if prefetch and is_last_spte(old, level) and spte_to_pfn(old) == pfn:
            return RET_PF_SPURIOUS
        if level > 1 and not is_large_pte(old):
            drop_parent_pte(m, spte_to_child_row(old), row, idx)
            flush = True
        elif spte_to_pfn(old) != pfn:
            drop_spte(m, vm, row, idx)
            flush = True
        else:
            was_rmapped = True
    if rec < 0:
        # is_noslot_pfn (the legacy TDP MMU with MMIO caching): an MMIO SPTE, emulated
        m.vt.stats[vm, ST_PF_MMIO_SPTE_CREATED] += 1
        mmu_spte_set(m.pa.spt, row, idx, make_mmio_spte(m.vt.rec[vm, VM_FMT], gfn, pte_access,
                                                        m.vt.rec[vm, VM_MEMSLOTS_GEN]))   # mark_mmio_spte
        if flush:
            flush_remote_tlbs(m, vm)   # kvm_flush_remote_tlbs_gfn
        return RET_PF_EMULATE
    old = m.pa.spt[row, idx]
    spte, wrprot = make_spte(m, vm, rec, row, pte_access, gfn, pfn, old, prefetch, False, host_writable)
    if old == spte:
        ret = RET_PF_SPURIOUS
    else:
        flush |= mmu_spte_update(m.pa.spt, m.vt.rec[vm, VM_FMT], row, idx, spte)
    if wrprot and write_fault:
        ret = RET_PF_EMULATE  # RET_PF_WRITE_PROTECTED: the write is emulated
    if flush:
        flush_remote_tlbs(m, vm)  # kvm_flush_remote_tlbs_gfn
    if not was_rmapped:
        rmap_add(m, vm, rec, row, idx, gfn, pte_access)
    elif sp_has_gptes(m.pa.meta[row, SP_ROLE]):
        m.sh.trans[row, idx] = (gfn << 12) | pte_access  # kvm_mmu_page_set_access
    return ret


@njit(inline="always", _nrt=False)
def host_page_resident(m, rec, gfn):
    i = gfn - m.st.rec[rec, SL_BASE_GFN]
    return (m.st.host[m.st.rec[rec, SL_HOST_OFF] + (i >> 6)] >> np.int64(i & 63)) & 1


@njit(inline="always", _nrt=False)
def prefetch_slot(m, vm, gfn, writable, hint):
    # gfn_to_memslot_dirty_bitmap(no_dirty_log=true); ``hint``: the fault's slot, the answer when it holds gfn
    rec = hint
    if rec < 0 or not m.st.rec[rec, SL_BASE_GFN] <= gfn < m.st.rec[rec, SL_BASE_GFN] + m.st.rec[rec, SL_NPAGES]:
        rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec < 0:
        return -1
    if writable and slot_dirty_logging(m.st, rec):
        return -1
    if slot_readonly(m.st, rec):
        return -1  # kvm_prefetch_pages: gfn_to_hva_many(write) is KVM_HVA_ERR_RO_BAD for a read-only slot
    return rec


@njit(inline="always", _nrt=False)
def direct_pte_prefetch(m, vm, row, idx, rec_hint):
    """direct_pte_prefetch / __direct_pte_prefetch: runs of non-present SPTEs around ``idx`` in its aligned group
    of 8, mapped to pages the host has resident (gup-fast); none without A/D bits (the caller checked the level
    and invalidations); a run that leaves its memslot stops the prefetch (kvm_prefetch_pages)."""
    if m.pa.meta[row, SP_ROLE] & ROLE_AD_DISABLED:
        return   # sp_ad_disabled: without accessed bits a prefetched SPTE would look young forever
    start = idx & ~(PTE_PREFETCH_NUM - 1)
    access = role_access(m.pa.meta[row, SP_ROLE])
    i = start
    while i < start + PTE_PREFETCH_NUM:
        if i == idx or is_shadow_present_pte(m.pa.spt[row, i]):
            i += 1
            continue
        j = i
        while j < start + PTE_PREFETCH_NUM and j != idx and not is_shadow_present_pte(m.pa.spt[row, j]):
            j += 1
        gfn = sp_get_gfn(m, row, i)
        rec = prefetch_slot(m, vm, gfn, (access & ACC_WRITE_MASK) != 0, rec_hint)
        if rec < 0:
            return
        if gfn + (j - i) > m.st.rec[rec, SL_BASE_GFN] + m.st.rec[rec, SL_NPAGES]:
            return   # gfn_to_hva_many: fewer pages left in the slot than the run
        got = 0
        for k in range(j - i):
            if not host_page_resident(m, rec, gfn + k):
                break   # get_user_pages_fast_only: the resident prefix
            got += 1
        if got == 0:
            return
        for k in range(got):
            mmu_set_spte(m, vm, rec, row, i + k, access, gfn + k, gfn_to_hva(m.st, rec, gfn + k) >> 12,
                         np.bool_(False), np.bool_(False), np.bool_(True))
        i = j


@njit(inline="always", _nrt=False)  # one call site (fetch): no bundle pushed for it
def pte_prefetch(m, vm, row, idx, mode, maxphyaddr, gpte_base_gpa):
    """FNAME(pte_prefetch): map the aligned group of 8 around a new 4K SPTE."""
    if role_level(m.pa.meta[row, SP_ROLE]) > 1 or m.vt.rec[vm, VM_INVAL_COUNT] > 0:
        return
    if m.pa.meta[row, SP_ROLE] & ROLE_DIRECT:
        direct_pte_prefetch(m, vm, row, idx, np.int64(-1))
        return
    start = idx & ~(PTE_PREFETCH_NUM - 1)
    for i in range(start, start + PTE_PREFETCH_NUM):
        if i == idx or is_shadow_present_pte(m.pa.spt[row, i]):
            continue
        # FNAME(prefetch_gpte)
        gpte = scratch(m.sh)[SC_PREFETCH + i - start]
        if prefetch_invalid_gpte(m, vm, row, i, gpte, mode, maxphyaddr):
            break
        gfn = (gpte & GFN_MASK_64) >> 12
        access = protect_clean_gpte(role_access(m.pa.meta[row, SP_ROLE]) & gpte_access(gpte, mode), gpte, mode)
        rec = prefetch_slot(m, vm, gfn, (access & ACC_WRITE_MASK) != 0, np.int64(-1))
        if rec < 0 or not host_page_resident(m, rec, gfn):
            break
        mmu_set_spte(m, vm, rec, row, i, access, gfn, gfn_to_hva(m.st, rec, gfn) >> 12, np.bool_(False),
                     np.bool_(False), np.bool_(True))


# mmu_set_spte inlined where a fault installs its leaf (fetch, direct_map): no bundle pushed per fault; the
# prefetch and sync paths call the compiled copy
mmu_set_spte_inline = njit(inline="always", _nrt=False)(getattr(mmu_set_spte, "py_func", mmu_set_spte))


# out of line: shadow_page_fault and nested_page_fault call one compiled copy (inlined into both, it cost 18 s of
# cold compile for 0-10 % of a nested fault: bench/README.md, session 14)
@helper
def fetch(m, vm, vg, gva, wk, gfn, rec, pfn, pte_access, write_fault, exec_fault, host_writable, mode, maxphyaddr):
    """FNAME(fetch): link indirect pages down to the guest's leaf level, direct pages below it,
    then mmu_set_spte and the prefetch.  Returns RET_PF_*."""
    pa = m.pa
    row, level = walk_start(m, vg, gva)
    if row < 0:
        return RET_PF_RETRY  # a PAE root for a non-present PDPTE: the guest walk refused it already
    gw_level = wk[WK_LEAF_LEVEL]
    idx = 0
    while True:
        idx = (gva >> (12 + 9 * (level - 1))) & 511
        m.pa.meta[row, SP_FLOOD] = 0  # clear_sp_write_flooding_count
        if level == gw_level:
            break
        spte = pa.spt[row, idx]
        if is_shadow_present_pte(spte) and not is_large_pte(spte):
            row = spte_to_child_row(spte)  # kvm_mmu_get_child_sp -> -EEXIST
            level -= 1
            continue
        table_gfn = wk[WK_TABLE_GFN + level - 1]
        access = wk[WK_PT_ACCESS + level - 1]
        role = kvm_mmu_child_role(pa.meta[row, SP_ROLE], idx, False, access)
        child = get_shadow_page(m, vm, vg, table_gfn, role, mode, maxphyaddr)
        if m.pa.meta[child, SP_UNSYNC_CHILDREN]:
            mmu_sync_children(m, vm, vg, child, mode, maxphyaddr)
        link_shadow_page(m, vm, row, idx, child)
        row = child
        level -= 1
    # kvm_mmu_hugepage_adjust
    goal_level = 1
    req_level = 1
    huge_disallowed = exec_fault and m.host[CFG_NX_HUGE_PAGES] != 0
    if gw_level > 1 and rec >= 0 and not slot_dirty_logging(m.st, rec):
        max_level = gw_level
        if m.vt.rec[vm, VM_MMU] != MMU_SHADOW:   # guest_mmu on a TDP host: max_huge_page_level is the TDP one
            max_level = min(max_level, m.host[CFG_TDP_MAX_LEVEL])
        req_level = invalidation_clamp_level(m.vt, vm, gfn, kvm_mmu_max_mapping_level(m.st, rec, gfn, max_level))
        if req_level > 1 and not huge_disallowed:
            goal_level = req_level
    direct_access = pte_access
    while True:
        spte = pa.spt[row, idx]
        goal_level = disallowed_hugepage_adjust(m, spte, level, goal_level)
        if level == goal_level:
            break
        # validate_direct_spte
        if is_shadow_present_pte(spte) and not is_large_pte(spte):
            child = spte_to_child_row(spte)
            if role_access(pa.meta[child, SP_ROLE]) != direct_access:
                drop_parent_pte(m, child, row, idx)
                flush_remote_tlbs(m, vm)
        spte = pa.spt[row, idx]
        if is_shadow_present_pte(spte) and not is_large_pte(spte):
            row = spte_to_child_row(spte)
        else:
            base = gfn & ~((np.int64(1) << np.int64(9 * (level - 1))) - 1)
            role = kvm_mmu_child_role(pa.meta[row, SP_ROLE], idx, True, direct_access)
            child = get_shadow_page(m, vm, vg, base, role, mode, maxphyaddr)
            link_shadow_page(m, vm, row, idx, child)
            if huge_disallowed:
                account_nx_huge_page(pa, m.vt, vm, child, req_level >= level)
            row = child
        level -= 1
        idx = (gva >> (12 + 9 * (level - 1))) & 511
    base_gfn = gfn & ~((np.int64(1) << np.int64(9 * (level - 1))) - 1)
    pfn_al = pfn & ~((np.int64(1) << np.int64(9 * (level - 1))) - 1)
    ret = mmu_set_spte_inline(m, vm, rec, row, idx, pte_access, base_gfn, pfn_al, np.bool_(True), write_fault,
                              host_writable)
    if ret == RET_PF_SPURIOUS:
        return ret
    pte_prefetch(m, vm, row, idx, mode, maxphyaddr, 0)
    return ret


@njit(inline="always", _nrt=False)  # one call site (shadow_access): no bundle pushed for it
def shadow_page_fault(m, vm, vg, gva, err, mode, maxphyaddr):
    """kvm_mmu_do_page_fault -> FNAME(page_fault).  Returns (RET_PF_*, guest error code or 0)."""
    wk = scratch(m.sh)  # the walker output lives at SC_WK == 0
    gm = m.gm
    pfec = err & (PFERR_WRITE | PFERR_USER | PFERR_FETCH)
    gerr = guest_walk(gm, slot_map(m.vt, m.st), vm, mode, m.vr.rec[vg, VR_CR3],
                      m.vr.rec[vg, VR_PDPTR:VR_PDPTR + 4], m.vr.rec[vg, VR_PKRU], maxphyaddr,
                      gva, pfec, wk)
    if gerr != 0:
        return RET_PF_GUEST, gerr & PFERR_MASK  # kvm_inject_emulated_page_fault, then RET_PF_RETRY
    return page_fault_walked(m, vm, vg, gva, err, mode, maxphyaddr)


@njit(inline="always", _nrt=False)
def page_fault_walked(m, vm, vg, gva, err, mode, maxphyaddr):
    """FNAME(page_fault) once the walk (in the scratch ``wk``) allowed the access: A/D bits, page tracking, the
    prefetch group, kvm_mmu_faultin_pfn, FNAME(fetch).  Shared by the shadow MMU and guest_mmu (nested.py).
    Returns (RET_PF_*, 0)."""
    wk = scratch(m.sh)
    pfec = err & (PFERR_WRITE | PFERR_USER | PFERR_FETCH)
    write = (err & PFERR_WRITE) != 0
    present = (err & PFERR_PRESENT) != 0
    gfn = wk[WK_GFN]
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if host_page_needs_budget(m.st, m.host, rec, gfn, write):
        scratch(m.sh)[SC_OOM_GPA] = gfn << 12
        return RET_PF_OOM, np.int64(0)  # the host cannot back the page: stop before any change
    set_ad_and_log(m, vm, wk, pfec, mode)
    # page_fault_handle_page_track
    if present and write and gfn_write_tracked(m, rec, gfn):
        clear_flood_on_walk(m, vm, vg, gva)
        return RET_PF_EMULATE, np.int64(0)
    pte_access = wk[WK_PTE_ACCESS] if write else wk[WK_PTE_ACCESS_CLEAN]
    # prefetch group of the leaf gpte, read now (FNAME(gpte_changed) at level 1)
    if wk[WK_LEAF_LEVEL] == 1:
        size = 4 if mode_levels(mode) == 2 else 8
        base = wk[WK_PTE_GPA + 1] & ~np.int64(size * PTE_PREFETCH_NUM - 1)
        gm_read_group(m.gm, walk_table_row(m.gm, slot_map(m.vt, m.st), vm, base, wk, 1), base, size, PTE_PREFETCH_NUM,
                      scratch(m.sh), SC_PREFETCH)
    r, pfn, host_writable = kvm_mmu_faultin_pfn(m, vm, rec, gfn, write, mode)
    if r != RET_PF_CONTINUE:
        return r, np.int64(0)
    # CR0.WP=0: a supervisor write through a read-only gpte maps the page writable for the kernel only
    user = (err & PFERR_USER) != 0
    if write and not (pte_access & ACC_WRITE_MASK) and not (mode & MODE_WP) and not user:
        pte_access = (pte_access | ACC_WRITE_MASK) & ~ACC_USER_MASK
        if mode & MODE_SMEP:
            pte_access &= ~ACC_EXEC_MASK
    if not make_mmu_pages_available(m, vm):
        return RET_PF_RETRY, np.int64(0)  # -ENOSPC: every page is a pinned root
    r = fetch(m, vm, vg, gva, wk, gfn, rec, pfn, pte_access, write, (err & PFERR_FETCH) != 0, host_writable, mode,
              maxphyaddr)
    return r, np.int64(0)


@njit(inline="always", _nrt=False)
def set_ad_and_log(m, vm, wk, pfec, mode):
    """FNAME(update_accessed_dirty_bits): set guest A/D (EPT12's with ``MODE_EPT``), and log the dirtied table
    pages."""
    if wk[WK_AD_NEEDED] == 0:
        return   # every A (and the leaf's D for a write) set already: nothing to write
    if mode & MODE_EPT:
        changed = ept_set_ad(m.gm, m.vt, m.st, vm, wk, pfec)
    else:
        changed = guest_set_ad(m.gm, slot_map(m.vt, m.st), vm, wk, pfec)
    if changed == 0:
        return
    for level in range(1, 6):
        if (changed >> level) & 1:
            tg = wk[WK_PTE_GPA + level] >> 12
            rec = gfn_to_memslot(m.vt, m.st, vm, tg)
            if rec >= 0:
                mark_page_dirty(m.st, m.ct, scratch(m.sh)[SC_RUNNING_VCPU], rec, tg)


@helper
def invalidate_addr(m, vm, vg, gva, mode, maxphyaddr, all_roots):
    """kvm_mmu_invalidate_addr over the current root (and the previous roots when ``all_roots``)."""
    if not mode & (MODE_PG | MODE_EPT):
        return  # nonpaging_init_context: no sync_spte, nothing to invalidate
    for r in range(1 + (KVM_MMU_NUM_PREV_ROOTS if all_roots else 0)):
        if r == 0:
            row, level = walk_start(m, vg, gva)
        else:
            row = m.vr.rec[vg, VR_PREV_ROOT + (r - 1)]
            level = role_level(m.pa.meta[row, SP_ROLE]) if row >= 0 else 0
        if row < 0:
            continue
        while level >= 1:
            idx = (gva >> (12 + 9 * (level - 1))) & 511
            if m.pa.meta[row, SP_UNSYNC]:
                ret = sync_spte(m, vm, vg, row, idx, mode, maxphyaddr)
                if ret < 0:
                    mmu_page_zap_pte(m, vm, row, idx)
                if ret:
                    flush_remote_tlbs(m, vm)
            if m.pa.meta[row, SP_UNSYNC_CHILDREN] == 0:
                break
            spte = m.pa.spt[row, idx]
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                break
            row = spte_to_child_row(spte)
            level -= 1
