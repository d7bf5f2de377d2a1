"""Guest page-table walker (kernels/guest_walk.py) against the SDM rules and tests/reference/guest_walk.py.

(1) directed tests, one per rule, each also cross-checked with the reference; (2) a kvm-unit-tests
``x86/access.c``-style flag matrix; (3) hypothesis random tables and modes; (4) a ``nojit`` subset.
"""

import numpy as np
import pytest
from batchmmu.kernels import guest_walk as G
from batchmmu.kernels import state as S
from batchmmu.kernels.gmem import NGMCTL, gm_read64, gm_write64
from batchmmu.kernels.state import GuestMem, SlotMap
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from numba import njit
from reference.guest_walk import ref_walk

WALK_FAULT = 1 << 62  # flag on guest_walk's result for a refused access

# architectural register bits (SDM), spelled out here rather than taken from the kernel
CR0_PG, CR0_WP = 1 << 31, 1 << 16
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21, 1 << 22
EFER_LME, EFER_LMA, EFER_NX = 1 << 8, 1 << 10, 1 << 11
RFLAGS_AC = 1 << 18
# gpte bits and error-code bits
P, RW, US, A, D, PS = 1, 2, 4, 32, 64, 128
XD = 1 << 63
W, U, F = 2, 4, 0x10
PF_P, PF_RSVD, PF_I, PF_PK = 1, 8, 0x10, 0x20
U64 = (1 << 64) - 1

LONG = dict(cr0=CR0_PG | CR0_WP, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA | EFER_NX)
LONG5 = dict(cr0=CR0_PG | CR0_WP, cr4=CR4_PAE | CR4_LA57, efer=EFER_LME | EFER_LMA | EFER_NX)
PAE = dict(cr0=CR0_PG | CR0_WP, cr4=CR4_PAE, efer=EFER_NX)
BIT32 = dict(cr0=CR0_PG | CR0_WP, cr4=CR4_PSE, efer=0)


def s64(x):
    return int(np.array([x & U64], dtype=np.uint64).view(np.int64)[0])


def u64(x):
    return int(x) & U64


def put32(mem, gpa, value):
    """Store a 4-byte gpte into the dict of 8-byte words."""
    word = mem.get(gpa & ~7, 0)
    sh = 8 * (gpa & 4)
    mem[gpa & ~7] = (word & ~(0xFFFFFFFF << sh) & U64) | ((value & 0xFFFFFFFF) << sh)


def new_gmem(pages=16, keys=64):
    """Empty guest memory of VM 0 and a SlotMap with one memslot over every gpa (hva = gpa)."""
    one = lambda v: np.array([v], np.int64)  # noqa: E731
    ht = np.zeros((keys, S.NGMH), np.int64)
    ht[:, S.GMH_KEY] = -1
    gm = GuestMem(hash=ht, page=np.zeros((pages, 512), np.int64), free=np.zeros(pages, np.int64),
                  ctl=np.zeros(NGMCTL, np.int64))
    vrec = np.zeros((1, S.NVMF), np.int64)
    vrec[0, S.VM_SLOT_LAST], vrec[0, S.VM_SLOT_CNT] = -1, 1
    srec = np.zeros((1, S.NSLF), np.int64)
    srec[0, S.SL_NPAGES] = 1 << 40
    return gm, SlotMap(vrec=vrec, order=one(0), srec=srec, spt=vrec, root=np.int64(-1), levels=np.int64(0))


def regs_mode(cr0, cr4, efer, rflags=0, pse36_kvm=False):
    mode = int(G.cpu_mode(cr0, cr4, efer, rflags))
    return mode | (int(G.MODE_PSE36_KVM) if pse36_kvm else 0)


class Walk:
    """One access through the kernel (walk, then A/D on success) and through the reference."""

    def __init__(self, mem, gva, pfec, cr3=0x1000, pdptrs=(0, 0, 0, 0), pkru=0, maxphyaddr=46, rflags=0,
                 pse36_kvm=False, cr0=0, cr4=0, efer=0):
        gm, sm = new_gmem()
        for gpa, val in mem.items():
            gm_write64(gm, sm, 0, gpa, np.int64(s64(val)))
        self.mode = regs_mode(cr0, cr4, efer, rflags, pse36_kvm)
        self.wk = np.zeros(G.WK_SIZE, np.int64)
        pd = np.array([s64(x) for x in pdptrs], np.int64)
        ret = int(G.guest_walk(gm, sm, 0, self.mode, cr3, pd, pkru, maxphyaddr, gva, pfec, self.wk))
        self.ad_needed = int(self.wk[G.WK_AD_NEEDED])
        self.ok = ret == 0
        self.err = None if self.ok else ret & 0xFFFF  # error code of a refused access (may be 0)
        assert self.ok or ret & WALK_FAULT, hex(ret)
        assert self.err == (None if self.ok else int(self.wk[G.WK_ERROR]))
        self.changed = int(G.guest_set_ad(gm, sm, 0, self.wk, pfec)) if self.ok else 0
        assert self.ad_needed == (self.changed != 0)
        self.mem = {gpa: u64(gm_read64(gm, sm, 0, gpa)) for gpa in mem}
        self.gpa = int(self.wk[G.WK_GPA])
        self.level = int(self.wk[G.WK_LEAF_LEVEL])
        ref = ref_walk(mem, cr0, cr4, efer, rflags, cr3, list(pdptrs), pkru, maxphyaddr, gva, pfec,
                       pse36_kvm=pse36_kvm)
        want = (None, ref[1], ref[2]) if ref[1] is not None else (ref[0], -1, ref[2])
        assert (self.err, self.gpa, self.level) == want
        assert self.mem == ref[3]

    def f(self, slot, level=0):
        return int(self.wk[slot + level])


def long_tables(leaf=None, pde=None, pdpte=None, pml4e=None, pml5e=None, levels=4):
    """4/5-level tables for GVA_L: PML5 0x6000, PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000, page 0x7654000."""
    mem = {}
    up = P | RW | US | A
    if levels == 5:
        mem[0x6000 + 8 * 2] = 0x1000 | up if pml5e is None else pml5e
    mem[0x1000 + 8 * 3] = 0x2000 | up if pml4e is None else pml4e
    mem[0x2000 + 8 * 5] = 0x3000 | up if pdpte is None else pdpte
    if pdpte is None or not pdpte & PS:
        mem[0x3000 + 8 * 7] = 0x4000 | up if pde is None else pde
        if pde is None or not pde & PS:
            mem[0x4000 + 8 * 9] = 0x7654000 | up | D if leaf is None else leaf
    return mem


