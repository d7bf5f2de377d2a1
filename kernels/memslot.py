"""Memslot lookups inside kernels: gfn -> slot, lpage_info, host mapping level, host pages."""

import numpy as np
from numba import njit

from .jit import kernel
from .state import (
    BACKING_4K,
    BACKING_HUGETLB_1G,
    BACKING_HUGETLB_2M,
    HOST_BUDGET_BYTES,
    HOST_SWAPPED_BYTES,
    HOST_USED_BYTES,
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    RG_FLAGS,
    RG_OFFSET,
    RG_SLOT,
    SL_BACKING,
    SL_BASE_GFN,
    SL_DIRTY_OFF,
    SL_FLAGS,
    SL_HOST_OFF,
    SL_HVA,
    SL_LPAGE_OFF,
    SL_NPAGES,
    SL_SLOT_ID,
    ST_HOST_MAJOR_FAULTS,
    ST_HOST_PAGES_FAULTED_IN,
    ST_HOST_PAGES_SWAPPED,
    VC_RING_DIRTY,
    VC_RING_OFF,
    VC_RING_RESET,
    VC_RING_SIZE,
    VM_HOST_BYTES,
    VM_INVAL_COUNT,
    VM_INVAL_END,
    VM_INVAL_START,
    VM_SLOT_CNT,
    VM_SLOT_LAST,
    VM_SLOT_OFF,
    SlotMap,
)


@njit(inline="always", _nrt=False)
def slot_map(vt, st):
    """The SlotMap of these tables (what a gpa -> hva translation reads)."""
    return SlotMap(vt.rec, st.order, st.rec, vt.rec, np.int64(-1), np.int64(0))


@njit(inline="always", _nrt=False)
def search_memslots(sm, vm, gfn):
    """search_memslots with the last_used_slot cache over a SlotMap: record index or -1 (no slot)."""
    last = sm.vrec[vm, VM_SLOT_LAST]
    if last >= 0 and sm.srec[last, SL_BASE_GFN] <= gfn < sm.srec[last, SL_BASE_GFN] + sm.srec[last, SL_NPAGES]:
        return last
    lo = sm.vrec[vm, VM_SLOT_OFF]
    hi = lo + sm.vrec[vm, VM_SLOT_CNT]
    # rightmost slot with base_gfn <= gfn
    while lo < hi:
        mid = (lo + hi) >> 1
        if sm.srec[sm.order[mid], SL_BASE_GFN] <= gfn:
            lo = mid + 1
        else:
            hi = mid
    if lo == sm.vrec[vm, VM_SLOT_OFF]:
        return -1
    rec = sm.order[lo - 1]
    if gfn < sm.srec[rec, SL_BASE_GFN] + sm.srec[rec, SL_NPAGES]:
        sm.vrec[vm, VM_SLOT_LAST] = rec
        return rec
    return -1


@njit(inline="always", _nrt=False)
def gfn_to_memslot(vt, st, vm, gfn):
    """search_memslots: record index or -1 (no slot)."""
    return search_memslots(slot_map(vt, st), vm, gfn)


@njit(inline="always", _nrt=False)
def slot_dirty_logging(st, rec):
    # kvm_slot_dirty_track_enabled
    return (st.rec[rec, SL_FLAGS] & KVM_MEM_LOG_DIRTY_PAGES) != 0


@njit(inline="always", _nrt=False)
def slot_readonly(st, rec):
    return (st.rec[rec, SL_FLAGS] & KVM_MEM_READONLY) != 0


@njit(inline="always", _nrt=False)
def lpage_disallowed(st, rec, gfn, level):
    """lpage_info_slot(gfn, slot, level)->disallow_lpage != 0 (level 2 = 2M, 3 = 1G)."""
    shift = (level - 1) * 9
    idx = (gfn >> shift) - (st.rec[rec, SL_BASE_GFN] >> shift)
    return st.lpage[st.rec[rec, SL_LPAGE_OFF + (level - 2)] + idx] != 0


@njit(inline="always", _nrt=False)
def gfn_to_hva(st, rec, gfn):
    return st.rec[rec, SL_HVA] + ((gfn - st.rec[rec, SL_BASE_GFN]) << 12)


