"""The shadow MMU (``mmu.c`` + ``paging_tmpl.h`` PTTYPE 64): shadow pages keyed by (gfn, role) in a
4096-bucket hash, parent-pte lists, rmaps, unsync and write tracking, emulated writes to guest page
tables, CR3 switches with prev_roots, INVLPG.

Guest page tables live in guest memory (kernels/gmem.py) and are walked by kernels/guest_walk.py.
Shadow SPTEs use the legacy (NPT) layout with A/D bits.  Every function takes the ``MMU`` bundle
``m`` (kernels/state.py).  Single-threaded: no mmu_lock, no races, so KVM's re-checks after taking
the lock (``gpte_changed``, ``is_page_fault_stale``) never fire except for MMU-notifier invalidations.
Modelled: 4- and 5-level guests (PAE and 32-bit guests are refused by batchmmu/host.py for now).
"""

import numpy as np
from numba import njit

from .dirty import ring_mask_target
from .gmem import gm_read32, gm_read64, gm_room, gm_write_bytes
from .guest_walk import (
    MODE_AC,
    MODE_PAE,
    MODE_PSE36_KVM,
    MODE_SMAP,
    MODE_SMEP,
    MODE_WP,
    PFERR_FETCH,
    PFERR_MASK,
    PFERR_PRESENT,
    PFERR_USER,
    PFERR_WRITE,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    WK_GFN,
    WK_GPA,
    WK_LEAF_LEVEL,
    WK_PT_ACCESS,
    WK_PTE_ACCESS,
    WK_PTE_ACCESS_CLEAN,
    WK_PTE_GPA,
    WK_TABLE_GFN,
    cpu_mode,
    cpu_role_word,
    gpte_rsvd_mask,
    guest_set_ad,
    guest_walk,
    mode_levels,
)
from .jit import helper, kernel
from .memslot import (
    dirty_ring_soft_full,
    gfn_to_hva,
    gfn_to_memslot,
    host_fault_in,
    host_page_pages,
    invalidation_clamp_level,
    kvm_mmu_max_mapping_level,
    mark_page_dirty,
    slot_dirty_logging,
    slot_map,
    slot_readonly,
)
from .rmap import parent_add, parent_remove, pte_list_add, pte_list_remove, rmap_index, sptep_idx, sptep_row
from .spte import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    FMT_NPT,
    KVM_MAX_HUGEPAGE_LEVEL,
    NPT_A,
    NPT_D,
    NPT_HOST_WRITABLE,
    NPT_MMU_WRITABLE,
    NPT_NX,
    NPT_P,
    NPT_U,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    ROLE_ACCESS_SHIFT,
    ROLE_DIRECT,
    ROLE_EFER_NX,
    ROLE_HAS_4_BYTE_GPTE,
    ROLE_INVALID,
    ROLE_PASSTHROUGH,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    is_large_pte,
    is_last_spte,
    is_shadow_present_pte,
    make_nonleaf_spte,
    spte_to_child_row,
    spte_to_pfn,
)
from .state import (
    CFG_NX_HUGE_PAGES,
    CFG_PML,
    CTL_FREE_TOP,
    CTL_USED,
    DM_INITIALLY_SET,
    DM_MANUAL_PROTECT,
    DM_RING,
    HOST_BUDGET_BYTES,
    HOST_USED_BYTES,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    KVM_MMU_HASH_SIZE,
    KVM_MMU_NUM_PREV_ROOTS,
    MAX_GM_PER_EVENT,
    MAX_PL_PER_EVENT,
    MAX_RN_PER_EVENT,
    MAX_ROWS_PER_EVENT,
    NODE_NEXT,
    NODE_VAL,
    OUT_EMULATED,
    OUT_GUEST_FAULT,
    OUT_HIT,
    OUT_MMIO,
    OUT_RETRY,
    OUT_RING_FULL,
    PML_ENTITY_NUM,
    PTE_PREFETCH_NUM,
    SH_PL_AVAIL,
    SH_RN_AVAIL,
    SL_BASE_GFN,
    SL_DIRTY_OFF,
    SL_HOST_OFF,
    SL_LPAGE_OFF,
    SL_NPAGES,
    SL_RMAP_OFF,
    SL_VM,
    SL_WTRACK_OFF,
    SP_ANEXT,
    SP_APREV,
    SP_FLAGS,
    SP_FLOOD,
    SP_GEN,
    SP_GFN,
    SP_HNEXT,
    SP_LEVEL,
    SP_PARENT,
    SP_ROLE,
    SP_ROOT_COUNT,
    SP_UNSYNC,
    SP_UNSYNC_CHILDREN,
    SP_VM,
    ST_ACCESSES,
    ST_DIRTY_RING_FULL,
    ST_INVLPG,
    ST_MAX_MMU_RMAP_SIZE,
    ST_MMU_CACHE_MISS,
    ST_MMU_FLOODED,
    ST_MMU_PAGES,
    ST_MMU_PDE_ZAPPED,
    ST_MMU_PTE_WRITE,
    ST_MMU_RECYCLED,
    ST_MMU_SHADOW_ZAPPED,
    ST_MMU_UNSYNC,
    ST_PAGES_4K,
    ST_PF_GUEST,
    ST_PF_RETRY,
    ST_PF_TAKEN,
    ST_REMOTE_TLB_FLUSH,
    ST_REMOTE_TLB_FLUSH_REQUESTS,
    ST_RMAP_ENTRIES,
    ST_TLB_FLUSH,
    ST_WALK_REFS,
    STOP_DONE,
    STOP_HOST_OOM,
    STOP_NEED_PAGES,
    VM_ACT_HEAD,
    VM_ACT_TAIL,
    VM_DIRTY_MODE,
    VM_HASH_OFF,
    VM_INDIRECT,
    VM_INVAL_COUNT,
    VM_INVAL_END,
    VM_INVAL_START,
    VM_N_MAX,
    VM_VALID_GEN,
    VR_CR0,
    VR_CR3,
    VR_CR4,
    VR_EFER,
    VR_PAE_ROOT,
    VR_PDPTR,
    VR_PKRU,
    VR_PREV_PGD,
    VR_PREV_ROOT,
    VR_RFLAGS,
    VR_ROOT,
    VR_ROOT_PGD,
)
from .tdp import account_pf_result

# RET_PF_* (mmu_internal.h)
RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_FIXED = 4
RET_PF_SPURIOUS = 5
RET_PF_MMIO = 6  # simulator: an EMULATE for a gfn without a memslot
RET_PF_OOM = 7   # simulator: the host memory budget cannot back the page (nothing changed)
RET_PF_GUEST = 8  # simulator: the guest walk refused the access (#PF injected; its code may be 0)
HW_FAULT = np.int64(1) << np.int64(40)  # shadow_hw_walk: set with the error code when the walk faults

# event ops
OP_ACCESS = 0        # native access (a store when ev_size > 0: ev_value written on success)
OP_EMULATED = 1      # access by KVM's instruction emulator (write when kind has W)
OP_INVLPG = 2
OP_MOV_CR3 = 3       # guest MOV to CR3 (kvm_set_cr3)
OP_FLUSH = 4         # guest TLB flush (kvm_vcpu_flush_tlb_guest)

PT32E_ROOT_LEVEL = 3
PAE_ROOT = -2        # vr.root value while the vCPU runs on its 4 PAE roots (32-bit and PAE guests)
GFN_MASK_64 = np.int64(0x000FFFFFFFFFF000)
RMAP_RECYCLE_THRESHOLD = 1000
KVM_PAGE_ARRAY_NR = 16

# scratch layout (sh.scratch): walker output at 0, small arrays after it
SC_WK = 0
SC_PVEC_SP = 64      # 16 rows
SC_PVEC_IDX = 80     # index of the entry in its parent
SC_PVEC_PAR = 96     # pvec index of the parent entry (-1 root)
SC_STACK = 112       # DFS stack: 16 (row, next bit) pairs
SC_INVALID_HEAD = 160  # head of invalid_list (rows linked through sh.anext)
SC_PREFETCH = 168    # 8 gptes of the prefetch group
SC_MARK_STACK = 176  # stack of mark_parents_unsync (pages whose unsync_children went 0 -> 1)
SC_MARK_STACK_LEN = 80
SC_SIZE = 256
# kvm_get_running_vcpu(): the global vCPU index while a shadow event runs, else -1 (the last word of the
# walker's block: the walk uses WK_SIZE words, kernels/tdp2d.py one more)
SC_RUNNING_VCPU = 63

MAX_EXITS = 4


# ----------------------------------------------------------------------------- small helpers
@njit(inline="always", _nrt=False)
def role_level(role):
    return role & 0xF


@njit(inline="always", _nrt=False)
def role_access(role):
    return (role >> ROLE_ACCESS_SHIFT) & 7


@njit(inline="always", _nrt=False)
def sp_has_gptes(role):
    return (role & ROLE_DIRECT) == 0 and (role & ROLE_PASSTHROUGH) == 0


@njit(inline="always", _nrt=False)
def sp_valid(m, vm, row):
    # !is_obsolete_sp: not invalid and of the current generation
    return (m.pa.meta[row, SP_ROLE] & ROLE_INVALID) == 0 and m.pa.meta[row, SP_GEN] == m.vt.rec[vm, VM_VALID_GEN]


