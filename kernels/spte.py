"""SPTE bit layout: every mask in one place, tiny predicates (KVM ``spte.h``).

SPTEs are kept in int64 arrays (bit 63 set = negative); every constant here is an
``np.int64`` so numba never mixes signed and unsigned arithmetic.

Two hardware formats are modelled: EPT (Intel, exec-only supported, A/D optional)
and legacy/NPT (AMD NPT, also the shadow-paging format).  A kernel picks the format
per VM with ``fmt`` (``FMT_EPT`` or ``FMT_NPT``).
"""

import numpy as np
from numba import njit


def _bit(n):
    return np.int64(np.uint64(1 << n).view(np.int64)) if n == 63 else np.int64(1 << n)


def _bits(lo, hi):
    """Mask of bits lo..hi inclusive."""
    m = 0
    for b in range(lo, hi + 1):
        m |= 1 << b
    return np.int64(np.uint64(m).view(np.int64)) if hi == 63 else np.int64(m)


FMT_EPT = 0
FMT_NPT = 1

PAGE_SHIFT = 12
SPTE_ENT_PER_PAGE = 512
LEVEL_BITS = 9
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G


@njit(inline="always", _nrt=False)
def hpage_gfn_shift(level):
    # KVM_HPAGE_GFN_SHIFT: gfn bits an entry at ``level`` covers
    return (level - 1) * LEVEL_BITS


@njit(inline="always", _nrt=False)
def spte_index(gfn, level):
    # SPTE_INDEX (spte.h), of a gfn: the entry of the table at ``level`` that maps it
    return (gfn >> hpage_gfn_shift(level)) & (SPTE_ENT_PER_PAGE - 1)


@njit(inline="always", _nrt=False)
def gfn_round_for_level(gfn, level):
    # gfn_round_for_level (mmu_internal.h): the first gfn of the entry at ``level`` that maps gfn
    shift = hpage_gfn_shift(level)
    return (gfn >> shift) << shift


@njit(inline="always", _nrt=False)
def pages_per_hpage(level):
    # KVM_PAGES_PER_HPAGE
    return np.int64(1) << hpage_gfn_shift(level)

# --- common software bits (spte.h) -------------------------------------------------
SPTE_MMU_PRESENT_MASK = _bit(11)
SPTE_BASE_ADDR_MASK = _bits(12, 51)
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = _bits(52, 53)
SPTE_TDP_AD_ENABLED = np.int64(0)
SPTE_TDP_AD_DISABLED = _bit(52)
SPTE_TDP_AD_WRPROT_ONLY = _bit(53)
SHADOW_NONPRESENT_VALUE = _bit(63)  # 64-bit kernels since ~v6.10
FROZEN_SPTE = np.int64(SHADOW_NONPRESENT_VALUE | np.int64(0x5A0))
PT_WRITABLE_MASK = _bit(1)
PT_PAGE_SIZE_MASK = _bit(7)
PFN_MASK = np.int64((1 << 40) - 1)

# --- EPT (vmx.h, spte.c kvm_mmu_set_ept_masks) ---------------------------------------
EPT_R = _bit(0)
EPT_W = _bit(1)
EPT_X = _bit(2)
EPT_RWX = np.int64(7)
EPT_MT_SHIFT = 3
EPT_MT_MASK = _bits(3, 5)
EPT_IPAT = _bit(6)
EPT_A = _bit(8)
EPT_D = _bit(9)
EPT_USER_EXEC = _bit(10)
EPT_SAVED_BITS_SHIFT = 54  # SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
EPT_SAVED_R = _bit(54)
EPT_SAVED_X = _bit(56)
EPT_HOST_WRITABLE = _bit(57)
EPT_MMU_WRITABLE = _bit(58)
EPT_SUPPRESS_VE = _bit(63)
MTRR_TYPE_WRBACK = 6
EPT_MEMTYPE_WB = np.int64((MTRR_TYPE_WRBACK << EPT_MT_SHIFT) | (1 << 6))  # vmx_get_mt_mask: WB | IPAT
EPT_MMIO_VALUE = np.int64(0b110)  # W|X without R -> EPT misconfiguration
EPT_MMIO_MASK = np.int64(EPT_RWX | EPT_SUPPRESS_VE)

