"""Reference x86 guest page walk, written from the SDM (vol. 3A ch. 4) as KVM applies it.

A plain, slow, readable oracle for ``batchmmu.kernels.guest_walk``.  Guest memory is a dict of
8-byte aligned gpa -> unsigned 64-bit word (absent = 0).  Where KVM's software walker and the SDM
differ, KVM wins and the rule says so:

* the I/D error-code bit is set for a fetch when EFER.NXE or CR4.SMEP, in every paging mode;
* the PK bit is reported whenever PKRU refuses the access, even if the page also refuses it;
* PAE PDPTEs are checked only for presence here (their reserved bits are checked at CR3 load),
  and their A bit is never set;
* with ``pse36_kvm=True`` a 4M page uses 36-bit PSE (PDE bits 13..16, bits 17..21 reserved)
  whatever MAXPHYADDR is, as KVM's shadow-paging walker does.
"""

# access kinds and error-code bits (SDM 4.7)
PF_P, PF_W, PF_U, PF_RSVD, PF_I, PF_PK = 1, 2, 4, 8, 16, 32

# entry bits
P, RW, US, A, D, PS = 1, 2, 4, 32, 64, 128
XD = 1 << 63

MASK64 = (1 << 64) - 1


def _bit(value, n):
    return (value >> n) & 1


def _field(value, lo, hi):
    """Bits lo..hi of ``value``."""
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def _range(lo, hi):
    """Mask of bits lo..hi (empty if lo > hi)."""
    return 0 if lo > hi else ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def _read(mem, gpa, size):
    word = mem.get(gpa & ~7, 0)
    if size == 8:
        return word
    return (word >> (8 * (gpa & 4))) & 0xFFFFFFFF


def _write(mem, gpa, size, value):
    if size == 8:
        mem[gpa] = value & MASK64
        return
    word = mem.get(gpa & ~7, 0)
    shift = 8 * (gpa & 4)
    mem[gpa & ~7] = (word & ~(0xFFFFFFFF << shift) & MASK64) | ((value & 0xFFFFFFFF) << shift)


def _reserved(mode, entry, level, is_large, m, pse, nxe, pse36_kvm, amd=False):
    """The reserved bits set in ``entry`` (a nonzero result means a RSVD fault); ``amd``: the guest's CPU is
    AMD, whose PML4Es and PML5Es also reserve bit 8 (KVM: nonleaf_bit8_rsvd)."""
    if mode == "32bit":
        # SDM table 4-4: only a 4M PDE has reserved bits: 21:(M-19) with M capped at 40
        if level == 2 and is_large and pse:
            lo = 17 if pse36_kvm else min(m, 40) - 19
            return entry & _range(lo, 21)
        return 0
    # PAE (tables 4-8..4-11): bits 62:M reserved; 4/5-level (tables 4-14..4-20): bits 51:M
    rsvd = _range(m, 62) if mode == "pae" else _range(m, 51)
    if not nxe:
        rsvd |= XD
    if level >= 4:
        rsvd |= PS  # PML5E / PML4E: bit 7 reserved
        if amd:
            rsvd |= 1 << 8
    elif level == 3 and is_large:
        rsvd |= _range(13, 29)  # 1G page, bit 12 is PAT
    elif level == 2 and is_large:
        rsvd |= _range(13, 20)  # 2M page, bit 12 is PAT
    return entry & rsvd


