"""Reverse maps and parent-pte lists of the shadow MMU (``mmu.c`` pte_list_*, rmap_add/remove).

Both are singly linked lists of SPTE pointers (``row * 512 + index``) in pooled node arrays with a
free list; Python tops the pools up before a batch.  KVM keeps the same lists in ``pte_list_desc``
blocks of 14; the count (``RM_COUNT``) is what its statistics and footprint depend on, and the
footprint is computed from it (``batchmmu/host.py``).
"""

from numba import njit

from .state import (
    NODE_NEXT,
    NODE_VAL,
    RM_COUNT,
    RM_HEAD,
    SH_PL_AVAIL,
    SH_PL_FREE,
    SH_RN_AVAIL,
    SH_RN_FREE,
    SL_BASE_GFN,
    SL_RMAP_OFF,
    SP_PARENT_HEAD,
)


@njit(inline="always", _nrt=False)
def sptep_row(sptep):
    return sptep >> 9


@njit(inline="always", _nrt=False)
def sptep_idx(sptep):
    return sptep & 511


@njit(inline="always", _nrt=False)
def pte_list_next(nodes, n):
    """rmap_get_first / rmap_get_next: the SPTE pointer at node ``n`` and the next node (-1: the end).
    ``for_each_rmap_spte`` is ``n = head; while n >= 0: sptep, n = pte_list_next(nodes, n)``; the next
    node is read first, so the body may drop the SPTE from the list."""
    return nodes[n, NODE_VAL], nodes[n, NODE_NEXT]


@njit(inline="always", _nrt=False)
def rmap_get_next(nodes, n):
    """pte_list_next with the SPTE pointer as (row, index, next node)."""
    sptep, nxt = pte_list_next(nodes, n)
    return sptep_row(sptep), sptep_idx(sptep), nxt


@njit(inline="always", _nrt=False)
def pte_list_count(nodes, n):
    # pte_list_count: the length of the list starting at node n
    c = 0
    while n >= 0:
        c += 1
        n = nodes[n, NODE_NEXT]
    return c


@njit(inline="always", _nrt=False)
def rmap_index(sh, st, rec, level, gfn):
    """Index of the rmap head of ``gfn`` at ``level`` in slot ``rec`` (gfn_to_rmap)."""
    shift = (level - 1) * 9
    return st.rec[rec, SL_RMAP_OFF + (level - 1)] + (gfn >> shift) - (st.rec[rec, SL_BASE_GFN] >> shift)


@njit(inline="always", _nrt=False)
def kvm_mmu_slot_lpages(base_gfn, npages, shift):
    """__kvm_mmu_slot_lpages: rmap heads (or lpage_info entries) of a slot at the level of ``shift``."""
    return ((base_gfn + npages - 1) >> shift) - (base_gfn >> shift) + 1


@njit(inline="always", _nrt=False)
def _list_push(head, nodes, ctl, free_i, avail_i, sptep):
    """Push ``sptep`` on the list starting at node ``head``, taking a node (``nodes[n] = (value, next)``)
    from the free list ``ctl[free_i]`` (topped up by Python before the batch).  Returns the new head."""
    n = ctl[free_i]
    ctl[free_i] = nodes[n, NODE_NEXT]
    ctl[avail_i] -= 1
    nodes[n, NODE_VAL] = sptep
    nodes[n, NODE_NEXT] = head
    return n


@njit(inline="always", _nrt=False)
def pte_list_add(sh, h, sptep):
    """pte_list_add: returns the number of SPTEs in the list before this one."""
    sh.rmap[h, RM_HEAD] = _list_push(sh.rmap[h, RM_HEAD], sh.rn, sh.ctl, SH_RN_FREE, SH_RN_AVAIL, sptep)
    c = sh.rmap[h, RM_COUNT]
    sh.rmap[h, RM_COUNT] = c + 1
    return c


@njit(inline="always", _nrt=False)
def _list_unlink(head, nodes, ctl, free_i, avail_i, sptep):
    """Unlink the node holding ``sptep`` from the list starting at node ``head``; the node goes back on
    the free list ``ctl[free_i]``.  Returns (new head, True if it was there)."""
    prev = -1
    n = head
    while n >= 0:
        if nodes[n, NODE_VAL] == sptep:
            if prev < 0:
                head = nodes[n, NODE_NEXT]
            else:
                nodes[prev, NODE_NEXT] = nodes[n, NODE_NEXT]
            nodes[n, NODE_NEXT] = ctl[free_i]
            ctl[free_i] = n
            ctl[avail_i] += 1
            return head, True
        prev = n
        n = nodes[n, NODE_NEXT]
    return head, False


@njit(inline="always", _nrt=False)
def pte_list_remove(sh, h, sptep):
    """pte_list_remove: unlink ``sptep`` from rmap ``h``."""
    head, found = _list_unlink(sh.rmap[h, RM_HEAD], sh.rn, sh.ctl, SH_RN_FREE, SH_RN_AVAIL, sptep)
    if found:
        sh.rmap[h, RM_HEAD] = head
        sh.rmap[h, RM_COUNT] -= 1
    return found


@njit(inline="always", _nrt=False)
def parent_add(pa, sh, row, sptep):
    """mmu_page_add_parent_pte: the list head is the page's SP_PARENT_HEAD."""
    pa.meta[row, SP_PARENT_HEAD] = _list_push(pa.meta[row, SP_PARENT_HEAD], sh.pl, sh.ctl, SH_PL_FREE, SH_PL_AVAIL,
                                              sptep)


@njit(inline="always", _nrt=False)
def parent_remove(pa, sh, row, sptep):
    """mmu_page_remove_parent_pte."""
    head, found = _list_unlink(pa.meta[row, SP_PARENT_HEAD], sh.pl, sh.ctl, SH_PL_FREE, SH_PL_AVAIL, sptep)
    if found:
        pa.meta[row, SP_PARENT_HEAD] = head