@njit(inline="always", _nrt=False)
def hash_bucket(gfn):
    # kvm_page_table_hashfn: any good spread of gfns over 4096 buckets (collisions are not a stat here)
    return (gfn ^ (gfn >> 12) ^ (gfn >> 24)) & (KVM_MMU_HASH_SIZE - 1)


@njit(inline="always", _nrt=False)
def flush_remote_tlbs(m, vm):
    # kvm_flush_remote_tlbs
    m.vt.stats[vm, ST_REMOTE_TLB_FLUSH_REQUESTS] += 1
    m.vt.stats[vm, ST_REMOTE_TLB_FLUSH] += 1


@njit(inline="always", _nrt=False)
def sp_get_gfn(m, row, i):
    # kvm_mmu_page_get_gfn
    role = m.pa.meta[row, SP_ROLE]
    if role & ROLE_PASSTHROUGH:
        return m.pa.meta[row, SP_GFN]
    if role & ROLE_DIRECT:
        return m.pa.meta[row, SP_GFN] + (np.int64(i) << ((role_level(role) - 1) * 9))
    return m.sh.trans[row, i] >> 12


@njit(inline="always", _nrt=False)
def sp_get_access(m, row, i):
    role = m.pa.meta[row, SP_ROLE]
    if sp_has_gptes(role):
        return m.sh.trans[row, i] & 7
    return role_access(role)


@njit(inline="always", _nrt=False)
def role_quadrant(role):
    return (role >> 5) & 3


@njit(inline="always", _nrt=False)
def sp_gpte(m, vm, row, i):
    """The guest pte that SPTE ``i`` of a last-level indirect page shadows (FNAME(get_level1_sp_gpa))."""
    role = m.pa.meta[row, SP_ROLE]
    base = m.pa.meta[row, SP_GFN] << 12
    if role & ROLE_HAS_4_BYTE_GPTE:
        return gm_read32(m.gm, slot_map(m.vt, m.st), vm, base + role_quadrant(role) * 2048 + 4 * i)
    return gm_read64(m.gm, slot_map(m.vt, m.st), vm, base + 8 * i)


@njit(inline="always", _nrt=False)
def walk_start(m, vg, gva):
    """shadow_walk_init: (row, level) of the first shadow page a walk for ``gva`` visits; PAE roots are
    picked by gva bits 31:30.  (-1, 0): nothing there."""
    row = m.vr.rec[vg, VR_ROOT]
    if row == PAE_ROOT:
        row = m.vr.rec[vg, VR_PAE_ROOT + ((gva >> 30) & 3)]
        if row < 0:
            return -1, 0
        return row, 2
    if row < 0:
        return -1, 0
    return row, role_level(m.pa.meta[row, SP_ROLE])


@njit(inline="always", _nrt=False)
def gfn_write_tracked(m, rec, gfn):
    # kvm_gfn_is_write_tracked
    if rec < 0 or m.st.rec[rec, SL_WTRACK_OFF] < 0:
        return False
    return m.sh.wtrack[m.st.rec[rec, SL_WTRACK_OFF] + gfn - m.st.rec[rec, SL_BASE_GFN]] > 0


@njit(inline="always", _nrt=False)
def update_disallow_lpage(m, rec, gfn, count):
    # update_gfn_disallow_lpage_count: both 2M and 1G
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        shift = (level - 1) * 9
        idx = (gfn >> shift) - (m.st.rec[rec, SL_BASE_GFN] >> shift)
        m.st.lpage[m.st.rec[rec, SL_LPAGE_OFF + (level - 2)] + idx] += count


@njit(inline="always", _nrt=False)
def is_writable_spte(spte):
    return is_shadow_present_pte(spte) and (spte & PT_WRITABLE_MASK) != 0


@njit(inline="always", _nrt=False)
def is_mmu_writable(spte):
    return (spte & NPT_MMU_WRITABLE) != 0


# ----------------------------------------------------------------------------- rmaps, SPTE updates
@njit(inline="always", _nrt=False)
def rmap_add(m, vm, rec, row, idx, gfn, access):
    # __rmap_add: record the translation, count the page, chain the SPTE
    sh = m.sh
    sh.trans[row, idx] = (gfn << 12) | access
    level = role_level(m.pa.meta[row, SP_ROLE])
    m.vt.stats[vm, ST_PAGES_4K + level - 1] += 1
    m.vt.stats[vm, ST_RMAP_ENTRIES] += 1
    h = rmap_index(sh, m.st, rec, level, gfn)
    cnt = pte_list_add(sh, h, row * 512 + idx)
    if cnt > m.vt.stats[vm, ST_MAX_MMU_RMAP_SIZE]:
        m.vt.stats[vm, ST_MAX_MMU_RMAP_SIZE] = cnt
    if cnt > RMAP_RECYCLE_THRESHOLD:
        # kvm_zap_all_rmap_sptes + flush
        n = sh.rmap_head[h]
        while n >= 0:
            sptep = sh.rn[n, NODE_VAL]
            n = sh.rn[n, NODE_NEXT]
            drop_spte(m, vm, sptep_row(sptep), sptep_idx(sptep))
        flush_remote_tlbs(m, vm)


@helper
def drop_spte(m, vm, row, idx):
    """drop_spte: clear a leaf SPTE, uncount it and take it off its rmap."""
    old = m.pa.spt[row, idx]
    m.pa.spt[row, idx] = SHADOW_NONPRESENT_VALUE
    if not is_shadow_present_pte(old):
        return old
    level = role_level(m.pa.meta[row, SP_ROLE])
    m.vt.stats[vm, ST_PAGES_4K + level - 1] -= 1
    m.vt.stats[vm, ST_RMAP_ENTRIES] -= 1
    gfn = sp_get_gfn(m, row, idx)
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec >= 0 and m.st.rec[rec, SL_RMAP_OFF + (level - 1)] >= 0:
        pte_list_remove(m.sh, rmap_index(m.sh, m.st, rec, level, gfn), row * 512 + idx)
    return old


@njit(inline="always", _nrt=False)
def mmu_spte_update(m, row, idx, new):
    """mmu_spte_update: returns True when the change needs a TLB flush (MMU-writable dropped)."""
    old = m.pa.spt[row, idx]
    m.pa.spt[row, idx] = new
    if not is_shadow_present_pte(old):
        return False
    return is_mmu_writable(old) and not is_mmu_writable(new)


@helper
def drop_parent_pte(m, child, prow, pidx):
    # drop_parent_pte: unlink and clear the parent SPTE
    parent_remove(m.sh, child, prow * 512 + pidx)
    m.pa.spt[prow, pidx] = SHADOW_NONPRESENT_VALUE


@helper
def mmu_page_zap_pte(m, vm, row, idx):
    """mmu_page_zap_pte: leaf -> drop; table -> unlink the child; MMIO -> clear."""
    pte = m.pa.spt[row, idx]
    if is_shadow_present_pte(pte):
        if is_last_spte(pte, role_level(m.pa.meta[row, SP_ROLE])):
            drop_spte(m, vm, row, idx)
        else:
            drop_parent_pte(m, spte_to_child_row(pte), row, idx)
    elif pte != SHADOW_NONPRESENT_VALUE:
        m.pa.spt[row, idx] = SHADOW_NONPRESENT_VALUE


@helper
def rmap_write_protect_gfn(m, vm, rec, gfn, min_level, pt_protect):
    """kvm_mmu_slot_gfn_write_protect over the rmaps: True if a flush is needed."""
    sh = m.sh
    flush = False
    for level in range(min_level, KVM_MAX_HUGEPAGE_LEVEL + 1):
        if m.st.rec[rec, SL_RMAP_OFF + (level - 1)] < 0:
            continue
        n = sh.rmap_head[rmap_index(sh, m.st, rec, level, gfn)]
        while n >= 0:
            sptep = sh.rn[n, NODE_VAL]
            n = sh.rn[n, NODE_NEXT]
            row = sptep_row(sptep)
            idx = sptep_idx(sptep)
            spte = m.pa.spt[row, idx]
            # spte_write_protect
            if not (spte & PT_WRITABLE_MASK) and not (pt_protect and is_mmu_writable(spte)):
                continue
            new = spte & ~PT_WRITABLE_MASK
            if pt_protect:
                new &= ~NPT_MMU_WRITABLE
            flush |= mmu_spte_update(m, row, idx, new)
    return flush


# ----------------------------------------------------------------------------- shadow pages
@helper
def account_shadowed(m, vm, row):
    # account_shadowed: upper levels are write-tracked, last-level tables only write-protected
    m.vt.rec[vm, VM_INDIRECT] += 1
    gfn = m.pa.meta[row, SP_GFN]
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec < 0:
        return
    if role_level(m.pa.meta[row, SP_ROLE]) > 1:
        # __kvm_write_track_add_gfn
        m.sh.wtrack[m.st.rec[rec, SL_WTRACK_OFF] + gfn - m.st.rec[rec, SL_BASE_GFN]] += 1
        update_disallow_lpage(m, rec, gfn, 1)
        if rmap_write_protect_gfn(m, vm, rec, gfn, 1, True):
            flush_remote_tlbs(m, vm)
        return
    update_disallow_lpage(m, rec, gfn, 1)
    if rmap_write_protect_gfn(m, vm, rec, gfn, 1, True):
        flush_remote_tlbs(m, vm)  # kvm_flush_remote_tlbs_gfn


