"""Reference for kernels/tdp_iter.py: KVM's ``for_each_tdp_pte_min_level`` as a plain recursive pre-order walk."""

PRESENT = 1 << 11   # SPTE_MMU_PRESENT_MASK
LARGE = 1 << 7      # PT_PAGE_SIZE_MASK
PFN_MASK = (1 << 40) - 1
PT_PFN_BASE = 1 << 38  # table rows are pfns from here (kernels/spte.py)


def for_each_tdp_pte(spt, root, root_level, min_level, start, end):
    """Yield (row, level, gfn) of every SPTE the iterator visits: in pre-order, from the entry that maps
    ``start`` to the last entry before ``end``, stepping into present tables above ``min_level``."""
    def visit(row, level, base):
        span = 512 ** (level - 1)
        for i in range(512):
            gfn = base + i * span
            if gfn + span <= start:
                continue
            if gfn >= end:
                return False
            yield row, level, gfn
            spte = int(spt[row, i])
            if level > min_level and spte & PRESENT and level > 1 and not spte & LARGE:
                if (yield from visit(((spte >> 12) & PFN_MASK) - PT_PFN_BASE, level - 1, gfn)) is False:
                    return False
        return True

    if root >= 0:
        yield from visit(root, root_level, 0)
