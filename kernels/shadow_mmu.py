"""mmu.c's shadow half: the (gfn, role) hash, shadow-page alloc/free and the active list, rmaps and the
``mmu_spte_*`` chokepoint, unsync bookkeeping, zapping, the page budget and shrinker.

Shadow SPTEs use the legacy (NPT) layout with A/D bits; the direct pages of the legacy TDP MMU (a VM with
kvm.tdp_mmu=N) use the VM's TDP format (``VM_FMT``: EPT, with A/D bits or not, or NPT).  The shadow MMU's
functions take the ``MMU`` bundle ``m`` (kernels/state.py).  Single-threaded: no mmu_lock, no races, so KVM's
re-checks after taking the lock (``gpte_changed``, ``is_page_fault_stale``) never fire except for MMU-notifier
invalidations.
"""

import numpy as np
from numba import njit

from .dirty import tdp_write_protect_gfn
from .gmem import gm_read32, gm_read64
from .jit import helper, kernel
from .memslot import (
    gfn_to_memslot,
    slot_map,
)
from .mmu_internal import (
    KVM_PAGE_ARRAY_NR,
    PAE_ROOT,
    RMAP_RECYCLE_THRESHOLD,
    SC_INVALID_HEAD,
    SC_MARK_STACK,
    SC_MARK_STACK_LEN,
    SC_PVEC_IDX,
    SC_PVEC_PAR,
    SC_PVEC_SP,
    SC_STACK,
    scratch,
    unaccount_nx_huge_page,
)
from .rmap import parent_remove, pte_list_add, pte_list_remove, rmap_get_next, rmap_index
from .spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    PT_WRITABLE_MASK,
    ROLE_ACCESS_SHIFT,
    ROLE_DIRECT,
    ROLE_HAS_4_BYTE_GPTE,
    ROLE_INVALID,
    ROLE_PASSTHROUGH,
    SHADOW_NONPRESENT_VALUE,
    is_large_pte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    shadow_mmu_writable_mask,
    spte_to_child_row,
)
from .state import (
    CTL_FREE_TOP,
    CTL_USED,
    MMU_TDP,
    RM_HEAD,
    SL_BASE_GFN,
    SL_LPAGE_OFF,
    SL_RMAP_OFF,
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
    SP_PARENT_HEAD,
    SP_ROLE,
    SP_ROOT_COUNT,
    SP_UBITMAP,
    SP_UNSYNC,
    SP_UNSYNC_CHILDREN,
    SP_VM,
    SPF_NX_DISALLOWED,
    ST_MAX_MMU_RMAP_SIZE,
    ST_MMU_PAGES,
    ST_MMU_RECYCLED,
    ST_MMU_SHADOW_ZAPPED,
    ST_MMU_UNSYNC,
    ST_PAGES_4K,
    ST_REMOTE_TLB_FLUSH,
    ST_REMOTE_TLB_FLUSH_REQUESTS,
    ST_RMAP_ENTRIES,
    VM_ACT_HEAD,
    VM_ACT_TAIL,
    VM_FMT,
    VM_HASH_OFF,
    VM_INDIRECT,
    VM_MMU,
    VM_N_MAX,
    VM_N_USED,
    VM_VALID_GEN,
    VR_PAE_ROOT,
    VR_ROOT,
)


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
    return page_valid(m.pa, m.vt, vm, row)


@njit(inline="always", _nrt=False)
def memslots_have_rmaps(vt, vm):
    # kvm_memslots_have_rmaps: the shadow MMU's code has pages here (the hash exists: shadow paging, legacy TDP,
    # or a TDP-MMU VM's first guest_mmu root, mmu_first_shadow_root_alloc)
    return vt.rec[vm, VM_HASH_OFF] >= 0


@njit(inline="always", _nrt=False)
def page_valid(pa, vt, vm, row):
    # !is_obsolete_sp: not invalid and of the current generation
    return (pa.meta[row, SP_ROLE] & ROLE_INVALID) == 0 and pa.meta[row, SP_GEN] == vt.rec[vm, VM_VALID_GEN]


_GOLDEN_HI = np.int64(0x61C88646)   # GOLDEN_RATIO_64 (0x61C8864680B583EB) in 32-bit halves
_GOLDEN_LO = np.int64(0x80B583EB)


