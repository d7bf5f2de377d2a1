"""Guest page-table walker: KVM's software walk of the guest's own page tables.

Models ``paging_tmpl.h`` FNAME(walk_addr_generic) for PTTYPE 32 (2-level, 4-byte gptes, PSE/PSE-36)
and PTTYPE 64 (PAE with cached PDPTRs, 4-level, 5-level), with the reserved-bit masks of ``mmu.c``
__reset_rsvds_bits_mask (Intel guest, 1G pages supported), the permission and protection-key bitmasks
of update_permission_bitmask / update_pkru_bitmask and ``mmu.h`` permission_fault.

The CPU state a walk needs is one packed *mode word* (``cpu_mode``).  A walk fills a small int64
scratch array ``wk`` (``WK_*`` slots) with KVM's ``struct guest_walker`` fields and returns 0 (allowed)
or ``WALK_FAULT | error code``; it never writes guest memory.  ``guest_set_ad`` then applies
FNAME(update_accessed_dirty_bits) for a successful walk.

gptes are int64 (bit 63 = XD makes them negative); 4-byte gptes are zero-extended.
"""

import numpy as np
from numba import njit

from .gmem import gm_find, gm_page_key, gm_row_read, gm_row_write, gm_slot, gm_write_bytes
from .jit import kernel
from .state import GMH_KEY, GMH_ROW, VM_MEMSLOTS_GEN


def _bits(lo, hi):
    """Mask of bits lo..hi inclusive, as np.int64."""
    m = ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)
    return np.int64(np.uint64(m).view(np.int64))


# --- architectural register bits ------------------------------------------------------
X86_CR0_WP = np.int64(1 << 16)
X86_CR0_PG = np.int64(1 << 31)
X86_CR4_PSE = np.int64(1 << 4)
X86_CR4_PAE = np.int64(1 << 5)
X86_CR4_LA57 = np.int64(1 << 12)
X86_CR4_SMEP = np.int64(1 << 20)
X86_CR4_SMAP = np.int64(1 << 21)
X86_CR4_PKE = np.int64(1 << 22)
EFER_LMA = np.int64(1 << 10)
EFER_NX = np.int64(1 << 11)
X86_EFLAGS_AC = np.int64(1 << 18)

# --- mode word (cpu_mode): raw register bits + walk depth --------------------------------
MODE_PG = np.int64(1 << 0)
MODE_WP = np.int64(1 << 1)
MODE_PSE = np.int64(1 << 2)
MODE_PAE = np.int64(1 << 3)
MODE_LMA = np.int64(1 << 4)
MODE_LA57 = np.int64(1 << 5)
MODE_NXE = np.int64(1 << 6)
MODE_SMEP = np.int64(1 << 7)
MODE_SMAP = np.int64(1 << 8)
MODE_PKE = np.int64(1 << 9)  # CR4.PKE as written; protection keys act only with LMA too
MODE_AC = np.int64(1 << 10)
# Not a register bit: a caller ORs it in to get KVM's software walker for 4M pages, which hard-codes
# 36-bit PSE (PDE bits 13..16 -> gpa bits 32..35, bits 17..21 reserved) whatever MAXPHYADDR is.
# Without it a 4M page follows the SDM (bits 13..(M-20) -> gpa 32..(M-1), M = min(MAXPHYADDR, 40)).
MODE_PSE36_KVM = np.int64(1 << 11)
# the guest's CPU is AMD (guest_cpuid_is_amd_compatible): the VM's host has NPT; set by the callers, not cpu_mode
MODE_AMD = np.int64(1 << 15)
MODE_LEVELS_SHIFT = 12
MODE_LEVELS_MASK = np.int64(7)

