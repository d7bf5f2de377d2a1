"""Host memory reclaim over the per-slot host bitmaps: aging, swap-out, MADV_DONTNEED.

The host keeps, per memslot, a resident bit, a swapped bit and a THP-split bit per 4K page and,
with overcommit, a reclaim age byte per 4K page (``SlotTable.host/swap/split/age``).  A *folio* is
the host's LRU unit: a 4K page, or the 512 pages of an unsplit THP.  What these kernels model of
mm/vmscan.c and mm/huge_memory.c, and of KVM's side of it (the MMU notifier), is described in
docs/host_memory.md.
"""

import numpy as np
from numba import njit

from .jit import kernel
from .memslot import host_pfn_mapping_level
from .notifier import tdp_age_range, tdp_zap_leafs
from .shadow_mmu import memslots_have_rmaps
from .slot_rmap import shadow_age_gfn_range, shadow_zap_gfn_range
from .state import (
    BACKING_HUGETLB_1G,
    BACKING_HUGETLB_2M,
    BACKING_THP,
    HOST_SWAPPED_BYTES,
    HOST_USED_BYTES,
    MMU_TDP,
    SL_BACKING,
    SL_BASE_GFN,
    SL_HOST_OFF,
    SL_HVA,
    SL_NPAGES,
    SL_SLOT_ID,
    ST_HOST_PAGES_RECLAIMED,
    ST_HOST_PAGES_SWAPPED,
    ST_HOST_THP_SPLITS,
    ST_REMOTE_TLB_FLUSH,
    ST_REMOTE_TLB_FLUSH_REQUESTS,
    VM_HOST_BYTES,
    VM_MMU,
)

MAX_AGE = 255          # ages saturate here (a byte per page)
NAGES = MAX_AGE + 1


@njit(inline="always", _nrt=False)
def _bit(words, base, p):
    return (words[base + (p >> 6)] >> (p & 63)) & 1


@njit(inline="always", _nrt=False)
def _set_bits(words, base, first, n, on):
    """Set (``on``) or clear bits first..first+n-1 of the bitmap at words[base]."""
    p = first
    end = first + n
    while p < end:
        if (p & 63) == 0 and p + 64 <= end:
            words[base + (p >> 6)] = np.int64(-1) if on else np.int64(0)
            p += 64
        else:
            if on:
                words[base + (p >> 6)] |= np.int64(1) << (p & 63)
            else:
                words[base + (p >> 6)] &= ~(np.int64(1) << (p & 63))
            p += 1


@njit(inline="always", _nrt=False)
def _evictable(st, rec):
    # hugetlbfs pages are not on the LRU: never reclaimed
    b = st.rec[rec, SL_BACKING]
    return b != BACKING_HUGETLB_2M and b != BACKING_HUGETLB_1G


@njit(inline="always", _nrt=False)
def _thp_region(st, rec, p):
    """First slot page of the 2M host region behind page ``p`` if the slot's mapping holds the whole
    aligned 2M hva range (THP backing), else -1."""
    if st.rec[rec, SL_BACKING] != BACKING_THP:
        return np.int64(-1)
    hva = st.rec[rec, SL_HVA] + (p << 12)
    h2 = hva & ~np.int64((1 << 21) - 1)
    if h2 < st.rec[rec, SL_HVA] or h2 + (1 << 21) > st.rec[rec, SL_HVA] + (st.rec[rec, SL_NPAGES] << 12):
        return np.int64(-1)
    return (h2 - st.rec[rec, SL_HVA]) >> 12


@njit(inline="always", _nrt=False)
def _folio(st, rec, p):
    """(first page, pages) of the resident folio holding slot page ``p``."""
    if host_pfn_mapping_level(st, rec, st.rec[rec, SL_BASE_GFN] + p) == 2:  # an unsplit THP
        h2 = (st.rec[rec, SL_HVA] + (p << 12)) & ~np.int64((1 << 21) - 1)
        return (h2 - st.rec[rec, SL_HVA]) >> 12, np.int64(512)
    return p, np.int64(1)


@njit(inline="always", _nrt=False)
def _next_resident(st, off, p, n):
    """The first resident page >= p of a slot (n pages, bitmap at host[off]), or n."""
    while p < n:
        w = st.host[off + (p >> 6)] >> (p & 63)
        if w == 0:
            p = ((p >> 6) + 1) << 6
            continue
        while not w & 1:
            w >>= 1
            p += 1
        return p
    return n