@helper
def unaccount_shadowed(m, vm, row):
    m.vt.rec[vm, VM_INDIRECT] -= 1
    gfn = m.pa.meta[row, SP_GFN]
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec < 0:
        return
    if role_level(m.pa.meta[row, SP_ROLE]) > 1:
        m.sh.wtrack[m.st.rec[rec, SL_WTRACK_OFF] + gfn - m.st.rec[rec, SL_BASE_GFN]] -= 1
    update_disallow_lpage(m, rec, gfn, -1)


@helper
def alloc_shadow_page(m, vm, gfn, role):
    """kvm_mmu_alloc_shadow_page: a row from the topped-up free stack, on the active list and hash."""
    pa, sh = m.pa, m.sh
    top = pa.ctl[CTL_FREE_TOP] - 1
    row = pa.free[top]
    pa.ctl[CTL_FREE_TOP] = top
    pa.ctl[CTL_USED] += 1
    for k in range(512):
        pa.spt[row, k] = SHADOW_NONPRESENT_VALUE
    pa.meta[row, SP_VM] = vm
    pa.meta[row, SP_LEVEL] = role_level(role)
    pa.meta[row, SP_GFN] = gfn
    pa.meta[row, SP_ROLE] = role
    pa.meta[row, SP_PARENT] = -1
    pa.meta[row, SP_FLAGS] = 0
    m.pa.meta[row, SP_UNSYNC] = 0
    m.pa.meta[row, SP_UNSYNC_CHILDREN] = 0
    for k in range(8):
        sh.ubitmap[row, k] = 0
    m.pa.meta[row, SP_ROOT_COUNT] = 0
    m.pa.meta[row, SP_FLOOD] = 0
    m.pa.meta[row, SP_GEN] = m.vt.rec[vm, VM_VALID_GEN]
    sh.parent_head[row] = -1
    # list_add(&sp->link, &kvm->arch.active_mmu_pages): newest at the head
    head = m.vt.rec[vm, VM_ACT_HEAD]
    m.pa.meta[row, SP_ANEXT] = head
    m.pa.meta[row, SP_APREV] = -1
    if head >= 0:
        m.pa.meta[head, SP_APREV] = row
    else:
        m.vt.rec[vm, VM_ACT_TAIL] = row
    m.vt.rec[vm, VM_ACT_HEAD] = row
    b = m.vt.rec[vm, VM_HASH_OFF] + hash_bucket(gfn)
    m.pa.meta[row, SP_HNEXT] = sh.hash[b]
    sh.hash[b] = row
    m.vt.stats[vm, ST_MMU_PAGES] += 1
    if sp_has_gptes(role):
        account_shadowed(m, vm, row)
    return row


@njit(inline="always", _nrt=False)
def active_list_del(m, vm, row):
    nxt, prv = m.pa.meta[row, SP_ANEXT], m.pa.meta[row, SP_APREV]
    if prv >= 0:
        m.pa.meta[prv, SP_ANEXT] = nxt
    else:
        m.vt.rec[vm, VM_ACT_HEAD] = nxt
    if nxt >= 0:
        m.pa.meta[nxt, SP_APREV] = prv
    else:
        m.vt.rec[vm, VM_ACT_TAIL] = prv
    m.pa.meta[row, SP_ANEXT] = -1
    m.pa.meta[row, SP_APREV] = -1


@helper
def free_shadow_page(m, vm, row):
    """kvm_mmu_free_shadow_page: out of the hash, back on the free stack."""
    pa, sh = m.pa, m.sh
    b = m.vt.rec[vm, VM_HASH_OFF] + hash_bucket(pa.meta[row, SP_GFN])
    cur = sh.hash[b]
    if cur == row:
        sh.hash[b] = m.pa.meta[row, SP_HNEXT]
    else:
        while cur >= 0:
            if m.pa.meta[cur, SP_HNEXT] == row:
                m.pa.meta[cur, SP_HNEXT] = m.pa.meta[row, SP_HNEXT]
                break
            cur = m.pa.meta[cur, SP_HNEXT]
    pa.meta[row, SP_VM] = -1
    pa.ctl[CTL_USED] -= 1
    top = pa.ctl[CTL_FREE_TOP]
    pa.free[top] = row
    pa.ctl[CTL_FREE_TOP] = top + 1


@helper
def kvm_unlink_unsync_page(m, vm, row):
    m.pa.meta[row, SP_UNSYNC] = 0
    m.vt.stats[vm, ST_MMU_UNSYNC] -= 1


@njit(inline="always", _nrt=False)
def clear_unsync_child_bit(m, row, idx):
    w = idx >> 6
    bit = np.int64(1) << np.int64(idx & 63)
    if m.sh.ubitmap[row, w] & bit:
        m.sh.ubitmap[row, w] &= ~bit
        m.pa.meta[row, SP_UNSYNC_CHILDREN] -= 1


@helper
def mark_parents_unsync(m, row):
    """kvm_mmu_mark_parents_unsync: set the child bit in every parent, recursing on 0 -> 1."""
    sh = m.sh
    sc = sh.scratch
    sc[SC_MARK_STACK] = row
    sp_ = 1
    while sp_ > 0:
        sp_ -= 1
        r = sc[SC_MARK_STACK + sp_]
        n = sh.parent_head[r]
        while n >= 0:
            sptep = sh.pl[n, NODE_VAL]
            n = sh.pl[n, NODE_NEXT]
            prow = sptep_row(sptep)
            pidx = sptep_idx(sptep)
            w = pidx >> 6
            bit = np.int64(1) << np.int64(pidx & 63)
            if sh.ubitmap[prow, w] & bit:
                continue
            sh.ubitmap[prow, w] |= bit
            c = m.pa.meta[prow, SP_UNSYNC_CHILDREN]
            m.pa.meta[prow, SP_UNSYNC_CHILDREN] = c + 1
            if c == 0 and sp_ < SC_MARK_STACK_LEN:
                sc[SC_MARK_STACK + sp_] = prow
                sp_ += 1


@helper
def mmu_unsync_walk(m, row):
    """mmu_unsync_walk: collect up to 16 entries (``row`` first, then tables with unsync children and
    unsync last-level pages, depth first) into the pvec.  Returns the number of entries."""
    sh, pa = m.sh, m.pa
    sc = sh.scratch
    if m.pa.meta[row, SP_UNSYNC_CHILDREN] == 0:
        return 0
    nr = 0
    sc[SC_PVEC_SP] = row
    sc[SC_PVEC_IDX] = -1
    sc[SC_PVEC_PAR] = -1
    nr = 1
    # explicit DFS: stack of (pvec index of the table being scanned, next bit)
    depth = 0
    sc[SC_STACK] = 0
    sc[SC_STACK + 1] = 0
    depth = 1
    while depth > 0:
        pv = sc[SC_STACK + 2 * (depth - 1)]
        bit = sc[SC_STACK + 2 * (depth - 1) + 1]
        sp = sc[SC_PVEC_SP + pv]
        found = False
        while bit < 512:
            w = bit >> 6
            if sh.ubitmap[sp, w] == 0:
                bit = (w + 1) << 6
                continue
            if not (sh.ubitmap[sp, w] >> np.int64(bit & 63)) & 1:
                bit += 1
                continue
            i = bit
            bit += 1
            ent = pa.spt[sp, i]
            if not is_shadow_present_pte(ent) or is_large_pte(ent):
                clear_unsync_child_bit(m, sp, i)
                continue
            child = spte_to_child_row(ent)
            if m.pa.meta[child, SP_UNSYNC_CHILDREN] > 0:
                sc[SC_PVEC_SP + nr] = child
                sc[SC_PVEC_IDX + nr] = i
                sc[SC_PVEC_PAR + nr] = pv
                nr += 1
                sc[SC_STACK + 2 * (depth - 1) + 1] = bit
                sc[SC_STACK + 2 * depth] = nr - 1
                sc[SC_STACK + 2 * depth + 1] = 0
                depth += 1
                found = True
                break
            elif m.pa.meta[child, SP_UNSYNC]:
                dup = False
                for k in range(nr):
                    if sc[SC_PVEC_SP + k] == child:
                        dup = True
                if not dup:
                    sc[SC_PVEC_SP + nr] = child
                    sc[SC_PVEC_IDX + nr] = i
                    sc[SC_PVEC_PAR + nr] = pv
                    nr += 1
                if nr == KVM_PAGE_ARRAY_NR:
                    return nr
            else:
                clear_unsync_child_bit(m, sp, i)
            if nr == KVM_PAGE_ARRAY_NR:
                return nr
        if found:
            if nr == KVM_PAGE_ARRAY_NR:
                return nr
            continue
        # done with this table: a table whose children turned out all synced leaves its parent's bit
        depth -= 1
        if depth > 0 and m.pa.meta[sp, SP_UNSYNC_CHILDREN] == 0:
            clear_unsync_child_bit(m, sc[SC_PVEC_SP + sc[SC_PVEC_PAR + pv]], sc[SC_PVEC_IDX + pv])
    return nr


@helper
def mmu_pages_clear_parents(m, pv):
    """mmu_pages_clear_parents: clear the bit of ``pv`` in its parent, upwards while a parent runs out."""
    sc = m.sh.scratch
    while True:
        par = sc[SC_PVEC_PAR + pv]
        if par < 0:
            return
        psp = sc[SC_PVEC_SP + par]
        clear_unsync_child_bit(m, psp, sc[SC_PVEC_IDX + pv])
        if m.pa.meta[psp, SP_UNSYNC_CHILDREN] != 0:
            return
        pv = par


