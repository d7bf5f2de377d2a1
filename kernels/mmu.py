"""mmu.c's roots: kvm_mmu_load, free_roots, prev_roots and kvm_mmu_new_pgd, CR3 loads, vCPU entry and its
requests (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_MMU_RELOAD); and the direct fault path of the shadow MMU
(direct_page_fault -> fast_page_fault / direct_map) for guests with paging off (nonpaging_page_fault) and for
VMs on the legacy TDP MMU (kvm.tdp_mmu=N: legacy_tdp_exit)."""

import numpy as np
from numba import njit

from .dirty import pml_flush
from .fault import (
    MAX_EXITS_PER_ACCESS,
    WALK_OK,
    WALK_RSVD,
    exit_error_code,
    fast_page_fault,
    handle_mmio_page_fault,
    tdp_hw_walk,
)
from .gmem import gm_read64
from .guest_walk import (
    MODE_PSE36_KVM,
    PFERR_FETCH,
    PFERR_PRESENT,
    PFERR_WRITE,
    cpu_mode,
    cpu_role_word,
    mode_levels,
)
from .jit import helper, kernel
from .memslot import (
    gfn_to_memslot,
    host_page_needs_budget,
    invalidation_clamp_level,
    kvm_mmu_max_mapping_level,
    slot_dirty_logging,
    slot_map,
)
from .mmu_internal import (
    GFN_MASK_64,
    PAE_ROOT,
    PT32E_ROOT_LEVEL,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_INVALID,
    RET_PF_OOM,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    SC_OOM_GPA,
    account_nx_huge_page,
    scratch,
    unaccount_nx_huge_page,
)
from .paging_ept import MODE_EPT, MODE_NPT, ept_root_role
from .paging_tmpl import (
    direct_pte_prefetch,
    disallowed_hugepage_adjust,
    get_shadow_page,
    kvm_mmu_child_role,
    kvm_mmu_faultin_pfn,
    link_shadow_page,
    mmu_set_spte_inline,
    mmu_sync_children,
)
from .shadow_mmu import (
    commit_zap_page,
    flush_remote_tlbs,
    gfn_write_tracked,
    make_mmu_pages_available,
    prepare_zap_page,
    role_level,
    sp_valid,
    walk_start,
)
from .spte import (
    ACC_ALL,
    KVM_MAX_HUGEPAGE_LEVEL,
    PFERR_RSVD_MASK,
    ROLE_EFER_NX,
    ROLE_GUEST_MODE,
    ROLE_INVALID,
    SHADOW_NONPRESENT_VALUE,
    gfn_round_for_level,
    is_large_pte,
    is_shadow_present_pte,
    spte_to_child_row,
)
from .state import (
    CFG_MMIO_CACHING,
    CFG_NX_HUGE_PAGES,
    CFG_TDP_MAX_LEVEL,
    CTL_FREE_TOP,
    DM_PML_ACTIVE,
    KVM_MMU_NUM_PREV_ROOTS,
    MAX_PL_PER_EVENT,
    MAX_RN_PER_EVENT,
    MAX_ROWS_PER_EVENT,
    MMU_LEGACY,
    OUT_EMULATED,
    OUT_FIXED,
    OUT_MMIO,
    OUT_RETRY,
    SH_PL_AVAIL,
    SH_RN_AVAIL,
    SP_FLAGS,
    SP_FLOOD,
    SP_GFN,
    SP_LEVEL,
    SP_PARENT,
    SP_PARENT_INDEX,
    SP_ROLE,
    SP_ROOT_COUNT,
    SP_UNSYNC,
    SP_UNSYNC_CHILDREN,
    SPF_NX_TRACKED,
    SPF_TDP_MMU,
    ST_NX_LPAGE_RECOVERED,
    ST_PF_FAST,
    ST_PF_RETRY,
    ST_PF_TAKEN,
    ST_TLB_FLUSH,
    VM_AD_DISABLED,
    VM_DIRTY_MODE,
    VM_FMT,
    VM_INVAL_COUNT,
    VM_LEVELS,
    VM_MAX_GFN,
    VM_MMU,
    VR_ALT_ROOT,
    VR_CR0,
    VR_CR3,
    VR_CR4,
    VR_EFER,
    VR_EPTP,
    VR_GUEST_MODE,
    VR_PAE_ROOT,
    VR_PDPTR,
    VR_PREV_PGD,
    VR_PREV_ROOT,
    VR_RFLAGS,
    VR_ROOT,
    VR_ROOT_PGD,
)
from .tdp import account_pf_result, tdp_mmu_root_role, tdp_set_spte