GVA_L = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x123
GVA_L5 = (2 << 48) | GVA_L


def lwalk(pfec=0, **kw):
    """A 4-level walk of GVA_L (``levels=5``: 5-level, GVA_L5); table entries and registers by keyword."""
    tables = {k: kw.pop(k) for k in ("leaf", "pde", "pdpte", "pml4e", "pml5e", "levels") if k in kw}
    five = tables.get("levels") == 5
    regs = dict(LONG5 if five else LONG)
    for k in ("cr0", "cr4", "efer"):
        if k in kw:
            regs[k] = kw.pop(k)
    return Walk(long_tables(**tables), GVA_L5 if five else GVA_L, pfec, cr3=0x6000 if five else 0x1000,
                **regs, **kw)


# ---------------------------------------------------------------- (1) directed tests: the walk itself


@pytest.mark.nojit
def test_paging_off_is_identity():
    w = Walk({0x1000: 0}, 0x12345678, W, cr0=CR0_WP, cr4=CR4_PAE, efer=EFER_NX)
    assert (w.ok, w.gpa, w.f(G.WK_LEVELS), w.changed) == (True, 0x12345678, 0, 0)
    assert w.f(G.WK_PTE_ACCESS) == 7


@pytest.mark.nojit
def test_4level_translation_and_walker_fields():
    w = lwalk(0)
    assert w.ok and w.gpa == 0x7654123 and w.level == 1
    assert [w.f(G.WK_PTE_GPA, lv) for lv in (4, 3, 2, 1)] == [0x1018, 0x2028, 0x3038, 0x4048]
    assert [w.f(G.WK_TABLE_GFN, lv) for lv in (4, 3, 2, 1)] == [1, 2, 3, 4]
    assert w.f(G.WK_PTE_GPA, 5) == -1 and w.f(G.WK_GPTE_SIZE) == 8
    assert (w.f(G.WK_LEVELS), w.f(G.WK_MAX_LEVEL), w.f(G.WK_GFN)) == (4, 4, 0x7654)
    assert w.f(G.WK_PTE_ACCESS) == 7 and w.f(G.WK_AD_NEEDED) == 0 and w.changed == 0


@pytest.mark.nojit
def test_high_half_gva():
    gva = s64(0xFFFF_8000_0000_0000 | (GVA_L & ((1 << 39) - 1)))  # PML4 index 256, negative as int64
    mem = long_tables(pml4e=0x5000)  # slot 3 not present: the walk must use slot 256
    mem[0x1000 + 8 * 256] = 0x2000 | P | RW | US | A
    w = Walk(mem, gva, W, **LONG)
    assert w.ok and w.gpa == 0x7654123 and w.f(G.WK_PTE_GPA, 4) == 0x1000 + 8 * 256


@pytest.mark.nojit
def test_5level_walk():
    w = lwalk(W | U, levels=5)
    assert w.ok and w.gpa == 0x7654123 and w.f(G.WK_LEVELS) == 5
    assert w.f(G.WK_PTE_GPA, 5) == 0x6010 and w.f(G.WK_TABLE_GFN, 5) == 6
    w = lwalk(0, levels=5, pml5e=0x1000 | RW | US)
    assert not w.ok and w.err == 0 and w.level == 5  # not present PML5E: a #PF with error code 0
    assert lwalk(0, levels=5, pml5e=0x1000 | P | RW | US | PS).err == PF_P | PF_RSVD


@pytest.mark.nojit
@pytest.mark.parametrize("where", ["leaf", "pde", "pdpte", "pml4e"])
def test_not_present_at_each_level(where):
    level = {"leaf": 1, "pde": 2, "pdpte": 3, "pml4e": 4}[where]
    w = lwalk(W | U, **{where: 0x5000 | RW | US})
    assert w.err == W | U and w.level == level and w.gpa == -1
    assert w.changed == 0


@pytest.mark.nojit
@pytest.mark.parametrize("where", ["leaf", "pde", "pdpte", "pml4e"])
def test_reserved_address_bit_above_maxphyaddr(where):
    base = {"leaf": 0x7654000, "pde": 0x4000, "pdpte": 0x3000, "pml4e": 0x2000}[where]
    e = base | P | RW | US | A | D | (1 << 51)
    assert lwalk(U, **{where: e}).err == PF_P | PF_RSVD | U
    # MAXPHYADDR 52: bit 51 is an address bit; a table there is empty (not present one level down)
    w = lwalk(U, maxphyaddr=52, **{where: e})
    if where == "leaf":
        assert w.ok and w.gpa == (1 << 51) | 0x7654123
    else:
        assert (w.ok, w.err, w.level) == (False, U, w.f(G.WK_LEVELS) - {"pml4e": 1, "pdpte": 2, "pde": 3}[where])
        assert w.f(G.WK_TABLE_GFN, w.level) == ((1 << 51) | base) >> 12
    # bits 52..58 are ignored in 4-level gptes
    assert lwalk(U, **{where: base | P | RW | US | A | D | (0x7F << 52)}).ok


@pytest.mark.nojit
def test_nx_reserved_without_efer_nx():
    assert lwalk(0, leaf=0x7654000 | P | A | D | XD, efer=EFER_LME | EFER_LMA).err == PF_P | PF_RSVD
    assert lwalk(0, pml4e=0x2000 | P | RW | US | A | XD, efer=EFER_LME | EFER_LMA).err == PF_P | PF_RSVD
    assert lwalk(0, leaf=0x7654000 | P | A | D | XD).ok  # NXE=1: plain NX


@pytest.mark.nojit
def test_ps_reserved_in_pml4e_and_pml5e():
    assert lwalk(0, pml4e=0x2000 | P | RW | US | A | PS).err == PF_P | PF_RSVD
    w = lwalk(0, levels=5, pml4e=0x2000 | P | RW | US | A | PS)
    assert w.err == PF_P | PF_RSVD and w.level == 4


@pytest.mark.nojit
def test_1g_page():
    base = 0x80000000  # 1G aligned
    w = lwalk(W, pdpte=base | P | RW | US | A | PS)
    assert w.ok and w.level == 3 and w.gpa == base | (GVA_L & ((1 << 30) - 1))
    assert lwalk(0, pdpte=base | P | A | PS | (1 << 12)).ok  # PAT bit
    for b in (13, 20, 29):
        assert lwalk(0, pdpte=base | P | A | PS | (1 << b)).err == PF_P | PF_RSVD