# --- gpte bits (pgtable_types.h) ---------------------------------------------------------
PT_PRESENT_MASK = np.int64(1 << 0)
PT_WRITABLE_MASK = np.int64(1 << 1)
PT_USER_MASK = np.int64(1 << 2)
PT_ACCESSED_MASK = np.int64(1 << 5)
PT_DIRTY_MASK = np.int64(1 << 6)
PT_PAGE_SIZE_MASK = np.int64(1 << 7)
PT64_NX_MASK = _bits(63, 63)
PT_PKEY_SHIFT = 59
PT64_BASE_ADDR_MASK = _bits(12, 51)  # GUEST_PT64_BASE_ADDR_MASK
PT32_BASE_ADDR_MASK = _bits(12, 31)
PT32_PSE36_SHIFT = 13  # PT32_DIR_PSE36_SHIFT
PAE_PDPT_MASK = _bits(5, 31)  # CR3 bits holding the 32-byte aligned PDPT

# --- ACC_* (mmu_internal.h) and PFERR_* (kvm_host.h) ---------------------------------------
ACC_EXEC = np.int64(1)
ACC_WRITE = np.int64(2)
ACC_USER = np.int64(4)
ACC_ALL = np.int64(7)
PFERR_PRESENT = np.int64(1 << 0)
PFERR_WRITE = np.int64(1 << 1)
PFERR_USER = np.int64(1 << 2)
PFERR_RSVD = np.int64(1 << 3)
PFERR_FETCH = np.int64(1 << 4)
PFERR_PK = np.int64(1 << 5)
PFERR_ACCESS_MASK = np.int64(PFERR_WRITE | PFERR_USER | PFERR_FETCH)

# --- kvm_mmu_page_role bits (kvm_host.h) -----------------------------------------------------
ROLE_HAS_4_BYTE_GPTE = np.int64(1 << 4)
ROLE_DIRECT = np.int64(1 << 7)
ROLE_ACCESS_SHIFT = 8
ROLE_EFER_NX = np.int64(1 << 12)
ROLE_CR0_WP = np.int64(1 << 13)
ROLE_SMEP_ANDNOT_WP = np.int64(1 << 14)
ROLE_SMAP_ANDNOT_WP = np.int64(1 << 15)
# kvm_mmu_extended_role bits
EXT_VALID = np.int64(1 << 0)
EXT_CR4_PSE = np.int64(1 << 2)
EXT_CR4_PKE = np.int64(1 << 3)
EXT_CR4_SMAP = np.int64(1 << 4)
EXT_CR4_SMEP = np.int64(1 << 5)
EXT_CR4_LA57 = np.int64(1 << 6)
EXT_EFER_LMA = np.int64(1 << 7)

# --- walker scratch layout (struct guest_walker); per-level slots are indexed base + level (1..5) ---
WK_LEVELS = 0  # start level: 0 paging off, 2, 3 (PAE), 4, 5
WK_MAX_LEVEL = 1  # walker->max_level: highest level read from memory (PAE: 2)
WK_LEAF_LEVEL = 2  # walker->level: leaf level (1 4K, 2 2M/4M, 3 1G) or the level where the walk stopped
WK_GPA = 3  # final gpa incl. page offset (-1 on a fault)
WK_GFN = 4  # walker->gfn: gfn of the 4K page accessed (-1 on a fault)
WK_PTE_ACCESS = 5  # FNAME(gpte_access) of all levels ANDed: what permission_fault checks
WK_PTE_ACCESS_CLEAN = 6  # walker->pte_access after FNAME(protect_clean_gpte) (reads of a D-clean leaf lose W)
WK_PKEY = 7  # pkey of the leaf (bits 62:59, 8-byte gptes only)
WK_AD_NEEDED = 8  # 1 if guest_set_ad has something to set (a missing A, or D for a write)
WK_GPTE_SIZE = 9  # 4 or 8
WK_ERROR = 10  # architectural #PF error code of a refused access (0 when allowed, and may be 0 when refused)
WK_FAULT = 11  # 1 if the access is refused
WK_PTE_GPA = 12  # + level: gpa of the gpte read at that level (-1 not read; PAE PDPTE: -1)
WK_GPTE = 18  # + level: its value (PAE level 3: the cached PDPTE); guest_set_ad updates it
WK_TABLE_GFN = 24  # + level: gfn of the table holding it (-1 not walked)
WK_PT_ACCESS = 30  # + level: walker->pt_access[level-1], ACC bits of the levels above (not incl.) it; PAE 3: 7
WK_SIZE = 36
# --- the walker's table-row cache (the simulator's, not KVM's), after the walker's words in a ``wk`` of at least
# WKC_END words (the shadow scratch); per level the last table page looked up: its gfn, guest-memory key and
# key-table slot, for one VM and memslot generation.  A shorter ``wk`` walks without it.
WKC_VM = 40  # VM id + 1 of the cached entries (0: none)
WKC_GEN = 41  # that VM's memslot generation when they were cached
WKC_GFN = 42  # + level: the table's gfn (-1: nothing cached)
WKC_KEY = 48  # + level: its key (GuestMem)
WKC_SLOT = 54  # + level: the key-table slot the key was found in
WKC_END = 60