# --- legacy / NPT (spte.c kvm_mmu_reset_all_pte_masks) -------------------------------
NPT_P = _bit(0)
NPT_W = _bit(1)
NPT_U = _bit(2)
NPT_PWT = _bit(3)
NPT_PCD = _bit(4)
NPT_A = _bit(5)
NPT_D = _bit(6)
NPT_G = _bit(8)
NPT_HOST_WRITABLE = _bit(9)   # DEFAULT_SPTE_HOST_WRITABLE
NPT_MMU_WRITABLE = _bit(10)   # DEFAULT_SPTE_MMU_WRITABLE
NPT_NX = _bit(63)
NPT_MMIO_VALUE = np.int64(_bit(51) | NPT_P)  # host MAXPHYADDR < 52: reserved PA bit 51 + P
NPT_MMIO_MASK = NPT_MMIO_VALUE
NPT_MMIO_ACCESS_MASK = np.int64(NPT_W | NPT_U)

# --- MMIO generation (spte.h) --------------------------------------------------------
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_MASK = _bits(3, 10)
MMIO_SPTE_GEN_HIGH_MASK = _bits(52, 62)
MMIO_SPTE_GEN_LOW_BITS = 8
MMIO_SPTE_GEN_MASK = np.int64((1 << 19) - 1)
MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS  # 44
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = _bit(63)

# --- access bits (mmu.h ACC_*) and page-fault error code (kvm_host.h PFERR_*) --------
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = 2
ACC_USER_MASK = 4
ACC_ALL = 7
PFERR_PRESENT_MASK = 1
PFERR_WRITE_MASK = 2
PFERR_USER_MASK = 4
PFERR_RSVD_MASK = 8
PFERR_FETCH_MASK = 16
PFERR_PK_MASK = 32

# --- kvm_mmu_page_role (kvm_host.h): bit positions ------------------------------------
ROLE_LEVEL_MASK = 0xF
ROLE_HAS_4_BYTE_GPTE = 1 << 4
ROLE_QUADRANT_SHIFT = 5
ROLE_DIRECT = 1 << 7
ROLE_ACCESS_SHIFT = 8
ROLE_INVALID = 1 << 11
ROLE_EFER_NX = 1 << 12
ROLE_CR0_WP = 1 << 13
ROLE_SMEP_ANDNOT_WP = 1 << 14
ROLE_SMAP_ANDNOT_WP = 1 << 15
ROLE_AD_DISABLED = 1 << 16
ROLE_GUEST_MODE = 1 << 17
ROLE_PASSTHROUGH = 1 << 18
ROLE_SMM_SHIFT = 24

# Non-leaf SPTEs of the simulator point at arena rows: pa = (PT_PFN_BASE + row) << 12.
PT_PFN_BASE = np.int64(1 << 38)

# Masks per format, gathered for the non-overlap test and for documentation.
EPT_HW_MASKS = {
    "R": EPT_R, "W": EPT_W, "X": EPT_X, "MT": EPT_MT_MASK, "IPAT": EPT_IPAT, "PS": PT_PAGE_SIZE_MASK,
    "A": EPT_A, "D": EPT_D, "UX": EPT_USER_EXEC, "MMU_PRESENT": SPTE_MMU_PRESENT_MASK,
    "PFN": SPTE_BASE_ADDR_MASK, "AD_TYPE": SPTE_TDP_AD_MASK, "SAVED_R": EPT_SAVED_R,
    "SAVED_X": EPT_SAVED_X, "HOST_WRITABLE": EPT_HOST_WRITABLE, "MMU_WRITABLE": EPT_MMU_WRITABLE,
    "SUPPRESS_VE": EPT_SUPPRESS_VE,
}
NPT_HW_MASKS = {
    "P": NPT_P, "W": NPT_W, "U": NPT_U, "PWT": NPT_PWT, "PCD": NPT_PCD, "A": NPT_A, "D": NPT_D,
    "PS": PT_PAGE_SIZE_MASK, "G": NPT_G, "HOST_WRITABLE": NPT_HOST_WRITABLE,
    "MMU_WRITABLE": NPT_MMU_WRITABLE, "MMU_PRESENT": SPTE_MMU_PRESENT_MASK, "PFN": SPTE_BASE_ADDR_MASK,
    "AD_TYPE": SPTE_TDP_AD_MASK, "NX": NPT_NX,
}
MMIO_GEN_MASKS = {"GEN_LOW": MMIO_SPTE_GEN_LOW_MASK, "GEN_HIGH": MMIO_SPTE_GEN_HIGH_MASK}