def ref_walk(mem, cr0, cr4, efer, rflags, cr3, pdptrs, pkru, maxphyaddr, gva, pfec, *, pse36_kvm=False, amd=False):
    """Translate ``gva`` for an access of kind ``pfec`` (W=2, U=4, fetch=0x10).

    Returns ``(error_code, gpa, level, new_mem)``: error_code 0 when allowed; gpa None on a fault;
    level = level of the leaf (1 4K, 2 2M/4M, 3 1G) or of the entry where the walk stopped (0 with
    paging off); new_mem = a copy of ``mem`` with A/D bits set by a successful access.  ``amd``: the guest's
    CPU is AMD (bit 8 of a PML4E / PML5E is reserved).
    """
    write, user, fetch = bool(pfec & PF_W), bool(pfec & PF_U), bool(pfec & 0x10)
    pg, wp = _bit(cr0, 31), _bit(cr0, 16)
    pse, pae, la57 = _bit(cr4, 4), _bit(cr4, 5), _bit(cr4, 12)
    smep, smap, pke = _bit(cr4, 20), _bit(cr4, 21), _bit(cr4, 22)
    lma, nxe = _bit(efer, 10), _bit(efer, 11)
    ac = _bit(rflags, 18)
    new_mem = dict(mem)
    if not pg:
        return 0, gva, 0, new_mem

    if lma:
        mode, top = "long", (5 if la57 else 4)
    elif pae:
        mode, top = "pae", 3
    else:
        mode, top = "32bit", 2
    if mode != "long":
        gva &= 0xFFFFFFFF
    size = 4 if mode == "32bit" else 8
    index_bits = 10 if mode == "32bit" else 9

    def fault(code, level):
        code |= pfec & (PF_W | PF_U)
        if fetch and (nxe or smep):
            code |= PF_I
        return code, None, level, dict(mem)

    # the entries used for the translation: (level, gpa of the entry, value)
    used = []
    if mode == "pae":
        pdpte = pdptrs[_field(gva, 30, 31)]
        if not pdpte & P:
            return fault(0, 3)
        table = pdpte & _range(12, 51)
        level = 2
    elif mode == "32bit":
        table = cr3 & _range(12, 31)
        level = 2
    else:
        table = cr3 & _range(12, 51)
        level = top

    while True:
        shift = 12 + index_bits * (level - 1)
        entry_gpa = table + size * _field(gva, shift, shift + index_bits - 1)
        entry = _read(mem, entry_gpa, size)
        if not entry & P:
            return fault(0, level)
        is_large = level > 1 and bool(entry & PS) and (mode != "32bit" or (level == 2 and pse))
        if _reserved(mode, entry, level, is_large, maxphyaddr, pse, nxe, pse36_kvm, amd):
            return fault(PF_P | PF_RSVD, level)
        used.append((level, entry_gpa, entry))
        if level == 1 or is_large:
            break
        table = entry & (_range(12, 31) if mode == "32bit" else _range(12, 51))
        level -= 1

    # SDM 4.6: rights are the combination over every entry used (a PDPTE of PAE has none)
    leaf = used[-1][2]
    writable = all(e & RW for _, _, e in used)
    user_page = all(e & US for _, _, e in used)
    executable = not (nxe and any(e & XD for _, _, e in used)) if size == 8 else True
    pkey = _field(leaf, 59, 62) if size == 8 else 0

    refused = False
    if user:
        refused |= not user_page
        refused |= write and not writable
        refused |= fetch and not executable
    else:
        if fetch:
            refused |= not executable
            refused |= bool(smep) and user_page
        else:
            refused |= bool(smap) and user_page and not ac
            refused |= write and bool(wp) and not writable
    # protection keys: 4/5-level only, data accesses to user pages
    pk_refused = False
    if pke and mode == "long" and user_page and not fetch:
        ad, wd = _bit(pkru, 2 * pkey), _bit(pkru, 2 * pkey + 1)
        pk_refused = bool(ad) or (write and bool(wd) and (user or bool(wp)))
    if refused or pk_refused:
        return fault(PF_P | (PF_PK if pk_refused else 0), level)

    page_bits = 12 + index_bits * (level - 1)
    addr_mask = _range(page_bits, 31) if mode == "32bit" else _range(page_bits, 51)
    gpa = (leaf & addr_mask) | (gva & ((1 << page_bits) - 1))
    if mode == "32bit" and level == 2:
        width = 4 if pse36_kvm else min(maxphyaddr, 40) - 32
        gpa |= _field(leaf, 13, 12 + width) << 32

    for lvl, entry_gpa, entry in used:
        new = entry | A
        if write and lvl == level:
            new |= D
        if new != entry:
            _write(new_mem, entry_gpa, size, new)
    return 0, gpa, level, new_mem
