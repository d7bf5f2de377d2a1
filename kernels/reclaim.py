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
from .state import (
    BACKING_HUGETLB_1G,
    BACKING_HUGETLB_2M,
    BACKING_THP,
    HOST_SWAPPED_BYTES,
    HOST_USED_BYTES,
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


@kernel
def reclaim_scan(pa, vt, st, vm, recs, aptr, arecs, hist, scratch):
    """One aging pass of the LRU over the VM's slots ``recs`` (folio_referenced ->
    mmu_notifier clear_young -> kvm_age_gfn, no flush on x86): a folio any of whose SPTEs was
    accessed becomes age 0, others get one older.  hist[age] += pages of evictable folios.
    The slots sharing recs[k]'s host pages (same hva range) are arecs[aptr[k]:aptr[k + 1]]."""
    for k in range(recs.shape[0]):
        rec = recs[k]
        if not _evictable(st, rec):
            continue
        off = st.rec[rec, SL_HOST_OFF]
        aoff = 64 * off
        n = st.rec[rec, SL_NPAGES]
        p = _next_resident(st, off, np.int64(0), n)
        while p < n:
            first, cnt = _folio(st, rec, p)
            young = False
            for a in range(aptr[k], aptr[k + 1]):
                r = arecs[a]
                if (st.rec[r, SL_SLOT_ID] >> 16) == 0:
                    g = st.rec[r, SL_BASE_GFN] + first
                    young |= tdp_age_range(pa, vt, vm, g, g + cnt, np.bool_(True), scratch)
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
def _evict_folio(pa, vt, st, host, vm, rec, first, cnt, take, aptr, arecs, k):
    """shrink_folio_list for one folio: try_to_unmap (split_huge_pmd for a THP) runs the MMU
    notifier over its hva range, in every slot that maps it; a THP is split (split_huge_page) and
    its first ``take`` pages go to swap (all of them unless the reclaim target is met first)."""
    off = st.rec[rec, SL_HOST_OFF]
    zapped = 0
    for a in range(aptr[k], aptr[k + 1]):
        r = arecs[a]
        if (st.rec[r, SL_SLOT_ID] >> 16) == 0:
            g = st.rec[r, SL_BASE_GFN] + first
            zapped += tdp_zap_leafs(pa, vt, vm, g, g + cnt)
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
def reclaim_evict(pa, vt, st, host, vm, recs, aptr, arecs, threshold, at_threshold):
    """Swap out the VM's evictable folios older than ``threshold`` and, in slot and page order,
    ``at_threshold`` pages of age ``threshold`` (a THP across that count is split and only the pages
    needed go).  Returns pages swapped out."""
    total = 0
    taken = 0
    for k in range(recs.shape[0]):
        rec = recs[k]
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
                _evict_folio(pa, vt, st, host, vm, rec, first, cnt, take, aptr, arecs, k)
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
def madvise_dontneed(pa, vt, st, host, vm, recs, p0s, p1s):
    """madvise(MADV_DONTNEED) calls, one per entry, each within one slot (no aliases): the MMU
    notifier zaps the SPTEs of slot pages [p0s[i], p1s[i]) (a flush when any went), then
    discard_pages frees the host pages.  Returns bytes freed."""
    freed = 0
    for i in range(recs.shape[0]):
        rec = recs[i]
        if (st.rec[rec, SL_SLOT_ID] >> 16) == 0:
            g = st.rec[rec, SL_BASE_GFN]
            if tdp_zap_leafs(pa, vt, vm, g + p0s[i], g + p1s[i]) > 0:
                vt.stats[vm, ST_REMOTE_TLB_FLUSH_REQUESTS] += 1
                vt.stats[vm, ST_REMOTE_TLB_FLUSH] += 1
        freed += discard_pages(vt, st, host, vm, rec, p0s[i], p1s[i])
    return freed