@helper
def invalid_list_add(m, row):
    sc = m.sh.scratch
    m.pa.meta[row, SP_ANEXT] = sc[SC_INVALID_HEAD]
    sc[SC_INVALID_HEAD] = row


@helper
def commit_zap_page(m, vm):
    """kvm_mmu_commit_zap_page: one flush, then free every page on invalid_list."""
    sc = m.sh.scratch
    row = sc[SC_INVALID_HEAD]
    if row < 0:
        return False
    flush_remote_tlbs(m, vm)
    while row >= 0:
        nxt = m.pa.meta[row, SP_ANEXT]
        free_shadow_page(m, vm, row)
        row = nxt
    sc[SC_INVALID_HEAD] = -1
    return True


@helper
def prepare_zap_one(m, vm, row):
    """__kvm_mmu_prepare_zap_page minus the unsync children (done by prepare_zap_page)."""
    pa, sh = m.pa, m.sh
    m.vt.stats[vm, ST_MMU_SHADOW_ZAPPED] += 1
    # kvm_mmu_page_unlink_children
    for i in range(512):
        if pa.spt[row, i] != SHADOW_NONPRESENT_VALUE:
            mmu_page_zap_pte(m, vm, row, i)
    # kvm_mmu_unlink_parents
    n = sh.parent_head[row]
    while n >= 0:
        sptep = sh.pl[n, NODE_VAL]
        nxt = sh.pl[n, NODE_NEXT]
        drop_parent_pte(m, row, sptep_row(sptep), sptep_idx(sptep))
        n = nxt
    role = pa.meta[row, SP_ROLE]
    if not (role & ROLE_INVALID) and sp_has_gptes(role):
        unaccount_shadowed(m, vm, row)
    if m.pa.meta[row, SP_UNSYNC]:
        kvm_unlink_unsync_page(m, vm, row)
    if m.pa.meta[row, SP_ROOT_COUNT] == 0:
        if not (role & ROLE_INVALID):
            active_list_del(m, vm, row)
        m.vt.stats[vm, ST_MMU_PAGES] -= 1
        invalid_list_add(m, row)
    elif not (role & ROLE_INVALID):
        active_list_del(m, vm, row)  # a pinned root stays allocated until its root_count drops
    pa.meta[row, SP_ROLE] = role | ROLE_INVALID


@helper
def prepare_zap_page(m, vm, row):
    """kvm_mmu_prepare_zap_page.  Unsync last-level children of a zapped upper-level page are NOT
    zapped with it: they are only unlinked and keep their SPTEs and their unsync state, which is what
    the real kernel (6.18) does (a PD zapped by a misaligned write leaves mmu_unsync and pages_4k as
    they were: tests/test_realkvm.py).  Older kernels zapped them first (mmu_zap_unsync_children)."""
    prepare_zap_one(m, vm, row)


# ----------------------------------------------------------------------------- sync
@njit(inline="always", _nrt=False)
def prefetch_invalid_gpte(m, vm, row, idx, gpte, mode, maxphyaddr):
    """FNAME(prefetch_invalid_gpte): drop the SPTE when the gpte is not present, not accessed or reserved."""
    if (gpte & 1) == 0 or (gpte & PT_ACCESSED_MASK) == 0 or (gpte & gpte_rsvd_mask(mode, maxphyaddr, 1, gpte)):
        drop_spte(m, vm, row, idx)
        return True
    return False


@njit(inline="always", _nrt=False)
def gpte_access(gpte):
    # FNAME(gpte_access) for 64-bit gptes
    access = gpte & (ACC_WRITE_MASK | ACC_USER_MASK)
    if gpte >= 0:  # NX (bit 63) clear
        access |= ACC_EXEC_MASK
    return access


@njit(inline="always", _nrt=False)
def protect_clean_gpte(access, gpte):
    # FNAME(protect_clean_gpte): write access only once the guest's D bit is set
    if not (gpte & PT_DIRTY_MASK):
        access &= ~ACC_WRITE_MASK
    return access


@helper
def sync_spte(m, vm, vg, row, i, mode, maxphyaddr):
    """FNAME(sync_spte): re-derive SPTE ``i`` of an unsync page from its gpte; 1 = flush, 0, -1 = zap."""
    spte = m.pa.spt[row, i]
    if not is_shadow_present_pte(spte):
        return 0
    gpte = sp_gpte(m, vm, row, i)
    if prefetch_invalid_gpte(m, vm, row, i, gpte, mode, maxphyaddr):
        return 1
    gfn = (gpte & GFN_MASK_64) >> 12
    access = role_access(m.pa.meta[row, SP_ROLE]) & gpte_access(gpte)
    access = protect_clean_gpte(access, gpte)
    if gfn != sp_get_gfn(m, row, i):
        drop_spte(m, vm, row, i)
        return 1
    if sp_get_access(m, row, i) == access:
        return 0
    m.sh.trans[row, i] = (gfn << 12) | access
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    new, wrprot = make_spte(m, vm, rec, row, access, gfn, spte_to_pfn(spte), spte, True, True,
                            (spte & NPT_HOST_WRITABLE) != 0)
    return 1 if mmu_spte_update(m, row, i, new) else 0


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
    sc = m.sh.scratch
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
                    protected |= rmap_write_protect_gfn(m, vm, rec, m.pa.meta[sp, SP_GFN], 1, True)
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


# ----------------------------------------------------------------------------- lookup / creation
@helper
def find_shadow_page(m, vm, vg, gfn, role, mode, maxphyaddr):
    """kvm_mmu_find_shadow_page: the valid page with this gfn and role, or -1 (mmu_cache_miss)."""
    sh, pa = m.sh, m.pa
    row = sh.hash[m.vt.rec[vm, VM_HASH_OFF] + hash_bucket(gfn)]
    found = -1
    while row >= 0:
        nxt = m.pa.meta[row, SP_HNEXT]
        if sp_valid(m, vm, row) and pa.meta[row, SP_GFN] == gfn:
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
    m.pa.spt[prow, pidx] = make_nonleaf_spte(FMT_NPT, child, False)
    parent_add(m.sh, child, prow * 512 + pidx)
    if m.pa.meta[child, SP_UNSYNC_CHILDREN] or m.pa.meta[child, SP_UNSYNC]:
        # mark_unsync(sptep)
        w = pidx >> 6
        bit = np.int64(1) << np.int64(pidx & 63)
        if not (m.sh.ubitmap[prow, w] & bit):
            m.sh.ubitmap[prow, w] |= bit
            c = m.pa.meta[prow, SP_UNSYNC_CHILDREN]
            m.pa.meta[prow, SP_UNSYNC_CHILDREN] = c + 1
            if c == 0:
                mark_parents_unsync(m, prow)


# ----------------------------------------------------------------------------- make_spte / set_spte
@njit(inline="always", _nrt=False)
def mmu_try_to_unsync_pages(m, vm, rec, gfn, synchronizing, prefetch):
    """mmu_try_to_unsync_pages: 0 = may be writable; 1 = must stay write-protected."""
    if gfn_write_tracked(m, rec, gfn):
        return 1
    sh, pa = m.sh, m.pa
    row = sh.hash[m.vt.rec[vm, VM_HASH_OFF] + hash_bucket(gfn)]
    while row >= 0:
        if sp_valid(m, vm, row) and pa.meta[row, SP_GFN] == gfn and sp_has_gptes(pa.meta[row, SP_ROLE]):
            if synchronizing:
                return 1
            if not m.pa.meta[row, SP_UNSYNC]:
                if prefetch:
                    return 1
                # kvm_unsync_page
                m.vt.stats[vm, ST_MMU_UNSYNC] += 1
                m.pa.meta[row, SP_UNSYNC] = 1
                mark_parents_unsync(m, row)
        row = m.pa.meta[row, SP_HNEXT]
    return 0


@njit(inline="always", _nrt=False)
def make_spte(m, vm, rec, row, pte_access, gfn, pfn, old_spte, prefetch, synchronizing, host_writable):
    """make_spte (spte.c) for a shadow page: (spte, wrprot)."""
    level = role_level(m.pa.meta[row, SP_ROLE])
    spte = SPTE_MMU_PRESENT_MASK | NPT_P
    wrprot = False
    if not prefetch or synchronizing:
        spte |= NPT_A
    if level > 1 and (pte_access & ACC_EXEC_MASK) and m.cfg[CFG_NX_HUGE_PAGES]:
        pte_access &= ~ACC_EXEC_MASK
    if not (pte_access & ACC_EXEC_MASK):
        spte |= NPT_NX
    if pte_access & ACC_USER_MASK:
        spte |= NPT_U
    if level > 1:
        spte |= PT_PAGE_SIZE_MASK
    if host_writable:
        spte |= NPT_HOST_WRITABLE
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << 12
    if pte_access & ACC_WRITE_MASK:
        if (not is_last_spte(old_spte, level) or not is_writable_spte(old_spte)) and \
                mmu_try_to_unsync_pages(m, vm, rec, gfn, synchronizing, prefetch):
            wrprot = True
        else:
            spte |= PT_WRITABLE_MASK | NPT_MMU_WRITABLE | NPT_D
    if prefetch and not synchronizing:
        spte &= ~NPT_A  # mark_spte_for_access_track with A/D enabled
    if (spte & PT_WRITABLE_MASK) and rec >= 0 and slot_dirty_logging(m.st, rec):
        mark_page_dirty(m.st, m.ct, m.sh.scratch[SC_RUNNING_VCPU], rec, gfn)
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
    old = m.pa.spt[row, idx]
    spte, wrprot = make_spte(m, vm, rec, row, pte_access, gfn, pfn, old, prefetch, False, host_writable)
    if old == spte:
        ret = RET_PF_SPURIOUS
    else:
        flush |= mmu_spte_update(m, row, idx, spte)
    if wrprot and write_fault:
        ret = RET_PF_EMULATE  # RET_PF_WRITE_PROTECTED: the write is emulated
    if flush:
        flush_remote_tlbs(m, vm)  # kvm_flush_remote_tlbs_gfn
    if not was_rmapped:
        rmap_add(m, vm, rec, row, idx, gfn, pte_access)
    else:
        m.sh.trans[row, idx] = (gfn << 12) | pte_access  # kvm_mmu_page_set_access
    return ret


