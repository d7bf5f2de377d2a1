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
    ST_HOST_MAJOR_FAULTS,
    ST_HOST_PAGES_FAULTED_IN,
    ST_HOST_PAGES_SWAPPED,
    SlotMap,
)


@njit(inline="always", _nrt=False)
def slot_map(vt, st):
    """The SlotMap of these tables (what a gpa -> hva translation reads)."""
    return SlotMap(vt.slot_last, vt.slot_off, vt.slot_cnt, st.order, st.base_gfn, st.npages, st.hva)


@njit(inline="always", _nrt=False)
def search_memslots(sm, vm, gfn):
    """search_memslots with the last_used_slot cache over a SlotMap: record index or -1 (no slot)."""
    last = sm.slot_last[vm]
    if last >= 0 and sm.base_gfn[last] <= gfn < sm.base_gfn[last] + sm.npages[last]:
        return last
    lo = sm.slot_off[vm]
    hi = lo + sm.slot_cnt[vm]
    # rightmost slot with base_gfn <= gfn
    while lo < hi:
        mid = (lo + hi) >> 1
        if sm.base_gfn[sm.order[mid]] <= gfn:
            lo = mid + 1
        else:
            hi = mid
    if lo == sm.slot_off[vm]:
        return -1
    rec = sm.order[lo - 1]
    if gfn < sm.base_gfn[rec] + sm.npages[rec]:
        sm.slot_last[vm] = rec
        return rec
    return -1


@njit(inline="always", _nrt=False)
def gfn_to_memslot(vt, st, vm, gfn):
    """search_memslots: record index or -1 (no slot)."""
    return search_memslots(slot_map(vt, st), vm, gfn)


@njit(inline="always", _nrt=False)
def slot_dirty_logging(st, rec):
    # kvm_slot_dirty_track_enabled
    return (st.flags[rec] & KVM_MEM_LOG_DIRTY_PAGES) != 0


@njit(inline="always", _nrt=False)
def slot_readonly(st, rec):
    return (st.flags[rec] & KVM_MEM_READONLY) != 0


@njit(inline="always", _nrt=False)
def lpage_disallowed(st, rec, gfn, level):
    """lpage_info_slot(gfn, slot, level)->disallow_lpage != 0 (level 2 = 2M, 3 = 1G)."""
    shift = (level - 1) * 9
    idx = (gfn >> shift) - (st.base_gfn[rec] >> shift)
    return st.lpage[st.lpage_off[rec, level - 2] + idx] != 0


@njit(inline="always", _nrt=False)
def gfn_to_hva(st, rec, gfn):
    return st.hva[rec] + ((gfn - st.base_gfn[rec]) << 12)


@njit(inline="always", _nrt=False)
def host_pfn_mapping_level(st, rec, gfn):
    """host_pfn_mapping_level: level of the host mapping that backs this gfn's hva."""
    b = st.backing[rec]
    if b == BACKING_4K:
        return 1
    if b == BACKING_HUGETLB_2M:
        return 2
    if b == BACKING_HUGETLB_1G:
        return 3
    # THP: a 2M host page exists where the aligned 2M hva range lies inside the mapping.
    hva = gfn_to_hva(st, rec, gfn)
    h2 = hva & ~np.int64((1 << 21) - 1)
    end = st.hva[rec] + (st.npages[rec] << 12)
    if h2 >= st.hva[rec] and h2 + (1 << 21) <= end:
        off = gfn - st.base_gfn[rec]
        if st.split[st.host_off[rec] + (off >> 6)] & (np.int64(1) << (off & 63)):
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
    if vt.inval_count[vm] == 0:
        return level
    while level > 1:
        span = np.int64(1) << np.int64(9 * (level - 1))
        base = gfn & ~(span - 1)
        if base + span <= vt.inval_start[vm] or base >= vt.inval_end[vm]:
            break
        level -= 1
    return level


@njit(inline="always", _nrt=False)
def host_page_pages(st, rec, gfn):
    """4K pages the host must allocate to back gfn: 0 if resident, else its host page's size."""
    off = gfn - st.base_gfn[rec]
    if st.host[st.host_off[rec] + (off >> 6)] & (np.int64(1) << (off & 63)):
        return np.int64(0)
    return np.int64(1) << (9 * (host_pfn_mapping_level(st, rec, gfn) - 1))


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
    vt.host_bytes[vm] += nbytes
    vt.stats[vm, ST_HOST_PAGES_FAULTED_IN] += 1
    if npg == 1:
        off = gfn - st.base_gfn[rec]
        w = st.host_off[rec] + (off >> 6)
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
        first = (first_hva - st.hva[rec]) >> 12
        set_bit_range(st.host, st.host_off[rec], first, npg)
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
    rel = gfn - st.base_gfn[rec]
    size = ct.ring_size[vcpu_g] if vcpu_g >= 0 else 0
    if size > 0:
        # kvm_dirty_ring_push: the ring never overruns (the soft limit stops the vCPU first)
        idx = ct.ring_off[vcpu_g] + (ct.ring_dirty[vcpu_g] & (size - 1))
        ct.ring_slot[idx] = st.slot_id[rec]
        ct.ring_gfn[idx] = rel
        ct.ring_flags[idx] = KVM_DIRTY_GFN_F_DIRTY
        ct.ring_dirty[vcpu_g] += 1
        return
    off = st.dirty_off[rec]
    if off < 0:
        return
    st.dirty[off + (rel >> 6)] |= np.int64(1) << (rel & 63)


@njit(inline="always", _nrt=False)
def dirty_ring_soft_full(ct, vcpu_g, rsvd):
    """kvm_dirty_ring_soft_full: the vCPU must exit (KVM_EXIT_DIRTY_RING_FULL) before it runs."""
    size = ct.ring_size[vcpu_g]
    return size > 0 and ct.ring_dirty[vcpu_g] - ct.ring_reset[vcpu_g] >= size - rsvd


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
            first = ((gfn_to_hva(st, rec, gfn) & ~((npg << 12) - 1)) - st.hva[rec]) >> 12
            gfn = st.base_gfn[rec] + first + npg
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