# guest_walk's result for a refused access: the error code with this flag (a not-present fault on a
# supervisor read has error code 0, so the code alone cannot say "refused")
WALK_FAULT = np.int64(1 << 62)
PFERR_MASK = np.int64(0xFFFF)

# permissions[] byte helpers (mmu.c BYTE_MASK): bit i set iff ACC value i has the flag
_BYTE_X = np.int64(0xAA)
_BYTE_W = np.int64(0xCC)
_BYTE_U = np.int64(0xF0)


@njit(inline="always", _nrt=False)
def _rsvd(lo, hi):
    """Mask of bits lo..hi inclusive (empty when lo > hi), for hi - lo < 62."""
    if lo > hi:
        return np.int64(0)
    return ((np.int64(1) << np.int64(hi - lo + 1)) - np.int64(1)) << np.int64(lo)


@kernel
def cpu_mode(cr0, cr4, efer, rflags):
    """Mode word of the vCPU registers: MODE_* flags and the walk depth (mmu.c kvm_calc_cpu_role levels)."""
    m = np.int64(0)
    if cr0 & X86_CR0_PG:
        m |= MODE_PG
    if cr0 & X86_CR0_WP:
        m |= MODE_WP
    if cr4 & X86_CR4_PSE:
        m |= MODE_PSE
    if cr4 & X86_CR4_PAE:
        m |= MODE_PAE
    if efer & EFER_LMA:
        m |= MODE_LMA
    if cr4 & X86_CR4_LA57:
        m |= MODE_LA57
    if efer & EFER_NX:
        m |= MODE_NXE
    if cr4 & X86_CR4_SMEP:
        m |= MODE_SMEP
    if cr4 & X86_CR4_SMAP:
        m |= MODE_SMAP
    if cr4 & X86_CR4_PKE:
        m |= MODE_PKE
    if rflags & X86_EFLAGS_AC:
        m |= MODE_AC
    levels = 0
    if m & MODE_PG:
        if m & MODE_LMA:
            levels = 5 if m & MODE_LA57 else 4
        elif m & MODE_PAE:
            levels = 3
        else:
            levels = 2
    return m | (np.int64(levels) << np.int64(MODE_LEVELS_SHIFT))


@njit(inline="always", _nrt=False)
def mode_levels(mode):
    """Walk depth of a mode word: 0 (paging off), 2, 3 (PAE), 4 or 5."""
    return (mode >> np.int64(MODE_LEVELS_SHIFT)) & MODE_LEVELS_MASK


@njit(inline="always", _nrt=False)
def mode_pke(mode):
    """Protection keys active: CR4.PKE and long mode (kvm_calc_cpu_role ext.cr4_pke)."""
    return (mode & MODE_PKE) != 0 and (mode & MODE_LMA) != 0