@njit(inline="always", _nrt=False)
def shadow_root_role(mode):
    # kvm_calc_shadow_mmu_root_page_role: the cpu role, at least PAE-sized, EFER.NX forced on (nested EPT:
    # kvm_calc_shadow_ept_root_page_role)
    if mode & MODE_EPT:
        return ept_root_role(mode)
    role = cpu_role_word(mode)
    lvl = role & 0xF
    if lvl < PT32E_ROOT_LEVEL:
        role = (role & ~np.int64(0xF)) | PT32E_ROOT_LEVEL
    if mode & MODE_NPT:
        # kvm_calc_shadow_npt_root_page_role: the cpu role (computed in guest mode), EFER.NX as L1 has it
        return np.int32(role | ROLE_GUEST_MODE)
    return np.int32(role | ROLE_EFER_NX)


@helper
def free_root(m, vm, row):
    # mmu_free_root_page
    if row < 0:
        return
    m.pa.meta[row, SP_ROOT_COUNT] -= 1
    if m.pa.meta[row, SP_ROOT_COUNT] == 0 and (m.pa.meta[row, SP_ROLE] & ROLE_INVALID):
        prepare_zap_page(m, vm, row)


@helper
def free_roots(m, vm, vg, mask):
    """kvm_mmu_free_roots: bit 0 current, bits 1..3 prev_roots."""
    vr = m.vr
    if mask & 1:
        if vr.rec[vg, VR_ROOT] == PAE_ROOT:
            for i in range(4):
                free_root(m, vm, vr.rec[vg, VR_PAE_ROOT + i])
                vr.rec[vg, VR_PAE_ROOT + i] = -1
        else:
            free_root(m, vm, vr.rec[vg, VR_ROOT])
        vr.rec[vg, VR_ROOT] = -1
        vr.rec[vg, VR_ROOT_PGD] = 0
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        if mask & (2 << i):
            free_root(m, vm, vr.rec[vg, VR_PREV_ROOT + i])
            vr.rec[vg, VR_PREV_ROOT + i] = -1
            vr.rec[vg, VR_PREV_PGD + i] = 0
    commit_zap_page(m, vm)


@helper
def sync_roots(m, vm, vg, mode, maxphyaddr):
    # kvm_mmu_sync_roots
    root = m.vr.rec[vg, VR_ROOT]
    if root == PAE_ROOT:
        for i in range(4):
            r = m.vr.rec[vg, VR_PAE_ROOT + i]
            if r >= 0:
                mmu_sync_children(m, vm, vg, r, mode, maxphyaddr)
        return
    if root < 0:
        return
    if m.pa.meta[root, SP_UNSYNC] or m.pa.meta[root, SP_UNSYNC_CHILDREN]:
        mmu_sync_children(m, vm, vg, root, mode, maxphyaddr)


