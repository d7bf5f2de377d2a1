"""``paging_tmpl.h`` instantiated with PTTYPE_EPT: L0's software walk of an L1 hypervisor's EPT12 tables (nested
EPT), the EPT gpte helpers FNAME(gpte_access) / protect_clean_gpte / prefetch_invalid_gpte / is_rsvd_bits_set,
and FNAME(update_accessed_dirty_bits) for EPT A/D bits.

The walk fills the same ``WK_*`` scratch as the x86 walker (``guest_walk.py``), so the shadow MMU's fetch,
prefetch and sync code runs unchanged over EPT12 tables; its *mode word* is ``ept_mode(eptp, execonly)``
(``MODE_EPT`` set).  Table addresses are L1 gpas, read through L1's memslots (kvm_translate_gpa is the
identity for guest_mmu).  A refused walk returns ``WALK_FAULT`` | the EPT-violation exit qualification bits
0-5 it computes (access bits, then the RWX bits ANDed over the entries read), or ``WALK_FAULT |
EPT_MISCONFIG`` for reserved bits / a bad memory type or XWR combination (__reset_rsvds_bits_mask_ept).
"""

import numpy as np
from numba import njit

from .gmem import gm_read64, gm_write64
from .guest_walk import (
    MODE_LEVELS_SHIFT,
    PFERR_FETCH,
    PFERR_USER,
    PFERR_WRITE,
    WALK_FAULT,
    WK_AD_NEEDED,
    WK_ERROR,
    WK_FAULT,
    WK_GFN,
    WK_GPA,
    WK_GPTE,
    WK_GPTE_SIZE,
    WK_LEAF_LEVEL,
    WK_LEVELS,
    WK_MAX_LEVEL,
    WK_PT_ACCESS,
    WK_PTE_ACCESS,
    WK_PTE_ACCESS_CLEAN,
    WK_PTE_GPA,
    WK_SIZE,
    WK_TABLE_GFN,
    mode_levels,
)
from .memslot import gfn_to_memslot, slot_map, slot_readonly
from .spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    ROLE_ACCESS_SHIFT,
    ROLE_AD_DISABLED,
    ROLE_GUEST_MODE,
)

# --- mode word of an EPT12 walk (beside the x86 MODE_* bits of guest_walk.py; levels in the same field) ---
MODE_EPT = np.int64(1 << 16)
MODE_EPT_AD = np.int64(1 << 17)      # EPTP bit 6: the processor (and KVM's walker) sets EPT A/D bits
MODE_EPT_XO = np.int64(1 << 18)      # execute-only translations allowed (VMX capability)
# nested NPT (SVM): the walk of NPT12 is an x86 walk in L1's paging mode (kvm_init_shadow_npt_mmu); this bit
# on that mode word makes its pages guest_mode ones
MODE_NPT = np.int64(1 << 19)

# --- EPT entries (vmx.h) ----------------------------------------------------------------------
VMX_EPT_READABLE_MASK = np.int64(1)
VMX_EPT_WRITABLE_MASK = np.int64(2)
VMX_EPT_EXECUTABLE_MASK = np.int64(4)
VMX_EPT_RWX_MASK = np.int64(7)
EPT_LARGE_MASK = np.int64(1 << 7)
EPT_ACCESSED_MASK = np.int64(1 << 8)  # PT_GUEST_ACCESSED_SHIFT 8
EPT_DIRTY_MASK = np.int64(1 << 9)     # PT_GUEST_DIRTY_SHIFT 9
EPT_ADDR_MASK = np.int64(((1 << 52) - 1) & ~4095)
# --- EPTP (vmx.h VMX_EPTP_*) ------------------------------------------------------------------
VMX_EPTP_MT_MASK = np.int64(7)
VMX_EPTP_MT_UC = 0
VMX_EPTP_MT_WB = 6
VMX_EPTP_PWL_SHIFT = 3               # bits 5:3: page-walk length - 1
VMX_EPTP_AD_ENABLE_BIT = np.int64(1 << 6)
VMX_EPTP_RSVD_BITS = np.int64(0xF80)  # bits 11:7
# --- EPT-violation exit qualification (vmx.h EPT_VIOLATION_*) --------------------------------------
EPT_VIOLATION_ACC_READ = np.int64(1 << 0)
EPT_VIOLATION_ACC_WRITE = np.int64(1 << 1)
EPT_VIOLATION_ACC_INSTR = np.int64(1 << 2)
EPT_VIOLATION_RWX_SHIFT = 3           # EPT_VIOLATION_RWX_TO_PROT: bits 5:3
EPT_VIOLATION_GVA_IS_VALID = np.int64(1 << 7)
EPT_VIOLATION_GVA_TRANSLATED = np.int64(1 << 8)
# a refused walk that is an EPT misconfiguration, not a violation (PFERR_RSVD_MASK in KVM's walker)
EPT_MISCONFIG = np.int64(1 << 40)
# a refused walk that is a permission fault on present entries (PFERR_PRESENT_MASK in KVM's walker's error code)
EPT_PRESENT_FAULT = np.int64(1 << 41)