# --- per-format mask selectors ---------------------------------------------------------
@njit(inline="always", _nrt=False)
def shadow_present_mask(fmt):
    # EPT with exec-only support: only SUPPRESS_VE; R comes from ACC_USER (shadow_user_mask).
    return EPT_SUPPRESS_VE if fmt == FMT_EPT else NPT_P


@njit(inline="always", _nrt=False)
def shadow_user_mask(fmt):
    return EPT_R if fmt == FMT_EPT else NPT_U


@njit(inline="always", _nrt=False)
def shadow_x_mask(fmt):
    return EPT_X if fmt == FMT_EPT else np.int64(0)


@njit(inline="always", _nrt=False)
def shadow_nx_mask(fmt):
    return np.int64(0) if fmt == FMT_EPT else NPT_NX


@njit(inline="always", _nrt=False)
def shadow_accessed_mask(fmt):
    return EPT_A if fmt == FMT_EPT else NPT_A


@njit(inline="always", _nrt=False)
def shadow_dirty_mask(fmt):
    return EPT_D if fmt == FMT_EPT else NPT_D


@njit(inline="always", _nrt=False)
def shadow_host_writable_mask(fmt):
    return EPT_HOST_WRITABLE if fmt == FMT_EPT else NPT_HOST_WRITABLE


@njit(inline="always", _nrt=False)
def shadow_mmu_writable_mask(fmt):
    return EPT_MMU_WRITABLE if fmt == FMT_EPT else NPT_MMU_WRITABLE


@njit(inline="always", _nrt=False)
def shadow_memtype_mask(fmt):
    return EPT_MEMTYPE_WB if fmt == FMT_EPT else np.int64(0)


@njit(inline="always", _nrt=False)
def shadow_mmio_value(fmt):
    return EPT_MMIO_VALUE if fmt == FMT_EPT else NPT_MMIO_VALUE


@njit(inline="always", _nrt=False)
def shadow_mmio_mask(fmt):
    return EPT_MMIO_MASK if fmt == FMT_EPT else NPT_MMIO_MASK


@njit(inline="always", _nrt=False)
def shadow_mmio_access_mask(fmt):
    return np.int64(0) if fmt == FMT_EPT else NPT_MMIO_ACCESS_MASK


# --- predicates ------------------------------------------------------------------------
@njit(inline="always", _nrt=False)
def is_shadow_present_pte(spte):
    return (spte & SPTE_MMU_PRESENT_MASK) != 0


@njit(inline="always", _nrt=False)
def is_large_pte(spte):
    return (spte & PT_PAGE_SIZE_MASK) != 0


@njit(inline="always", _nrt=False)
def is_last_spte(spte, level):
    return level == PG_LEVEL_4K or is_large_pte(spte)


@njit(inline="always", _nrt=False)
def is_writable_pte(spte):
    return (spte & PT_WRITABLE_MASK) != 0


@njit(inline="always", _nrt=False)
def is_mmu_writable_spte(fmt, spte):
    return (spte & shadow_mmu_writable_mask(fmt)) != 0


@njit(inline="always", _nrt=False)
def is_mmio_spte(fmt, spte, mmio_caching):
    return mmio_caching and (spte & shadow_mmio_mask(fmt)) == shadow_mmio_value(fmt)