@pytest.mark.nojit
def test_2m_page():
    base = 0x40000000
    w = lwalk(0, pde=base | P | A | PS)
    assert w.ok and w.level == 2 and w.gpa == base | (GVA_L & ((1 << 21) - 1))
    assert lwalk(0, pde=base | P | A | PS | (1 << 12)).ok  # PAT bit
    for b in (13, 20):
        assert lwalk(0, pde=base | P | A | PS | (1 << b)).err == PF_P | PF_RSVD
    assert lwalk(0, pde=base | P | A | PS | (1 << 21)).gpa == (base | 1 << 21) | (GVA_L & ((1 << 21) - 1))


# ---------------------------------------------------------------- 32-bit and PAE

GVA_32 = (0x12 << 22) | (0x345 << 12) | 0x123


def walk32(pde, pte=None, pfec=0, cr4=CR4_PSE, **kw):
    """2-level walk of GVA_32: PD at 0x1000, PT at 0x400000 (also a 4M page base), neighbours in the words."""
    mem = {}
    put32(mem, 0x1000 + 4 * 0x12, pde)
    put32(mem, 0x1000 + 4 * 0x13, 0xDEAD0000 | P)  # shares the 8-byte word with the PDE
    if pte is not None:
        put32(mem, 0x400000 + 4 * 0x345, pte)
        put32(mem, 0x400000 + 4 * 0x344, 0xBEEF0000)
    return Walk(mem, GVA_32, pfec, cr0=CR0_PG | CR0_WP, cr4=cr4, efer=kw.pop("efer", 0), **kw)


@pytest.mark.nojit
def test_32bit_4k_and_4byte_ad_update():
    w = walk32(0x400000 | P | RW | US, 0x7654000 | P | RW | US, pfec=W | U)
    assert w.ok and w.gpa == 0x7654123 and w.level == 1 and w.f(G.WK_GPTE_SIZE) == 4
    assert w.f(G.WK_PTE_GPA, 2) == 0x1048 and w.f(G.WK_PTE_GPA, 1) == 0x400000 + 4 * 0x345
    assert w.changed == 0b110
    # only the 4 bytes of each gpte changed: the neighbours in the same words are intact
    assert w.mem[0x1048] == ((0xDEAD0000 | P) << 32) | 0x400000 | P | RW | US | A
    assert w.mem[0x400000 + 4 * 0x344] == ((0x7654000 | P | RW | US | A | D) << 32) | 0xBEEF0000
    # KVM's pt_access for the top level of a 32-bit walk lacks ACC_EXEC (gpte_access(~0) without NX mask)
    assert w.f(G.WK_PT_ACCESS, 2) == 6 and w.f(G.WK_PT_ACCESS, 1) == 7 and w.f(G.WK_PTE_ACCESS) == 7


@pytest.mark.nojit
def test_32bit_4m_page_and_pse36():
    w = walk32(0x400000 | P | PS | (1 << 13) | (1 << 16))
    assert w.ok and w.level == 2 and w.gpa == (0x9 << 32) | 0x400000 | (GVA_32 & 0x3FFFFF)
    # bits 17..20: address bits 36..39 when MAXPHYADDR allows, else reserved; bit 21 always reserved
    assert walk32(0x400000 | P | PS | (1 << 17), maxphyaddr=36).err == PF_P | PF_RSVD
    assert walk32(0x400000 | P | PS | (1 << 17), maxphyaddr=46).gpa == (1 << 36) | 0x400000 | (GVA_32 & 0x3FFFFF)
    assert walk32(0x400000 | P | PS | (1 << 20), maxphyaddr=40).gpa == (1 << 39) | 0x400000 | (GVA_32 & 0x3FFFFF)
    assert walk32(0x400000 | P | PS | (1 << 20), maxphyaddr=39).err == PF_P | PF_RSVD
    assert walk32(0x400000 | P | PS | (1 << 21), maxphyaddr=52).err == PF_P | PF_RSVD
    # KVM's software walker: 36-bit PSE whatever MAXPHYADDR
    assert walk32(0x400000 | P | PS | (1 << 17), maxphyaddr=46, pse36_kvm=True).err == PF_P | PF_RSVD
    assert walk32(0x400000 | P | PS | (1 << 12)).ok  # PAT bit of a 4M page


@pytest.mark.nojit
def test_32bit_ps_ignored_without_cr4_pse():
    w = walk32(0x400000 | P | PS | RW, 0x7654000 | P | RW, cr4=0, pfec=W)
    assert w.ok and w.level == 1 and w.gpa == 0x7654123
    # without CR4.PSE bit 21 is no reserved bit but a table address bit: the PT is at 0x600000 (empty)
    w = walk32(0x400000 | P | PS | (1 << 21), 0x7654000 | P, cr4=0)
    assert not w.ok and w.err == 0 and w.level == 1 and w.f(G.WK_TABLE_GFN, 1) == 0x600


@pytest.mark.nojit
def test_32bit_no_reserved_bits_and_no_nx():
    # a 4K PTE and a PDE without PS have no reserved bits; fetches never see NX
    w = walk32(0x400000 | P | RW, 0xFFFFF000 | P | (0xF << 8), pfec=F, efer=EFER_NX)
    assert w.ok and w.gpa == 0xFFFFF123
    # I/D is reported with EFER.NXE even in 32-bit paging (KVM), not without NXE/SMEP
    assert walk32(0x400000 | RW, pfec=F, efer=EFER_NX).err == PF_I
    w = walk32(0x400000 | RW, pfec=F)
    assert not w.ok and w.err == 0


GVA_PAE = (2 << 30) | (7 << 21) | (9 << 12) | 0x123


def pae_walk(pdpte, pde=0x3000 | P | RW | US, pte=0x7654000 | P | RW | US | A | D, pfec=0, **kw):
    mem = {0x3000 + 8 * 7: pde, 0x4000 + 8 * 9: pte}
    if not pde & PS:
        mem[0x3000 + 8 * 7] = (pde & ~0x3000 & U64) | 0x4000 if (pde & 0xFFFFF000) == 0x3000 else pde
    pdptrs = [0x2000 | P, 0, pdpte, 0]
    regs = dict(PAE)
    regs.update({k: kw.pop(k) for k in ("cr0", "cr4", "efer") if k in kw})
    return Walk(mem, GVA_PAE, pfec, cr3=0x1040, pdptrs=pdptrs, **regs, **kw)