@helper
def kvm_mmu_load(m, vm, vg, mode, maxphyaddr):
    """kvm_mmu_load: allocate (or find) the root for the guest's CR3, sync it, flush; a legacy-TDP VM's vCPUs
    share one direct root of the TDP level (mmu_alloc_direct_roots, found in the hash after the first)."""
    make_mmu_pages_available(m, vm)
    if mode & (MODE_EPT | MODE_NPT):
        # guest_mmu under nested EPT / NPT: mmu_alloc_shadow_roots for the EPTP's or nCR3's table, synced
        eptp = m.vr.rec[vg, VR_EPTP]
        row = get_shadow_page(m, vm, vg, (eptp & GFN_MASK_64) >> 12, np.int64(shadow_root_role(mode)), mode,
                              maxphyaddr)
        m.pa.meta[row, SP_ROOT_COUNT] += 1
        m.vr.rec[vg, VR_ROOT] = row
        m.vr.rec[vg, VR_ROOT_PGD] = eptp
        sync_roots(m, vm, vg, mode, maxphyaddr)
        return   # flush_tlb_current on a new root: not a tlb_flush statistic
    if m.vt.rec[vm, VM_MMU] == MMU_LEGACY:
        # L2 without nested paging runs on its own direct root (role.guest_mode, kvm_calc_cpu_role)
        role = tdp_mmu_root_role(m.vt, vm) | (ROLE_GUEST_MODE if m.vr.rec[vg, VR_GUEST_MODE] else 0)
        row = get_shadow_page(m, vm, vg, np.int64(0), np.int64(role), mode, maxphyaddr)
        m.pa.meta[row, SP_ROOT_COUNT] += 1
        m.vr.rec[vg, VR_ROOT] = row
        m.vr.rec[vg, VR_ROOT_PGD] = 0
        return   # as the TDP MMU's root load: no flush counted
    role = shadow_root_role(mode)
    levels = mode_levels(mode)
    if levels >= 4:
        gfn = (m.vr.rec[vg, VR_CR3] & GFN_MASK_64) >> 12
        row = get_shadow_page(m, vm, vg, gfn, np.int64(role), mode, maxphyaddr)
        m.pa.meta[row, SP_ROOT_COUNT] += 1
        m.vr.rec[vg, VR_ROOT] = row
    else:
        # mmu_alloc_shadow_roots for 32-bit and PAE guests, mmu_alloc_direct_roots with paging off: four
        # level-2 roots behind pae_root
        for i in range(4):
            if levels == 0:
                gfn = np.int64(i) << 18   # i << (30 - PAGE_SHIFT)
                quadrant = 0
            elif levels == 3:
                pdpte = m.vr.rec[vg, VR_PDPTR + i]
                if not (pdpte & 1):
                    m.vr.rec[vg, VR_PAE_ROOT + i] = -1
                    continue
                gfn = (pdpte & GFN_MASK_64) >> 12
                quadrant = 0
            else:
                gfn = (m.vr.rec[vg, VR_CR3] & np.int64(0xFFFFF000)) >> 12
                quadrant = i
            r = (role & ~np.int32(0xF) & ~np.int32(3 << 5)) | np.int32(2) | np.int32(quadrant << 5)
            row = get_shadow_page(m, vm, vg, gfn, np.int64(r), mode, maxphyaddr)
            m.pa.meta[row, SP_ROOT_COUNT] += 1
            m.vr.rec[vg, VR_PAE_ROOT + i] = row
        m.vr.rec[vg, VR_ROOT] = PAE_ROOT
    m.vr.rec[vg, VR_ROOT_PGD] = m.vr.rec[vg, VR_CR3] if levels else 0   # root.pgd is ignored for direct MMUs
    sync_roots(m, vm, vg, mode, maxphyaddr)
    m.vt.stats[vm, ST_TLB_FLUSH] += 1  # flush_tlb_current on a new root


@helper
def free_obsolete_roots(m, vm, vg):
    # kvm_mmu_free_obsolete_roots
    mask = np.int64(0)
    if m.vr.rec[vg, VR_ROOT] >= 0 and not sp_valid(m, vm, m.vr.rec[vg, VR_ROOT]):
        mask |= 1
    if m.vr.rec[vg, VR_ROOT] == PAE_ROOT:
        for i in range(4):
            r = m.vr.rec[vg, VR_PAE_ROOT + i]
            if r >= 0 and not sp_valid(m, vm, r):
                mask |= 1
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        r = m.vr.rec[vg, VR_PREV_ROOT + i]
        if r >= 0 and not sp_valid(m, vm, r):
            mask |= 2 << i
    if mask:
        free_roots(m, vm, vg, mask)


@njit(inline="always", _nrt=False)
def root_usable(m, row, pgd, want_pgd, role):
    return row >= 0 and pgd == want_pgd and m.pa.meta[row, SP_ROLE] == role


@helper
def kvm_mmu_new_pgd(m, vm, vg, new_pgd, mode):
    """kvm_mmu_new_pgd: reuse the current root or one of 3 prev_roots (fast_pgd_switch) for the mode's role."""
    fast_pgd_switch(m, vm, vg, new_pgd, np.int64(shadow_root_role(mode)))