@kernel
def cpu_role_word(mode):
    """kvm_mmu_page_role word of kvm_calc_cpu_role (smm = guest_mode = 0)."""
    role = np.int64(ACC_ALL) << np.int64(ROLE_ACCESS_SHIFT)
    if not mode & MODE_PG:
        return role | ROLE_DIRECT
    role |= mode_levels(mode)
    if not mode & MODE_PAE:
        role |= ROLE_HAS_4_BYTE_GPTE
    if mode & MODE_NXE:
        role |= ROLE_EFER_NX
    if mode & MODE_WP:
        role |= ROLE_CR0_WP
    elif mode & MODE_SMEP:
        role |= ROLE_SMEP_ANDNOT_WP
    if (mode & MODE_WP) == 0 and (mode & MODE_SMAP) != 0:
        role |= ROLE_SMAP_ANDNOT_WP
    return role


@kernel
def cpu_role_ext_word(mode):
    """kvm_mmu_extended_role word of kvm_calc_cpu_role (execonly = 0)."""
    ext = EXT_VALID
    if not mode & MODE_PG:
        return ext
    if mode & MODE_SMEP:
        ext |= EXT_CR4_SMEP
    if mode & MODE_SMAP:
        ext |= EXT_CR4_SMAP
    if mode & MODE_PSE:
        ext |= EXT_CR4_PSE
    if mode & MODE_LMA:
        ext |= EXT_EFER_LMA
        if mode & MODE_PKE:
            ext |= EXT_CR4_PKE
        if mode & MODE_LA57:
            ext |= EXT_CR4_LA57
    return ext


@njit(inline="always", _nrt=False)
def permission_byte(mode, pfec):
    """mmu->permissions[index] for this access (mmu.c update_permission_bitmask, non-EPT): bit = fault."""
    user = (pfec & PFERR_USER) != 0
    fetch = (pfec & PFERR_FETCH) != 0
    wf = (~_BYTE_W & 0xFF) if pfec & PFERR_WRITE else np.int64(0)
    uf = (~_BYTE_U & 0xFF) if user else np.int64(0)
    ff = (~_BYTE_X & 0xFF) if fetch else np.int64(0)
    kf = np.int64(0) if user else _BYTE_U
    if not mode & MODE_NXE:
        ff = np.int64(0)
    if (mode & MODE_WP) == 0 and not user:
        wf = np.int64(0)
    smepf = kf if ((mode & MODE_SMEP) != 0 and fetch) else np.int64(0)
    # permission_fault puts EFLAGS.AC in the PFERR_RSVD slot of the index: it switches SMAP off
    smapf = kf if ((mode & MODE_SMAP) != 0 and not fetch and (mode & MODE_AC) == 0) else np.int64(0)
    return ff | uf | wf | smepf | smapf


@njit(inline="always", _nrt=False)
def pkru_fault_bits(mode, pte_access, pkey, pkru, pfec):
    """Nonzero PKRU AD/WD bits that refuse this access (mmu.c update_pkru_bitmask, mmu.h permission_fault)."""
    if not mode_pke(mode):
        return np.int64(0)
    # check_pkey: data access to a user page; check_write: write, and for supervisor writes only with CR0.WP
    if (pfec & PFERR_FETCH) != 0 or (pte_access & ACC_USER) == 0:
        return np.int64(0)
    check = np.int64(1)
    if (pfec & PFERR_WRITE) != 0 and ((pfec & PFERR_USER) != 0 or (mode & MODE_WP) != 0):
        check = np.int64(3)
    return (pkru >> np.int64(2 * pkey)) & check


@njit(inline="always", _nrt=False)
def permission_fault(mode, pte_access, pkey, pkru, pfec):
    """Error code bits (PFERR_PRESENT, + PFERR_PK) if the access is refused, else 0 (mmu.h permission_fault)."""
    fault = (permission_byte(mode, pfec) >> pte_access) & 1
    pk = pkru_fault_bits(mode, pte_access, pkey, pkru, pfec)
    if fault == 0 and pk == 0:
        return np.int64(0)
    return PFERR_PRESENT | (PFERR_PK if pk != 0 else np.int64(0))