@njit(inline="always", _nrt=False)
def spte_ad_enabled(spte):
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED


@njit(inline="always", _nrt=False)
def spte_ad_need_write_protect(spte):
    """Dirty tracking by write protection: A/D disabled, or an L2's SPTE on a PML host (SPTE_TDP_AD_WRPROT_ONLY)."""
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED


@njit(inline="always", _nrt=False)
def is_access_track_spte(fmt, spte):
    return fmt == FMT_EPT and not spte_ad_enabled(spte) and (spte & EPT_RWX) == 0


@njit(inline="always", _nrt=False)
def is_accessed_spte(fmt, spte):
    # is_accessed_spte (spte.h)
    if spte_ad_enabled(spte):
        return (spte & shadow_accessed_mask(fmt)) != 0
    return (spte & 7) != 0  # not access-tracked


@njit(inline="always", _nrt=False)
def spte_to_pfn(spte):
    return (spte >> PAGE_SHIFT) & PFN_MASK


@njit(inline="always", _nrt=False)
def spte_to_child_row(spte):
    return spte_to_pfn(spte) - PT_PFN_BASE


@njit(inline="always", _nrt=False)
def hw_present(fmt, spte):
    """What the hardware calls present (error-code P / EPT PROT bits)."""
    if fmt == FMT_EPT:
        return (spte & EPT_RWX) != 0
    return (spte & NPT_P) != 0


@njit(inline="always", _nrt=False)
def hw_access_allowed(fmt, spte, write, fetch):
    """Does this (leaf) TDP entry permit the access?  Upper levels are always RWX/U."""
    if fmt == FMT_EPT:
        if fetch:
            return (spte & EPT_X) != 0
        if write:
            return (spte & EPT_W) != 0 and (spte & EPT_R) != 0
        return (spte & EPT_R) != 0
    if (spte & NPT_P) == 0 or (spte & NPT_U) == 0:
        return False
    if spte & _NPT_RSVD_51:
        return False
    if write and (spte & NPT_W) == 0:
        return False
    if fetch and (spte & NPT_NX) != 0:
        return False
    return True


_NPT_RSVD_51 = _bit(51)


@njit(inline="always", _nrt=False)
def hw_rsvd_fault(fmt, spte):
    """EPT misconfiguration / NPT reserved-bit fault for this entry (MMIO SPTEs)."""
    if fmt == FMT_EPT:
        return (spte & EPT_RWX) == EPT_W | EPT_X or (spte & EPT_RWX) == EPT_W
    return (spte & NPT_P) != 0 and (spte & _NPT_RSVD_51) != 0