@helper
def fast_pgd_switch(m, vm, vg, new_pgd, role):
    """fast_pgd_switch: keep the current root if it has ``new_pgd`` and ``role``, else rotate one in from the 3
    prev_roots, else free the least recently used (the current root, rotated last)."""
    vr = m.vr
    hit = False
    if vr.rec[vg, VR_ROOT] == PAE_ROOT:
        free_roots(m, vm, vg, np.int64(1))  # special (PAE) roots are never cached
    if vr.rec[vg, VR_ROOT] >= 0:
        # cached_root_find_and_keep_current
        if root_usable(m, vr.rec[vg, VR_ROOT], vr.rec[vg, VR_ROOT_PGD], new_pgd, role):
            hit = True
        else:
            for i in range(KVM_MMU_NUM_PREV_ROOTS):
                r, p = vr.rec[vg, VR_ROOT], vr.rec[vg, VR_ROOT_PGD]
                vr.rec[vg, VR_ROOT], vr.rec[vg, VR_ROOT_PGD] = vr.rec[vg, VR_PREV_ROOT + i], vr.rec[vg, VR_PREV_PGD + i]
                vr.rec[vg, VR_PREV_ROOT + i], vr.rec[vg, VR_PREV_PGD + i] = r, p
                if root_usable(m, vr.rec[vg, VR_ROOT], vr.rec[vg, VR_ROOT_PGD], new_pgd, role):
                    hit = True
                    break
            if not hit:
                free_roots(m, vm, vg, np.int64(1))
    else:
        # cached_root_find_without_current
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if root_usable(m, vr.rec[vg, VR_PREV_ROOT + i], vr.rec[vg, VR_PREV_PGD + i], new_pgd, role):
                vr.rec[vg, VR_ROOT], vr.rec[vg, VR_ROOT_PGD] = vr.rec[vg, VR_PREV_ROOT + i], vr.rec[vg, VR_PREV_PGD + i]
                for k in range(i, KVM_MMU_NUM_PREV_ROOTS - 1):
                    vr.rec[vg, VR_PREV_ROOT + k] = vr.rec[vg, VR_PREV_ROOT + (k + 1)]
                    vr.rec[vg, VR_PREV_PGD + k] = vr.rec[vg, VR_PREV_PGD + (k + 1)]
                vr.rec[vg, VR_PREV_ROOT + (KVM_MMU_NUM_PREV_ROOTS - 1)] = -1
                vr.rec[vg, VR_PREV_PGD + (KVM_MMU_NUM_PREV_ROOTS - 1)] = 0
                hit = True
                break
    if hit:
        m.pa.meta[vr.rec[vg, VR_ROOT], SP_FLOOD] = 0


@njit(inline="always", _nrt=False)
def swap_mmu_roots(vr, vg):
    """vcpu->arch.mmu switches between root_mmu and guest_mmu (nested paging): the vCPU's two root sets
    (VR_ROOT.. and VR_ALT_ROOT..) trade places."""
    for k in range(8):
        t = vr.rec[vg, VR_ROOT + k]
        vr.rec[vg, VR_ROOT + k] = vr.rec[vg, VR_ALT_ROOT + k]
        vr.rec[vg, VR_ALT_ROOT + k] = t


@helper
def kvm_set_cr3(m, vm, vg, cr3, maxphyaddr):
    """kvm_set_cr3 (guest MOV to CR3, no PCID): switch roots if CR3 changed, then sync + flush."""
    regs = m.vr.rec[vg]
    mode = cpu_mode(regs[VR_CR0], regs[VR_CR4], regs[VR_EFER], regs[VR_RFLAGS]) | MODE_PSE36_KVM
    if mode_levels(mode) == 3:
        # load_pdptrs: always reloaded for PAE paging; new values drop the current (PAE) roots
        base = cr3 & np.int64(0xFFFFFFE0)
        changed = False
        for i in range(4):
            v = gm_read64(m.gm, slot_map(m.vt, m.st), vm, base + 8 * i)
            if v != m.vr.rec[vg, VR_PDPTR + i]:
                changed = True
            m.vr.rec[vg, VR_PDPTR + i] = v
        if changed:
            free_roots(m, vm, vg, np.int64(1))
    if cr3 != m.vr.rec[vg, VR_CR3]:
        kvm_mmu_new_pgd(m, vm, vg, cr3, mode)
        m.vr.rec[vg, VR_CR3] = cr3
    # kvm_invalidate_pcid -> KVM_REQ_MMU_SYNC + KVM_REQ_TLB_FLUSH_CURRENT, then vCPU entry
    m.vt.stats[vm, ST_TLB_FLUSH] += 1
    vcpu_enter(m, vm, vg, mode, maxphyaddr)


@helper
def vcpu_enter(m, vm, vg, mode, maxphyaddr):
    """The MMU part of vcpu_enter_guest: free obsolete roots, sync, (re)load the root."""
    free_obsolete_roots(m, vm, vg)
    if m.vr.rec[vg, VR_ROOT] != -1:  # a root or the PAE roots: kvm_mmu_reload loads only when there is none
        sync_roots(m, vm, vg, mode, maxphyaddr)
    else:
        kvm_mmu_load(m, vm, vg, mode, maxphyaddr)