@njit(inline="always", _nrt=False)
def gpte_rsvd_mask(mode, maxphyaddr, level, gpte):
    """Reserved bits of ``gpte`` at ``level`` (mmu.c __reset_rsvds_bits_mask, 1G pages supported; with MODE_AMD
    bit 8 of a PML4E / PML5E too, nonleaf_bit8_rsvd)."""
    levels = mode_levels(mode)
    large = (gpte & PT_PAGE_SIZE_MASK) != 0
    if levels == 2:
        # 4-byte gptes: nothing reserved except in a 4M PDE (PSE-36 address bits above MAXPHYADDR, bit 21)
        if level == 2 and large and (mode & MODE_PSE) != 0:
            if mode & MODE_PSE36_KVM:
                return _rsvd(17, 21)
            return _rsvd(min(maxphyaddr, 40) - 19, 21)
        return np.int64(0)
    high = _rsvd(maxphyaddr, 62 if levels == 3 else 51)
    if not mode & MODE_NXE:
        high |= PT64_NX_MASK
    if level >= 4:
        high |= PT_PAGE_SIZE_MASK  # PML4E/PML5E: PS reserved
        return high | _rsvd(8, 8) if mode & MODE_AMD else high
    if large and level == 3:
        return high | _rsvd(13, 29)  # 1G page: bits 13..29 (bit 12 = PAT)
    if large and level == 2:
        return high | _rsvd(13, 20)  # 2M page: bits 13..20 (bit 12 = PAT)
    return high


@njit(inline="always", _nrt=False)
def walk_table_row(gm, sm, vm, gpa, wk, level):
    """Row of the guest-memory page holding the gpte at ``gpa`` (level ``level`` of a walk), -1 when it reads as
    zeros: gm_find(gm_page_key()), remembered per level in wk[WKC_*].  An entry holds while the VM's memslot
    generation is unchanged (gpa -> hva is fixed) and the key table still has the key in the remembered slot (so
    removals, re-adds and a rehash are seen).  Walks of L2 memory (``sm.root`` >= 0) do not use it."""
    if sm.root >= 0 or wk.shape[0] < WKC_END:
        k = gm_page_key(sm, vm, gpa)
        return gm_find(gm.hash, k) if k >= 0 else np.int64(-1)
    ht = gm.hash
    gfn = gpa >> 12
    gen = sm.vrec[vm, VM_MEMSLOTS_GEN]
    if wk[WKC_VM] != vm + 1 or wk[WKC_GEN] != gen:
        wk[WKC_VM] = vm + 1
        wk[WKC_GEN] = gen
        for lv in range(6):
            wk[WKC_GFN + lv] = -1
    elif wk[WKC_GFN + level] == gfn:
        h = wk[WKC_SLOT + level]
        if h < ht.shape[0] and ht[h, GMH_KEY] == wk[WKC_KEY + level]:
            return ht[h, GMH_ROW]
    k = gm_page_key(sm, vm, gpa)
    if k < 0:
        return np.int64(-1)
    h = gm_slot(ht, k)
    if ht[h, GMH_KEY] == -1:
        return np.int64(-1)   # never written: not remembered (a write gives it a row)
    wk[WKC_GFN + level] = gfn
    wk[WKC_KEY + level] = k
    wk[WKC_SLOT + level] = h
    return ht[h, GMH_ROW]


@njit(inline="always", _nrt=False)
def _walk_error(mode, pfec, errcode, wk):
    # paging_tmpl.h FNAME(walk_addr_generic), label error
    errcode |= pfec & (PFERR_WRITE | PFERR_USER)
    if (pfec & PFERR_FETCH) != 0 and (mode & (MODE_NXE | MODE_SMEP)) != 0:
        errcode |= PFERR_FETCH
    wk[WK_ERROR] = errcode
    wk[WK_FAULT] = 1
    wk[WK_GPA] = -1
    wk[WK_GFN] = -1
    return errcode | WALK_FAULT