@njit(inline="always", _nrt=False)
def _age_range(m, vm, rec, g0, g1, young):
    # kvm_age_gfn for [g0, g1) of slot rec: the rmaps (shadow paging, legacy TDP, guest_mmu), then the TDP MMU
    y = False
    if memslots_have_rmaps(m.vt, vm):
        y = shadow_age_gfn_range(m, vm, rec, g0, g1, np.bool_(True), young)
    if m.vt.rec[vm, VM_MMU] == MMU_TDP:
        y |= tdp_age_range(m.pa, m.vt, vm, g0, g1, np.bool_(True), young)
    return y


@njit(inline="always", _nrt=False)
def _zap_range(m, vm, rec, g0, g1):
    # kvm_unmap_gfn_range for [g0, g1) of slot rec: SPTEs zapped
    n = 0
    if memslots_have_rmaps(m.vt, vm):
        n = shadow_zap_gfn_range(m, vm, rec, g0, g1)
    if m.vt.rec[vm, VM_MMU] == MMU_TDP:
        n += tdp_zap_leafs(m.pa, m.vt, vm, g0, g1)
    return n


@njit(inline="always", _nrt=False)
def _lay(lay, k):
    """A VM's slots for reclaim in one array (batchmmu/reclaim.py ``vm_layout``): lay[0] = n, the records at
    lay[1:1+n], the offsets of their alias lists at lay[1+n:2+2n], the alias lists after them.  Returns
    (record k, first and end index in ``lay`` of the records sharing its host pages)."""
    n = lay[0]
    base = 2 + 2 * n
    return lay[1 + k], base + lay[1 + n + k], base + lay[2 + n + k]


@kernel
def reclaim_scan(m, vm, lay, work):
    """One aging pass of the LRU over the VM's slots (``lay``: see _lay; folio_referenced -> mmu_notifier
    clear_young -> kvm_age_gfn, no flush on x86): a folio any of whose SPTEs was accessed becomes age 0,
    others get one older.  work[age] += pages of evictable folios (work[:NAGES]); work[NAGES:] is the young
    map of one folio."""
    st = m.st
    hist = work[:NAGES]
    scratch = work[NAGES:]
    for k in range(lay[0]):
        rec, a0, a1 = _lay(lay, k)
        if not _evictable(st, rec):
            continue
        off = st.rec[rec, SL_HOST_OFF]
        aoff = 64 * off
        n = st.rec[rec, SL_NPAGES]
        p = _next_resident(st, off, np.int64(0), n)
        while p < n:
            first, cnt = _folio(st, rec, p)
            young = False
            for a in range(a0, a1):
                r = lay[a]
                if (st.rec[r, SL_SLOT_ID] >> 16) == 0:
                    g = st.rec[r, SL_BASE_GFN] + first
                    young |= _age_range(m, vm, r, g, g + cnt, scratch)
            age = np.int64(st.age[aoff + first])
            if young:
                age = 0
            elif age < MAX_AGE:
                age += 1
            for q in range(first, first + cnt):
                st.age[aoff + q] = age
            hist[age] += cnt
            p = _next_resident(st, off, first + cnt, n)


@njit(inline="always", _nrt=False)
def _evict_folio(m, vm, rec, first, cnt, take, lay, a0, a1):
    """shrink_folio_list for one folio: try_to_unmap (split_huge_pmd for a THP) runs the MMU
    notifier over its hva range, in every slot that maps it; a THP is split (split_huge_page) and
    its first ``take`` pages go to swap (all of them unless the reclaim target is met first)."""
    vt, st, host = m.vt, m.st, m.host
    off = st.rec[rec, SL_HOST_OFF]
    zapped = 0
    for a in range(a0, a1):
        r = lay[a]
        if (st.rec[r, SL_SLOT_ID] >> 16) == 0:
            g = st.rec[r, SL_BASE_GFN] + first
            zapped += _zap_range(m, vm, r, g, g + cnt)
    if zapped > 0:
        vt.stats[vm, ST_REMOTE_TLB_FLUSH_REQUESTS] += 1   # kvm_flush_remote_tlbs on the notifier's return
        vt.stats[vm, ST_REMOTE_TLB_FLUSH] += 1
    if cnt > 1:
        _set_bits(st.split, off, first, cnt, True)         # 4K pages from now on
        vt.stats[vm, ST_HOST_THP_SPLITS] += 1
    _set_bits(st.host, off, first, take, False)
    _set_bits(st.swap, off, first, take, True)
    nbytes = take << 12
    host[HOST_USED_BYTES] -= nbytes
    host[HOST_SWAPPED_BYTES] += nbytes
    vt.rec[vm, VM_HOST_BYTES] -= nbytes
    vt.stats[vm, ST_HOST_PAGES_RECLAIMED] += take
    vt.stats[vm, ST_HOST_PAGES_SWAPPED] += take