@njit(inline="always", _nrt=False)
def host_pfn_mapping_level(st, rec, gfn):
    """host_pfn_mapping_level: level of the host mapping that backs this gfn's hva."""
    b = st.rec[rec, SL_BACKING]
    if b == BACKING_4K:
        return 1
    if b == BACKING_HUGETLB_2M:
        return 2
    if b == BACKING_HUGETLB_1G:
        return 3
    # THP: a 2M host page exists where the aligned 2M hva range lies inside the mapping.
    hva = gfn_to_hva(st, rec, gfn)
    h2 = hva & ~np.int64((1 << 21) - 1)
    end = st.rec[rec, SL_HVA] + (st.rec[rec, SL_NPAGES] << 12)
    if h2 >= st.rec[rec, SL_HVA] and h2 + (1 << 21) <= end:
        off = gfn - st.rec[rec, SL_BASE_GFN]
        if st.split[st.rec[rec, SL_HOST_OFF] + (off >> 6)] & (np.int64(1) << (off & 63)):
            return 1  # a THP split by reclaim or MADV_DONTNEED: 4K host pages (no khugepaged)
        return 2
    return 1


@njit(inline="always", _nrt=False)
def kvm_mmu_max_mapping_level(st, rec, gfn, max_level):
    # kvm_mmu_max_mapping_level (mmu.c): lpage_info walk, then the host mapping level
    level = max_level
    while level > 1:
        if not lpage_disallowed(st, rec, gfn, level):
            break
        level -= 1
    if level == 1:
        return 1
    host_level = host_pfn_mapping_level(st, rec, gfn)
    return min(host_level, level)


@njit(inline="always", _nrt=False)
def invalidation_clamp_level(vt, vm, gfn, level):
    """The largest level <= ``level`` whose huge page around gfn meets no gfn of an MMU-notifier
    invalidation in progress.  The host splits a huge page before it changes part of it, so
    host_pfn_mapping_level sees 4K pages there until invalidate_range_end."""
    if vt.rec[vm, VM_INVAL_COUNT] == 0:
        return level
    while level > 1:
        span = np.int64(1) << np.int64(9 * (level - 1))
        base = gfn & ~(span - 1)
        if base + span <= vt.rec[vm, VM_INVAL_START] or base >= vt.rec[vm, VM_INVAL_END]:
            break
        level -= 1
    return level


@njit(inline="always", _nrt=False)
def host_page_pages(st, rec, gfn):
    """4K pages the host must allocate to back gfn: 0 if resident, else its host page's size."""
    off = gfn - st.rec[rec, SL_BASE_GFN]
    if st.host[st.rec[rec, SL_HOST_OFF] + (off >> 6)] & (np.int64(1) << (off & 63)):
        return np.int64(0)
    return np.int64(1) << (9 * (host_pfn_mapping_level(st, rec, gfn) - 1))


@njit(inline="always", _nrt=False)
def host_page_needs_budget(st, host, rec, gfn, write):
    """True when the fault would fault a host page in (gfn in memslot ``rec``, not a write to a read-only slot)
    and that page does not fit the host memory budget: the batch stops before any change."""
    return rec >= 0 and not (write and slot_readonly(st, rec)) and \
        host[HOST_USED_BYTES] + (host_page_pages(st, rec, gfn) << 12) > host[HOST_BUDGET_BYTES]


@njit(inline="always", _nrt=False)
def host_fault_in(st, vt, host, rec, gfn, vm):
    """Make the host page behind gfn resident (get_user_pages).  False: host budget exhausted."""
    npg = host_page_pages(st, rec, gfn)
    if npg == 0:
        return True
    nbytes = npg << 12
    if host[HOST_USED_BYTES] + nbytes > host[HOST_BUDGET_BYTES]:
        return False
    host[HOST_USED_BYTES] += nbytes
    vt.rec[vm, VM_HOST_BYTES] += nbytes
    vt.stats[vm, ST_HOST_PAGES_FAULTED_IN] += 1
    if npg == 1:
        off = gfn - st.rec[rec, SL_BASE_GFN]
        w = st.rec[rec, SL_HOST_OFF] + (off >> 6)
        bit = np.int64(1) << (off & 63)
        st.host[w] |= bit
        if st.swap[w] & bit:  # swapped out by reclaim: a major fault reads it back
            st.swap[w] &= ~bit
            host[HOST_SWAPPED_BYTES] -= 4096
            vt.stats[vm, ST_HOST_MAJOR_FAULTS] += 1
            vt.stats[vm, ST_HOST_PAGES_SWAPPED] -= 1
    else:
        # The huge host page covers gfns congruent with its aligned hva range.
        hva = gfn_to_hva(st, rec, gfn)
        first_hva = hva & ~np.int64((npg << 12) - 1)
        first = (first_hva - st.rec[rec, SL_HVA]) >> 12
        set_bit_range(st.host, st.rec[rec, SL_HOST_OFF], first, npg)
    return True


