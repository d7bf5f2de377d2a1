"""Reference nested EPT, written from the SDM (vol. 3C 29.3, "EPT translation mechanism") and KVM's
paging_tmpl.h (PTTYPE_EPT): a plain, slow oracle for ``batchmmu.kernels.paging_ept`` / ``nested``.

L1 memory is a dict of 8-byte aligned L1 gpa -> u64 word (absent = 0).  ``ref_ept_walk`` walks L1's EPT12 for
one L2 gpa.  ``ref_l2_access`` is what an L2 guest sees of one access: the processor's 2D walk of L2's page
tables with every table gpa and the data gpa translated through EPT12 (what L0's shadow EPT02 converges to),
so an access either completes, faults in L2 (#PF) or is refused by EPT12 (an EPT violation / misconfiguration
for L1).  It does not model EPT12's A/D bits (KVM sets them only when its shadow tables miss).
"""

from .guest_walk import MASK64, A, D, _range, ref_walk

R, W, X = 1, 2, 4
LARGE, EPT_A, EPT_D = 1 << 7, 1 << 8, 1 << 9
ADDR = _range(12, 51)
# exit qualification bits (SDM table 28-7)
Q_READ, Q_WRITE, Q_FETCH, Q_GVA_VALID, Q_GVA_TRANSLATED = 1, 2, 4, 1 << 7, 1 << 8
MISCONFIG = "misconfig"


def _rsvd(entry, level, maxphyaddr, execonly):
    """SDM 29.3.3.1: reserved bits, or a bad memory type / XWR combination (a misconfiguration)."""
    high = _range(maxphyaddr, 51)
    large = bool(entry & LARGE)
    if level >= 4:
        rsvd = high | _range(3, 7)
    elif level >= 2 and not large:
        rsvd = high | _range(3, 6)
    elif level == 3:
        rsvd = high | _range(12, 29)
    elif level == 2:
        rsvd = high | _range(12, 20)
    else:
        rsvd = high
    xwr, mt = entry & 7, (entry >> 3) & 7
    bad_xwr = xwr in (W, W | X) or (xwr == X and not execonly)
    # the memory type is a leaf's only (bits 5:3 of a table entry are reserved, caught above)
    is_leaf = level == 1 or large
    return bool(entry & rsvd) or bad_xwr or (is_leaf and mt in (2, 3, 7))


def ref_ept_walk(mem, eptp, gpa, read, write, fetch, maxphyaddr=46, execonly=True, visible=None):
    """Translate L2 gpa ``gpa`` through EPT12 at ``eptp``.  Returns ``(l1_gpa, None)`` when allowed, else
    ``(None, qual)`` with the exit qualification bits 0-5 or MISCONFIG.  ``visible(gfn)``: whether an L1 gfn lies
    in a memslot (an EPT12 table outside them refuses the walk)."""
    levels = ((eptp >> 3) & 7) + 1
    table = eptp & ADDR
    rights = 7
    level = levels
    while True:
        if visible is not None and not visible(table >> 12):
            break
        entry = mem.get(table + 8 * ((gpa >> (12 + 9 * (level - 1))) & 511), 0)
        rights &= entry
        if entry & 7 == 0:
            break
        if _rsvd(entry, level, maxphyaddr, execonly):
            return None, MISCONFIG
        if level == 1 or entry & LARGE:
            if (read and not rights & R) or (write and not rights & W) or (fetch and not rights & X):
                break
            span = 12 + 9 * (level - 1)
            return (entry & ADDR & ~((1 << span) - 1)) | (gpa & ((1 << span) - 1)), None
        table = entry & ADDR
        level -= 1
    qual = (Q_READ if read else 0) | (Q_WRITE if write else 0) | (Q_FETCH if fetch else 0) | ((rights & 7) << 3)
    return None, qual


def ref_npt_walk(mem, ncr3, gpa, write, fetch, l1_cr4, l1_efer, maxphyaddr=46):
    """Translate L2 gpa ``gpa`` through L1's NPT12 at ``ncr3``: an x86 walk in L1's paging mode (CR0 = PG alone),
    on an AMD CPU, always a user access.  Returns ``(l1_gpa, None)`` or ``(None, error code)`` (the #NPF's low bits)."""
    err, out, _, new = ref_walk(mem, 1 << 31, l1_cr4, l1_efer, 0, ncr3, [0] * 4, 0, maxphyaddr, gpa,
                                4 | (2 if write else 0) | (0x10 if fetch else 0), amd=True)
    if out is None:
        return None, err
    mem.update(new)   # NPT has A/D bits: a translation L0 makes sets them
    return out, None