@njit(inline="always", _nrt=False)
def host_page_resident(m, rec, gfn):
    i = gfn - m.st.rec[rec, SL_BASE_GFN]
    return (m.st.host[m.st.rec[rec, SL_HOST_OFF] + (i >> 6)] >> np.int64(i & 63)) & 1


@njit(inline="always", _nrt=False)
def prefetch_slot(m, vm, gfn, writable):
    # gfn_to_memslot_dirty_bitmap(no_dirty_log=true)
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec < 0:
        return -1
    if writable and slot_dirty_logging(m.st, rec):
        return -1
    if slot_readonly(m.st, rec):
        return -1  # kvm_prefetch_pages: gfn_to_hva_many(write) is KVM_HVA_ERR_RO_BAD for a read-only slot
    return rec


@helper
def pte_prefetch(m, vm, row, idx, mode, maxphyaddr, gpte_base_gpa):
    """FNAME(pte_prefetch): map the aligned group of 8 around a new 4K SPTE."""
    if role_level(m.pa.meta[row, SP_ROLE]) > 1 or m.vt.rec[vm, VM_INVAL_COUNT] > 0:
        return
    start = idx & ~(PTE_PREFETCH_NUM - 1)
    if m.pa.meta[row, SP_ROLE] & ROLE_DIRECT:
        # __direct_pte_prefetch: runs of non-present SPTEs, pages the host has mapped (gup-fast)
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
            rec = prefetch_slot(m, vm, gfn, (access & ACC_WRITE_MASK) != 0)
            if rec < 0:
                return
            got = 0
            for k in range(j - i):
                g = gfn + k
                if g >= m.st.rec[rec, SL_BASE_GFN] + m.st.rec[rec, SL_NPAGES] or not host_page_resident(m, rec, g):
                    break
                got += 1
            if got == 0:
                return
            for k in range(got):
                mmu_set_spte(m, vm, rec, row, i + k, access, gfn + k, gfn_to_hva(m.st, rec, gfn + k) >> 12,
                             np.bool_(False), np.bool_(False), np.bool_(True))
            i = j
        return
    for i in range(start, start + PTE_PREFETCH_NUM):
        if i == idx or is_shadow_present_pte(m.pa.spt[row, i]):
            continue
        # FNAME(prefetch_gpte)
        gpte = m.sh.scratch[SC_PREFETCH + i - start]
        if prefetch_invalid_gpte(m, vm, row, i, gpte, mode, maxphyaddr):
            break
        gfn = (gpte & GFN_MASK_64) >> 12
        access = protect_clean_gpte(role_access(m.pa.meta[row, SP_ROLE]) & gpte_access(gpte), gpte)
        rec = prefetch_slot(m, vm, gfn, (access & ACC_WRITE_MASK) != 0)
        if rec < 0 or not host_page_resident(m, rec, gfn):
            break
        mmu_set_spte(m, vm, rec, row, i, access, gfn, gfn_to_hva(m.st, rec, gfn) >> 12, np.bool_(False),
                     np.bool_(False), np.bool_(True))


# ----------------------------------------------------------------------------- roots
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
        # a zapped invalid root is already off the active list; it was not counted in mmu_pages
        # by prepare_zap_one (root_count was 0 only now), so it goes straight to invalid_list


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
                    vr.rec[vg, VR_PREV_ROOT + k], vr.rec[vg, VR_PREV_PGD + k] = vr.rec[vg, VR_PREV_ROOT + (k + 1)], vr.rec[vg, VR_PREV_PGD + (k + 1)]
                vr.rec[vg, VR_PREV_ROOT + (KVM_MMU_NUM_PREV_ROOTS - 1)] = -1
                vr.rec[vg, VR_PREV_PGD + (KVM_MMU_NUM_PREV_ROOTS - 1)] = 0
                hit = True
                break
    if hit:
        m.pa.meta[vr.rec[vg, VR_ROOT], SP_FLOOD] = 0


@helper
def kvm_set_cr3(m, vm, vg, cr3, maxphyaddr):
    """kvm_set_cr3 (guest MOV to CR3, no PCID): switch roots if CR3 changed, then sync + flush."""
    mode = cpu_mode(m.vr.rec[vg, VR_CR0], m.vr.rec[vg, VR_CR4], m.vr.rec[vg, VR_EFER], m.vr.rec[vg, VR_RFLAGS]) | MODE_PSE36_KVM
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


# ----------------------------------------------------------------------------- walks
@helper
def clear_flood_on_walk(m, vm, vg, gva):
    """shadow_page_table_clear_flood: reset write_flooding_count of every page on the gva's walk."""
    row, level = walk_start(m, vg, gva)
    if row < 0:
        return
    while True:
        m.pa.meta[row, SP_FLOOD] = 0
        idx = (gva >> (12 + 9 * (level - 1))) & 511
        spte = m.pa.spt[row, idx]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return
        row = spte_to_child_row(spte)
        level -= 1


@njit(inline="always", _nrt=False)
def shadow_hw_walk(m, vm, vg, gva, pfec, mode):
    """The processor's walk of the shadow tables: (error code or 0, gpa, refs, row, idx).  Hardware
    CR0.WP is always 1 under shadow paging; SMEP/SMAP are the guest's; A/D of the leaf get set."""
    row, level = walk_start(m, vg, gva)
    refs = 0
    if row < 0:
        return pfec | HW_FAULT, 0, refs, -1, 0
    write = (pfec & PFERR_WRITE) != 0
    user = (pfec & PFERR_USER) != 0
    fetch = (pfec & PFERR_FETCH) != 0
    while True:
        idx = (gva >> (12 + 9 * (level - 1))) & 511
        spte = m.pa.spt[row, idx]
        refs += 1
        if not (spte & NPT_P):
            return pfec | HW_FAULT, 0, refs, row, idx
        if level == 1 or (spte & PT_PAGE_SIZE_MASK):
            if (write and not (spte & PT_WRITABLE_MASK)) or (user and not (spte & NPT_U)) or \
                    (fetch and spte < 0):
                return pfec | PFERR_PRESENT | HW_FAULT, 0, refs, row, idx
            if not user and (spte & NPT_U):
                from_smep = fetch and (mode & MODE_SMEP) != 0
                from_smap = not fetch and (mode & MODE_SMAP) != 0 and (mode & MODE_AC) == 0
                if from_smep or from_smap:
                    return pfec | PFERR_PRESENT | HW_FAULT, 0, refs, row, idx
            want = NPT_A | (NPT_D if write else np.int64(0))
            if (spte & want) != want:
                m.pa.spt[row, idx] = spte | want
            size_mask = (np.int64(1) << np.int64(12 + 9 * (level - 1))) - 1
            gpa = (sp_get_gfn(m, row, idx) << 12) | (gva & size_mask)
            return 0, gpa, refs, row, idx
        row = spte_to_child_row(spte)
        level -= 1