@njit(inline="always", _nrt=False)
def ept_mode(eptp, execonly):
    """The mode word of the EPT12 walk for ``eptp`` (kvm_init_shadow_ept_mmu's cpu_role)."""
    m = MODE_EPT | (np.int64(((eptp >> VMX_EPTP_PWL_SHIFT) & 7) + 1) << np.int64(MODE_LEVELS_SHIFT))
    if eptp & VMX_EPTP_AD_ENABLE_BIT:
        m |= MODE_EPT_AD
    if execonly:
        m |= MODE_EPT_XO
    return m


@njit(inline="always", _nrt=False)
def ept_root_role(mode):
    """kvm_calc_shadow_ept_root_page_role: the EPTP's walk length, guest_mode, indirect, 8-byte gptes, ACC_ALL,
    ad_disabled without EPTP A/D (execonly is in the extended role, not the page's)."""
    role = mode_levels(mode) | ROLE_GUEST_MODE | (ACC_ALL << ROLE_ACCESS_SHIFT)
    if (mode & MODE_EPT_AD) == 0:
        role |= ROLE_AD_DISABLED
    return np.int32(role)


@njit(inline="always", _nrt=False)
def ept_gpte_access(gpte):
    # FNAME(gpte_access) for PTTYPE_EPT: R is ACC_USER_MASK
    access = np.int64(0)
    if gpte & VMX_EPT_WRITABLE_MASK:
        access |= ACC_WRITE_MASK
    if gpte & VMX_EPT_EXECUTABLE_MASK:
        access |= ACC_EXEC_MASK
    if gpte & VMX_EPT_READABLE_MASK:
        access |= ACC_USER_MASK
    return access


@njit(inline="always", _nrt=False)
def ept_protect_clean_gpte(mode, access, gpte):
    # FNAME(protect_clean_gpte): only with A/D bits, write access once D is set
    if (mode & MODE_EPT_AD) != 0 and (gpte & EPT_DIRTY_MASK) == 0:
        access &= ~ACC_WRITE_MASK
    return access


@njit(inline="always", _nrt=False)
def ept_rsvd_bits_set(mode, maxphyaddr, level, gpte):
    """FNAME(is_rsvd_bits_set) for EPT: the reserved bits of the level (bit 7 picks the large-page masks), then
    is_bad_mt_xwr: memory type 2, 3 or 7, write without read, execute-only without the capability."""
    high = np.int64(0)
    if maxphyaddr < 52:
        high = ((np.int64(1) << np.int64(52 - maxphyaddr)) - 1) << np.int64(maxphyaddr)
    large = (gpte & EPT_LARGE_MASK) != 0
    if level >= 4:
        rsvd = high | np.int64(0xF8)                   # rsvd_bits(3, 7)
    elif level >= 2 and not large:
        rsvd = high | np.int64(0x78)                   # rsvd_bits(3, 6)
    elif level == 3:
        rsvd = high | np.int64(((1 << 30) - 1) & ~4095)   # 1G page: rsvd_bits(12, 29)
    elif level == 2:
        rsvd = high | np.int64(((1 << 21) - 1) & ~4095)   # 2M page: rsvd_bits(12, 20)
    else:
        rsvd = high
    if gpte & rsvd:
        return True
    xwr = gpte & 7
    mt = (gpte >> 3) & 7
    return mt == 2 or mt == 3 or mt == 7 or xwr == 2 or xwr == 6 or (xwr == 4 and (mode & MODE_EPT_XO) == 0)


@njit(inline="always", _nrt=False)
def ept_prefetch_invalid(mode, maxphyaddr, gpte):
    """FNAME(prefetch_invalid_gpte)'s test for EPT: not present, not accessed (with A/D bits) or reserved."""
    if (gpte & VMX_EPT_RWX_MASK) == 0:
        return True
    if (mode & MODE_EPT_AD) != 0 and (gpte & EPT_ACCESSED_MASK) == 0:
        return True
    return ept_rsvd_bits_set(mode, maxphyaddr, 1, gpte)


@njit(inline="always", _nrt=False)
def _ept_error(pfec, rwx, misconfig, wk, present=False):
    # FNAME(walk_addr_generic), label error, #if PTTYPE == PTTYPE_EPT
    wk[WK_FAULT] = 1
    wk[WK_GPA] = -1
    wk[WK_GFN] = -1
    if misconfig:
        wk[WK_ERROR] = EPT_MISCONFIG
        return WALK_FAULT | EPT_MISCONFIG
    q = np.int64(0)
    if pfec & PFERR_WRITE:
        q |= EPT_VIOLATION_ACC_WRITE
    if pfec & PFERR_USER:
        q |= EPT_VIOLATION_ACC_READ
    if pfec & PFERR_FETCH:
        q |= EPT_VIOLATION_ACC_INSTR
    q |= (rwx & 7) << np.int64(EPT_VIOLATION_RWX_SHIFT)
    wk[WK_ERROR] = q
    return WALK_FAULT | q | (EPT_PRESENT_FAULT if present else np.int64(0))


