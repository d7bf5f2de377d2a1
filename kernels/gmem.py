"""Guest memory contents inside kernels: a sparse pool of 4 KiB pages of host memory.

As in KVM, contents belong to host memory, not to gpas: a page is keyed by the VM (its VMM process, whose
address space the hvas live in) and the hva page behind the gpa (the memslot's ``userspace_addr`` plus the
offset, ``__gfn_to_hva_memslot``).  So a moved slot keeps its contents, two slots over one hva share them, a
slot made over another hva does not see the old ones, and a gpa in no memslot has none: it reads as zeros
and a write to it stores nothing (KVM: ``kvm_read_guest`` / ``kvm_write_guest`` fail; the guest's access is
MMIO).  Only pages that something wrote have a row; every other page reads as zeros.

The key table is open addressing with linear probing over a power-of-two capacity; the key is hashed as a
whole (both 32-bit halves through a 32-bit avalanche mix), so VMs spread like pages.  Python keeps the table
at most a quarter full (a lookup probes ~1.2 slots) and tops the page pool up before a batch, so kernels
never allocate.  Removal (MADV_DONTNEED, a slot's memory unmapped) shifts the cluster back (no tombstones)
and returns the row to a free stack.

Arrays (``GuestMem`` in state.py): ``hash`` int64[hcap, 2] (GMH_KEY: (vm << GM_VM_SHIFT) | hva page, -1 =
empty; GMH_ROW: its row), ``page`` int64[cap, 512] (u64 words stored as int64), ``free`` int64[cap] (released
rows), ``ctl`` int64[NGMCTL].  Translations read a ``SlotMap`` (state.py, built by memslot.slot_map).
"""

import numpy as np
from numba import njit

from .jit import helper, kernel
from .memslot import search_memslots
from .spte import is_last_spte, is_shadow_present_pte, spte_to_child_row, spte_to_pfn
from .state import (
    BACKING_HUGETLB_1G,
    BACKING_HUGETLB_2M,
    GMH_KEY,
    GMH_ROW,
    SL_BACKING,
    SL_BASE_GFN,
    SL_HVA,
)

GM_USED = 0      # rows ever handed out (bump pointer)
GM_KEYS = 1      # keys stored
GM_NFREE = 2     # rows on the free stack
NGMCTL = 3
GM_VM_SHIFT = 35              # hva pages lie below TASK_SIZE_MAX >> 12 = 2**35
GM_MAX_VMS = 1 << 28          # VM ids above the hva page bits of a non-negative int64 key
GM_MAX_LOAD = 4               # the key table is kept at most 1/GM_MAX_LOAD full
_M32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit value times one stays below 2**63 (no int64 wrap, no float)
_MIX1 = 0x7FEB352D
_MIX2 = 0x2C1B3C6D


@njit(inline="always", _nrt=False)
def _mix32(x):
    """A 32-bit avalanche mix (xorshift-multiply, lowbias32's shape) of 0 <= x < 2**32."""
    x ^= x >> 16
    x = (x * _MIX1) & _M32
    x ^= x >> 15
    x = (x * _MIX2) & _M32
    x ^= x >> 16
    return x


@njit(inline="always", _nrt=False)
def gm_hash(k, mask):
    """Home slot of key ``k`` >= 0: the high half (VM id and top page bits) is mixed into the low one."""
    return _mix32((k & _M32) ^ _mix32(k >> 32)) & mask


@njit(inline="always", _nrt=False)
def gm_page_key(sm, vm, gpa):
    """Key of the host page behind ``gpa`` of ``vm`` (SlotMap ``sm``), -1 when no memslot maps it; for an L2
    map (``sm.root`` >= 0) the host page its shadow tables map ``gpa`` to, -1 when they do not."""
    gfn = gpa >> 12
    if sm.root >= 0:
        return l2_page_key(sm, vm, gfn)
    rec = search_memslots(sm, vm, gfn)
    if rec < 0:
        return np.int64(-1)
    return (np.int64(vm) << GM_VM_SHIFT) | ((sm.srec[rec, SL_HVA] >> 12) + gfn - sm.srec[rec, SL_BASE_GFN])