@helper
def track_write(m, vm, gpa, nbytes, mode):
    """kvm_mmu_track_write: an emulated write hit guest memory; zap what shadows the written gpte."""
    if m.vt.rec[vm, VM_INDIRECT] == 0:
        return
    gfn = gpa >> 12
    # mmu_pte_write_fetch_gpte: with CR4.PAE a 4-byte write is taken as the whole 8-byte gpte
    if (mode & MODE_PAE) and nbytes == 4:
        gpa &= ~np.int64(7)
        nbytes = 8
    gentry = np.int64(0)
    if nbytes == 8:
        gentry = gm_read64(m.gm, slot_map(m.vt, m.st), vm, gpa)
    elif nbytes == 4:
        gentry = gm_read32(m.gm, slot_map(m.vt, m.st), vm, gpa)
    m.vt.stats[vm, ST_MMU_PTE_WRITE] += 1
    sh, pa = m.sh, m.pa
    flush = False
    row = sh.hash[m.vt.rec[vm, VM_HASH_OFF] + hash_bucket(gfn)]
    while row >= 0:
        nxt = m.pa.meta[row, SP_HNEXT]
        role = pa.meta[row, SP_ROLE]
        if sp_valid(m, vm, row) and pa.meta[row, SP_GFN] == gfn and sp_has_gptes(role):
            offset = gpa & 4095
            psz = 4 if role & ROLE_HAS_4_BYTE_GPTE else 8
            # detect_write_misaligned
            misaligned = False
            if not ((offset & (psz - 1)) == 0 and nbytes == 1):
                misaligned = ((offset ^ (offset + nbytes - 1)) & ~(psz - 1)) != 0 or nbytes < 4
            flooded = False
            if not misaligned and role_level(role) > 1:
                # detect_write_flooding
                m.pa.meta[row, SP_FLOOD] += 1
                flooded = m.pa.meta[row, SP_FLOOD] >= 3
            if misaligned or flooded:
                prepare_zap_page(m, vm, row)
                m.vt.stats[vm, ST_MMU_FLOODED] += 1
            else:
                # get_written_sptes: 4-byte gptes cover half an SPTE page (level 2: two SPTEs each)
                page_offset = offset
                nspte = 1
                skip = False
                if role & ROLE_HAS_4_BYTE_GPTE:
                    page_offset <<= 1
                    if role_level(role) == 2:
                        page_offset = (page_offset & ~7) << 1
                        nspte = 2
                    skip = (page_offset >> 12) != role_quadrant(role)
                    page_offset &= 4095
                if not skip:
                    for k in range(nspte):
                        i = (page_offset >> 3) + k
                        entry = pa.spt[row, i]
                        mmu_page_zap_pte(m, vm, row, i)
                        if gentry != 0 and role_level(role) != 1:
                            m.vt.stats[vm, ST_MMU_PDE_ZAPPED] += 1
                        if is_shadow_present_pte(entry):
                            flush = True
        row = nxt
    # kvm_mmu_remote_flush_or_zap
    if not commit_zap_page(m, vm) and flush:
        flush_remote_tlbs(m, vm)


@helper
def invalidate_addr(m, vm, vg, gva, mode, maxphyaddr, all_roots):
    """kvm_mmu_invalidate_addr over the current root (and the previous roots when ``all_roots``)."""
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


# ----------------------------------------------------------------------------- the fault
@helper
def fetch(m, vm, vg, gva, wk, gfn, rec, pfn, pte_access, write_fault, host_writable, mode, maxphyaddr):
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
        # kvm_mmu_child_role
        role = (pa.meta[row, SP_ROLE] & ~np.int32(0xF) & ~np.int32(7 << ROLE_ACCESS_SHIFT) & ~np.int32(ROLE_DIRECT)
                & ~np.int32(ROLE_PASSTHROUGH)) | np.int32(level - 1) | np.int32(access << ROLE_ACCESS_SHIFT)
        if role & ROLE_HAS_4_BYTE_GPTE:
            role = (role & ~np.int32(3 << 5)) | np.int32((idx & 1) << 5)
        child = get_shadow_page(m, vm, vg, table_gfn, np.int64(role), mode, maxphyaddr)
        if m.pa.meta[child, SP_UNSYNC_CHILDREN]:
            mmu_sync_children(m, vm, vg, child, mode, maxphyaddr)
        link_shadow_page(m, vm, row, idx, child)
        row = child
        level -= 1
    # kvm_mmu_hugepage_adjust
    goal_level = 1
    if gw_level > 1 and rec >= 0 and not slot_dirty_logging(m.st, rec):
        req = invalidation_clamp_level(m.vt, vm, gfn, kvm_mmu_max_mapping_level(m.st, rec, gfn, gw_level))
        huge_disallowed = False  # the NX huge page workaround is off on shadow hosts we model
        if req > 1 and not huge_disallowed:
            goal_level = req
    direct_access = pte_access
    while level > goal_level:
        spte = pa.spt[row, idx]
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
            role = (pa.meta[row, SP_ROLE] & ~np.int32(0xF) & ~np.int32(7 << ROLE_ACCESS_SHIFT)) | np.int32(level - 1) \
                | np.int32(direct_access << ROLE_ACCESS_SHIFT) | np.int32(ROLE_DIRECT)
            if role & ROLE_HAS_4_BYTE_GPTE:
                role = (role & ~np.int32(3 << 5)) | np.int32((idx & 1) << 5)
            child = get_shadow_page(m, vm, vg, base, np.int64(role), mode, maxphyaddr)
            link_shadow_page(m, vm, row, idx, child)
            row = child
        level -= 1
        idx = (gva >> (12 + 9 * (level - 1))) & 511
    base_gfn = gfn & ~((np.int64(1) << np.int64(9 * (level - 1))) - 1)
    pfn_al = pfn & ~((np.int64(1) << np.int64(9 * (level - 1))) - 1)
    ret = mmu_set_spte(m, vm, rec, row, idx, pte_access, base_gfn, pfn_al, np.bool_(True), write_fault,
                       host_writable)
    if ret == RET_PF_SPURIOUS:
        return ret
    pte_prefetch(m, vm, row, idx, mode, maxphyaddr, 0)
    return ret


@helper
def shadow_page_fault(m, vm, vg, gva, err, mode, maxphyaddr):
    """kvm_mmu_do_page_fault -> FNAME(page_fault).  Returns (RET_PF_*, guest error code or 0)."""
    wk = m.sh.scratch  # the walker output lives at SC_WK == 0
    gm = m.gm
    pfec = err & (PFERR_WRITE | PFERR_USER | PFERR_FETCH)
    write = (err & PFERR_WRITE) != 0
    present = (err & PFERR_PRESENT) != 0
    gerr = guest_walk(gm, slot_map(m.vt, m.st), vm, mode, m.vr.rec[vg, VR_CR3], m.vr.rec[vg, VR_PDPTR:VR_PDPTR + 4], m.vr.rec[vg, VR_PKRU], maxphyaddr,
                      gva, pfec, wk)
    if gerr != 0:
        return RET_PF_GUEST, gerr & PFERR_MASK  # kvm_inject_emulated_page_fault, then RET_PF_RETRY
    gfn = wk[WK_GFN]
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec >= 0 and not (write and slot_readonly(m.st, rec)) and \
            m.host[HOST_USED_BYTES] + (host_page_pages(m.st, rec, gfn) << 12) > m.host[HOST_BUDGET_BYTES]:
        return RET_PF_OOM, 0  # the host cannot back the page: stop before any change
    set_ad_and_log(m, vm, wk, pfec)
    # page_fault_handle_page_track
    if present and write and gfn_write_tracked(m, rec, gfn):
        clear_flood_on_walk(m, vm, vg, gva)
        return RET_PF_EMULATE, 0
    pte_access = wk[WK_PTE_ACCESS] if write else wk[WK_PTE_ACCESS_CLEAN]
    # prefetch group of the leaf gpte, read now (FNAME(gpte_changed) at level 1)
    if wk[WK_LEAF_LEVEL] == 1:
        if mode_levels(mode) == 2:
            base = wk[WK_PTE_GPA + 1] & ~np.int64(31)
            for k in range(PTE_PREFETCH_NUM):
                m.sh.scratch[SC_PREFETCH + k] = gm_read32(gm, slot_map(m.vt, m.st), vm, base + 4 * k)
        else:
            base = wk[WK_PTE_GPA + 1] & ~np.int64(63)
            for k in range(PTE_PREFETCH_NUM):
                m.sh.scratch[SC_PREFETCH + k] = gm_read64(gm, slot_map(m.vt, m.st), vm, base + 8 * k)
    # kvm_faultin_pfn
    if rec < 0:
        return RET_PF_MMIO, 0  # no memslot: MMIO, emulated (MMIO caching is off on shadow hosts we model)
    if m.vt.rec[vm, VM_INVAL_COUNT] > 0 and m.vt.rec[vm, VM_INVAL_START] <= gfn < m.vt.rec[vm, VM_INVAL_END]:
        return RET_PF_RETRY, 0
    if write and slot_readonly(m.st, rec):
        return RET_PF_EMULATE, 0
    host_writable = not slot_readonly(m.st, rec)
    host_fault_in(m.st, m.vt, m.host, rec, gfn, vm)
    pfn = gfn_to_hva(m.st, rec, gfn) >> 12
    # CR0.WP=0: a supervisor write through a read-only gpte maps the page writable for the kernel only
    user = (err & PFERR_USER) != 0
    if write and not (pte_access & ACC_WRITE_MASK) and not (mode & MODE_WP) and not user:
        pte_access = (pte_access | ACC_WRITE_MASK) & ~ACC_USER_MASK
        if mode & MODE_SMEP:
            pte_access &= ~ACC_EXEC_MASK
    if not make_mmu_pages_available(m, vm):
        return RET_PF_RETRY, 0  # -ENOSPC: every page is a pinned root
    r = fetch(m, vm, vg, gva, wk, gfn, rec, pfn, pte_access, write, host_writable, mode, maxphyaddr)
    return r, 0


@njit(inline="always", _nrt=False)
def set_ad_and_log(m, vm, wk, pfec):
    """FNAME(update_accessed_dirty_bits): set guest A/D, and log the dirtied table pages."""
    changed = guest_set_ad(m.gm, slot_map(m.vt, m.st), vm, wk, pfec)
    if changed == 0:
        return
    for level in range(1, 6):
        if (changed >> level) & 1:
            tg = wk[WK_PTE_GPA + level] >> 12
            rec = gfn_to_memslot(m.vt, m.st, vm, tg)
            if rec >= 0:
                mark_page_dirty(m.st, m.ct, m.sh.scratch[SC_RUNNING_VCPU], rec, tg)