# --- MMIO SPTE generation (spte.h generation_mmio_spte_mask / get_mmio_spte_generation)
@njit(inline="always", _nrt=False)
def generation_mmio_spte_mask(gen):
    mask = (gen << MMIO_SPTE_GEN_LOW_START) & MMIO_SPTE_GEN_LOW_MASK
    mask |= (gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK
    return mask


@njit(inline="always", _nrt=False)
def get_mmio_spte_generation(spte):
    gen = (spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START
    gen |= (spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT
    return gen


_MMIO_GFN_MASK = _bits(12, 50)


@njit(inline="always", _nrt=False)
def get_mmio_spte_gfn(spte):
    return (spte & _MMIO_GFN_MASK) >> PAGE_SHIFT


# --- constructors (spte.c) -------------------------------------------------------------
@njit(inline="always", _nrt=False)
def make_mmio_spte(fmt, gfn, access, memslots_gen):
    # make_mmio_spte (spte.c); shadow_nonpresent_or_rsvd_mask = 0 (no L1TF mitigation)
    gen = memslots_gen & MMIO_SPTE_GEN_MASK
    spte = generation_mmio_spte_mask(gen)
    spte |= shadow_mmio_value(fmt) | (np.int64(access) & shadow_mmio_access_mask(fmt))
    spte |= gfn << PAGE_SHIFT
    return spte


@njit(inline="always", _nrt=False)
def make_nonleaf_spte(fmt, child_row, ad_disabled):
    # make_nonleaf_spte (spte.c): upper-level entries always grant full access
    spte = SPTE_MMU_PRESENT_MASK | ((PT_PFN_BASE + child_row) << PAGE_SHIFT)
    spte |= shadow_present_mask(fmt) | PT_WRITABLE_MASK | shadow_user_mask(fmt) | shadow_x_mask(fmt)
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= shadow_accessed_mask(fmt)
    return spte


@njit(inline="always", _nrt=False)
def make_leaf_spte(fmt, level, pte_access, pfn, host_writable, ad_disabled, nx_huge_pages):
    """make_spte (spte.c) for a direct (TDP) page, not prefetch: returns the SPTE.

    The unsync check (mmu_try_to_unsync_pages) never refuses for TDP-only VMs: there
    are no shadow pages with gptes.
    """
    spte = SPTE_MMU_PRESENT_MASK
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    spte |= shadow_present_mask(fmt)
    # Since v6.13 the accessed/dirty masks are set even on A/D-disabled SPTEs (the CPU ignores them).
    spte |= shadow_accessed_mask(fmt)
    if level > PG_LEVEL_4K and (pte_access & ACC_EXEC_MASK) and nx_huge_pages:
        pte_access &= ~ACC_EXEC_MASK
    if pte_access & ACC_EXEC_MASK:
        spte |= shadow_x_mask(fmt)
    else:
        spte |= shadow_nx_mask(fmt)
    if pte_access & ACC_USER_MASK:
        spte |= shadow_user_mask(fmt)
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    spte |= shadow_memtype_mask(fmt)
    if host_writable:
        spte |= shadow_host_writable_mask(fmt)
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << PAGE_SHIFT
    if pte_access & ACC_WRITE_MASK:
        spte |= PT_WRITABLE_MASK | shadow_mmu_writable_mask(fmt) | shadow_dirty_mask(fmt)  # D pre-set
    return spte


@njit(inline="always", _nrt=False)
def restore_acc_track_spte(spte):
    # restore_acc_track_spte (spte.h): put the saved R/X back
    saved = (spte >> EPT_SAVED_BITS_SHIFT) & 5  # R | X
    return (spte & ~(np.int64(5) << EPT_SAVED_BITS_SHIFT)) | saved


@njit(inline="always", _nrt=False)
def mark_spte_for_access_track(fmt, spte):
    # mark_spte_for_access_track (spte.c): clear A, or save R/X and clear RWX (and A)
    if spte_ad_enabled(spte):
        return spte & ~shadow_accessed_mask(fmt)
    if (spte & EPT_RWX) == 0:
        return spte
    spte |= (spte & 5) << EPT_SAVED_BITS_SHIFT
    return spte & ~(EPT_RWX | shadow_accessed_mask(fmt))


@njit(inline="always", _nrt=False)
def modify_spte_protections(fmt, spte, set_bits, clear_bits):
    """modify_spte_protections (spte.c): change X/NX, keeping an access-tracked SPTE tracked."""
    tracked = is_access_track_spte(fmt, spte)
    if tracked:
        spte = restore_acc_track_spte(spte)
    spte = (spte | set_bits) & ~clear_bits
    if tracked:
        spte = mark_spte_for_access_track(fmt, spte)
    return spte


@njit(inline="always", _nrt=False)
def make_small_spte(fmt, huge_spte, child_level, index, nx_huge_pages, role_access):
    # make_small_spte (spte.c, was make_huge_page_split_spte)
    child = huge_spte + np.int64(index * (1 << ((child_level - 1) * LEVEL_BITS))) * (1 << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        child &= ~PT_PAGE_SIZE_MASK
        if (role_access & ACC_EXEC_MASK) and nx_huge_pages:
            child = modify_spte_protections(fmt, child, shadow_x_mask(fmt), shadow_nx_mask(fmt))  # executable
    return child