class L2Memory(dict):
    """L2's view of memory: reads of L2 gpas through EPT12 (unmapped: 0); writes go to L1's page."""

    def __init__(self, l1mem, eptp, maxphyaddr, npt=None):
        super().__init__()
        self.l1mem, self.eptp, self.maxphyaddr, self.npt = l1mem, eptp, maxphyaddr, npt

    def l1(self, gpa):
        if self.npt:
            out, _ = ref_npt_walk(dict(self.l1mem), self.eptp, gpa, False, False, *self.npt, self.maxphyaddr)
            return out
        out, _ = ref_ept_walk(self.l1mem, self.eptp, gpa, False, False, False, self.maxphyaddr)
        return out

    def get(self, gpa, default=0):
        l1 = self.l1(gpa)
        return default if l1 is None else self.l1mem.get(l1, default)


def ref_l2_access(l1mem, eptp, regs, gva, kind, maxphyaddr=46, ept_ad=None, value=None, nbytes=0, npt=None):
    """One L2 access (``kind``: PFERR-style W=2, U=4, fetch=0x10) with L2 registers ``regs`` (cr0, cr3, cr4,
    efer).  Returns ``(outcome, code, fault_gpa)`` with outcome "ok", "guest_fault" (code: #PF error code) or
    "l1_exit" (code: exit qualification incl. bits 7-8, 0 for a misconfiguration; fault_gpa: the L2 gpa), and
    updates ``l1mem`` with what a completed access writes (L2's A/D bits, the stored bytes)."""
    ept_ad = (npt is not None or bool(eptp & (1 << 6))) if ept_ad is None else ept_ad
    write, fetch = bool(kind & 2), bool(kind & 0x10)
    view = L2Memory(l1mem, eptp, maxphyaddr, npt)

    def translate(gpa, read, w, f, final):
        """(l1 gpa, None) or (None, what L1 receives): exit qualification, or #NPF exit_info_1."""
        if npt is not None:
            out, err = ref_npt_walk(l1mem, eptp, gpa, w, f, *npt, maxphyaddr)
            return out, None if out is not None else err | (1 << 32 if final else 1 << 33)
        out, q = ref_ept_walk(l1mem, eptp, gpa, read, w, f, maxphyaddr)
        if q is None:
            return out, None
        return None, 0 if q == MISCONFIG else q | Q_GVA_VALID | (Q_GVA_TRANSLATED if final else 0)

    cr0, cr3, cr4, efer = regs
    err, gpa, stop, new_view = ref_walk(view, cr0, cr4, efer, 0x2, cr3, [0] * 4, 0, maxphyaddr, gva, kind,
                                        amd=npt is not None)   # an SVM guest's CPU is AMD
    # the table entries the processor read, top down to the level where the walk ended
    steps = [s for s in _table_entries(view, cr0, cr4, efer, cr3, gva) if s[3] >= stop]
    for entry_gpa, entry, is_leaf, _ in steps:
        sets_ad = gpa is not None and (not entry & A or (is_leaf and write and not entry & D))
        w = ept_ad or sets_ad
        _, q = translate(entry_gpa, True, w, False, False)
        if q is not None:
            return "l1_exit", q, entry_gpa
    if gpa is None:
        return "guest_fault", err, -1
    l1, q = translate(gpa, not write and not fetch, write, fetch, True)
    if q is not None:
        return "l1_exit", q, gpa
    # the walk's A/D writes, then the data
    for k, v in new_view.items():
        if view.get(k) != v:
            l1mem[view.l1(k)] = v
    if nbytes:
        for b in range(nbytes):
            a = l1 + b
            word = l1mem.get(a & ~7, 0)
            sh = 8 * (a & 7)
            l1mem[a & ~7] = (word & ~(0xFF << sh) & MASK64) | (((value >> (8 * b)) & 0xFF) << sh)
    return "ok", 0, -1


def _table_entries(view, cr0, cr4, efer, cr3, gva):
    """(gpa, value, is_leaf, level) of each L2 paging-structure entry a walk of ``gva`` reads, top down, up to a
    not-present or leaf entry (4- and 5-level paging, or 32-bit paging; none with paging off)."""
    if not cr0 & (1 << 31):
        return []
    if efer & (1 << 10):
        level, size, bits, table = (5 if cr4 & (1 << 12) else 4), 8, 9, cr3 & ADDR
    else:
        level, size, bits, table = 2, 4, 10, cr3 & _range(12, 31)
    out = []
    while True:
        shift = 12 + bits * (level - 1)
        egpa = table + size * ((gva >> shift) & ((1 << bits) - 1))
        word = view.get(egpa & ~7)
        entry = word if size == 8 else (word >> (8 * (egpa & 4))) & 0xFFFFFFFF
        large = level > 1 and entry & (1 << 7) and (size == 8 or cr4 & (1 << 4))
        leaf = level == 1 or bool(large)
        out.append((egpa, entry, leaf, level))
        if not entry & 1 or leaf:
            return out
        table = entry & (ADDR if size == 8 else _range(12, 31))
        level -= 1