@helper
def free_obsolete_alt_roots(m, vm, vg):
    """KVM_REQ_MMU_FREE_OBSOLETE_ROOTS for the MMU a vCPU is not on (guest_mmu's roots while L1 runs)."""
    if m.vr.rec[vg, VR_ALT_ROOT] >= 0 or m.vr.rec[vg, VR_ALT_ROOT + (VR_PREV_ROOT - VR_ROOT)] >= 0:
        swap_mmu_roots(m.vr, vg)
        free_obsolete_roots(m, vm, vg)
        swap_mmu_roots(m.vr, vg)


@kernel
def vcpu_reenter(m, vm, vg, mode, maxphyaddr):
    """vcpu_enter_guest after an exit: KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (obsolete current and previous
    roots are put, of both MMUs of a vCPU that has run an L2 on nested paging), then kvm_mmu_reload (a root is
    loaded only when there is none)."""
    free_obsolete_roots(m, vm, vg)
    free_obsolete_alt_roots(m, vm, vg)
    if m.vr.rec[vg, VR_ROOT] == -1:
        kvm_mmu_load(m, vm, vg, mode, maxphyaddr)


@kernel
def kvm_mmu_reset_context(m, vm, vg):
    # kvm_mmu_reset_context -> kvm_mmu_unload: every root of the vCPU is put
    free_roots(m, vm, vg, np.int64(0xF))


@njit(inline="always", _nrt=False)
def exit_room(m, legacy):
    """mmu_topup_memory_caches has left enough for one exit: table rows, and for the shadow MMU's code (the legacy
    TDP MMU, guest_mmu) parent-pte links and rmap nodes."""
    if m.pa.ctl[CTL_FREE_TOP] < MAX_ROWS_PER_EVENT:
        return False
    return not legacy or (m.sh.ctl[SH_PL_AVAIL] >= MAX_PL_PER_EVENT and m.sh.ctl[SH_RN_AVAIL] >= MAX_RN_PER_EVENT)


@njit(inline="always", _nrt=False)
def root_needs_reload(m, vm, vg):
    r = m.vr.rec[vg, VR_ROOT]
    if r == PAE_ROOT:
        for i in range(4):
            p = m.vr.rec[vg, VR_PAE_ROOT + i]
            if p >= 0 and not sp_valid(m, vm, p):
                return True
        return False
    return r < 0 or not sp_valid(m, vm, r)


@njit(inline="always", _nrt=False)
def entry_work_needed(m, vm, vg):
    """No root, or an obsolete current or previous root: a zap raised KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
    (kvm_mmu_zap_all_fast, or a zapped root with root_count > 0) that the next entry services."""
    if root_needs_reload(m, vm, vg):
        return True
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        r = m.vr.rec[vg, VR_PREV_ROOT + i]
        if r >= 0 and not sp_valid(m, vm, r):
            return True
    return False


# ---------------------------------------------------------------- direct_page_fault
@njit(inline="always", _nrt=False)
def direct_map(m, vm, vg, gpa, gfn, rec, pfn, goal_level, req_level, write, host_writable, huge_disallowed):
    """direct_map: direct shadow pages (ACC_ALL) down to ``goal_level``, then mmu_set_spte and the prefetch."""
    row, level = walk_start(m, vg, gpa)
    while True:
        idx = (gpa >> (12 + 9 * (level - 1))) & 511
        spte = m.pa.spt[row, idx]
        goal_level = disallowed_hugepage_adjust(m, spte, level, goal_level)
        if level == goal_level:
            break
        if is_shadow_present_pte(spte) and not is_large_pte(spte):
            row = spte_to_child_row(spte)  # kvm_mmu_get_child_sp -> -EEXIST
            level -= 1
            continue
        role = kvm_mmu_child_role(m.pa.meta[row, SP_ROLE], idx, True, ACC_ALL)
        child = get_shadow_page(m, vm, vg, gfn_round_for_level(gfn, level), role, np.int64(0), np.int64(0))
        link_shadow_page(m, vm, row, idx, child)
        if huge_disallowed:
            account_nx_huge_page(m.pa, m.vt, vm, child, req_level >= level)
        row = child
        level -= 1
    pfn_al = gfn_round_for_level(pfn, level)
    ret = mmu_set_spte_inline(m, vm, rec, row, idx, np.int64(ACC_ALL), gfn_round_for_level(gfn, level), pfn_al,
                              np.bool_(True), write, host_writable)
    if ret == RET_PF_SPURIOUS:
        return ret
    # direct_pte_prefetch
    if role_level(m.pa.meta[row, SP_ROLE]) == 1 and m.vt.rec[vm, VM_INVAL_COUNT] == 0:
        direct_pte_prefetch(m, vm, row, idx, rec)
    return ret