@helper   # out of line: gm_page_key is inlined into every guest-memory access, the L2 case is rare
def l2_page_key(sm, vm, gfn):
    """The processor's view of L2 memory: ``gfn`` (an L2 gfn) through the shadow EPT/NPT tables at ``sm.root``
    (their leaf holds the host page, an hva page of L1's memory here), -1 where they map nothing.  The caller
    walked them with the access's permissions first, as the processor does."""
    row = sm.root
    level = sm.levels
    while True:
        spte = sm.spt[row, (gfn >> np.int64(9 * (level - 1))) & 511]
        if not is_shadow_present_pte(spte):
            return np.int64(-1)
        if is_last_spte(spte, level):
            pfn = spte_to_pfn(spte) + (gfn & ((np.int64(1) << np.int64(9 * (level - 1))) - 1))
            return (np.int64(vm) << GM_VM_SHIFT) | pfn
        row = spte_to_child_row(spte)
        level -= 1


@njit(inline="always", _nrt=False)
def gm_slot(ht, k):
    """Slot of key ``k`` in the key table ``ht``: where it is, or the empty slot where it would go."""
    mask = ht.shape[0] - 1
    h = gm_hash(k, mask)
    while ht[h, GMH_KEY] != k and ht[h, GMH_KEY] != -1:
        h = (h + 1) & mask
    return h


@njit(inline="always", _nrt=False)
def gm_find(ht, k):
    """Row holding the page of key ``k`` (key table ``ht``), or -1 (the page reads as zeros)."""
    h = gm_slot(ht, k)
    return ht[h, GMH_ROW] if ht[h, GMH_KEY] != -1 else -1


@njit(inline="always", _nrt=False)
def gm_get_or_add(gm, k):
    """Row of the page of key ``k``, adding a zeroed row if it has none (capacity topped up by Python)."""
    ht = gm.hash
    h = gm_slot(ht, k)
    if ht[h, GMH_KEY] != -1:
        return ht[h, GMH_ROW]
    nf = gm.ctl[GM_NFREE]
    if nf > 0:
        r = gm.free[nf - 1]
        gm.ctl[GM_NFREE] = nf - 1
    else:
        r = gm.ctl[GM_USED]
        gm.ctl[GM_USED] = r + 1
    gm.ctl[GM_KEYS] += 1
    for i in range(512):
        gm.page[r, i] = 0
    ht[h, GMH_KEY] = k
    ht[h, GMH_ROW] = r
    return r


@njit(inline="always", _nrt=False)
def gm_room(gm, n):
    """True when ``n`` more pages fit without Python topping up (free rows, key-table load)."""
    return gm.page.shape[0] - gm.ctl[GM_USED] + gm.ctl[GM_NFREE] >= n and \
        GM_MAX_LOAD * (gm.ctl[GM_KEYS] + n) <= gm.hash.shape[0]