@njit(inline="always", _nrt=False)
def ept_walk(gm, vt, st, vm, mode, eptp, maxphyaddr, gpa, pfec, wk):
    """FNAME(walk_addr_generic) over L1's EPT12 for L2 gpa ``gpa``: 0 if the access (``pfec``: PFERR_USER for a
    read, PFERR_WRITE, PFERR_FETCH, as handle_ept_violation builds it) is allowed, else WALK_FAULT | exit
    qualification bits 0-5 (or EPT_MISCONFIG).  Fills ``wk`` like guest_walk; writes nothing else."""
    pfec = pfec & (PFERR_WRITE | PFERR_USER | PFERR_FETCH)
    levels = mode_levels(mode)
    for i in range(WK_SIZE):
        wk[i] = 0
    for lv in range(6):
        wk[WK_PTE_GPA + lv] = -1
        wk[WK_TABLE_GFN + lv] = -1
    wk[WK_LEVELS] = levels
    wk[WK_GPTE_SIZE] = 8
    wk[WK_MAX_LEVEL] = levels
    sm = slot_map(vt, st)
    pte = eptp
    pte_access = np.int64(-1)       # pte_access = ~0: the entries read, ANDed (RWX, A)
    level = levels
    while True:
        pt_access = pte_access
        index = (gpa >> np.int64(12 + 9 * (level - 1))) & 511
        table_gfn = (pte & EPT_ADDR_MASK) >> 12
        pte_gpa = (table_gfn << 12) + 8 * index
        wk[WK_TABLE_GFN + level] = table_gfn
        wk[WK_PTE_GPA + level] = pte_gpa
        wk[WK_LEAF_LEVEL] = level
        if gfn_to_memslot(vt, st, vm, table_gfn) < 0:
            return _ept_error(pfec, pte_access, False, wk)   # !kvm_is_visible_memslot
        pte = gm_read64(gm, sm, vm, pte_gpa)
        wk[WK_GPTE + level] = pte
        pte_access = pt_access & pte
        if (pte & VMX_EPT_RWX_MASK) == 0:
            return _ept_error(pfec, pte_access, False, wk)
        if ept_rsvd_bits_set(mode, maxphyaddr, level, pte):
            return _ept_error(pfec, pte_access, True, wk)
        wk[WK_PT_ACCESS + level] = ept_gpte_access(pt_access)
        if level == 1 or (pte & EPT_LARGE_MASK) != 0:
            break
        level -= 1
    acc = ept_gpte_access(pte_access)
    wk[WK_PTE_ACCESS] = acc
    # permission_fault with update_permission_bitmask(ept=true): read needs R, write W, fetch X
    if ((pfec & PFERR_USER) != 0 and (acc & ACC_USER_MASK) == 0) or \
            ((pfec & PFERR_WRITE) != 0 and (acc & ACC_WRITE_MASK) == 0) or \
            ((pfec & PFERR_FETCH) != 0 and (acc & ACC_EXEC_MASK) == 0):
        return _ept_error(pfec, pte_access, False, wk, True)
    off_mask = (np.int64(1) << np.int64(12 + 9 * (level - 1))) - 1
    out = (pte & EPT_ADDR_MASK & ~off_mask) | (gpa & off_mask)
    wk[WK_GPA] = out
    wk[WK_GFN] = out >> 12
    have_ad = (mode & MODE_EPT_AD) != 0
    accessed_dirty = have_ad and (pte_access & EPT_ACCESSED_MASK) != 0
    if pfec & PFERR_WRITE:
        wk[WK_PTE_ACCESS_CLEAN] = acc
        accessed_dirty = accessed_dirty and (pte & EPT_DIRTY_MASK) != 0
    else:
        wk[WK_PTE_ACCESS_CLEAN] = ept_protect_clean_gpte(mode, acc, pte)
    wk[WK_AD_NEEDED] = 1 if have_ad and not accessed_dirty else 0
    return np.int64(0)


@njit(inline="always", _nrt=False)
def ept_set_ad(gm, vt, st, vm, wk, pfec):
    """FNAME(update_accessed_dirty_bits) for EPT12 (with A/D bits): A in every entry of the walk, D in the leaf
    for a write; entries in read-only memslots are left as they are.  Returns the bitmask of changed levels
    (bit ``level``); the caller marks those table pages dirty."""
    changed = np.int64(0)
    if wk[WK_AD_NEEDED] == 0 or wk[WK_FAULT] != 0:
        return changed
    sm = slot_map(vt, st)
    leaf = wk[WK_LEAF_LEVEL]
    for level in range(wk[WK_MAX_LEVEL], leaf - 1, -1):
        old = wk[WK_GPTE + level]
        new = old | EPT_ACCESSED_MASK
        if level == leaf and (pfec & PFERR_WRITE) != 0:
            new |= EPT_DIRTY_MASK
        if new == old:
            continue
        gpa = wk[WK_PTE_GPA + level]
        rec = gfn_to_memslot(vt, st, vm, gpa >> 12)
        if rec < 0 or slot_readonly(st, rec):   # !walker->pte_writable
            continue
        gm_write64(gm, sm, vm, gpa, new)
        wk[WK_GPTE + level] = new
        changed |= np.int64(1) << np.int64(level)
    return changed