@njit(inline="always", _nrt=False)
def hash_bucket(gfn):
    """kvm_page_table_hashfn: hash_64(gfn, KVM_MMU_HASH_SHIFT), the top 12 bits of the low 64 of gfn *
    GOLDEN_RATIO_64, in 32-bit pieces so that nothing wraps (gfn < 2**52)."""
    xl = gfn & 0xFFFFFFFF
    xh = (gfn >> 32) & 0xFFFFF
    lo_b = (xl & 0xFFFF) * _GOLDEN_LO          # xl * GOLDEN_LO, 16 bits of xl at a time (< 2**48 each)
    lo_a = (xl >> 16) * _GOLDEN_LO
    carry = ((lo_b & 0xFFFFFFFF) + ((lo_a & 0xFFFF) << 16)) >> 32
    high = (lo_b >> 32) + (lo_a >> 16) + carry     # bits 32.. of xl * GOLDEN_LO
    return ((high + xh * _GOLDEN_LO + xl * _GOLDEN_HI) & 0xFFFFFFFF) >> 20


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
    return write_tracked(m.st, m.sh, rec, gfn)


@njit(inline="always", _nrt=False)
def write_tracked(st, sh, rec, gfn):
    # kvm_gfn_is_write_tracked
    if rec < 0 or st.rec[rec, SL_WTRACK_OFF] < 0:
        return False
    return sh.wtrack[st.rec[rec, SL_WTRACK_OFF] + gfn - st.rec[rec, SL_BASE_GFN]] > 0


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
def rmap_add(m, vm, rec, row, idx, gfn, access):
    # __rmap_add: record the translation, count the page, chain the SPTE
    sh = m.sh
    role = m.pa.meta[row, SP_ROLE]
    if sp_has_gptes(role):   # kvm_mmu_page_set_translation: a direct page's gfn and access follow from its role
        sh.trans[row, idx] = (gfn << 12) | access
    level = role_level(role)
    m.vt.stats[vm, ST_PAGES_4K + level - 1] += 1
    m.vt.stats[vm, ST_RMAP_ENTRIES] += 1
    h = rmap_index(sh, m.st, rec, level, gfn)
    cnt = pte_list_add(sh, h, row * 512 + idx)
    if cnt > m.vt.stats[vm, ST_MAX_MMU_RMAP_SIZE]:
        m.vt.stats[vm, ST_MAX_MMU_RMAP_SIZE] = cnt
    if cnt > RMAP_RECYCLE_THRESHOLD:
        # kvm_zap_all_rmap_sptes + flush
        n = sh.rmap[h, RM_HEAD]
        while n >= 0:
            r, i, n = rmap_get_next(sh.rn, n)
            drop_spte(m, vm, r, i)
        flush_remote_tlbs(m, vm)


# ----------------------------------------------------------------------------- the SPTE chokepoint
# Every store into a shadow page goes through these (mmu.c's mmu_spte_* family); only a fresh page's fill
# (the kvm_mmu_memory_cache's init value) and the processor's A/D updates (hw.py) write around them.
@njit(inline="always", _nrt=False)
def mmu_spte_update_no_track(spt, row, idx, new):
    """mmu_spte_update_no_track: store ``new``; returns the old SPTE."""
    old = spt[row, idx]
    spt[row, idx] = new
    return old


@njit(inline="always", _nrt=False)
def mmu_spte_update(spt, fmt, row, idx, new):
    """mmu_spte_update: returns True when the change needs a TLB flush (MMU-writable dropped)."""
    old = mmu_spte_update_no_track(spt, row, idx, new)
    if not is_shadow_present_pte(old):
        return False
    return is_mmu_writable_spte(fmt, old) and not is_mmu_writable_spte(fmt, new)


@njit(inline="always", _nrt=False)
def mmu_spte_set(spt, row, idx, new):
    # mmu_spte_set: a non-present SPTE becomes present (a table link)
    mmu_spte_update_no_track(spt, row, idx, new)


@njit(inline="always", _nrt=False)
def mmu_spte_clear_track_bits(spt, row, idx):
    # mmu_spte_clear_track_bits: clear a leaf; returns the old SPTE
    return mmu_spte_update_no_track(spt, row, idx, SHADOW_NONPRESENT_VALUE)