@njit(inline="always", _nrt=False)
def _remove_at(gm, h):
    """Drop the key in slot ``h`` (its row goes to the free stack) and shift its cluster back."""
    ht = gm.hash
    mask = ht.shape[0] - 1
    gm.free[gm.ctl[GM_NFREE]] = ht[h, GMH_ROW]
    gm.ctl[GM_NFREE] += 1
    gm.ctl[GM_KEYS] -= 1
    i = h
    j = h
    while True:
        j = (j + 1) & mask
        if ht[j, GMH_KEY] == -1:
            break
        home = gm_hash(ht[j, GMH_KEY], mask)
        # key j stays unless the hole at i lies cyclically between its home slot and j
        if (i < j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            ht[i, GMH_KEY] = ht[j, GMH_KEY]
            ht[i, GMH_ROW] = ht[j, GMH_ROW]
            i = j
    ht[i, GMH_KEY] = -1


@njit(inline="always", _nrt=False)
def _drop_range(gm, k0, k1):
    """Drop every page with key in [k0, k1); returns how many had contents."""
    n = 0
    keys = gm.ctl[GM_KEYS]
    if keys == 0 or k1 <= k0:
        return n
    ht = gm.hash
    if k1 - k0 <= 2 * keys:
        for k in range(k0, k1):
            h = gm_slot(ht, k)
            if ht[h, GMH_KEY] != -1:
                _remove_at(gm, h)
                n += 1
        return n
    i = 0
    while i < ht.shape[0]:  # a removal may shift a later key into slot i: look at it again
        if k0 <= ht[i, GMH_KEY] < k1:
            _remove_at(gm, i)
            n += 1
        else:
            i += 1
    return n


@kernel
def gm_drop_range(gm, k0, k1):
    """The host pages of keys [k0, k1) lose their contents (they read back as zeros); returns pages dropped."""
    return _drop_range(gm, k0, k1)


@kernel
def gm_discard_slots(gm, st, vm, recs, p0s, p1s):
    """MADV_DONTNEED of slot pages [p0s[i], p1s[i]) of records ``recs`` of ``vm`` (kernels/reclaim.py
    discard_pages frees the host pages): anonymous memory reads back as zeros.  hugetlbfs pages lose their
    contents only when wholly inside, as they are freed only then.  Returns pages dropped."""
    n = 0
    for i in range(recs.shape[0]):
        rec = recs[i]
        lo = st.rec[rec, SL_HVA] + (p0s[i] << 12)
        hi = st.rec[rec, SL_HVA] + (p1s[i] << 12)
        b = st.rec[rec, SL_BACKING]
        if b == BACKING_HUGETLB_2M or b == BACKING_HUGETLB_1G:
            size = np.int64(1 << 21) if b == BACKING_HUGETLB_2M else np.int64(1 << 30)
            lo = (lo + size - 1) & ~(size - 1)
            hi = hi & ~(size - 1)
        base = np.int64(vm) << GM_VM_SHIFT
        n += _drop_range(gm, base | (lo >> 12), base | (hi >> 12))
    return n


@kernel
def gm_rehash(old, ht):
    """Insert every key of the old key table into the new (empty) one ``ht``."""
    for i in range(old.shape[0]):
        if old[i, GMH_KEY] != -1:
            h = gm_slot(ht, old[i, GMH_KEY])
            ht[h, GMH_KEY] = old[i, GMH_KEY]
            ht[h, GMH_ROW] = old[i, GMH_ROW]


@njit(inline="always", _nrt=False)
def gm_row_read(gm, r, gpa, size):
    """The ``size``-byte (4 or 8) word at aligned ``gpa`` of the page in row ``r`` (-1: a page that reads as
    zeros), zero-extended."""
    if r < 0:
        return np.int64(0)
    w = gm.page[r, (gpa >> 3) & 511]
    if size == 4:
        return (w >> 32) & 0xFFFFFFFF if gpa & 4 else w & 0xFFFFFFFF
    return w


@njit(inline="always", _nrt=False)
def gm_row_write(gm, r, gpa, value, size):
    """Store the ``size``-byte (4 or 8) ``value`` at aligned ``gpa`` of the page in row ``r``."""
    i = (gpa >> 3) & 511
    if size == 8:
        gm.page[r, i] = value
        return
    w = gm.page[r, i]
    if gpa & 4:
        gm.page[r, i] = (w & 0xFFFFFFFF) | (np.int64(value & 0xFFFFFFFF) << np.int64(32))
    else:
        gm.page[r, i] = (w & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)


@njit(inline="always", _nrt=False)
def _gm_read(gm, sm, vm, gpa, size):
    k = gm_page_key(sm, vm, gpa)
    return gm_row_read(gm, gm_find(gm.hash, k) if k >= 0 else np.int64(-1), gpa, size)


@njit(inline="always", _nrt=False)
def gm_read64(gm, sm, vm, gpa):
    """The 8-byte word at 8-aligned ``gpa`` (0 for a page never written or in no memslot)."""
    return _gm_read(gm, sm, vm, gpa, 8)


@njit(inline="always", _nrt=False)
def gm_read_group(gm, r, base, size, n, out, off):
    """``n`` consecutive ``size``-byte (4 or 8) entries from ``base`` (aligned, within one page, held in row ``r``,
    -1: zeros) into ``out[off:off + n]``, zero-extended: one look-up for the group (FNAME(prefetch_gpte) reads
    the 8 gptes of a prefetch group with one kvm_read_guest_atomic)."""
    for i in range(n):
        out[off + i] = gm_row_read(gm, r, base + size * i, size)


@njit(inline="always", _nrt=False)
def gm_read32(gm, sm, vm, gpa):
    """The 4-byte word at 4-aligned ``gpa``, zero-extended."""
    return _gm_read(gm, sm, vm, gpa, 4)


@njit(inline="always", _nrt=False)
def gm_write64(gm, sm, vm, gpa, value):
    """Store the word at 8-aligned ``gpa`` (nothing when no memslot maps it)."""
    k = gm_page_key(sm, vm, gpa)
    if k >= 0:
        gm_row_write(gm, gm_get_or_add(gm, k), gpa, value, 8)


@njit(inline="always", _nrt=False)
def gm_write32(gm, sm, vm, gpa, value):
    """Store the 4-byte ``value`` at 4-aligned ``gpa`` (nothing when no memslot maps it)."""
    k = gm_page_key(sm, vm, gpa)
    if k >= 0:
        gm_row_write(gm, gm_get_or_add(gm, k), gpa, value, 4)


@njit(inline="always", _nrt=False)
def gm_write_bytes(gm, sm, vm, gpa, value, nbytes):
    """Little-endian store of the low ``nbytes`` of ``value`` at any ``gpa`` (bytes in no memslot are lost)."""
    r = np.int64(-1)
    for b in range(nbytes):
        a = gpa + b
        if b == 0 or (a & 4095) == 0:
            k = gm_page_key(sm, vm, a)
            r = gm_get_or_add(gm, k) if k >= 0 else np.int64(-1)
        if r < 0:
            continue
        i = (a >> 3) & 511
        sh = 8 * (a & 7)
        byte = np.int64((value >> (8 * b)) & 0xFF)
        gm.page[r, i] = (gm.page[r, i] & ~(np.int64(0xFF) << np.int64(sh))) | (byte << np.int64(sh))


# ------------------------------------------------------------------ host side (write/read_guest_memory)
@kernel
def gm_unmapped(sm, vm, gpa, n):
    """The first address of the words [gpa, gpa + 8n) that no memslot maps, or -1."""
    a = gpa
    end = gpa + 8 * n
    while a < end:
        if gm_page_key(sm, vm, a) < 0:
            return a
        a = (a | 4095) + 1
    return np.int64(-1)


@kernel
def gm_write_words(gm, sm, vm, gpa, words):
    """Userspace writes ``words`` at 8-aligned ``gpa`` through its mapping (every page mapped, rows reserved)."""
    r = np.int64(-1)
    for i in range(words.shape[0]):
        a = gpa + 8 * i
        if i == 0 or (a & 4095) == 0:
            r = gm_get_or_add(gm, gm_page_key(sm, vm, a))
        gm.page[r, (a >> 3) & 511] = words[i]


@kernel
def gm_read_words(gm, sm, vm, gpa, out):
    """Userspace reads ``out.shape[0]`` words at 8-aligned ``gpa`` (pages never written or unmapped: 0)."""
    r = np.int64(-1)
    for i in range(out.shape[0]):
        a = gpa + 8 * i
        if i == 0 or (a & 4095) == 0:
            k = gm_page_key(sm, vm, a)
            r = gm_find(gm.hash, k) if k >= 0 else np.int64(-1)
        out[i] = gm.page[r, (a >> 3) & 511] if r >= 0 else 0
