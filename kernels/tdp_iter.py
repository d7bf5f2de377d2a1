"""KVM's ``tdp_iter.c``: the pre-order iterator over one TDP page table, and the one-gfn walk.

The iterator's state is five scalars, not a struct: ``row`` (the table holding the current SPTE),
``level``, ``gfn`` (the first gfn the current SPTE maps), ``nlg`` (``next_last_level_gfn``) and
``valid``.  KVM keeps ``pt_path[]`` to step up; here a table's parent is in its page record
(``SP_PARENT``).  ``for_each_tdp_pte_min_level(iter, root, min_level, start, end)`` reads::

    row, level, gfn, nlg, valid = tdp_iter_start(root, root_level, start)
    while valid and gfn < end:
        spte = spt[row, spte_index(gfn, level)]
        ...                                   # the body; it may change the SPTE (a zap, a split)
        row, level, gfn, nlg, valid = tdp_iter_next(spt, meta, row, level, gfn, nlg, root_level, min_level)

A body that works on 4K leaves takes a whole run of them at once (``tdp_iter_run``): a tight loop over
the table's entries instead of one iterator step each.

Like KVM's, the iterator steps down into the SPTE as it is after the body ran: a split entry is
descended, a zapped one is not.
"""

import numpy as np
from numba import njit

from .spte import (
    PG_LEVEL_4K,
    SPTE_ENT_PER_PAGE,
    gfn_round_for_level,
    is_last_spte,
    is_shadow_present_pte,
    pages_per_hpage,
    spte_index,
    spte_to_child_row,
)
from .state import SP_PARENT


@njit(inline="always", _nrt=False)
def tdp_iter_start(root, root_level, start):
    # tdp_iter_start (+ tdp_iter_restart): at the root entry that maps ``start``
    return (np.int64(root), np.int64(root_level), gfn_round_for_level(start, root_level), np.int64(start),
            root >= 0)


@njit(inline="always", _nrt=False)
def tdp_iter_next(spt, meta, row, level, gfn, nlg, root_level, min_level):
    # tdp_iter_next: try_step_down, else try_step_side, else try_step_up and side again
    if level > min_level:
        spte = spt[row, spte_index(gfn, level)]
        if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
            level -= 1
            return spte_to_child_row(spte), level, gfn_round_for_level(nlg, level), nlg, True
    while True:
        if spte_index(gfn, level) != SPTE_ENT_PER_PAGE - 1:
            gfn += pages_per_hpage(level)  # try_step_side
            return row, level, gfn, gfn, True
        if level == root_level:
            return row, level, gfn, nlg, False
        row = meta[row, SP_PARENT]  # try_step_up
        level += 1
        gfn = gfn_round_for_level(gfn, level)


@njit(inline="always", _nrt=False)
def _step_down_tables(spt, row, level, nlg, min_level):
    """try_step_down while the current SPTE is a present table (what a leaf-only body skips anyway); returns
    (row, level, gfn).  Written as walk_to_leaf is: LLVM makes a slower loop of ``while level > min_level``."""
    while True:
        if level == min_level:
            return row, level, gfn_round_for_level(nlg, level)
        spte = spt[row, spte_index(nlg, level)]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return row, level, gfn_round_for_level(nlg, level)
        row = spte_to_child_row(spte)
        level -= 1


@njit(inline="always", _nrt=False)
def tdp_iter_start_leaf(spt, root, root_level, start, min_level):
    """tdp_iter_start for ``tdp_root_for_each_leaf_pte``-style loops, whose body skips present tables: the
    iterator is already stepped down past them (the same SPTEs reach the body, without a step each)."""
    row, level, gfn, nlg, valid = tdp_iter_start(root, root_level, start)
    if valid:
        row, level, gfn = _step_down_tables(spt, row, level, nlg, min_level)
    return row, level, gfn, nlg, valid


@njit(inline="always", _nrt=False)
def tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level, min_level, end):
    """tdp_iter_next, then past present tables (as tdp_iter_start_leaf) while before ``end``."""
    row, level, gfn, nlg, valid = tdp_iter_next(spt, meta, row, level, gfn, nlg, root_level, min_level)
    if valid and gfn < end:
        row, level, gfn = _step_down_tables(spt, row, level, nlg, min_level)
    return row, level, gfn, nlg, valid


@njit(inline="always", _nrt=False)
def tdp_iter_run(gfn, level, end):
    """SPTEs a body may take at once from the current one: 1 above 4K; in a 4K table every entry from
    here to the table's end or ``end``, whichever comes first.  The body then adds ``run - 1`` to gfn so
    that the next tdp_iter_next steps on from the last of them (the same SPTEs, in the same order, as
    one tdp_iter_next per entry: a 4K SPTE has nothing below it)."""
    if level != PG_LEVEL_4K:
        return np.int64(1)
    return min(SPTE_ENT_PER_PAGE - spte_index(gfn, level), end - gfn)


@njit(inline="always", _nrt=False)
def walk_to_leaf(spt, row, level, gfn):
    """tdp_mmu_for_each_pte(gfn, gfn + 1) down to the SPTE that decides gfn: (row, idx, level, spte)
    of the leaf that maps it, or of the first non-present entry on the way."""
    while True:
        idx = spte_index(gfn, level)
        spte = spt[row, idx]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return row, idx, level, spte
        row = spte_to_child_row(spte)
        level -= 1