@pytest.mark.nojit
def test_pae_walk_uses_cached_pdptes():
    w = pae_walk(0x3000 | P, pfec=W)
    assert w.ok and w.gpa == 0x7654123 and w.f(G.WK_LEVELS) == 3 and w.f(G.WK_MAX_LEVEL) == 2
    assert w.f(G.WK_PTE_GPA, 3) == -1 and u64(w.f(G.WK_GPTE, 3)) == 0x3000 | P
    assert w.f(G.WK_PTE_GPA, 2) == 0x3038 and w.changed == 0b100  # A on the PDE only (never the PDPTE)
    # PDPTE reserved bits (1, 2, 5..8, 63) are not checked at walk time
    assert pae_walk(0x3000 | P | RW | US | (0xF << 5) | XD).ok


@pytest.mark.nojit
def test_pae_pdpte_not_present():
    w = pae_walk(0x3000, pfec=W | U)
    assert w.err == W | U and w.level == 3 and w.changed == 0


@pytest.mark.nojit
def test_pae_reserved_bits():
    # PAE entries reserve 62:M (4-level ignores 52..58 and 59..62 are protection keys)
    assert pae_walk(0x3000 | P, pte=0x7654000 | P | A | D | (1 << 52)).err == PF_P | PF_RSVD
    assert pae_walk(0x3000 | P, pte=0x7654000 | P | A | D | (1 << 60)).err == PF_P | PF_RSVD
    assert pae_walk(0x3000 | P, pte=0x7654000 | P | A | D | (1 << 52), maxphyaddr=52).err == PF_P | PF_RSVD
    assert lwalk(0, leaf=0x7654000 | P | A | D | (1 << 52) | (1 << 60)).ok
    assert pae_walk(0x3000 | P, pde=0x40000000 | P | PS | (1 << 13)).err == PF_P | PF_RSVD
    w = pae_walk(0x3000 | P, pde=0x40000000 | P | PS | A)
    assert w.ok and w.level == 2 and w.gpa == 0x40000000 | (GVA_PAE & 0x1FFFFF)
    assert pae_walk(0x3000 | P, pte=0x7654000 | P | A | D | XD, efer=0).err == PF_P | PF_RSVD


# ---------------------------------------------------------------- permissions

RO_USER = 0x7654000 | P | US | A | D
RW_SUPER = 0x7654000 | P | RW | A | D


@pytest.mark.nojit
def test_user_needs_us_at_every_level():
    assert lwalk(U).ok
    assert lwalk(U, pde=0x4000 | P | RW | A).err == PF_P | U
    assert lwalk(U, pml4e=0x2000 | P | RW | A).err == PF_P | U
    assert lwalk(0, pml4e=0x2000 | P | RW | A).ok


@pytest.mark.nojit
def test_writes_and_cr0_wp():
    assert lwalk(W | U, leaf=RO_USER).err == PF_P | W | U
    assert lwalk(W | U, pdpte=0x3000 | P | US | A).err == PF_P | W | U
    assert lwalk(W, leaf=RO_USER).err == PF_P | W  # WP=1: supervisor writes honour R/W
    assert lwalk(W, leaf=RO_USER, cr0=CR0_PG).ok  # WP=0: supervisor may write
    assert lwalk(W | U, leaf=RO_USER, cr0=CR0_PG).err == PF_P | W | U  # but not user


@pytest.mark.nojit
def test_nx_and_id_bit():
    nx_leaf = 0x7654000 | P | RW | US | A | D | XD
    assert lwalk(F, leaf=nx_leaf).err == PF_P | PF_I
    assert lwalk(F | U, pml4e=0x2000 | P | RW | US | A | XD).err == PF_P | PF_I | U
    assert lwalk(0, leaf=nx_leaf).ok
    # I/D only with EFER.NXE or CR4.SMEP
    w = lwalk(F, leaf=0x7654000 | RW, efer=EFER_LME | EFER_LMA)
    assert not w.ok and w.err == 0
    assert lwalk(F, leaf=0x7654000 | RW).err == PF_I
    assert lwalk(F, leaf=0x7654000 | RW, efer=EFER_LME | EFER_LMA, cr4=CR4_PAE | CR4_SMEP).err == PF_I


@pytest.mark.nojit
def test_smep():
    smep = CR4_PAE | CR4_SMEP
    assert lwalk(F, cr4=smep).err == PF_P | PF_I  # supervisor fetch from a user page
    assert lwalk(F, cr4=smep, efer=EFER_LME | EFER_LMA).err == PF_P | PF_I  # I/D set by SMEP alone
    assert lwalk(F | U, cr4=smep).ok
    assert lwalk(F, cr4=smep, pde=0x4000 | P | RW | A).ok  # not a user page
    assert lwalk(0, cr4=smep).ok  # data accesses unaffected


@pytest.mark.nojit
def test_smap_and_ac():
    smap = CR4_PAE | CR4_SMAP
    assert lwalk(0, cr4=smap).err == PF_P
    assert lwalk(W, cr4=smap, cr0=CR0_PG).err == PF_P | W  # even with WP=0
    assert lwalk(0, cr4=smap, rflags=RFLAGS_AC).ok
    assert lwalk(W, cr4=smap, rflags=RFLAGS_AC, leaf=RO_USER).err == PF_P | W  # AC lifts SMAP, not R/W
    assert lwalk(F, cr4=smap).ok  # fetches are SMEP's business
    assert lwalk(U, cr4=smap).ok
    assert lwalk(0, cr4=smap, leaf=RW_SUPER).ok


def pk_leaf(key, user=True, rw=True):
    return 0x7654000 | P | A | D | (US if user else 0) | (RW if rw else 0) | (key << 59)


@pytest.mark.nojit
def test_pku_access_and_write_disable():
    pke = CR4_PAE | CR4_PKE
    ad5, wd5 = 1 << 10, 1 << 11
    assert lwalk(U, cr4=pke, leaf=pk_leaf(5), pkru=ad5).err == PF_P | PF_PK | U
    assert lwalk(0, cr4=pke, leaf=pk_leaf(5), pkru=ad5).err == PF_P | PF_PK  # supervisor access to user page
    assert lwalk(F | U, cr4=pke, leaf=pk_leaf(5), pkru=ad5).ok  # fetches ignore PKRU
    assert lwalk(U, cr4=pke, leaf=pk_leaf(4), pkru=ad5).ok  # another key
    assert lwalk(0, cr4=pke, leaf=pk_leaf(5, user=False), pkru=ad5 | wd5).ok  # supervisor page
    assert lwalk(U, cr4=pke, leaf=pk_leaf(5), pkru=wd5).ok
    assert lwalk(W | U, cr4=pke, leaf=pk_leaf(5), pkru=wd5).err == PF_P | PF_PK | W | U
    assert lwalk(W, cr4=pke, leaf=pk_leaf(5), pkru=wd5).err == PF_P | PF_PK | W  # CR0.WP=1
    assert lwalk(W, cr4=pke, leaf=pk_leaf(5), pkru=wd5, cr0=CR0_PG).ok  # CR0.WP=0
    # a page refusal and a key refusal together still report PK
    assert lwalk(W | U, cr4=pke, leaf=pk_leaf(5, rw=False), pkru=wd5).err == PF_P | PF_PK | W | U
    # without CR4.PKE or outside long mode the key is ignored
    assert lwalk(U, leaf=pk_leaf(5), pkru=ad5).ok
    w = lwalk(U, cr4=pke, leaf=pk_leaf(5), pkru=0)
    assert w.ok and w.f(G.WK_PKEY) == 5


