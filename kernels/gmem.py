"""Guest memory contents inside kernels: a sparse pool of 4 KiB pages keyed by (vm, gfn).

Only pages that something wrote (the host through ``write_guest_memory``, a guest store, a walker's
A/D update) have a row; every other page reads as zeros.  The key table is open addressing with
linear probing over a power-of-two capacity; Python keeps it at most half full and tops the page
pool up before a batch (``GM_FREE`` rows free), so kernels never allocate.

Arrays (``GuestMem`` in state.py): ``key`` int64[hcap] ((vm << 40) | gfn, -1 = empty), ``row``
int64[hcap], ``page`` int64[cap, 512] (u64 words stored as int64), ``ctl`` int64[2]
(GM_USED rows handed out, GM_KEYS keys stored).
"""

import numpy as np
from numba import njit

GM_USED = 0
GM_KEYS = 1
GM_VM_SHIFT = 40


@njit(inline="always", _nrt=False)
def gm_hash(vm, gfn, mask):
    k = (vm << GM_VM_SHIFT) | gfn
    return (k ^ (k >> 13) ^ (k >> 29)) & mask


@njit(inline="always", _nrt=False)
def gm_slot(key, vm, gfn):
    """Key-table slot of page ``gfn`` of ``vm``: where its key is, or the empty slot where it would go."""
    mask = key.shape[0] - 1
    want = (vm << GM_VM_SHIFT) | gfn
    h = gm_hash(vm, gfn, mask)
    while key[h] != want and key[h] != -1:
        h = (h + 1) & mask
    return h


@njit(inline="always", _nrt=False)
def gm_find(key, row, vm, gfn):
    """Row holding page ``gfn`` of ``vm``, or -1 (the page reads as zeros)."""
    h = gm_slot(key, vm, gfn)
    return row[h] if key[h] != -1 else -1


@njit(inline="always", _nrt=False)
def gm_get_or_add(key, row, page, ctl, vm, gfn):
    """Row of page ``gfn`` of ``vm``, adding a zeroed row if it has none (capacity topped up by Python)."""
    h = gm_slot(key, vm, gfn)
    if key[h] != -1:
        return row[h]
    r = ctl[GM_USED]
    ctl[GM_USED] = r + 1
    ctl[GM_KEYS] += 1
    for i in range(512):
        page[r, i] = 0
    key[h] = (vm << GM_VM_SHIFT) | gfn
    row[h] = r
    return r


@njit(inline="always", _nrt=False)
def gm_read64(key, row, page, vm, gpa):
    """The 8-byte word at 8-aligned ``gpa`` (0 for a page never written)."""
    r = gm_find(key, row, vm, gpa >> 12)
    if r < 0:
        return 0
    return page[r, (gpa >> 3) & 511]


@njit(inline="always", _nrt=False)
def gm_read32(key, row, page, vm, gpa):
    """The 4-byte word at 4-aligned ``gpa``, zero-extended."""
    w = gm_read64(key, row, page, vm, gpa & ~7)
    if gpa & 4:
        return (w >> 32) & 0xFFFFFFFF
    return w & 0xFFFFFFFF


@njit(inline="always", _nrt=False)
def gm_write64(key, row, page, ctl, vm, gpa, value):
    r = gm_get_or_add(key, row, page, ctl, vm, gpa >> 12)
    page[r, (gpa >> 3) & 511] = value


@njit(inline="always", _nrt=False)
def gm_write32(key, row, page, ctl, vm, gpa, value):
    r = gm_get_or_add(key, row, page, ctl, vm, gpa >> 12)
    i = (gpa >> 3) & 511
    w = page[r, i]
    if gpa & 4:
        page[r, i] = (w & 0xFFFFFFFF) | (np.int64(value & 0xFFFFFFFF) << np.int64(32))
    else:
        page[r, i] = (w & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)


@njit(inline="always", _nrt=False)
def gm_write_bytes(key, row, page, ctl, vm, gpa, value, nbytes):
    """Little-endian store of the low ``nbytes`` of ``value`` at any ``gpa`` inside one page."""
    for b in range(nbytes):
        a = gpa + b
        r = gm_get_or_add(key, row, page, ctl, vm, a >> 12)
        i = (a >> 3) & 511
        sh = 8 * (a & 7)
        byte = np.int64((value >> (8 * b)) & 0xFF)
        page[r, i] = (page[r, i] & ~(np.int64(0xFF) << np.int64(sh))) | (byte << np.int64(sh))