@kernel
def reclaim_evict(m, vm, lay, threshold, at_threshold):
    """Swap out the VM's evictable folios (``lay``: see _lay) older than ``threshold`` and, in slot and page order,
    ``at_threshold`` pages of age ``threshold`` (a THP across that count is split and only the pages
    needed go).  Returns pages swapped out."""
    st = m.st
    total = 0
    taken = 0
    for k in range(lay[0]):
        rec, a0, a1 = _lay(lay, k)
        if not _evictable(st, rec):
            continue
        off = st.rec[rec, SL_HOST_OFF]
        aoff = 64 * off
        n = st.rec[rec, SL_NPAGES]
        p = _next_resident(st, off, np.int64(0), n)
        while p < n:
            first, cnt = _folio(st, rec, p)
            age = np.int64(st.age[aoff + first])
            take = np.int64(0)
            if age > threshold:
                take = cnt
            elif age == threshold and taken < at_threshold:
                take = min(cnt, at_threshold - taken)
                taken += take
            if take > 0:
                _evict_folio(m, vm, rec, first, cnt, take, lay, a0, a1)
                total += take
            p = _next_resident(st, off, first + cnt, n)
    return total


@kernel
def discard_pages(vt, st, host, vm, rec, p0, p1):
    """MADV_DONTNEED of slot pages [p0, p1), host side (the notifier ran before): resident pages
    are freed and swapped ones dropped.  A THP wholly inside goes as a whole (its PMD is cleared and
    a later fault may get a THP again); one partly inside is split first (split_huge_pmd).
    hugetlbfs pages go only when wholly inside.  Returns bytes freed."""
    off = st.rec[rec, SL_HOST_OFF]
    b = st.rec[rec, SL_BACKING]
    freed = 0
    p = p0
    while p < p1:
        if b == BACKING_HUGETLB_2M or b == BACKING_HUGETLB_1G:
            size = np.int64(512) if b == BACKING_HUGETLB_2M else np.int64(512 * 512)
            hva = st.rec[rec, SL_HVA] + (p << 12)
            r0 = ((hva & ~((size << 12) - 1)) - st.rec[rec, SL_HVA]) >> 12
            r1 = r0 + size
            if r0 >= p0 and r1 <= p1 and _bit(st.host, off, r0):
                _set_bits(st.host, off, r0, size, False)
                freed += size << 12
            p = min(p1, r1)
            continue
        r0 = _thp_region(st, rec, p)
        if r0 >= 0 and not _bit(st.split, off, r0):
            r1 = r0 + 512
            if _bit(st.host, off, r0):
                if r0 >= p0 and r1 <= p1:
                    _set_bits(st.host, off, r0, 512, False)
                    freed += 512 << 12
                else:
                    _set_bits(st.split, off, r0, 512, True)
                    vt.stats[vm, ST_HOST_THP_SPLITS] += 1
                    lo, hi = max(p0, r0), min(p1, r1)
                    _set_bits(st.host, off, lo, hi - lo, False)
                    freed += (hi - lo) << 12
            p = min(p1, r1)
            continue
        if _bit(st.host, off, p):
            _set_bits(st.host, off, p, 1, False)
            freed += 4096
        elif _bit(st.swap, off, p):
            _set_bits(st.swap, off, p, 1, False)
            host[HOST_SWAPPED_BYTES] -= 4096
            vt.stats[vm, ST_HOST_PAGES_SWAPPED] -= 1
        p += 1
    host[HOST_USED_BYTES] -= freed
    vt.rec[vm, VM_HOST_BYTES] -= freed
    return freed


@kernel
def madvise_dontneed(m, vm, calls):
    """madvise(MADV_DONTNEED) calls, one per column of ``calls`` (record, first page, end page), each within one
    slot (no aliases): the MMU notifier zaps the SPTEs of slot pages [p0, p1) (a flush when any went), then
    discard_pages frees the host pages.  Returns bytes freed."""
    vt, st = m.vt, m.st
    recs, p0s, p1s = calls[0], calls[1], calls[2]
    freed = 0
    for i in range(recs.shape[0]):
        rec = recs[i]
        if (st.rec[rec, SL_SLOT_ID] >> 16) == 0:
            g = st.rec[rec, SL_BASE_GFN]
            if _zap_range(m, vm, rec, g + p0s[i], g + p1s[i]) > 0:
                vt.stats[vm, ST_REMOTE_TLB_FLUSH_REQUESTS] += 1
                vt.stats[vm, ST_REMOTE_TLB_FLUSH] += 1
        freed += discard_pages(vt, st, m.host, vm, rec, p0s[i], p1s[i])
    return freed