@njit(inline="always", _nrt=False)
def mmu_spte_clear_no_track(spt, row, idx):
    mmu_spte_update_no_track(spt, row, idx, SHADOW_NONPRESENT_VALUE)


@helper
def drop_spte(m, vm, row, idx):
    """drop_spte: clear a leaf SPTE, uncount it and take it off its rmap."""
    old = mmu_spte_clear_track_bits(m.pa.spt, row, idx)
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




@helper
def drop_parent_pte(m, child, prow, pidx):
    # drop_parent_pte: unlink and clear the parent SPTE
    parent_remove(m.pa, m.sh, child, prow * 512 + pidx)
    mmu_spte_clear_no_track(m.pa.spt, prow, pidx)


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
        mmu_spte_clear_no_track(m.pa.spt, row, idx)


@helper
def slot_gfn_write_protect(m, vm, rec, gfn, min_level, pt_protect):
    """kvm_mmu_slot_gfn_write_protect: over the rmaps and, for a TDP-MMU VM (nested EPT / NPT's guest_mmu beside
    it), kvm_tdp_mmu_write_protect_gfn.  True if a flush is needed."""
    flush = False
    if m.vt.rec[vm, VM_MMU] == MMU_TDP:
        flush = tdp_write_protect_gfn(m.pa, m.vt, vm, gfn, min_level)
    sh = m.sh
    fmt = m.vt.rec[vm, VM_FMT]
    for level in range(min_level, KVM_MAX_HUGEPAGE_LEVEL + 1):
        if m.st.rec[rec, SL_RMAP_OFF + (level - 1)] < 0:
            continue
        n = sh.rmap[rmap_index(sh, m.st, rec, level, gfn), RM_HEAD]
        while n >= 0:
            row, idx, n = rmap_get_next(sh.rn, n)
            spte = m.pa.spt[row, idx]
            # spte_write_protect
            if not (spte & PT_WRITABLE_MASK) and not (pt_protect and is_mmu_writable_spte(fmt, spte)):
                continue
            new = spte & ~PT_WRITABLE_MASK
            if pt_protect:
                new &= ~shadow_mmu_writable_mask(fmt)
            flush |= mmu_spte_update(m.pa.spt, fmt, row, idx, new)
    return flush


@helper
def account_shadowed(m, vm, row):
    # account_shadowed: upper levels are write-tracked, last-level tables only write-protected
    m.vt.rec[vm, VM_INDIRECT] += 1
    gfn = m.pa.meta[row, SP_GFN]
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec < 0:
        return
    if role_level(m.pa.meta[row, SP_ROLE]) > 1:
        # __kvm_write_track_add_gfn (the arrays exist once a VM has a shadow root: mmu_first_shadow_root_alloc)
        if m.st.rec[rec, SL_WTRACK_OFF] >= 0:
            m.sh.wtrack[m.st.rec[rec, SL_WTRACK_OFF] + gfn - m.st.rec[rec, SL_BASE_GFN]] += 1
        update_disallow_lpage(m, rec, gfn, 1)
        if slot_gfn_write_protect(m, vm, rec, gfn, 1, True):
            flush_remote_tlbs(m, vm)
        return
    update_disallow_lpage(m, rec, gfn, 1)
    if slot_gfn_write_protect(m, vm, rec, gfn, 1, True):
        flush_remote_tlbs(m, vm)  # kvm_flush_remote_tlbs_gfn


@helper
def unaccount_shadowed(m, vm, row):
    m.vt.rec[vm, VM_INDIRECT] -= 1
    gfn = m.pa.meta[row, SP_GFN]
    rec = gfn_to_memslot(m.vt, m.st, vm, gfn)
    if rec < 0:
        return
    if role_level(m.pa.meta[row, SP_ROLE]) > 1 and m.st.rec[rec, SL_WTRACK_OFF] >= 0:
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
        m.pa.meta[row, SP_UBITMAP + k] = 0
    m.pa.meta[row, SP_ROOT_COUNT] = 0
    m.pa.meta[row, SP_FLOOD] = 0
    m.pa.meta[row, SP_GEN] = m.vt.rec[vm, VM_VALID_GEN]
    m.pa.meta[row, SP_PARENT_HEAD] = -1
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
    m.vt.rec[vm, VM_N_USED] += 1   # kvm_account_mmu_page
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
    if m.pa.meta[row, SP_UBITMAP + w] & bit:
        m.pa.meta[row, SP_UBITMAP + w] &= ~bit
        m.pa.meta[row, SP_UNSYNC_CHILDREN] -= 1


