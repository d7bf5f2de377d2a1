"""Reverse maps and parent-pte lists of the shadow MMU (``mmu.c`` pte_list_*, rmap_add/remove).

Both are singly linked lists of SPTE pointers (``row * 512 + index``) in pooled node arrays with a
free list; Python tops the pools up before a batch.  KVM keeps the same lists in ``pte_list_desc``
blocks of 14; the count (``rmap_cnt``) is what its statistics and footprint depend on, and the
footprint is computed from it (``batchmmu/host.py``).
"""

from numba import njit

from .state import (
    SH_PL_AVAIL,
    SH_PL_FREE,
    SH_RN_AVAIL,
    SH_RN_FREE,
    SHS_RMAP_OFF,
    SL_BASE_GFN,
)


@njit(inline="always", _nrt=False)
def sptep_row(sptep):
    return sptep >> 9


@njit(inline="always", _nrt=False)
def sptep_idx(sptep):
    return sptep & 511


@njit(inline="always", _nrt=False)
def rmap_index(sh, st, rec, level, gfn):
    """Index of the rmap head of ``gfn`` at ``level`` in slot ``rec`` (gfn_to_rmap)."""
    shift = (level - 1) * 9
    return sh.slotrec[rec, SHS_RMAP_OFF + (level - 1)] + (gfn >> shift) - (st.rec[rec, SL_BASE_GFN] >> shift)


@njit(inline="always", _nrt=False)
def _list_add(heads, h, val, nxt, ctl, free_i, avail_i, sptep):
    """Push ``sptep`` on the list starting at ``heads[h]``, taking a node from the free list ``ctl[free_i]``
    (topped up by Python before the batch)."""
    n = ctl[free_i]
    ctl[free_i] = nxt[n]
    ctl[avail_i] -= 1
    val[n] = sptep
    nxt[n] = heads[h]
    heads[h] = n


@njit(inline="always", _nrt=False)
def pte_list_add(sh, h, sptep):
    """pte_list_add: returns the number of SPTEs in the list before this one."""
    _list_add(sh.rmap_head, h, sh.rn_sptep, sh.rn_next, sh.ctl, SH_RN_FREE, SH_RN_AVAIL, sptep)
    c = sh.rmap_cnt[h]
    sh.rmap_cnt[h] = c + 1
    return c


@njit(inline="always", _nrt=False)
def _list_remove(heads, h, val, nxt, ctl, free_i, avail_i, sptep):
    """Unlink the node holding ``sptep`` from the list starting at ``heads[h]``; the node goes back on
    the free list ``ctl[free_i]``.  Returns True if it was there."""
    prev = -1
    n = heads[h]
    while n >= 0:
        if val[n] == sptep:
            if prev < 0:
                heads[h] = nxt[n]
            else:
                nxt[prev] = nxt[n]
            nxt[n] = ctl[free_i]
            ctl[free_i] = n
            ctl[avail_i] += 1
            return True
        prev = n
        n = nxt[n]
    return False


@njit(inline="always", _nrt=False)
def pte_list_remove(sh, h, sptep):
    """pte_list_remove: unlink ``sptep`` from rmap ``h``."""
    if _list_remove(sh.rmap_head, h, sh.rn_sptep, sh.rn_next, sh.ctl, SH_RN_FREE, SH_RN_AVAIL, sptep):
        sh.rmap_cnt[h] -= 1
        return True
    return False


@njit(inline="always", _nrt=False)
def parent_add(sh, row, sptep):
    """mmu_page_add_parent_pte."""
    _list_add(sh.parent_head, row, sh.pl_sptep, sh.pl_next, sh.ctl, SH_PL_FREE, SH_PL_AVAIL, sptep)


@njit(inline="always", _nrt=False)
def parent_remove(sh, row, sptep):
    """mmu_page_remove_parent_pte."""
    _list_remove(sh.parent_head, row, sh.pl_sptep, sh.pl_next, sh.ctl, SH_PL_FREE, SH_PL_AVAIL, sptep)