@pytest.mark.nojit
def test_pke_ignored_in_pae_mode():
    w = pae_walk(0x3000 | P, pfec=U, cr4=CR4_PAE | CR4_PKE, pkru=0xFFFFFFFF)
    assert w.ok


# ---------------------------------------------------------------- A/D bits and the walker outputs


@pytest.mark.nojit
def test_ad_set_on_success_only():
    clean = 0x7654000 | P | RW | US
    mem_levels = dict(leaf=clean, pde=0x4000 | P | RW | US, pdpte=0x3000 | P | RW | US, pml4e=0x2000 | P | RW | US)
    w = lwalk(W | U, **mem_levels)
    assert w.ok and w.ad_needed == 1 and w.changed == 0b11110
    assert w.mem[0x4048] == clean | A | D and w.mem[0x1018] == 0x2000 | P | RW | US | A
    assert u64(w.f(G.WK_GPTE, 1)) == clean | A | D  # the walker sees what it wrote
    r = lwalk(U, **mem_levels)
    assert r.changed == 0b11110 and r.mem[0x4048] == clean | A  # a read sets no D
    bad = dict(mem_levels, leaf=clean & ~RW)
    f = lwalk(W | U, **bad)
    assert f.err == PF_P | W | U and f.changed == 0 and f.mem[0x1018] == 0x2000 | P | RW | US
    assert int(G.guest_set_ad(*new_gmem(), 0, f.wk, W | U)) == 0  # a failed walk sets nothing


@pytest.mark.nojit
def test_protect_clean_gpte():
    r = lwalk(0, leaf=0x7654000 | P | RW | US | A)
    assert r.f(G.WK_PTE_ACCESS) == 7 and r.f(G.WK_PTE_ACCESS_CLEAN) == 5 and r.ad_needed == 0
    w = lwalk(W, leaf=0x7654000 | P | RW | US | A)
    assert w.f(G.WK_PTE_ACCESS_CLEAN) == 7 and w.ad_needed == 1 and w.changed == 0b10
    d = lwalk(0, leaf=0x7654000 | P | RW | US | A | D)
    assert d.f(G.WK_PTE_ACCESS_CLEAN) == 7


@pytest.mark.nojit
def test_pt_access_is_access_of_the_levels_above():
    w = lwalk(0, pdpte=0x3000 | P | US | A, pde=0x4000 | P | RW | A | XD)
    assert [w.f(G.WK_PT_ACCESS, lv) for lv in (4, 3, 2, 1)] == [7, 7, 5, 0]
    assert w.f(G.WK_PTE_ACCESS) == 0


@pytest.mark.nojit
def test_cpu_mode_and_roles():
    m = regs_mode(CR0_PG | CR0_WP, CR4_PAE | CR4_SMEP | CR4_PKE | CR4_LA57, EFER_LMA | EFER_NX, RFLAGS_AC)
    assert int(G.mode_levels(m)) == 5
    for flag in (G.MODE_PG, G.MODE_WP, G.MODE_PAE, G.MODE_LMA, G.MODE_LA57, G.MODE_NXE, G.MODE_SMEP,
                 G.MODE_PKE, G.MODE_AC):
        assert m & int(flag)
    assert not m & (int(G.MODE_SMAP) | int(G.MODE_PSE))
    assert [int(G.mode_levels(regs_mode(CR0_PG, c4, e))) for c4, e in
            ((0, 0), (CR4_PAE, 0), (CR4_PAE, EFER_LMA), (CR4_PAE | CR4_LA57, 0))] == [2, 3, 4, 3]
    assert int(G.mode_levels(regs_mode(CR0_WP, CR4_PAE, EFER_LMA))) == 0
    role = int(G.cpu_role_word(m))
    assert role & 0xF == 5 and not role & (1 << 4) and (role >> 8) & 7 == 7
    assert role & (1 << 12) and role & (1 << 13) and not role & (3 << 14) and not role & (1 << 7)
    r32 = int(G.cpu_role_word(regs_mode(CR0_PG, CR4_SMEP | CR4_SMAP, 0)))
    assert r32 & 0xF == 2 and r32 & (1 << 4) and r32 & (1 << 14) and r32 & (1 << 15) and not r32 & (1 << 13)
    assert int(G.cpu_role_word(regs_mode(0, CR4_PAE, EFER_NX))) == (1 << 7) | (7 << 8)  # direct, ACC_ALL
    ext = int(G.cpu_role_ext_word(m))
    assert ext == 1 | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7)
    assert int(G.cpu_role_ext_word(regs_mode(CR0_PG, CR4_PAE | CR4_PKE | CR4_PSE, 0))) == 1 | (1 << 2)


@pytest.mark.nojit
def test_permission_fault_helper():
    m = regs_mode(CR0_PG | CR0_WP, CR4_PAE | CR4_PKE, EFER_LMA | EFER_NX)
    assert int(G.permission_fault(m, 7, 0, 0, W | U)) == 0
    assert int(G.permission_fault(m, 5, 0, 0, W | U)) == PF_P
    assert int(G.permission_fault(m, 7, 3, 1 << 6, U)) == PF_P | PF_PK
    assert int(G.permission_fault(m, 6, 0, 0, F)) == PF_P


# ---------------------------------------------------------------- batch driver (matrix and random tables)