@helper
def direct_page_fault(m, vm, vg, gpa, err, max_level, mmio_caching):
    """direct_page_fault: a guest with paging off under the shadow MMU (nonpaging_page_fault, 2M at most, no
    MMIO SPTEs) or a legacy-TDP VM (kvm_tdp_page_fault with kvm.tdp_mmu=N).  Returns RET_PF_*."""
    gfn = gpa >> 12
    write = (err & PFERR_WRITE) != 0
    present = (err & PFERR_PRESENT) != 0
    fetch = (err & PFERR_FETCH) != 0
    rsvd = (err & PFERR_RSVD_MASK) != 0
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if host_page_needs_budget(m.st, m.host, rec, gfn, write):
        scratch(m.sh)[SC_OOM_GPA] = gpa
        return RET_PF_OOM  # the host cannot back the page: stop before any change
    # page_fault_handle_page_track
    if present and write and not rsvd and gfn_write_tracked(m, rec, gfn):
        return RET_PF_EMULATE
    if not rsvd:  # page_fault_can_be_fast: faults on MMIO SPTEs never are
        row, level = walk_start(m, vg, gpa)
        r = fast_page_fault(m.pa, m.st, m.ct, vg, m.vt.rec[vm, VM_FMT], row, level, gfn, rec, present, write, fetch,
                            m.vt.rec[vm, VM_AD_DISABLED] == 0)
        if r != RET_PF_INVALID:
            m.vt.stats[vm, ST_PF_FAST] += 1
            return r
    if rec < 0 and mmio_caching:
        # kvm_handle_noslot_fault: an MMIO SPTE (4K), unless the gfn is beyond the guest's MAXPHYADDR
        if gfn > m.vt.rec[vm, VM_MAX_GFN]:
            return RET_PF_EMULATE
        pfn, host_writable = np.int64(-1), False
    else:
        r, pfn, host_writable = kvm_mmu_faultin_pfn(m, vm, rec, gfn, write, np.int64(0))
        if r != RET_PF_CONTINUE:
            return r
    if not make_mmu_pages_available(m, vm):
        return RET_PF_RETRY  # -ENOSPC: every page is a pinned root
    # kvm_mmu_hugepage_adjust; an executable fault under the NX huge page workaround stays 4K
    huge_disallowed = fetch and m.host[CFG_NX_HUGE_PAGES] != 0
    goal = 1
    req = 1
    if rec >= 0 and not slot_dirty_logging(m.st, rec):
        req = max(1, invalidation_clamp_level(m.vt, vm, gfn, kvm_mmu_max_mapping_level(m.st, rec, gfn, max_level)))
        if not huge_disallowed:
            goal = req
    return direct_map(m, vm, vg, gpa, gfn, rec, pfn, goal, req, write, np.bool_(host_writable), huge_disallowed)


# the same function inlined into the legacy TDP MMU's exit (tdp2d_batch): a call pushes the whole MMU bundle, which
# cost more than half of a legacy fault (bench/README.md, session 14); nonpaging_page_fault keeps the call
direct_page_fault_inline = njit(inline="always", _nrt=False)(getattr(direct_page_fault, "py_func", direct_page_fault))


@njit(inline="always", _nrt=False)
def nonpaging_page_fault(m, vm, vg, gpa, err):
    # nonpaging_page_fault: gva == gpa below a PAE-shaped root (2M pages at most); MMIO is emulated
    return direct_page_fault(m, vm, vg, gpa, err, np.int64(2), False)