@helper
def emulated_access(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr):
    """An access by KVM's emulator (emulator_read_write): an access that crosses a page is done one
    page at a time, each part translated and (for a write) tracked on its own.  (outcome, error code)."""
    first = nbytes
    if (gva & 4095) + nbytes > 4096:
        first = 4096 - (gva & 4095)
    o, e = emulated_onepage(m, vm, vg, gva, pfec, value, first, mode, maxphyaddr)
    if first == nbytes or o != OUT_EMULATED:
        return o, e
    return emulated_onepage(m, vm, vg, gva + first, pfec, value >> np.int64(8 * first), nbytes - first, mode,
                            maxphyaddr)


@helper
def emulated_onepage(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr):
    """emulator_read_write_onepage: software walk (A/D set), memory through the memslots, and for a
    write kvm_mmu_track_write."""
    gm = m.gm
    wk = m.sh.scratch
    if mode_levels(mode) == 0:
        gpa = gva
    else:
        gerr = guest_walk(gm, slot_map(m.vt, m.st), vm, mode, m.vr.rec[vg, VR_CR3], m.vr.rec[vg, VR_PDPTR:VR_PDPTR + 4], m.vr.rec[vg, VR_PKRU],
                          maxphyaddr, gva, pfec, wk)
        if gerr != 0:
            m.vt.stats[vm, ST_PF_GUEST] += 1
            return OUT_GUEST_FAULT, gerr & PFERR_MASK
        set_ad_and_log(m, vm, wk, pfec)
        gpa = wk[WK_GPA]
    rec = gfn_to_memslot(m.vt, m.st, vm, gpa >> 12)
    if rec < 0:
        return OUT_MMIO, 0
    if pfec & PFERR_WRITE:
        if slot_readonly(m.st, rec):
            return OUT_EMULATED, 0
        if nbytes == 0:
            # an access given without a value: the operand is the 8 bytes already there
            gpa &= ~np.int64(7)
            nbytes = 8
            value = gm_read64(gm, slot_map(m.vt, m.st), vm, gpa)
        gm_write_bytes(gm, slot_map(m.vt, m.st), vm, gpa, value, nbytes)
        mark_page_dirty(m.st, m.ct, m.sh.scratch[SC_RUNNING_VCPU], rec, gpa >> 12)
        track_write(m, vm, gpa, nbytes, mode)
    return OUT_EMULATED, 0


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


@helper
def shadow_access(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr):
    """One native guest access (a store of ``value`` when nbytes > 0): (outcome, error code)."""
    stats = m.vt.stats
    stats[vm, ST_ACCESSES] += 1
    outcome = OUT_HIT
    err = np.int64(0)
    for attempt in range(MAX_EXITS):
        if attempt > 0 and entry_work_needed(m, vm, vg):
            vcpu_reenter(m, vm, vg, mode, maxphyaddr)  # vcpu_enter_guest before the access runs again
        e, gpa, refs, row, idx = shadow_hw_walk(m, vm, vg, gva, pfec, mode)
        stats[vm, ST_WALK_REFS] += refs
        if e == 0:
            if nbytes > 0:
                gm_write_bytes(m.gm, slot_map(m.vt, m.st), vm, gpa, value, nbytes)
            return outcome, err
        e &= ~HW_FAULT
        err = e
        stats[vm, ST_PF_TAKEN] += 1
        r, gerr = shadow_page_fault(m, vm, vg, gva, e, mode, maxphyaddr)
        if r == RET_PF_OOM:
            stats[vm, ST_PF_TAKEN] -= 1
            stats[vm, ST_WALK_REFS] -= refs
            if attempt == 0:
                stats[vm, ST_ACCESSES] -= 1
                return -1, err
            return OUT_RETRY, err
        if r == RET_PF_GUEST:
            # kvm_inject_emulated_page_fault: a protection fault first drops a stale SPTE (current root)
            if gerr & PFERR_PRESENT:
                invalidate_addr(m, vm, vg, gva, mode, maxphyaddr, np.bool_(False))
            stats[vm, ST_PF_GUEST] += 1
            return OUT_GUEST_FAULT, gerr
        if r == RET_PF_RETRY:
            stats[vm, ST_PF_RETRY] += 1
            return OUT_RETRY, err
        outcome = account_pf_result(stats, vm, r)
        if outcome == OUT_EMULATED:
            o, ge = emulated_access(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr)
            if r == RET_PF_MMIO:
                return OUT_MMIO, err
            return o if o == OUT_GUEST_FAULT else OUT_EMULATED, err
    return outcome, err


@kernel
def shadow_event_batch(m, ev_vm, ev_vcpu, ev_op, ev_addr, ev_kind, ev_value, ev_size, maxphy, start,
                       out_outcome, out_err):
    """Run events ev[start:] of shadow-MMU VMs in order.  Returns (next_event, STOP_*)."""
    n = ev_vm.shape[0]
    sh = m.sh
    ring_rsvd = KVM_DIRTY_RING_RSVD_ENTRIES + (PML_ENTITY_NUM if m.cfg[CFG_PML] else 0)
    for i in range(start, n):
        sh.scratch[SC_RUNNING_VCPU] = -1
        if m.pa.ctl[CTL_FREE_TOP] < MAX_ROWS_PER_EVENT or sh.ctl[SH_PL_AVAIL] < MAX_PL_PER_EVENT or \
                sh.ctl[SH_RN_AVAIL] < MAX_RN_PER_EVENT or \
                not gm_room(m.gm, MAX_GM_PER_EVENT):
            return i, STOP_NEED_PAGES
        vm = ev_vm[i]
        vg = m.ct.vcpu_off[vm] + ev_vcpu[i]
        if (m.vt.rec[vm, VM_DIRTY_MODE] & DM_RING) and dirty_ring_soft_full(m.ct, vg, ring_rsvd):
            # KVM_EXIT_DIRTY_RING_FULL: the vCPU does not run until the rings are reset
            m.vt.stats[vm, ST_DIRTY_RING_FULL] += 1
            out_outcome[i] = OUT_RING_FULL
            out_err[i] = 0
            continue
        sh.scratch[SC_RUNNING_VCPU] = vg
        op = ev_op[i]
        addr = ev_addr[i]
        kind = ev_kind[i]
        mp = maxphy[vm]
        mode = cpu_mode(m.vr.rec[vg, VR_CR0], m.vr.rec[vg, VR_CR4], m.vr.rec[vg, VR_EFER], m.vr.rec[vg, VR_RFLAGS]) | MODE_PSE36_KVM
        if entry_work_needed(m, vm, vg):
            vcpu_reenter(m, vm, vg, mode, mp)
        out_err[i] = 0
        if op == OP_ACCESS:
            if ev_size[i] == 0:
                # the common case, a translation the shadow tables already hold: no call
                e, gpa, refs, row, idx = shadow_hw_walk(m, vm, vg, addr, kind, mode)
                if e == 0:
                    m.vt.stats[vm, ST_ACCESSES] += 1
                    m.vt.stats[vm, ST_WALK_REFS] += refs
                    out_outcome[i] = OUT_HIT
                    continue
            o, e = shadow_access(m, vm, vg, addr, kind, ev_value[i], ev_size[i], mode, mp)
            if o < 0:
                sh.scratch[SC_RUNNING_VCPU] = -1
                return i, STOP_HOST_OOM
            out_outcome[i] = o
            out_err[i] = e
        elif op == OP_EMULATED:
            o, e = emulated_access(m, vm, vg, addr, kind, ev_value[i], ev_size[i], mode, mp)
            out_outcome[i] = o
            out_err[i] = e
        elif op == OP_INVLPG:
            invalidate_addr(m, vm, vg, addr, mode, mp, np.bool_(True))  # kvm_mmu_invlpg: every root
            m.vt.stats[vm, ST_INVLPG] += 1
            out_outcome[i] = OUT_EMULATED
        elif op == OP_MOV_CR3:
            kvm_set_cr3(m, vm, vg, addr, mp)
            out_outcome[i] = OUT_EMULATED
        else:
            # kvm_vcpu_flush_tlb_guest: sync the current root, free unsync prev roots
            m.vt.stats[vm, ST_TLB_FLUSH] += 1
            sync_roots(m, vm, vg, mode, mp)
            mask = np.int64(0)
            for k in range(KVM_MMU_NUM_PREV_ROOTS):
                r = m.vr.rec[vg, VR_PREV_ROOT + k]
                if r >= 0 and (m.pa.meta[r, SP_UNSYNC] or m.pa.meta[r, SP_UNSYNC_CHILDREN]):
                    mask |= 2 << k
            if mask:
                free_roots(m, vm, vg, mask)
            out_outcome[i] = OUT_EMULATED
        if entry_work_needed(m, vm, vg):
            vcpu_reenter(m, vm, vg, mode, mp)  # the guest resumes: requests raised by the exit are serviced
    sh.scratch[SC_RUNNING_VCPU] = -1
    return n, STOP_DONE