@helper
def mark_parents_unsync(pa, sh, row):
    """kvm_mmu_mark_parents_unsync: set the child bit in every parent, recursing on 0 -> 1."""
    sc = scratch(sh)
    sc[SC_MARK_STACK] = row
    sp_ = 1
    while sp_ > 0:
        sp_ -= 1
        r = sc[SC_MARK_STACK + sp_]
        n = pa.meta[r, SP_PARENT_HEAD]
        while n >= 0:
            prow, pidx, n = rmap_get_next(sh.pl, n)
            w = pidx >> 6
            bit = np.int64(1) << np.int64(pidx & 63)
            if pa.meta[prow, SP_UBITMAP + w] & bit:
                continue
            pa.meta[prow, SP_UBITMAP + w] |= bit
            c = pa.meta[prow, SP_UNSYNC_CHILDREN]
            pa.meta[prow, SP_UNSYNC_CHILDREN] = c + 1
            if c == 0 and sp_ < SC_MARK_STACK_LEN:
                sc[SC_MARK_STACK + sp_] = prow
                sp_ += 1


@helper
def mmu_unsync_walk(m, row):
    """mmu_unsync_walk: collect up to 16 entries (``row`` first, then tables with unsync children and
    unsync last-level pages, depth first) into the pvec.  Returns the number of entries."""
    sh, pa = m.sh, m.pa
    sc = scratch(sh)
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
            if m.pa.meta[sp, SP_UBITMAP + w] == 0:
                bit = (w + 1) << 6
                continue
            if not (m.pa.meta[sp, SP_UBITMAP + w] >> np.int64(bit & 63)) & 1:
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
    sc = scratch(m.sh)
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
    sc = scratch(m.sh)
    m.pa.meta[row, SP_ANEXT] = sc[SC_INVALID_HEAD]
    sc[SC_INVALID_HEAD] = row


@helper
def commit_zap_page(m, vm):
    """kvm_mmu_commit_zap_page: one flush, then free every page on invalid_list."""
    sc = scratch(m.sh)
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
    n = m.pa.meta[row, SP_PARENT_HEAD]
    while n >= 0:
        prow, pidx, n = rmap_get_next(sh.pl, n)
        drop_parent_pte(m, row, prow, pidx)
    role = pa.meta[row, SP_ROLE]
    if not (role & ROLE_INVALID) and sp_has_gptes(role):
        unaccount_shadowed(m, vm, row)
    if pa.meta[row, SP_FLAGS] & SPF_NX_DISALLOWED:
        unaccount_nx_huge_page(pa, m.vt, vm, row)
    if m.pa.meta[row, SP_UNSYNC]:
        kvm_unlink_unsync_page(m, vm, row)
    if m.pa.meta[row, SP_ROOT_COUNT] == 0:
        if not (role & ROLE_INVALID):
            active_list_del(m, vm, row)
        m.vt.stats[vm, ST_MMU_PAGES] -= 1
        m.vt.rec[vm, VM_N_USED] -= 1
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
            used_before = m.vt.rec[vm, VM_N_USED]
            prepare_zap_page(m, vm, row)
            nr = used_before - m.vt.rec[vm, VM_N_USED]  # unsync children zapped + the page itself
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
    used = m.vt.rec[vm, VM_N_USED]
    avail = m.vt.rec[vm, VM_N_MAX] - used if m.vt.rec[vm, VM_N_MAX] > used else 0
    if avail >= 5:
        return True
    zap_oldest_mmu_pages(m, vm, 25 - avail)
    used = m.vt.rec[vm, VM_N_USED]
    return m.vt.rec[vm, VM_N_MAX] > used


@kernel
def kvm_mmu_change_mmu_pages(m, vm, goal):
    # kvm_mmu_change_mmu_pages
    used = m.vt.rec[vm, VM_N_USED]
    if used > goal:
        zap_oldest_mmu_pages(m, vm, used - goal)
        goal = m.vt.rec[vm, VM_N_USED]
    m.vt.rec[vm, VM_N_MAX] = goal
