"""The processor's walks of the tables KVM built: the shadow-paging walk (the TDP walk is kernels/fault.py's
``tdp_hw_walk``)."""

import numpy as np
from numba import njit

from .guest_walk import (
    MODE_AC,
    MODE_PG,
    MODE_SMAP,
    MODE_SMEP,
    PFERR_FETCH,
    PFERR_PRESENT,
    PFERR_USER,
    PFERR_WRITE,
)
from .mmu_internal import HW_FAULT
from .shadow_mmu import sp_get_gfn, walk_start
from .spte import (
    NPT_A,
    NPT_D,
    NPT_P,
    NPT_U,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    spte_to_child_row,
)


@njit(inline="always", _nrt=False)
def shadow_hw_walk(m, vm, vg, gva, pfec, mode):
    """The processor's walk of the shadow tables: (error code or 0, gpa, refs, row, idx).  Hardware
    CR0.WP is always 1 under shadow paging; SMEP/SMAP are the guest's; A/D of the leaf get set."""
    row, level = walk_start(m, vg, gva)
    refs = 0
    if row < 0:
        return pfec | HW_FAULT, 0, refs, -1, 0
    write = (pfec & PFERR_WRITE) != 0
    user = (pfec & PFERR_USER) != 0
    fetch = (pfec & PFERR_FETCH) != 0
    while True:
        idx = (gva >> (12 + 9 * (level - 1))) & 511
        spte = m.pa.spt[row, idx]
        refs += 1
        if not (spte & NPT_P):
            return pfec | HW_FAULT, 0, refs, row, idx
        if level == 1 or (spte & PT_PAGE_SIZE_MASK):
            if (write and not (spte & PT_WRITABLE_MASK)) or (user and not (spte & NPT_U)) or \
                    (fetch and spte < 0):
                return pfec | PFERR_PRESENT | HW_FAULT, 0, refs, row, idx
            if not user and (spte & NPT_U) and (mode & MODE_PG):   # SMEP/SMAP only with guest paging on
                from_smep = fetch and (mode & MODE_SMEP) != 0
                from_smap = not fetch and (mode & MODE_SMAP) != 0 and (mode & MODE_AC) == 0
                if from_smep or from_smap:
                    return pfec | PFERR_PRESENT | HW_FAULT, 0, refs, row, idx
            want = NPT_A | (NPT_D if write else np.int64(0))
            if (spte & want) != want:
                m.pa.spt[row, idx] = spte | want
            size_mask = (np.int64(1) << np.int64(12 + 9 * (level - 1))) - 1
            gpa = (sp_get_gfn(m, row, idx) << 12) | (gva & size_mask)
            return 0, gpa, refs, row, idx
        row = spte_to_child_row(spte)
        level -= 1