@njit(inline="always", _nrt=False)
def set_bit_range(words, base, first, n):
    """Set bits first..first+n-1 of the bitmap that starts at words[base]."""
    end = first + n
    p = first
    while p < end:
        if (p & 63) == 0 and p + 64 <= end:
            words[base + (p >> 6)] = np.int64(-1)
            p += 64
        else:
            words[base + (p >> 6)] |= np.int64(1) << (p & 63)
            p += 1


@njit(inline="always", _nrt=False)
def mark_page_dirty(st, ct, vcpu_g, rec, gfn):
    """mark_page_dirty_in_slot: push to the running vCPU's dirty ring, else set the bitmap bit
    (``vcpu_g`` -1: no running vCPU); nothing for a slot that does not log."""
    if not slot_dirty_logging(st, rec):
        return
    rel = gfn - st.rec[rec, SL_BASE_GFN]
    size = ct.rec[vcpu_g, VC_RING_SIZE] if vcpu_g >= 0 else 0
    if size > 0:
        # kvm_dirty_ring_push: the ring never overruns (the soft limit stops the vCPU first)
        idx = ct.rec[vcpu_g, VC_RING_OFF] + (ct.rec[vcpu_g, VC_RING_DIRTY] & (size - 1))
        ct.ring[idx, RG_FLAGS] = KVM_DIRTY_GFN_F_DIRTY
        ct.ring[idx, RG_SLOT] = st.rec[rec, SL_SLOT_ID]
        ct.ring[idx, RG_OFFSET] = rel
        ct.rec[vcpu_g, VC_RING_DIRTY] += 1
        return
    off = st.rec[rec, SL_DIRTY_OFF]
    if off < 0:
        return
    st.dirty[off + (rel >> 6)] |= np.int64(1) << (rel & 63)


@njit(inline="always", _nrt=False)
def dirty_ring_soft_full(ct, vcpu_g, rsvd):
    """kvm_dirty_ring_soft_full: the vCPU must exit (KVM_EXIT_DIRTY_RING_FULL) before it runs."""
    size = ct.rec[vcpu_g, VC_RING_SIZE]
    return size > 0 and ct.rec[vcpu_g, VC_RING_DIRTY] - ct.rec[vcpu_g, VC_RING_RESET] >= size - rsvd


@kernel
def host_touch_need(st, rec, first_gfn, end_gfn):
    """Bytes host_touch_range(first_gfn, end_gfn) would make resident; changes nothing."""
    need = np.int64(0)
    gfn = first_gfn
    while gfn < end_gfn:
        npg = host_page_pages(st, rec, gfn)
        need += npg << 12
        if npg <= 1:
            gfn += 1
        else:  # a huge host page: its other gfns are resident once it is
            first = ((gfn_to_hva(st, rec, gfn) & ~((npg << 12) - 1)) - st.rec[rec, SL_HVA]) >> 12
            gfn = st.rec[rec, SL_BASE_GFN] + first + npg
    return need


@kernel
def host_touch_range(st, vt, host, rec, first_gfn, end_gfn, vm):
    """Userspace touches guest memory through its mapping (memset, a write of page-table contents):
    every host page behind [first_gfn, end_gfn) becomes resident.  Returns the gfn it stopped at
    (end_gfn, or the first page the host budget cannot back)."""
    for gfn in range(first_gfn, end_gfn):
        if not host_fault_in(st, vt, host, rec, gfn, vm):
            return gfn
    return end_gfn