@njit
def _drive(gm, sm, mem_start, mem_gpa, mem_val, acc_start, modes, cr3s, pdptrs, pkrus, maxphys,
           gvas, pfecs, out, mem_out):
    """Per case: fresh guest memory, its accesses in order (walk, A/D on success), memory read back.  The walker's
    table-row cache (a ``wk`` of WKC_END words) lives across the cases: every case's fresh memory must be seen."""
    wk = np.full(G.WKC_END, -1, np.int64)
    for c in range(modes.shape[0]):
        gm.hash[:, S.GMH_KEY] = -1
        gm.ctl[:] = 0
        for j in range(mem_start[c], mem_start[c + 1]):
            gm_write64(gm, sm, 0, mem_gpa[j], mem_val[j])
        for a in range(acc_start[c], acc_start[c + 1]):
            err = G.guest_walk(gm, sm, 0, modes[c], cr3s[c], pdptrs[c], pkrus[c], maxphys[c], gvas[a],
                               pfecs[a], wk)
            out[a, 0] = err
            out[a, 1] = wk[G.WK_GPA]
            out[a, 2] = wk[G.WK_LEAF_LEVEL]
            out[a, 3] = G.guest_set_ad(gm, sm, 0, wk, pfecs[a]) if err == 0 else 0
            out[a, 4] = wk[G.WK_AD_NEEDED]
        for j in range(mem_start[c], mem_start[c + 1]):
            mem_out[j] = gm_read64(gm, sm, 0, mem_gpa[j])


def run_cases(cases):
    """cases: dicts with mem, cr0, cr4, efer, rflags, cr3, pdptrs, pkru, maxphyaddr, pse36_kvm, gva, pfecs.

    Runs every case through the kernel and the reference; returns a list of mismatch descriptions.
    """
    mem_start, mem_gpa, mem_val, acc_start, gvas, pfecs = [0], [], [], [0], [], []
    modes, cr3s, pdptrs, pkrus, maxphys = [], [], [], [], []
    for c in cases:
        for gpa, val in c["mem"].items():
            mem_gpa.append(gpa)
            mem_val.append(s64(val))
        mem_start.append(len(mem_gpa))
        for pf in c["pfecs"]:
            gvas.append(c["gva"])
            pfecs.append(pf)
        acc_start.append(len(pfecs))
        modes.append(regs_mode(c["cr0"], c["cr4"], c["efer"], c["rflags"], c["pse36_kvm"])
                     | (int(G.MODE_AMD) if c.get("amd") else 0))
        cr3s.append(c["cr3"])
        pdptrs.append([s64(x) for x in c["pdptrs"]])
        pkrus.append(c["pkru"])
        maxphys.append(c["maxphyaddr"])
    arr = lambda x: np.array(x, np.int64)  # noqa: E731
    out = np.zeros((len(pfecs), 5), np.int64)
    mem_out = np.zeros(len(mem_gpa), np.int64)
    _drive(*new_gmem(8, 32), arr(mem_start), arr(mem_gpa), arr(mem_val), arr(acc_start), arr(modes), arr(cr3s),
           arr(pdptrs).reshape(-1, 4), arr(pkrus), arr(maxphys), arr(gvas), arr(pfecs), out, mem_out)
    bad = []
    for i, c in enumerate(cases):
        mem = c["mem"]
        for a in range(acc_start[i], acc_start[i + 1]):
            err, gpa, level, new = ref_walk(mem, c["cr0"], c["cr4"], c["efer"], c["rflags"], c["cr3"], c["pdptrs"],
                                            c["pkru"], c["maxphyaddr"], c["gva"], pfecs[a], pse36_kvm=c["pse36_kvm"],
                                            amd=bool(c.get("amd")))
            got = tuple(int(x) for x in out[a, :3])
            ok = gpa is not None
            want = (0, gpa, level) if ok else (err | WALK_FAULT, -1, level)
            changed = {lv for lv in range(6) if int(out[a, 3]) >> lv & 1}
            ad = new != mem
            if got != want or (ok and (bool(changed) != ad or int(out[a, 4]) != ad)):
                bad.append((c.get("name"), pfecs[a], "kernel", got, "ref", want, sorted(changed)))
            mem = new
        got_mem = {g: u64(mem_out[j]) for j, g in zip(range(mem_start[i], mem_start[i + 1]), c["mem"], strict=True)}
        if got_mem != mem:
            bad.append((c.get("name"), "memory", {hex(k): hex(v) for k, v in got_mem.items() if mem[k] != v}))
    return bad


# ---------------------------------------------------------------- (2) access.c-style flag matrix

PTE_FLAGS = ("pte.p", "pte.rw", "pte.user", "pte.a", "pte.d", "pte.nx", "pte.51", "pte.36")
PDE_FLAGS = ("pde.p", "pde.rw", "pde.user", "pde.a", "pde.d", "pde.nx", "pde.51", "pde.36", "pde.13", "pde.pse")
OTHER_FLAGS = ("pdpte.ro", "pdpte.p", "huge1g", "upper.a", "pkey", "pku.ad", "pku.wd", "user", "write", "fetch",
               "twice", "efer.nx", "cr0.wp", "cr4.smep", "cr4.smap", "rflags.ac", "cr4.pke", "cr4.pse", "pde.17",
               "pse36_kvm")
FLAGS = PTE_FLAGS + PDE_FLAGS + OTHER_FLAGS


def _entry(f, pre, base):
    e = base
    for name, bit in (("p", P), ("rw", RW), ("user", US), ("a", A), ("d", D)):
        e |= bit if f[f"{pre}.{name}"] else 0
    e |= XD if f[f"{pre}.nx"] else 0
    e |= (1 << 51) if f[f"{pre}.51"] else 0
    e |= (1 << 36) if f[f"{pre}.36"] else 0
    return e