@njit(inline="always", _nrt=False)  # one call site (tdp2d's access_2d): no bundle pushed for it
def legacy_tdp_exit(m, vm, vg, gfn, write, fetch, res, spte):
    """An EPT violation / misconfiguration / #NPF of a legacy-TDP VM (kvm.tdp_mmu=N): kvm_handle_exit's loop
    with kvm_tdp_page_fault -> direct_page_fault over the direct shadow pages below the vCPU's root, and the
    guest's re-executed access.  Returns (outcome, error code, refs) as kernels/tdp2d.py's tdp_exit does (the 2D
    walk counts the access and its references); outcome -1: the host cannot back the page, nothing changed;
    ``refs`` >= 0: the re-executed access translated, with that many references (-1: it did not)."""
    vt = m.vt
    fmt = vt.rec[vm, VM_FMT]
    mmio_caching = m.host[CFG_MMIO_CACHING] != 0
    max_level = min(KVM_MAX_HUGEPAGE_LEVEL, m.host[CFG_TDP_MAX_LEVEL])
    if vt.rec[vm, VM_DIRTY_MODE] & DM_PML_ACTIVE:
        pml_flush(vt, m.st, m.ct, vm, vg)  # vmx_handle_exit flushes the PML buffer on every exit
    outcome = OUT_FIXED
    err = np.int64(0)
    for _attempt in range(MAX_EXITS_PER_ACCESS):
        err = exit_error_code(fmt, res, spte, write, fetch)
        if res == WALK_RSVD and handle_mmio_page_fault(vt, vm, fmt, spte, mmio_caching):
            return OUT_MMIO, err, np.int64(-1)
        vt.stats[vm, ST_PF_TAKEN] += 1
        r = direct_page_fault_inline(m, vm, vg, gfn << 12, err, max_level, mmio_caching)
        if r == RET_PF_OOM:
            vt.stats[vm, ST_PF_TAKEN] -= 1
            return -1, err, np.int64(-1)  # only a first exit needs a new host page: nothing has changed
        if r == RET_PF_RETRY:
            vt.stats[vm, ST_PF_RETRY] += 1
            return OUT_RETRY, err, np.int64(-1)
        outcome = account_pf_result(vt.stats, vm, r)
        if outcome == OUT_EMULATED:
            return (OUT_MMIO if gfn_to_memslot(vt, m.st, vm, gfn) < 0 else OUT_EMULATED), err, np.int64(-1)
        res, refs, row, idx, level, spte = tdp_hw_walk(m.pa.spt, fmt, m.vr.rec[vg, VR_ROOT], vt.rec[vm, VM_LEVELS],
                                                       gfn, write, fetch, vt.rec[vm, VM_AD_DISABLED] == 0)
        if res == WALK_OK:
            return outcome, err, np.int64(refs)
    return outcome, err, np.int64(-1)


# ---------------------------------------------------------------- NX huge page recovery
@kernel
def recover_nx_huge_pages(m, vm, rows, to_zap):
    """kvm_recover_nx_huge_pages for one VM: ``to_zap`` times, the oldest page still on the list (``rows``: its
    tracked pages, oldest first; a zap may free younger ones too) is zapped so that a huge page can come back
    (a TDP MMU page: its parent SPTE goes, kvm_tdp_mmu_zap_sp; a shadow page of shadow paging or the legacy TDP
    MMU: kvm_mmu_prepare_zap_page), or only unaccounted if its gfn's slot is dirty-logged; then
    kvm_mmu_remote_flush_or_zap.  Returns the number zapped."""
    zapped = 0
    done = 0
    tdp_flush = False
    for k in range(rows.shape[0]):
        if done == to_zap:
            break
        row = rows[k]
        if not m.pa.meta[row, SP_FLAGS] & SPF_NX_TRACKED:
            continue  # freed by an earlier zap in this pass
        done += 1
        rec = gfn_to_memslot(m.vt, m.st, vm, m.pa.meta[row, SP_GFN])
        if rec >= 0 and slot_dirty_logging(m.st, rec):
            unaccount_nx_huge_page(m.pa, m.vt, vm, row)
            continue
        if m.pa.meta[row, SP_FLAGS] & SPF_TDP_MMU:
            tdp_set_spte(m.pa, m.vt, vm, m.pa.meta[row, SP_PARENT], m.pa.meta[row, SP_PARENT_INDEX],
                         m.pa.meta[row, SP_LEVEL] + 1, SHADOW_NONPRESENT_VALUE)
            tdp_flush = True
        else:
            prepare_zap_page(m, vm, row)
        m.vt.stats[vm, ST_NX_LPAGE_RECOVERED] += 1
        zapped += 1
    if not commit_zap_page(m, vm) and tdp_flush:
        flush_remote_tlbs(m, vm)
    return zapped