@kernel
def guest_walk(gm, sm, vm, mode, cr3, pdptrs, pkru, maxphyaddr, gva, pfec, wk):
    """Walk the guest page tables of ``vm`` for ``gva``: 0 if the access is allowed, else WALK_FAULT | error code.

    Guest memory ``gm`` (GuestMem) is read through the memslots in ``sm`` (SlotMap): a gpte in no memslot
    reads as 0 (KVM: an error hva, the same not-present fault).  ``pfec``: access kind (PFERR_WRITE |
    PFERR_USER | PFERR_FETCH; other bits ignored).  ``pdptrs``
    int64[4] (PAE only).  Fills ``wk`` (WK_*, and with WKC_END words or more its table-row cache WKC_*),
    writes nothing else.
    """
    # paging_tmpl.h FNAME(walk_addr_generic)
    pfec = pfec & PFERR_ACCESS_MASK
    levels = mode_levels(mode)
    for i in range(WK_SIZE):
        wk[i] = 0
    for lv in range(6):
        wk[WK_PTE_GPA + lv] = -1
        wk[WK_TABLE_GFN + lv] = -1
    wk[WK_LEVELS] = levels
    if levels == 0:
        # nonpaging_gva_to_gpa: no tables, no permission checks
        wk[WK_GPA] = gva
        wk[WK_GFN] = gva >> 12
        wk[WK_PTE_ACCESS] = ACC_ALL
        wk[WK_PTE_ACCESS_CLEAN] = ACC_ALL
        return np.int64(0)
    four = levels == 2
    wk[WK_GPTE_SIZE] = 4 if four else 8
    if levels <= 3:
        gva = gva & np.int64(0xFFFFFFFF)
    level = levels
    pte = cr3
    if levels == 3:
        pdpte = pdptrs[(gva >> 30) & 3]
        wk[WK_GPTE + 3] = pdpte
        wk[WK_TABLE_GFN + 3] = (cr3 & PAE_PDPT_MASK) >> 12
        wk[WK_PT_ACCESS + 3] = ACC_ALL
        wk[WK_LEAF_LEVEL] = 3
        if not pdpte & PT_PRESENT_MASK:
            return _walk_error(mode, pfec, np.int64(0), wk)
        pte = pdpte
        level = 2
    wk[WK_MAX_LEVEL] = level
    base_mask = PT32_BASE_ADDR_MASK if four else PT64_BASE_ADDR_MASK
    bits_per_level = 10 if four else 9
    index_mask = np.int64(1023) if four else np.int64(511)
    # pte_access of KVM as separate pieces: W/U/A ANDed over levels, NX ORed
    and_bits = PT_WRITABLE_MASK | PT_USER_MASK | PT_ACCESSED_MASK
    nx = False
    first = True
    while True:
        if first and four:
            wk[WK_PT_ACCESS + level] = ACC_WRITE | ACC_USER  # KVM: gpte_access(~0ull) without an NX mask
        else:
            wk[WK_PT_ACCESS + level] = (and_bits & (ACC_WRITE | ACC_USER)) | (0 if nx else ACC_EXEC)
        first = False
        index = (gva >> np.int64(12 + (level - 1) * bits_per_level)) & index_mask
        table_gfn = (pte & base_mask) >> 12
        pte_gpa = (table_gfn << 12) + index * (4 if four else 8)
        wk[WK_TABLE_GFN + level] = table_gfn
        wk[WK_PTE_GPA + level] = pte_gpa
        wk[WK_LEAF_LEVEL] = level
        pte = gm_row_read(gm, walk_table_row(gm, sm, vm, pte_gpa, wk, level), pte_gpa, 4 if four else 8)
        wk[WK_GPTE + level] = pte
        if not pte & PT_PRESENT_MASK:
            return _walk_error(mode, pfec, np.int64(0), wk)
        if pte & gpte_rsvd_mask(mode, maxphyaddr, level, pte):
            return _walk_error(mode, pfec, PFERR_RSVD | PFERR_PRESENT, wk)
        and_bits &= pte
        if not four and pte < 0:
            nx = True
        # FNAME(is_last_gpte): 4K always; PS above it (32-bit: only in the PDE and only with CR4.PSE)
        if level == 1:
            break
        if (pte & PT_PAGE_SIZE_MASK) != 0 and (not four or (mode & MODE_PSE) != 0):
            break
        level -= 1
    pkey = np.int64(0) if four else (pte >> np.int64(PT_PKEY_SHIFT)) & 0xF
    pte_access = (and_bits & (ACC_WRITE | ACC_USER)) | (0 if nx else ACC_EXEC)
    wk[WK_PTE_ACCESS] = pte_access
    wk[WK_PKEY] = pkey
    err = permission_fault(mode, pte_access, pkey, pkru, pfec)
    if err:
        return _walk_error(mode, pfec, err, wk)
    # gpte_to_gfn_lvl + offset inside a huge page (+ PSE-36 high bits)
    page_shift = 12 + (level - 1) * bits_per_level
    off_mask = (np.int64(1) << np.int64(page_shift)) - 1
    gpa = (pte & base_mask & ~off_mask) | (gva & off_mask)
    if four and level == 2:
        gpa |= ((pte >> np.int64(PT32_PSE36_SHIFT)) & 0xFF) << np.int64(32)  # upper bits are reserved (0)
    wk[WK_GPA] = gpa
    wk[WK_GFN] = gpa >> 12
    accessed_dirty = (and_bits & PT_ACCESSED_MASK) != 0
    if pfec & PFERR_WRITE:
        wk[WK_PTE_ACCESS_CLEAN] = pte_access
        accessed_dirty = accessed_dirty and (pte & PT_DIRTY_MASK) != 0
    elif pte & PT_DIRTY_MASK:
        wk[WK_PTE_ACCESS_CLEAN] = pte_access
    else:
        wk[WK_PTE_ACCESS_CLEAN] = pte_access & ~ACC_WRITE  # FNAME(protect_clean_gpte)
    wk[WK_AD_NEEDED] = 0 if accessed_dirty else 1
    return np.int64(0)


