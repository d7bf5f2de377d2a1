"""The one walker over TDP tables (KVM ``tdp_iter.c``): step down to the entry that maps a gfn,
step sideways to the next gfn a level covers."""

from numba import njit

from .spte import is_last_spte, is_shadow_present_pte, spte_to_child_row


@njit(inline="always", _nrt=False)
def walk_to_leaf(spt, row, level, gfn):
    """Step down from table ``row`` at ``level`` through present tables: (row, idx, level, spte) of
    the leaf that maps ``gfn``, or of the first non-present entry on the way."""
    while True:
        idx = (gfn >> ((level - 1) * 9)) & 511
        spte = spt[row, idx]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return row, idx, level, spte
        row = spte_to_child_row(spte)
        level -= 1


@njit(inline="always", _nrt=False)
def next_gfn(gfn, level):
    """The first gfn after the range an entry at ``level`` covers (tdp_iter_step_side)."""
    shift = (level - 1) * 9
    return ((gfn >> shift) + 1) << shift
