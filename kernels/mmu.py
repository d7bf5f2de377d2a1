"""mmu.c's roots: kvm_mmu_load, free_roots, prev_roots and kvm_mmu_new_pgd, CR3 loads, vCPU entry and its
requests (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_MMU_RELOAD)."""

import numpy as np
from numba import njit

from .gmem import gm_read64
from .guest_walk import (
    MODE_PSE36_KVM,
    cpu_mode,
    cpu_role_word,
    mode_levels,
)
from .jit import helper, kernel
from .memslot import (
    slot_map,
)
from .mmu_internal import GFN_MASK_64, PAE_ROOT, PT32E_ROOT_LEVEL
from .paging_tmpl import get_shadow_page, mmu_sync_children
from .shadow_mmu import commit_zap_page, make_mmu_pages_available, prepare_zap_page, sp_valid
from .spte import (
    ROLE_EFER_NX,
    ROLE_INVALID,
)
from .state import (
    KVM_MMU_NUM_PREV_ROOTS,
    SP_FLOOD,
    SP_ROLE,
    SP_ROOT_COUNT,
    SP_UNSYNC,
    SP_UNSYNC_CHILDREN,
    ST_TLB_FLUSH,
    VR_CR0,
    VR_CR3,
    VR_CR4,
    VR_EFER,
    VR_PAE_ROOT,
    VR_PDPTR,
    VR_PREV_PGD,
    VR_PREV_ROOT,
    VR_RFLAGS,
    VR_ROOT,
    VR_ROOT_PGD,
)


@njit(inline="always", _nrt=False)
def shadow_root_role(mode):
    # kvm_calc_shadow_mmu_root_page_role: the cpu role, at least PAE-sized, EFER.NX forced on
    role = cpu_role_word(mode)
    lvl = role & 0xF
    if lvl < PT32E_ROOT_LEVEL:
        role = (role & ~np.int64(0xF)) | PT32E_ROOT_LEVEL
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
    """kvm_mmu_load: allocate (or find) the root for the guest's CR3, sync it, flush."""
    role = shadow_root_role(mode)
    levels = mode_levels(mode)
    make_mmu_pages_available(m, vm)
    if levels >= 4:
        gfn = (m.vr.rec[vg, VR_CR3] & GFN_MASK_64) >> 12
        row = get_shadow_page(m, vm, vg, gfn, np.int64(role), mode, maxphyaddr)
        m.pa.meta[row, SP_ROOT_COUNT] += 1
        m.vr.rec[vg, VR_ROOT] = row
    else:
        # mmu_alloc_shadow_roots for 32-bit and PAE guests: four level-2 roots behind pae_root
        for i in range(4):
            if levels == 3:
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
    m.vr.rec[vg, VR_ROOT_PGD] = m.vr.rec[vg, VR_CR3]
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
    """kvm_mmu_new_pgd / fast_pgd_switch: reuse the current root or one of 3 prev_roots."""
    vr = m.vr
    role = shadow_root_role(mode)
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


@kernel
def vcpu_reenter(m, vm, vg, mode, maxphyaddr):
    """vcpu_enter_guest after an exit: KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (obsolete current and previous
    roots are put), then kvm_mmu_reload (a root is loaded only when there is none)."""
    free_obsolete_roots(m, vm, vg)
    if m.vr.rec[vg, VR_ROOT] == -1:
        kvm_mmu_load(m, vm, vg, mode, maxphyaddr)


@kernel
def kvm_mmu_reset_context(m, vm, vg):
    # kvm_mmu_reset_context -> kvm_mmu_unload: every root of the vCPU is put
    free_roots(m, vm, vg, np.int64(0xF))


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