# ----------------------------------------------------------------------------- memslot events
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
        n_heads = ((m.st.rec[rec, SL_BASE_GFN] + m.st.rec[rec, SL_NPAGES] - 1) >> shift) - (m.st.rec[rec, SL_BASE_GFN] >> shift) + 1
        for h in range(off, off + n_heads):
            n = m.sh.rmap_head[h]
            while n >= 0:
                sptep = m.sh.rn[n, NODE_VAL]
                n = m.sh.rn[n, NODE_NEXT]
                row = sptep_row(sptep)
                idx = sptep_idx(sptep)
                spte = m.pa.spt[row, idx]
                if spte & PT_WRITABLE_MASK:
                    m.pa.spt[row, idx] = spte & ~PT_WRITABLE_MASK
                    flush = True
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
        rmap_write_protect_gfn(m, vm, rec, start, 2, True)  # kvm_mmu_slot_gfn_write_protect(PG_LEVEL_2M)
        if (start + 511) >> 9 != (end + 511) >> 9:  # ALIGN(start, PMD_SIZE) != ALIGN(end, PMD_SIZE)
            rmap_write_protect_gfn(m, vm, rec, end, 2, True)
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
    """kvm_mmu_write_protect_pt_masked: write-protect the 4K SPTEs of the gfns in a 64-page mask."""
    for b in range(64):
        if (mask >> np.int64(b)) & 1:
            gfn = m.st.rec[rec, SL_BASE_GFN] + first + b
            rmap_write_protect_gfn_level(m, rec, gfn, 1)


@helper
def rmap_write_protect_gfn_level(m, rec, gfn, level):
    # rmap_write_protect(pt_protect=false) on one rmap head
    n = m.sh.rmap_head[rmap_index(m.sh, m.st, rec, level, gfn)]
    while n >= 0:
        sptep = m.sh.rn[n, NODE_VAL]
        n = m.sh.rn[n, NODE_NEXT]
        row = sptep_row(sptep)
        idx = sptep_idx(sptep)
        if m.pa.spt[row, idx] & PT_WRITABLE_MASK:
            m.pa.spt[row, idx] &= ~PT_WRITABLE_MASK


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
    """kvm_mmu_zap_collapsible_sptes (rmap part): drop 4K SPTEs of direct pages that could be huge."""
    flush = False
    off = m.st.rec[rec, SL_RMAP_OFF + 0]
    if off < 0:
        return False
    for h in range(off, off + m.st.rec[rec, SL_NPAGES]):
        n = m.sh.rmap_head[h]
        while n >= 0:
            sptep = m.sh.rn[n, NODE_VAL]
            n = m.sh.rn[n, NODE_NEXT]
            row = sptep_row(sptep)
            if (m.pa.meta[row, SP_ROLE] & ROLE_DIRECT) and \
                    role_level(m.pa.meta[row, SP_ROLE]) < kvm_mmu_max_mapping_level(
                        m.st, rec, m.st.rec[rec, SL_BASE_GFN] + h - off, KVM_MAX_HUGEPAGE_LEVEL):
                drop_spte(m, vm, row, sptep_idx(sptep))
                flush = True
    return flush


@kernel
def shadow_zap_gfn_range(m, vm, rec, start, end):
    """kvm_unmap_gfn_range over the rmaps (MMU notifier): every SPTE of [start, end) at every level."""
    flush = False
    for level in range(1, KVM_MAX_HUGEPAGE_LEVEL + 1):
        if m.st.rec[rec, SL_RMAP_OFF + (level - 1)] < 0:
            continue
        shift = (level - 1) * 9
        g = (start >> shift) << shift
        while g < end:
            if g >= m.st.rec[rec, SL_BASE_GFN] or level > 1:
                gg = max(g, m.st.rec[rec, SL_BASE_GFN])
                n = m.sh.rmap_head[rmap_index(m.sh, m.st, rec, level, gg)]
                while n >= 0:
                    sptep = m.sh.rn[n, NODE_VAL]
                    n = m.sh.rn[n, NODE_NEXT]
                    drop_spte(m, vm, sptep_row(sptep), sptep_idx(sptep))
                    flush = True
            g += np.int64(1) << np.int64(shift)
    return flush


# ----------------------------------------------------------------------------- page budget, shrinker
@kernel
def zap_oldest_mmu_pages(m, vm, nr_to_zap):
    """kvm_mmu_zap_oldest_mmu_pages: zap from the oldest end of active_mmu_pages, skipping pinned roots."""
    total = 0
    restart = True
    while restart:
        restart = False
        row = m.vt.rec[vm, VM_ACT_TAIL]
        while row >= 0:
            prv = m.pa.meta[row, SP_APREV]
            if m.pa.meta[row, SP_ROOT_COUNT] > 0:
                row = prv
                continue
            used_before = m.vt.stats[vm, ST_MMU_PAGES]
            prepare_zap_page(m, vm, row)
            nr = used_before - m.vt.stats[vm, ST_MMU_PAGES]  # unsync children zapped + the page itself
            total += nr
            if total >= nr_to_zap:
                break
            if nr > 1:
                restart = True  # children were zapped: the list changed under the iterator
                break
            row = prv
    commit_zap_page(m, vm)
    m.vt.stats[vm, ST_MMU_RECYCLED] += total
    return total


@njit(inline="always", _nrt=False)
def make_mmu_pages_available(m, vm):
    """make_mmu_pages_available: keep KVM_MIN_FREE_MMU_PAGES (5) below n_max, refilling 25 at a time.
    Returns False (-ENOSPC) if not even one page is available afterwards."""
    used = m.vt.stats[vm, ST_MMU_PAGES]
    avail = m.vt.rec[vm, VM_N_MAX] - used if m.vt.rec[vm, VM_N_MAX] > used else 0
    if avail >= 5:
        return True
    zap_oldest_mmu_pages(m, vm, 25 - avail)
    used = m.vt.stats[vm, ST_MMU_PAGES]
    return m.vt.rec[vm, VM_N_MAX] > used


@kernel
def kvm_mmu_change_mmu_pages(m, vm, goal):
    # kvm_mmu_change_mmu_pages
    used = m.vt.stats[vm, ST_MMU_PAGES]
    if used > goal:
        zap_oldest_mmu_pages(m, vm, used - goal)
        goal = m.vt.stats[vm, ST_MMU_PAGES]
    m.vt.rec[vm, VM_N_MAX] = goal


# ----------------------------------------------------------------------------- notifiers
@kernel
def shadow_age_gfn_range(m, vm, rec, start, end, clear, young):
    """kvm_age_gfn / kvm_test_age_gfn over the rmaps (A/D enabled: clear the accessed bit).
    ``young[gfn - start]`` is set for each accessed 4K page.  Returns True if any was young."""
    any_young = False
    for level in range(1, KVM_MAX_HUGEPAGE_LEVEL + 1):
        if m.st.rec[rec, SL_RMAP_OFF + (level - 1)] < 0:
            continue
        shift = (level - 1) * 9
        g = (start >> shift) << shift
        while g < end:
            gg = max(g, m.st.rec[rec, SL_BASE_GFN])
            n = m.sh.rmap_head[rmap_index(m.sh, m.st, rec, level, gg)]
            hit = False
            while n >= 0:
                sptep = m.sh.rn[n, NODE_VAL]
                n = m.sh.rn[n, NODE_NEXT]
                row = sptep_row(sptep)
                idx = sptep_idx(sptep)
                spte = m.pa.spt[row, idx]
                if spte & NPT_A:
                    hit = True
                    if clear:
                        m.pa.spt[row, idx] = spte & ~NPT_A  # mmu_spte_age
            if hit:
                any_young = True
                lo = max(g, start)
                hi = min(g + (np.int64(1) << np.int64(shift)), end)
                for k in range(lo, hi):
                    young[k - start] = 1
            g += np.int64(1) << np.int64(shift)
    return any_young


# ----------------------------------------------------------------------------- footprint
@kernel
def shadow_footprint_counts(m, vm, out):
    """Objects KVM allocates for a shadow VM: out[0] pages with gptes (shadowed_translation arrays),
    out[1] pte_list_desc blocks of rmaps, out[2] of parent lists, out[3] rmap heads, out[4] write-track
    entries (only the slots of ``vm``)."""
    for k in range(5):
        out[k] = 0
    for row in range(m.pa.meta.shape[0]):
        if m.pa.meta[row, SP_VM] != vm or row >= m.sh.parent_head.shape[0]:
            continue
        if sp_has_gptes(m.pa.meta[row, SP_ROLE]):
            out[0] += 1
        c = 0
        n = m.sh.parent_head[row]
        while n >= 0:
            c += 1
            n = m.sh.pl[n, NODE_NEXT]
        if c >= 2:
            out[2] += (c + 13) // 14  # PTE_LIST_EXT = 14 pointers per descriptor
    for rec in range(m.st.rec.shape[0]):
        if rec >= m.st.rec.shape[0] or m.st.rec[rec, SL_VM] != vm or m.st.rec[rec, SL_RMAP_OFF + 0] < 0:
            continue
        for level in range(1, KVM_MAX_HUGEPAGE_LEVEL + 1):
            shift = (level - 1) * 9
            nh = ((m.st.rec[rec, SL_BASE_GFN] + m.st.rec[rec, SL_NPAGES] - 1) >> shift) - (m.st.rec[rec, SL_BASE_GFN] >> shift) + 1
            out[3] += nh
            off = m.st.rec[rec, SL_RMAP_OFF + (level - 1)]
            for h in range(off, off + nh):
                c = m.sh.rmap_cnt[h]
                if c >= 2:
                    out[1] += (c + 13) // 14
        out[4] += m.st.rec[rec, SL_NPAGES]