def access_case(levels, f, maxphyaddr):
    """The page tables and registers of one access.c-like combination ``f`` (flag name -> bool)."""
    cr0 = CR0_PG | (CR0_WP if f["cr0.wp"] else 0)
    cr4 = ((CR4_SMEP if f["cr4.smep"] else 0) | (CR4_SMAP if f["cr4.smap"] else 0) |
           (CR4_PKE if f["cr4.pke"] else 0) | (CR4_PSE if f["cr4.pse"] else 0))
    efer = EFER_NX if f["efer.nx"] else 0
    pfec = (W if f["write"] else 0) | (U if f["user"] else 0) | (F if f["fetch"] else 0)
    mem, pdptrs, cr3 = {}, [0, 0, 0, 0], 0x1000
    pkey = (1 << 59) if f["pkey"] else 0
    large = f["pde.pse"]
    if levels == 2:
        gva = GVA_32
        pde = 0x400000 | (P if f["pde.p"] else 0) | (RW if f["pde.rw"] else 0) | (US if f["pde.user"] else 0)
        pde |= (A if f["pde.a"] else 0) | (D if f["pde.d"] else 0) | (PS if large else 0)
        pde |= ((1 << 13) if f["pde.13"] else 0) | ((1 << 17) if f["pde.17"] else 0)
        put32(mem, 0x1000 + 4 * 0x12, pde)
        pte = 0x7654000 | (P if f["pte.p"] else 0) | (RW if f["pte.rw"] else 0) | (US if f["pte.user"] else 0)
        pte |= (A if f["pte.a"] else 0) | (D if f["pte.d"] else 0)
        put32(mem, 0x400000 + 4 * 0x345, pte)
    else:
        if levels == 3:
            gva = GVA_PAE
            cr4 |= CR4_PAE
            cr3 = 0x1040
            pdptrs[2] = 0x3000 | (P if f["pdpte.p"] else 0) | (0 if f["pdpte.ro"] else RW)  # RW: ignored junk
        else:
            gva = GVA_L5 if levels == 5 else GVA_L
            cr4 |= CR4_PAE | (CR4_LA57 if levels == 5 else 0)
            efer |= EFER_LME | EFER_LMA
            cr3 = 0x6000 if levels == 5 else 0x1000
            up = P | RW | US | (A if f["upper.a"] else 0)
            if levels == 5:
                mem[0x6000 + 8 * 2] = 0x1000 | up
            mem[0x1000 + 8 * 3] = 0x2000 | up | ((1 << 8) if f.get("pml4e.8") else 0)   # reserved on AMD only
            pdpte = 0x3000 | (up & ~RW if f["pdpte.ro"] else up) | (0 if f["pdpte.p"] else 0)
            if f["huge1g"]:
                pdpte = _entry(f, "pde", 0x80000000 | PS | pkey) & ~(RW if f["pdpte.ro"] else 0)
                pdpte |= (1 << 13) if f["pde.13"] else 0
            mem[0x2000 + 8 * 5] = pdpte
        if large:
            pde = _entry(f, "pde", 0x40000000 | PS | pkey) | ((1 << 13) if f["pde.13"] else 0)
        else:
            pde = _entry(f, "pde", 0x4000)
        mem[0x3000 + 8 * 7] = pde
        mem[0x4000 + 8 * 9] = _entry(f, "pte", 0x7654000 | (0 if large else pkey))
    pkru = (4 if f["pku.ad"] else 0) | (8 if f["pku.wd"] else 0)
    return dict(mem=mem, cr0=cr0, cr4=cr4, efer=efer, rflags=RFLAGS_AC if f["rflags.ac"] else 0, cr3=cr3,
                pdptrs=pdptrs, pkru=pkru, maxphyaddr=maxphyaddr, pse36_kvm=bool(f["pse36_kvm"]), amd=bool(f.get("amd")),
                gva=gva,
                pfecs=[0, pfec] if f["twice"] else [pfec], name=(levels, maxphyaddr, sorted(k for k in f if f[k])))


def _random_flags(rng, core=None):
    """Random extras (present bits mostly set, at most one reserved bit) over an exhaustive ``core``."""
    f = {k: bool(rng.random() < 0.5) for k in FLAGS}
    for k in ("pte.p", "pde.p", "pdpte.p"):
        f[k] = bool(rng.random() < 0.9)
    for k in ("pte.51", "pte.36", "pde.51", "pde.36", "pde.13", "pde.17", "huge1g", "pdpte.ro"):
        f[k] = False
    extra = rng.integers(0, 12)
    if extra < 6:
        f[("pte.51", "pte.36", "pde.51", "pde.36", "pde.13", "pde.17")[extra]] = True
    f["huge1g"] = bool(rng.random() < 0.1)
    f["pdpte.ro"] = bool(rng.random() < 0.2)
    f["pde.pse"] = bool(rng.random() < 0.3)
    f["amd"] = bool(rng.random() < 0.5)            # the guest's CPU (PML4E bit 8: reserved on AMD, ignored on Intel)
    f["pml4e.8"] = bool(rng.random() < 0.1)
    if core:
        f.update(core)
    if f["write"] and f["fetch"]:
        f["fetch"] = False
    return f


CORE = ("pte.rw", "pte.user", "pte.nx", "pde.rw", "pde.user", "pde.nx", "efer.nx", "cr0.wp", "cr4.smep",
        "cr4.smap", "rflags.ac")
ACCESS_KINDS = [(u, w, fe) for u in (0, 1) for w in (0, 1) for fe in (0, 1) if not (w and fe)]


def matrix_cases(levels, n_random, seed, exhaustive):
    rng = np.random.default_rng(seed)
    cases = []
    if exhaustive:
        for bits_ in range(1 << len(CORE)):
            for u, w, fe in ACCESS_KINDS:
                core = {k: bool(bits_ >> i & 1) for i, k in enumerate(CORE)}
                core.update(user=bool(u), write=bool(w), fetch=bool(fe))
                cases.append(access_case(levels, _random_flags(rng, core), int(rng.choice([36, 46, 52]))))
    for _ in range(n_random):
        cases.append(access_case(levels, _random_flags(rng), int(rng.choice([36, 40, 46, 52]))))
    return cases


def test_access_matrix_4level():
    cases = matrix_cases(4, 2000, seed=4, exhaustive=True)
    assert len(cases) > 14000
    bad = run_cases(cases)
    assert not bad, bad[:5]
    # the matrix exercises every outcome class
    seen = set()
    for c in cases[:3000]:
        err, gpa, _, _ = ref_walk(c["mem"], c["cr0"], c["cr4"], c["efer"], c["rflags"], c["cr3"], c["pdptrs"],
                                  c["pkru"], c["maxphyaddr"], c["gva"], c["pfecs"][-1])
        seen.add("ok" if gpa is not None else err & (PF_P | PF_RSVD | PF_I | PF_PK))
    assert {"ok", 0, PF_P, PF_P | PF_RSVD, PF_P | PF_I, PF_P | PF_PK} <= seen


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_access_matrix_other_modes(levels):
    bad = run_cases(matrix_cases(levels, 3000, seed=levels, exhaustive=False))
    assert not bad, bad[:5]


@pytest.mark.nojit
def test_access_matrix_sample_nojit():
    for levels in (2, 3, 4, 5):
        bad = run_cases(matrix_cases(levels, 40, seed=100 + levels, exhaustive=False))
        assert not bad, bad[:5]