@njit(inline="always", _nrt=False)
def walk_sets_ad(wk, level, leaf, write):
    """True when a successful walk sets A (or, on the leaf of a write, D) in the gpte at ``level``: the
    processor's access to that table page is then a write (for EPT without A/D bits)."""
    g = wk[WK_GPTE + level]
    if (g & PT_ACCESSED_MASK) == 0:
        return True
    return level == leaf and write and (g & PT_DIRTY_MASK) == 0


@kernel
def guest_set_ad(gm, sm, vm, wk, pfec):
    """Set A in every gpte of a successful walk that lacks it and D in the leaf for a write.

    Returns a bitmask of the levels whose gpte changed (bit ``level``); 4-byte gptes are written as 4
    bytes.  ``wk[WK_GPTE + level]`` is updated.  The caller marks the table pages dirty.
    """
    # paging_tmpl.h FNAME(update_accessed_dirty_bits)
    changed = np.int64(0)
    leaf = wk[WK_LEAF_LEVEL]
    top = wk[WK_MAX_LEVEL]
    if wk[WK_LEVELS] == 0 or wk[WK_FAULT] != 0:
        return changed
    for level in range(top, leaf - 1, -1):
        old = wk[WK_GPTE + level]
        new = old | PT_ACCESSED_MASK
        if level == leaf and (pfec & PFERR_WRITE) != 0:
            new |= PT_DIRTY_MASK
        if new == old:
            continue
        gpa = wk[WK_PTE_GPA + level]
        r = walk_table_row(gm, sm, vm, gpa, wk, level)   # the walk just read it there
        if r >= 0:
            gm_row_write(gm, r, gpa, new, wk[WK_GPTE_SIZE])
        else:   # (not reached: a gpte read as 0 is not present, the walk stopped there)
            gm_write_bytes(gm, sm, vm, gpa, new, wk[WK_GPTE_SIZE])
        wk[WK_GPTE + level] = new
        changed |= np.int64(1) << np.int64(level)
    return changed