def test_access_matrix_agrees_with_access_c_expectations():
    """Independent check of the 4-level matrix against access.c's own expectation rules (ac_emulate_access)."""
    rng = np.random.default_rng(7)
    for _ in range(3000):
        f = _random_flags(rng)
        f.update({"huge1g": False, "cr4.smap": False, "rflags.ac": False, "pde.17": False, "twice": False})
        f["pde.13"] &= f["pde.pse"]  # as in access.c: only meaningful for a 2M PDE
        f["pde.36"] &= f["pde.pse"]  # MAXPHYADDR 46: in a non-leaf PDE it would move the page table
        c = access_case(4, f, 46)
        F_ = f.__getitem__
        pfec = c["pfecs"][-1]
        err, gpa, _, new = ref_walk(c["mem"], c["cr0"], c["cr4"], c["efer"], 0, c["cr3"], c["pdptrs"], c["pkru"],
                                    46, c["gva"], pfec)
        want = (W if F_("write") else 0) | (U if F_("user") else 0) | (F if F_("fetch") else 0)
        fault = False
        pde_ok = F_("pde.p") and not F_("pde.51") and not F_("pde.13") and not (F_("pde.nx") and not F_("efer.nx"))
        if not pde_ok:
            fault = True
            want |= PF_RSVD | PF_P if F_("pde.p") else 0
        else:
            want |= PF_P
            writable, user, exe = not F_("pdpte.ro") and F_("pde.rw"), F_("pde.user"), not F_("pde.nx")
            pte_ok = True
            if not F_("pde.pse"):
                pte_ok = F_("pte.p") and not F_("pte.51") and not (F_("pte.nx") and not F_("efer.nx"))
                if not pte_ok:
                    fault = True
                    want = want & ~PF_P | (PF_RSVD | PF_P if F_("pte.p") else 0)
                writable, user, exe = writable and F_("pte.rw"), user and F_("pte.user"), exe and not F_("pte.nx")
            if pte_ok:
                kwritable = not F_("cr0.wp") and not F_("user")
                fault |= F_("user") and not user
                fault |= F_("write") and not writable and not kwritable
                fault |= F_("fetch") and not exe and F_("efer.nx")
                fault |= F_("fetch") and user and F_("cr4.smep") and not F_("user")
                if user and not F_("fetch") and F_("pkey") and F_("cr4.pke"):
                    if F_("pku.ad") or (F_("write") and F_("pku.wd") and not kwritable):
                        fault = True
                        want |= PF_PK
        if not F_("efer.nx") and not F_("cr4.smep"):
            want &= ~PF_I
        assert (gpa is None) == fault, c["name"]
        if fault:
            assert err == want, (c["name"], hex(err), hex(want))
        else:
            big = F_("pde.pse")
            high = (1 << 36) if F_("pde.36" if big else "pte.36") else 0  # an address bit with MAXPHYADDR 46
            assert gpa == high | (0x40000000 | (GVA_L & 0x1FFFFF) if big else 0x7654123)
            leaf_gpa = 0x3038 if F_("pde.pse") else 0x4048
            assert new[leaf_gpa] & A and bool(new[leaf_gpa] & D) == (F_("write") or bool(c["mem"][leaf_gpa] & D))


# ---------------------------------------------------------------- (3) hypothesis: random tables and modes

ODD_BITS = [7, 8, 12, 13, 16, 17, 20, 21, 29, 30, 35, 36, 39, 40, 45, 46, 51, 52, 58, 59, 60, 61, 62, 63]


@st.composite
def random_walks(draw):
    levels = draw(st.sampled_from([2, 3, 4, 5]))
    flag = st.booleans()
    cr0 = CR0_PG | (CR0_WP if draw(flag) else 0)
    cr4 = sum(b for b in (CR4_PSE, CR4_SMEP, CR4_SMAP, CR4_PKE) if draw(flag))
    efer = EFER_NX if draw(flag) else 0
    if levels >= 3:
        cr4 |= CR4_PAE
    if levels >= 4:
        efer |= EFER_LME | EFER_LMA
        cr4 |= CR4_LA57 if levels == 5 else 0
    rflags = RFLAGS_AC if draw(flag) else 0
    maxphy = draw(st.sampled_from([36, 39, 40, 46, 52]))
    four = levels == 2
    gva = draw(st.integers(0, (1 << 57) - 1)) & (0xFFFFFFFF if levels <= 3 else (1 << 57) - 1)
    bits_per, isize = (10, 4) if four else (9, 8)
    tables = [0x1000 * i for i in range(1, 9)]

    def entry(next_table, level):
        base = next_table if draw(st.integers(0, 4)) else draw(st.sampled_from(tables + [0x40000000, 0x80000000]))
        low = (draw(st.integers(0, 0xFFF)) & ~PS) | (P if draw(st.integers(0, 7)) else 0)
        # PS: often where it makes a huge page, rarely where it is reserved (PML4E/PML5E)
        low |= PS if draw(st.integers(0, 8 if level >= 4 else 2)) == 0 else 0
        if low & PS and level in (2, 3) and draw(st.integers(0, 4)):
            base = draw(st.sampled_from([1 << 30, 3 << 30] + ([] if level == 3 else [0x400000, 0xC00000])))
        odd = draw(st.lists(st.sampled_from(ODD_BITS), max_size=2))
        high = sum(1 << b for b in odd) if draw(st.integers(0, 3)) == 0 else 0
        return (base | low | high) & (0xFFFFFFFF if four else U64)

    mem = {}
    pdptrs = [0, 0, 0, 0]
    cr3 = draw(st.sampled_from(tables)) | draw(st.integers(0, 0xFFF))
    table = cr3 & ~0xFFF
    top = levels
    if levels == 3:
        pdptrs = [entry(draw(st.sampled_from(tables)), 3) for _ in range(4)]
        table, top = pdptrs[(gva >> 30) & 3] & 0xFFFFFFFFFF000, 2
    for lv in range(top, 0, -1):
        nxt = tables[lv - 1]
        e = entry(nxt, lv)
        gpa = table + isize * ((gva >> (12 + bits_per * (lv - 1))) & ((1 << bits_per) - 1))
        if four:
            put32(mem, gpa, e)
        else:
            mem[gpa] = e
        table = e & (0xFFFFF000 if four else 0xFFFFFFFFFF000)
    pfecs = draw(st.lists(st.sampled_from([0, W, U, W | U, F, F | U]), min_size=1, max_size=2))
    return dict(mem=mem, cr0=cr0, cr4=cr4, efer=efer, rflags=rflags, cr3=cr3, pdptrs=pdptrs,
                pkru=draw(st.integers(0, 0xFFFFFFFF)), maxphyaddr=maxphy, pse36_kvm=draw(flag), gva=gva,
                pfecs=pfecs, name=levels)


HYP = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(HYP, max_examples=300)
@given(st.lists(random_walks(), min_size=1, max_size=8))
def test_random_tables_kernel_vs_reference(cases):
    bad = run_cases(cases)
    assert not bad, bad[:3]
