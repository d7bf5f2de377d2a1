"""Nested EPT (issue #12): an L2 guest on L0's shadow of L1's EPT12.

Checks against the pure-Python reference (tests/reference/nested_ept.py: L2 cannot tell, L1_EXIT exactly where
EPT12 refuses), kvm-unit-tests' ept_access_test_* cases, the selftests nested_tdp_fault_test (hardware path) and
nested_dirty_log_test, INVEPT and the cached roots, L1's edits of EPT12, and the API's refusals.
"""

import random

import numpy as np
import pytest
from batchmmu.kernels import state as S
from reference.nested_ept import MISCONFIG, ref_ept_walk, ref_l2_access, ref_npt_walk

import batchmmu as bm
from batchmmu.l1 import L1

R, W, X = 1, 2, 4
WB = 6 << 3
LARGE = 1 << 7
EPT_A, EPT_D = 1 << 8, 1 << 9
P, RW, US, A_, D_ = 1, 2, 4, 32, 64
CR0_PG_PE = 0x80000011
CR4_PAE = 0x20
EFER_LME_LMA = 0x500
QV, QT = 0x80, 0x100          # GVA_IS_VALID, GVA_TRANSLATED
OK = (bm.HIT, bm.FIXED, bm.SPURIOUS)


class Nest(L1):
    """A nested VM (VMX, or SVM with ``svm``) whose EPT12 and L2 page tables the test writes into L1 memory
    (batchmmu.l1.L1), with L2 gpa -> L1 gpa from the reference's walk of what was written.  L0 runs the TDP MMU
    or the legacy one as the module's ``l0_mmu`` fixture says."""

    tdp_mmu = False

    def __init__(self, ept_ad=True, memory="64MiB", host_ad=True, svm=False, **host):
        h = bm.Host(memory="4GiB", tdp_mmu=host.pop("tdp_mmu", self.tdp_mmu), **host)
        vm = h.create_vms(1, memory=memory, nested=True, **({"tdp_format": "npt"} if svm else {"ept_ad": host_ad}))
        super().__init__(h, vm[0], ept_ad=ept_ad)

    ept_entry_gpa = L1.entry_gpa
    ept_map = L1.map

    def l1_of(self, l2gpa):
        if self.svm:
            out, _ = ref_npt_walk(dict(self.mem), self.eptp, l2gpa, False, False, CR4_PAE, EFER_LME_LMA | 0x800)
            return out
        out, _ = ref_ept_walk(self.mem, self.eptp, l2gpa, False, False, False)
        return out

    @property
    def npt(self):
        """The reference's NPT12 walk mode: L1's CR4 and EFER, or None for VMX."""
        return (CR4_PAE, EFER_LME_LMA | 0x800) if self.svm else None


@pytest.fixture(autouse=True, params=[False, True], ids=["legacy", "tdp_mmu"])
def l0_mmu(request):
    """Every test here runs with L0 on the legacy TDP MMU (kvm.tdp_mmu=N: L1's tables built by the shadow MMU's
    code) and on the TDP MMU (KVM's default: both MMUs in one VM)."""
    Nest.tdp_mmu = request.param
    yield request.param
    Nest.tdp_mmu = False


def _mmu_set():
    return f"tdp_mmu={str(Nest.tdp_mmu).lower()}"


def _outcome(o):
    return "ok" if o in OK else "guest_fault" if o == bm.GUEST_FAULT else "l1_exit" if o == bm.L1_EXIT else int(o)


# ------------------------------------------------------------------ L2 cannot tell (reference differential)
@pytest.mark.parametrize("seed,ad,svm", [pytest.param(1, True, False, marks=pytest.mark.nojit), (2, False, False),
                                         (3, True, False), (4, False, False), (5, True, True), (6, True, True)])
def test_l2_accesses_match_the_reference(seed, ad, svm):
    rng = random.Random(seed)
    n = Nest(ept_ad=ad, svm=svm)
    data = 0x200000                                  # L2 gpas of data pages
    perms = [R | W | X] * 6 + [R | W, R, R | X, X, 0, W]   # W alone: an EPT misconfiguration
    if svm:   # NPT12 leaves: P/RW/US, NX
        perms = [P | RW | US] * 6 + [P | US, P | RW, P, 0, P | RW | US | (1 << 63), P | US | (1 << 63)]
    gvas = []
    for k in range(48):
        gva = 0x7f0000000000 + k * 4096 + rng.choice([0, 1 << 21, 1 << 30]) * (k % 3)
        l2 = data + 4096 * k
        n.ept_map(l2, 0x1000000 + 4096 * rng.randrange(512), rng.choice(perms))
        n.l2_map(gva, l2, rng.choice([P | RW | US, P | RW, P | US, P | RW | US | A_, 0]))
        gvas.append(gva)
    # some of L2's table pages read-only or unmapped in EPT12 (faults on paging-structure accesses)
    for l2tab in rng.sample(range(0x11000, n.l2_next, 4096), 2):
        e = n.ept_entry_gpa(l2tab)
        n.put(e, n.mem[e] & ~W if rng.random() < 0.5 else 0)
    n.enter()
    ref = dict(n.mem)
    for i in range(400):
        gva = rng.choice(gvas) + 8 * rng.randrange(512)
        kind = rng.choice([0, 2, 4, 6, 0x10, 0x14])
        if kind & 2 and rng.random() < 0.5:
            val = rng.getrandbits(64)
            got = n.h.store(n.vm, 0, gva, val, kind=kind)
            want = ref_l2_access(ref, n.eptp, n.regs, gva, kind, value=val, nbytes=8, npt=n.npt)
        else:
            got = n.h.access(n.vm, 0, gva, kind)
            want = ref_l2_access(ref, n.eptp, n.regs, gva, kind, npt=n.npt)
        o = _outcome(int(got.outcome[0]))
        assert (o, int(got.error_code[0]) if o != "ok" else 0, int(got.fault_gpa[0])) == want, (i, hex(gva), kind)
    # guest memory as L2 left it: every page either side wrote (EPT12's A/D bits are KVM's business: masked)
    ept_pages = {a & ~4095 for a in n.mem} - {n.l1_of(t) for t in range(0x10000, n.l2_next, 4096)}
    for pg in sorted({a & ~4095 for a in ref}):
        got = n.h.read_guest_memory(n.vm, pg, 512).view(np.int64).astype(object) & ((1 << 64) - 1)
        want = [ref.get(pg + 8 * i, 0) for i in range(512)]
        if pg in ept_pages:   # L0 sets EPT12's / NPT12's A/D bits only when its shadow tables miss
            ad_bits = (A_ | D_) if svm else (EPT_A | EPT_D)
            got = [g & ~ad_bits for g in got]
            want = [w & ~ad_bits for w in want]
        assert list(got) == want, hex(pg)
    st = n.h.stats(n.vm)
    assert st["guest_mode"] == 1 and st["nested_run"] >= 1 and st["pf_taken"] > 0


# ------------------------------------------------------------------ kvm-unit-tests ept_access_test_*
EPT_ACCESS = [   # (name, EPT perms of the data page, {op: expected}) from x86/vmx_tests.c
    ("not_present", 0, {"read": 0x1, "write": 0x2, "exec": 0x4}),
    ("read_only", R, {"read": None, "write": 0x2 | 0x8, "exec": 0x4 | 0x8}),
    ("write_only", W, {"read": MISCONFIG, "write": MISCONFIG, "exec": MISCONFIG}),
    ("read_write", R | W, {"read": None, "write": None, "exec": 0x4 | 0x8 | 0x10}),
    ("execute_only", X, {"read": 0x1 | 0x20, "write": 0x2 | 0x20, "exec": None}),
    ("read_execute", R | X, {"read": None, "write": 0x2 | 0x8 | 0x20, "exec": None}),
    ("write_execute", W | X, {"read": MISCONFIG, "write": MISCONFIG, "exec": MISCONFIG}),
    ("read_write_execute", R | W | X, {"read": None, "write": None, "exec": None}),
]
OPS = {"read": 0, "write": bm.ACC_WRITE, "exec": bm.ACC_FETCH}


@pytest.mark.parametrize("name,perms,expect", EPT_ACCESS, ids=[c[0] for c in EPT_ACCESS])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_ept_access(name, perms, expect, level):
    """The permission of the data page set at one EPT12 level (the others RWX), as ept_access_violation /
    ept_access_allowed / ept_access_misconfig twiddle it; L2's paging on, its tables and code elsewhere."""
    n = Nest(ept_ad=False)
    gpa = 1 << 39                                   # data page (as KUT: its own EPT12 entry at every level)
    n.ept_map(gpa, 0x2000000)
    n.l2_map(0x7f0000000000, gpa)
    if level == 1:
        n.ept_map(gpa, 0x2000000, perms)
    else:
        e = n.ept_entry_gpa(gpa, level)
        n.put(e, (n.mem[e] & ~7) | perms)
    n.enter()
    for op, want in expect.items():
        r = n.h.access(n.vm, 0, 0x7f0000000000 + 8, OPS[op])
        if want is None:
            assert r.outcome[0] in OK, op
        elif want == MISCONFIG:
            assert (r.outcome[0], r.error_code[0]) == (bm.L1_EXIT, 0), op
        else:
            assert (r.outcome[0], r.error_code[0], r.fault_gpa[0]) == (bm.L1_EXIT, want | QV | QT, gpa + 8), op


def test_ept_access_reserved_and_ignored_bits():
    n = Nest(ept_ad=False)
    gpa = 1 << 39
    n.ept_map(gpa, 0x2000000)
    n.l2_map(0x7f0000000000, gpa)
    n.enter()
    base = n.mem[n.ept_entry_gpa(gpa)]
    cases = [(1 << 46, MISCONFIG), (1 << 51, MISCONFIG), (2 << 3, MISCONFIG), (7 << 3, MISCONFIG),
             (1 << 8, None), (1 << 9, None), (1 << 10, None), (1 << 11, None), (1 << 52, None), (1 << 63, None)]
    for bit, want in cases:   # each bit alone on the leaf (with memory types 2 and 7 in place of WB)
        n.h.nested_exit(n.vm, 0)
        n.h.store(n.vm, 0, n.ept_entry_gpa(gpa), (base & ~(7 << 3)) | bit if bit in (2 << 3, 7 << 3) else base | bit)
        n.h.invept(n.vm, 0, eptp=n.eptp)        # L1 invalidates what it changed, as KUT's twiddles do
        n.reenter()
        r = n.h.access(n.vm, 0, 0x7f0000000000, 0)
        if want is None:
            assert r.outcome[0] in OK, hex(bit)
        else:
            assert (r.outcome[0], r.error_code[0]) == (bm.L1_EXIT, 0), hex(bit)
    # reserved bits are ignored in a non-present entry: a violation, not a misconfiguration
    n.h.nested_exit(n.vm, 0)
    n.h.store(n.vm, 0, n.ept_entry_gpa(gpa), (base & ~7) | (1 << 46))
    n.h.invept(n.vm, 0, eptp=n.eptp)
    n.reenter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, 0)
    assert (r.outcome[0], r.error_code[0]) == (bm.L1_EXIT, 0x1 | QV | QT)


def test_ept_access_force_2m_page():
    n = Nest(ept_ad=False)
    gpa = 1 << 39
    n.ept_map(gpa, 0x2000000, R | W | X, level=2)
    n.l2_map(0x7f0000000000, gpa)
    n.enter()
    assert n.h.access(n.vm, 0, 0x7f0000000000, 0).outcome[0] in OK
    n.h.nested_exit(n.vm, 0)
    n.h.store(n.vm, 0, n.ept_entry_gpa(gpa, 2), 0x2000000 | R | WB | LARGE)   # L1 edits EPT12: emulated
    n.reenter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, bm.ACC_WRITE)
    assert (r.outcome[0], r.error_code[0], r.fault_gpa[0]) == (bm.L1_EXIT, 0x2 | 0x8 | QV | QT, gpa)
    assert n.h.stats(n.vm)["mmu_pte_write"] >= 1


PADDR = [   # (name, EPTP A/D, perms of the EPT12 leaf mapping L2's level-1 page table, expected qualification)
    ("paddr_not_present_ad_disabled", False, 0, 0x1),
    ("paddr_not_present_ad_enabled", True, 0, 0x3),
    ("paddr_read_only_ad_enabled", True, R, 0x3 | 0x8),
    ("paddr_read_execute_ad_enabled", True, R | X, 0x3 | 0x8 | 0x20),
    ("paddr_read_write", False, R | W, None),
    ("paddr_read_write_execute", False, R | W | X, None),
]


@pytest.mark.parametrize("name,ad,perms,want", PADDR, ids=[c[0] for c in PADDR])
@pytest.mark.parametrize("op", ["read", "write", "exec"])
def test_ept_access_paddr(name, ad, perms, want, op):
    """The EPT12 leaf of L2's level-1 page-table page restricted: the processor's walk faults on the table
    (guest-physical address = that entry, qualification without GVA_TRANSLATED)."""
    n = Nest(ept_ad=ad)
    gpa = 1 << 39
    n.ept_map(gpa, 0x2000000)
    n.l2_map(0x7f0000000000, gpa, P | RW | US | A_ | D_)
    pt = [t for t in range(0x10000, n.l2_next, 4096)][-1]        # the last L2 table made: the level-1 one
    n.ept_map(pt, n.l1_of(pt), perms)
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, OPS[op])
    if want is None:
        assert r.outcome[0] in OK
    else:
        assert (r.outcome[0], r.error_code[0], r.fault_gpa[0]) == (bm.L1_EXIT, want | QV, pt)


@pytest.mark.parametrize("pte_ad,op,want", [(0, "read", 0xB), (A_, "read", None), (A_, "write", 0xB),
                                             (A_ | D_, "write", None)])
def test_ept_access_paddr_read_only_ad_disabled(pte_ad, op, want):
    """EPT A/D off: a walk that must set the gpte's A (or D) bit writes the table page; one that need not
    only reads it (ept_access_test_paddr_read_only_ad_disabled)."""
    n = Nest(ept_ad=False)
    gpa = 1 << 39
    n.ept_map(gpa, 0x2000000)
    n.l2_map(0x7f0000000000, gpa, P | RW | US | pte_ad)
    tables = list(range(0x10000, n.l2_next, 4096))
    for t in tables[:-1]:                                            # A already set above the leaf PTE
        for a in [a for a in list(n.mem) if a & ~4095 == n.l1_of(t) and n.mem[a] & P]:
            n.put(a, n.mem[a] | A_)
    for t in tables:                                                 # every L2 table page read-only
        n.ept_map(t, n.l1_of(t), R)
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, OPS[op])
    if want is None:
        assert r.outcome[0] in OK
    else:
        assert (r.outcome[0], r.error_code[0]) == (bm.L1_EXIT, want | QV)


# ------------------------------------------------------------------ selftests
@pytest.mark.nojit
@pytest.mark.parametrize("case,write,want", [("final_unmapped", False, 0x181), ("pt_unmapped", False, 0x083),
                                             ("final_wrprot", True, 0x1AA), ("pt_wrprot", False, 0x0AB)])
def test_nested_tdp_fault(case, write, want):
    """nested_tdp_fault_test's four cases, VMX, through the processor's walk with EPT A/D on (L2 accesses to
    its page tables are read+write): exit GPA and qualification."""
    n = Nest(ept_ad=True)
    gpa = 0x40000000
    n.ept_map(gpa, 0x2000000, R | X)
    if case != "final_wrprot":
        n.ept_map(gpa, 0x2000000)
    n.l2_map(0x7f0000000000, gpa)
    pt = list(range(0x10000, n.l2_next, 4096))[-1]
    if case == "final_unmapped":
        n.ept_map(gpa, 0x2000000, 0)
    elif case == "pt_unmapped":
        n.ept_map(pt, n.l1_of(pt), 0)
    elif case == "pt_wrprot":
        n.ept_map(pt, n.l1_of(pt), R | X)
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, bm.ACC_WRITE if write else 0)
    assert r.outcome[0] == bm.L1_EXIT and r.error_code[0] == want
    assert r.fault_gpa[0] == (gpa if case.startswith("final") else pt)   # the entry read is at index 0


@pytest.mark.nojit
def test_nested_dirty_log():
    """nested_dirty_log_test: L2 gpas 0xc0002000 / 0xc0003000 alias L1 0xc0000000 / 0xc0001000 (EPT12 leaves
    with D preset); the dirty log (by L1 gpa) shows exactly the page an L2 write or a read fault made dirty."""
    n = Nest(ept_ad=True)
    base = 0xc0000000
    n.h.set_memslot(n.vm, 1, base, 4 * 4096, flags=bm.MEM_LOG_DIRTY_PAGES)
    for k in range(4):
        n.ept_map(base + 4096 * k, base + 4096 * k, R | W | X, extra=WB | EPT_D)
    for k in (2, 3):
        n.ept_map(base + 4096 * k, base + 4096 * (k - 2), R | W | X, extra=WB | EPT_D)
    for k in range(4):
        n.l2_map(base + 4096 * k, base + 4096 * k)
    n.enter()
    n.h.get_dirty_log(n.vm, 1)

    def step(page, write):
        gva = base + 4096 * (2 + page)
        if write:
            r = n.h.store(n.vm, 0, gva, 1)
        else:
            r = n.h.access(n.vm, 0, gva, 0)
        assert r.outcome[0] in OK
        return list(np.unpackbits(n.h.get_dirty_log(n.vm, 1).view(np.uint8), bitorder="little")[:4])

    assert step(0, False) == [1, 0, 0, 0]      # READ_FAULT: a writable SPTE (EPT12 D set) marks the gfn
    assert step(0, True) == [1, 0, 0, 0]       # WRITE_FAULT
    assert step(0, False) == [0, 0, 0, 0]      # NO_FAULT
    assert step(1, True) == [0, 1, 0, 0]
    assert step(1, True) == [0, 1, 0, 0]
    assert step(1, False) == [0, 0, 0, 0]
    assert n.read(base) == 1 and n.read(base + 4096) == 1
    assert n.read(base + 2 * 4096) == 0


# ------------------------------------------------------------------ roots, INVEPT, L1's edits
def test_cached_roots_by_eptp_and_invept():
    n = Nest(ept_ad=True)
    n.ept_map(0x200000, 0x2000000)
    n.enter(paging=False)
    first = n.h.access(n.vm, 0, 0x200000, 0)
    assert first.outcome[0] == bm.FIXED
    root = int(n.h.vr.root[0])
    n.h.nested_exit(n.vm, 0)
    assert int(n.h.vr.rec[0, S.VR_ALT_ROOT]) == root               # guest_mmu's root stays cached
    n.h.nested_enter(n.vm, 0, eptp=n.eptp, cr0=0x11, cr3=0, cr4=0, efer=0)
    assert n.h.access(n.vm, 0, 0x200000, 0).outcome[0] == bm.HIT     # same EPTP: the same root
    # another EPT12 (a copy of the root table): a new root; the old one waits in prev_roots
    other = n.page()
    for i in range(512):
        if n.mem.get(n.root + 8 * i):
            n.put(other + 8 * i, n.mem[n.root + 8 * i])
    n.flush()
    n.h.nested_exit(n.vm, 0)
    eptp2 = other | (n.eptp & 0xFFF)
    n.h.nested_enter(n.vm, 0, eptp=eptp2, cr0=0x11, cr3=0, cr4=0, efer=0)
    taken = n.h.stats(n.vm)["pf_taken"]
    # an exit: the new root is empty; below it the shared EPT12 tables' shadow pages are found in the hash and
    # the leaf SPTE is there already (SPURIOUS)
    assert n.h.access(n.vm, 0, 0x200000, 0).outcome[0] == bm.SPURIOUS and n.h.stats(n.vm)["pf_taken"] == taken + 1
    assert int(n.h.vr.root[0]) != root and int(n.h.vr.prev_root[0, 0]) == root
    n.h.nested_exit(n.vm, 0)
    pages = n.h.stats(n.vm)["mmu_pages"]
    n.h.invept(n.vm, 0, eptp=n.eptp)                                 # single context: the first root only
    alt = n.h.vr.rec[0, S.VR_ALT_ROOT:S.VR_ALT_ROOT + 8]
    assert alt[0] >= 0 and alt[2] == -1
    n.h.invept(n.vm, 0)                                              # global
    alt = n.h.vr.rec[0, S.VR_ALT_ROOT:S.VR_ALT_ROOT + 8]
    assert alt[0] == -1 and (alt[2:5] == -1).all()
    assert n.h.stats(n.vm)["mmu_pages"] == pages                     # freed roots stay hashed
    n.h.nested_enter(n.vm, 0, eptp=n.eptp, cr0=0x11, cr3=0, cr4=0, efer=0)
    assert n.h.access(n.vm, 0, 0x200000, 0).outcome[0] == bm.HIT     # found again in the hash


def test_l1_edits_ept12_through_stores():
    """L1 rewrites an EPT12 leaf with an ordinary store: its frame is write-protected (tracked or rmap-wrprot),
    the write is emulated or unsyncs the page, and L2 then sees the new mapping."""
    n = Nest(ept_ad=True)
    gpa = 0x200000
    n.ept_map(gpa, 0x2000000)
    n.enter(paging=False)
    assert n.h.access(n.vm, 0, gpa, 0).outcome[0] == bm.FIXED
    n.h.nested_exit(n.vm, 0)
    n.h.store(n.vm, 0, n.ept_entry_gpa(gpa), 0)                        # unmap it
    n.reenter()                                                         # without INVEPT: the stale translation
    assert n.h.access(n.vm, 0, gpa, 0).outcome[0] == bm.HIT
    n.h.nested_exit(n.vm, 0)
    n.h.invept(n.vm, 0, eptp=n.eptp)
    n.h.nested_enter(n.vm, 0, eptp=n.eptp, cr0=0x11, cr3=0, cr4=0, efer=0)
    r = n.h.access(n.vm, 0, gpa, 0)
    assert (r.outcome[0], r.error_code[0], r.fault_gpa[0]) == (bm.L1_EXIT, 0x1 | QV | QT, gpa)
    # a table page of EPT12 (upper level) is write-tracked: L1's store there is emulated (mmu_pte_write)
    n.h.nested_exit(n.vm, 0)
    before = n.h.stats(n.vm)["mmu_pte_write"]
    r = n.h.store(n.vm, 0, n.ept_entry_gpa(gpa, 2), 0)
    assert r.outcome[0] == bm.EMULATED and n.h.stats(n.vm)["mmu_pte_write"] == before + 1


def test_l2_without_nested_ept_gets_its_own_root(l0_mmu):
    """No EPTP: L2 runs on a direct root of role guest_mode (L1 gpas), apart from L1's: on the legacy MMU a
    vCPU's direct shadow root, on the TDP MMU a second TDP MMU root (kvm_tdp_mmu_get_vcpu_root_hpa by role) that
    every host-side operation walks too."""
    n = Nest()
    h, vm = n.h, n.vm
    h.access(vm, 0, 0x3000000, 0)
    l1_root = int(h.vt.root[vm]) if l0_mmu else int(h.vr.root[0])
    pages = h.stats(vm)["mmu_pages"]
    h.nested_enter(vm, 0, cr0=0x11, cr3=0, cr4=0, efer=0)
    assert h.access(vm, 0, 0x3000000, 0).outcome[0] == bm.FIXED      # a new root: L1's mapping is not shared
    assert h.stats(vm)["mmu_pages"] > pages
    if l0_mmu:
        l2_root = int(h.vt.root_l2[vm])
        assert l2_root >= 0 and l2_root != l1_root and int(h.vt.root[vm]) == l1_root
        assert h.pa.meta[l2_root, S.SP_ROLE] & (1 << 17)              # role.guest_mode
        assert h.shrink_count() == 0                                   # TDP MMU pages, not the shadow MMU's
    else:
        assert int(h.vr.root[0]) != l1_root
    h.nested_exit(vm, 0)
    assert (int(h.vt.root[vm]) if l0_mmu else int(h.vr.root[0])) == l1_root
    assert h.access(vm, 0, 0x3000000, 0).outcome[0] == bm.HIT


def test_host_operations_reach_the_guest_mode_root(l0_mmu):
    """An L2 without nested paging maps L1 gpas in its own root: MMU-notifier zaps, dirty logging and a memslot
    deletion act on its SPTEs as on L1's (for_each_valid_tdp_mmu_root / the rmaps)."""
    n = Nest(backing="4k")
    h, vm = n.h, n.vm
    base = 0x2000000
    h.access(vm, 0, base + 4096 * np.arange(4), bm.ACC_WRITE)
    h.nested_enter(vm, 0, cr0=0x11, cr3=0, cr4=0, efer=0)
    r = h.access(vm, 0, base + 4096 * np.arange(4), bm.ACC_WRITE).outcome
    assert r[0] == bm.FIXED and np.isin(r, OK).all()        # (the legacy MMU prefetches the neighbours)
    hva = int(h.memslots(vm)[0]["hva"])
    assert h.age_hva_range(vm, hva + base, hva + base + 4096).all()
    if l0_mmu:
        assert h.stats(vm)["pages_aged"] == 2                                   # the page in both roots
    assert h.invalidate_hva_range(vm, hva + base, hva + base + 2 * 4096) == 4       # 2 pages x 2 roots
    assert not h.age_hva_range(vm, hva + base, hva + base + 2 * 4096).any()
    h.set_memslot(vm, 1, 0x4000000, 1 << 21, flags=bm.MEM_LOG_DIRTY_PAGES)
    assert h.store(vm, 0, 0x4000000, 1).outcome[0] == bm.FIXED
    assert h.get_dirty_log(vm, 1)[0] == 1
    assert h.store(vm, 0, 0x4000000, 2).outcome[0] == bm.FIXED                # write-protected by the GET
    h.nested_exit(vm, 0)
    assert h.store(vm, 0, 0x4000000, 3).outcome[0] == bm.FIXED                # L1's root: its own fault
    assert h.get_dirty_log(vm, 1)[0] == 1 and n.read(0x4000000) == 3
    h.set_memslot(vm, 2, 1 << 30, 4096)
    h.set_memslot(vm, 2, 1 << 30, 0)                                            # kvm_mmu_zap_all_fast: both
    if l0_mmu:
        assert int(h.vt.root[vm]) == int(h.vt.root_l2[vm]) == -1
    h.nested_enter(vm, 0, cr0=0x11, cr3=0, cr4=0, efer=0)
    assert h.access(vm, 0, base, 0).outcome[0] == bm.FIXED


# ------------------------------------------------------------------ the API refuses
@pytest.mark.nojit
def test_nested_api_refusals():
    h = bm.Host(memory="1GiB", tdp_mmu=False)
    plain = int(h.create_vms(1, memory="16MiB")[0])
    vm = int(h.create_vms(1, memory="16MiB", nested=True)[0])
    with pytest.raises(bm.BatchMMUError, match="nested=True"):
        h.nested_enter(plain, 0, eptp=0x1000 | 0x1E)
    for eptp, what in ((0x1000 | 0x18 | 1, "memory type"), (0x1000 | 0x10 | 6, "walk length"),
                       (0x1000 | 0x1E | 0x80, "reserved"), ((1 << 47) | 0x1E, "MAXPHYADDR"),
                       (0x40000000 | 0x1E, "no memslot"), (-1, "64-bit"), (1.5, "64-bit")):
        with pytest.raises(bm.BatchMMUError, match=what):
            h.nested_enter(vm, 0, eptp=eptp)
    with pytest.raises(bm.BatchMMUError, match="ncr3"):
        h.nested_enter(vm, 0, ncr3=0x1000)
    with pytest.raises(bm.BatchMMUError, match="not running L2"):
        h.nested_exit(vm, 0)
    assert h.stats(vm)["nested_run"] == 0
    h.nested_enter(vm, 0, eptp=0x1000 | 0x1E)
    with pytest.raises(bm.BatchMMUError, match="already running L2"):
        h.nested_enter(vm, 0, eptp=0x1000 | 0x1E)
    with pytest.raises(bm.BatchMMUError, match="INVEPT in L2"):
        h.invept(vm, 0)
    with pytest.raises(bm.BatchMMUError, match="passthrough"):
        h.create_vms(1, memory="16MiB", nested=True, tdp_format="npt", tdp_levels=5)
    svm = int(h.create_vms(1, memory="16MiB", nested=True, tdp_format="npt")[0])
    with pytest.raises(bm.BatchMMUError, match="outside 4-level long mode"):
        h.nested_enter(svm, 0, ncr3=0x1000)
    for ncr3, what in ((1 << 47, "MAXPHYADDR"), (0x40000000, "no memslot"), (-1, "64-bit")):
        with pytest.raises(bm.BatchMMUError, match=what):
            h.nested_enter(svm, 0, ncr3=ncr3)
    with pytest.raises(bm.BatchMMUError, match="TDP host"):
        h.create_vms(1, memory="16MiB", nested=True, mmu="shadow")
    no_ad = int(h.create_vms(1, memory="16MiB", nested=True, ept_ad=False)[0])
    with pytest.raises(bm.BatchMMUError, match="A/D"):
        h.nested_enter(no_ad, 0, eptp=0x1000 | 0x5E)
    for call in (lambda: h.set_vcpu_regs(no_ad, 0, efer=1 << 40),           # kvm_valid_efer (review finding)
                 lambda: h.nested_enter(no_ad, 0, eptp=0x1000 | 0x1E, cr0=0x11, cr3=0, cr4=0, efer=1 << 40)):
        with pytest.raises(bm.BatchMMUError, match="reserved bits"):
            call()
    assert not h.vr.guest_mode[int(h.vt.vcpu_off[no_ad])] and int(h.vr.efer[int(h.vt.vcpu_off[no_ad])]) == 0


# ------------------------------------------------------------------ scenario: dirty_log_perf -n
@pytest.mark.parametrize("manual,pml", [(True, False), (False, False), (True, True)])
def test_dirty_log_perf_nested(manual, pml):
    """memstress -n: every vCPU in L2 on an identity EPT12 of 1G pages; every write is in the dirty log by L1
    gpa (verify=exact fails the run on a lost or invented one); write-protection faults are nested faults
    (L0's shadow-EPT path: pf_fixed, never fast_page_fault)."""
    pages = 2 * 1024
    rep = bm.run_scenario("dirty_log_perf", sets=["nested=true", _mmu_set(), "bytes_per_vcpu=4MiB",
                                                  f"manual_protect={str(manual).lower()}", "verify=exact",
                                                  f"pml={str(pml).lower()}",
                                                  "iterations=3", "write_percent=50", "random_access=true"])
    ph = {p["name"]: p for p in rep.phases}
    assert ph["Populate memory"]["stats"]["pf_fixed"] == pages and ph["Populate memory"]["stats"]["nested_run"] == 2
    assert ph["Populate memory"]["stats"]["guest_mode"] == 2
    for i in (2, 3):
        d = ph[f"Iteration {i} dirty memory"]["delta"]
        assert d.get("pf_fixed", 0) > 0 and d.get("pf_fast", 0) == 0
    with pytest.raises(bm.BatchMMUError, match="vm_group.nested"):
        bm.run_scenario("dirty_log_perf", sets=["nested=true", "vm_group.mmu=shadow"])


# ------------------------------------------------------------------ SVM: nested NPT
NPF_FINAL, NPF_PAGE = 1 << 32, 1 << 33
NX = 1 << 63

NPT_CASES = [   # kvm-unit-tests x86/svm_npt.c: (name, NPT12 leaf flags of the data page, access, exit_info_1)
    ("npt_np", 0, 0, NPF_FINAL | 0x4),
    ("npt_us", P | RW, 0, NPF_FINAL | 0x5),
    ("npt_rw", P | US, bm.ACC_WRITE, NPF_FINAL | 0x7),
    ("npt_nx", P | RW | US | NX, bm.ACC_FETCH, NPF_FINAL | 0x15),
    ("npt_rsvd_pte", P | RW | US | (1 << 50), 0, NPF_FINAL | 0xD),
    # svm_npt_rsvd_bits_test poisons the PTE of the guest's code: a fetch, with L1's EFER.NX
    ("svm_npt_rsvd_bits_test_pte", P | RW | US | (1 << 50), bm.ACC_FETCH, NPF_FINAL | 0x1D),
]


@pytest.mark.nojit
@pytest.mark.parametrize("name,flags,kind,want", NPT_CASES, ids=[c[0] for c in NPT_CASES])
def test_svm_npt(name, flags, kind, want):
    """The NPF exit_info_1 L1 receives (nested_svm_inject_npf_exit: the NPT12 walker's error code, a user access,
    FETCH with L1's EFER.NX, and the hardware's GUEST_FINAL bit) and exit_info_2 (the L2 gpa)."""
    n = Nest(svm=True)
    gpa = 1 << 39
    n.ept_map(gpa, 0x2000000, flags)
    n.l2_map(0x7f0000000000, gpa)
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000 + 8, kind)
    assert (r.outcome[0], int(r.error_code[0]), r.fault_gpa[0]) == (bm.L1_EXIT, want, gpa + 8)


def test_svm_npt_rw_pfwalk_and_rsvd_upper_levels():
    """npt_rw_pfwalk: the NPT12 leaf of L2's top page table read-only: the walk's access to it (a write for NPT)
    exits with GUEST_PAGE|P|W|U, exit_info_2 = the entry in CR3's page; svm_npt_rsvd_bits_test: a reserved bit
    in an NPT12 PML4E shared by L2's tables: the table access meets it first (GUEST_PAGE|RSVD|W|U|P)."""
    n = Nest(svm=True)
    gpa = 1 << 39
    n.ept_map(gpa, 0x2000000)
    n.l2_map(0x7f0000000000, gpa)
    n.ept_map(n.cr3, n.l1_of(n.cr3), P | US)
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, 0)
    assert (r.outcome[0], int(r.error_code[0]), r.fault_gpa[0]) == (bm.L1_EXIT, NPF_PAGE | 0x7,
                                                                    n.cr3 + 8 * ((0x7f0000000000 >> 39) & 511))
    n = Nest(svm=True)
    n.ept_map(0x200000, 0x2000000)
    n.l2_map(0x7f0000000000, 0x200000)
    n.put(n.root, n.mem[n.root] | (1 << 7))          # PML4E bit 7 (PS): reserved
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, 0)
    assert (r.outcome[0], int(r.error_code[0])) == (bm.L1_EXIT, NPF_PAGE | 0xF)


@pytest.mark.parametrize("svm", [True, False])
def test_npt_rsvd_pfwalk_bit8_is_reserved_on_amd_only(svm):
    """kvm-unit-tests npt_rsvd_pfwalk: bit 8 of the NPT12 PML4E (reserved in an AMD CPU's non-leaf PML4E, KVM's
    nonleaf_bit8_rsvd) stops L2's first table access: #NPF GUEST_PAGE|RSVD|W|U|P.  L2's own PML4E with bit 8:
    a RSVD #PF in L2 under SVM; VMX (an Intel guest) ignores the bit in both."""
    n = Nest(svm=svm)
    n.ept_map(0x200000, 0x2000000)
    n.l2_map(0x7f0000000000, 0x200000)
    if svm:
        n.put(n.root, n.mem[n.root] | (1 << 8))
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, 0)
    assert ((r.outcome[0], int(r.error_code[0])) == (bm.L1_EXIT, NPF_PAGE | 0xF)) if svm else r.outcome[0] == bm.FIXED
    n = Nest(svm=svm)
    n.ept_map(0x200000, 0x2000000)
    n.l2_map(0x7f0000000000, 0x200000)
    e = n.l1_of(n.cr3) + 8 * ((0x7f0000000000 >> 39) & 511)   # L2's PML4E, in L1 memory
    n.put(e, n.mem[e] | (1 << 8))
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, 0)
    assert ((r.outcome[0], int(r.error_code[0])) == (bm.GUEST_FAULT, 0x9)) if svm else r.outcome[0] == bm.FIXED


@pytest.mark.parametrize("case,write,want", [("final_unmapped", False, NPF_FINAL | 0x4),
                                             ("pt_unmapped", False, NPF_PAGE | 0x6),
                                             ("final_wrprot", True, NPF_FINAL | 0x7),
                                             ("pt_wrprot", False, NPF_PAGE | 0x7)])
def test_nested_tdp_fault_svm(case, write, want):
    """nested_tdp_fault_test's SVM column: exit_info_1 and exit_info_2."""
    n = Nest(svm=True)
    gpa = 0x40000000
    n.ept_map(gpa, 0x2000000)
    n.l2_map(0x7f0000000000, gpa)
    pt = list(range(0x10000, n.l2_next, 4096))[-1]
    if case == "final_unmapped":
        n.ept_map(gpa, 0x2000000, 0)
    elif case == "final_wrprot":
        n.ept_map(gpa, 0x2000000, P | US)
    elif case == "pt_unmapped":
        n.ept_map(pt, n.l1_of(pt), 0)
    else:
        n.ept_map(pt, n.l1_of(pt), P | US)
    n.enter()
    r = n.h.access(n.vm, 0, 0x7f0000000000, bm.ACC_WRITE if write else 0)
    assert (r.outcome[0], int(r.error_code[0])) == (bm.L1_EXIT, want)
    assert r.fault_gpa[0] == (gpa if case.startswith("final") else pt)


def test_svm_vmrun_flushes_and_syncs():
    """nested_svm_transition_tlb_flush: every VMRUN and #VMEXIT flushes the current context (tlb_flush) and an
    L1 exit is a #VMEXIT + VMRUN; an NPT12 leaf L1 rewrote (its shadow page unsync) is resynced at the VMRUN
    without any INVLPGA (VMX would need INVEPT)."""
    n = Nest(svm=True)
    n.ept_map(0x200000, 0x2000000)
    n.enter(paging=False)
    assert n.h.stats(n.vm)["tlb_flush"] == 1
    assert n.h.access(n.vm, 0, 0x200000, 0).outcome[0] == bm.FIXED
    n.h.nested_exit(n.vm, 0)
    assert n.h.stats(n.vm)["tlb_flush"] == 2
    n.h.store(n.vm, 0, n.ept_entry_gpa(0x200000), 0)   # L1 unmaps it: the leaf table's shadow page goes unsync
    n.reenter()
    r = n.h.access(n.vm, 0, 0x200000, 0)
    assert (r.outcome[0], int(r.error_code[0])) == (bm.L1_EXIT, NPF_FINAL | 0x4)
    assert n.h.stats(n.vm)["tlb_flush"] == 5 and n.h.stats(n.vm)["nested_run"] == 3
    with pytest.raises(bm.BatchMMUError, match="eptp is VMX"):
        n.h.nested_exit(n.vm, 0) or n.h.nested_enter(n.vm, 0, eptp=0x1E | n.root)
    with pytest.raises(bm.BatchMMUError, match="INVEPT is VMX"):
        n.h.invept(n.vm, 0)


# ------------------------------------------------------------------ L2 cannot tell; host events reach EPT02
def _same_as_plain(n, plain, vm, rng, gvas, kinds, pages, steps=300):
    """The L2 of ``n`` and VM ``vm`` of ``plain`` (the same guest as a plain VM) make the same random accesses and
    stores: the same outcome class and #PF error code each time, and the same ``pages`` of guest memory after."""
    for _ in range(steps):
        gva = rng.choice(gvas) + 8 * rng.randrange(512)
        kind = rng.choice(kinds)
        val = rng.getrandbits(64)
        if kind & 2:
            a, b = n.h.store(n.vm, 0, gva, val, kind=kind), plain.store(vm, 0, gva, val, kind=kind)
        else:
            a, b = n.h.access(n.vm, 0, gva, kind), plain.access(vm, 0, gva, kind)
        assert (_outcome(int(a.outcome[0])), int(a.error_code[0]) if a.outcome[0] == bm.GUEST_FAULT else 0) == \
            (_outcome(int(b.outcome[0])), int(b.error_code[0]) if b.outcome[0] == bm.GUEST_FAULT else 0)
    for pg in pages:
        assert (n.h.read_guest_memory(n.vm, pg, 512) == plain.read_guest_memory(vm, pg, 512)).all(), hex(pg)


@pytest.mark.parametrize("svm", [False, True])
def test_l2_cannot_tell_it_is_nested(svm):
    """An L2 guest on an identity EPT12/NPT12 and the same guest run as L1 of a plain VM with the same memory:
    every access completes or faults alike (outcome class, #PF error code) and leaves the same guest memory."""
    rng = random.Random(11)
    n = Nest(svm=svm)
    for k in range(64):                                   # L1's nested paging maps L2's first 64 MiB 1:1
        n.ept_map(k << 21, k << 21, (P | RW | US) if svm else (R | W | X), level=2)
    n.l2_next = 0x10000                                   # L2's tables at L2 = L1 gpas 0x10000..
    gvas = []
    for k in range(32):
        gva = 0x7f0000000000 + k * 4096
        n.l2_map(gva, 0x1000000 + 4096 * k, rng.choice([P | RW | US, P | US, P | RW, 0]))
        gvas.append(gva)
    n.enter()
    plain = bm.Host(memory="4GiB", tdp_mmu=False)
    vm = int(plain.create_vms(1, memory="64MiB", tdp_format="npt" if svm else "ept")[0])
    for pg in sorted({a & ~4095 for a in n.mem}):
        plain.write_guest_memory(vm, pg, [n.mem.get(pg + 8 * i, 0) for i in range(512)])
    plain.set_vcpu_regs(vm, 0, cr0=n.regs[0], cr3=n.regs[1], cr4=n.regs[2], efer=n.regs[3])
    tables = {n.l1_of(t) for t in range(0x10000, n.l2_next, 4096)}
    _same_as_plain(n, plain, vm, rng, gvas, [0, 2, 4, 6, 0x10, 0x14],
                   sorted(tables | {0x1000000 + 4096 * k for k in range(32)}))


def test_host_events_zap_the_shadow_ept():
    """EPT02 SPTEs sit in the rmaps of L1 gfns: an MMU-notifier invalidation of L1's memory and a memslot
    deletion zap them (the next L2 access exits again), and dirty logging write-protects them."""
    n = Nest(ept_ad=True)
    base = 0x200000
    for k in range(8):
        n.ept_map(base + 4096 * k, 0x2000000 + 4096 * k)
    n.enter(paging=False)
    assert (n.h.access(n.vm, 0, base + 4096 * np.arange(8), bm.ACC_WRITE).outcome == bm.FIXED).all()
    assert (n.h.access(n.vm, 0, base + 4096 * np.arange(8), 0).outcome == bm.HIT).all()
    hva = int(n.h.memslots(n.vm)[0]["hva"])
    taken = n.h.stats(n.vm)["pf_taken"]
    n.h.invalidate_hva_range(n.vm, hva + 0x2000000, hva + 0x2000000 + 4 * 4096)
    assert n.h.stats(n.vm)["mmu_notifier_zapped"] == 4
    r = n.h.access(n.vm, 0, base + 4096 * np.arange(8), 0).outcome
    # the first exits again; its fault prefetches the three zapped neighbours (their host pages are resident)
    assert r[0] == bm.FIXED and (r[1:] == bm.HIT).all() and n.h.stats(n.vm)["pf_taken"] == taken + 1
    # a memslot deletion zaps everything (kvm_mmu_zap_all_fast: guest_mmu's roots go obsolete)
    n.h.set_memslot(n.vm, 1, 1 << 30, 4096)
    n.h.set_memslot(n.vm, 1, 1 << 30, 0)
    assert (n.h.access(n.vm, 0, base + 4096 * np.arange(8), 0).outcome[:1] == bm.FIXED).all()
    # dirty logging by L1 gpa write-protects EPT02's writable SPTEs: the next L2 write faults and is logged
    n.h.nested_exit(n.vm, 0)
    n.h.set_memslot(n.vm, 2, 0x4000000, 1 << 21, flags=bm.MEM_LOG_DIRTY_PAGES)
    n.ept_map(base + 0x100000, 0x4000000)
    n.flush()
    n.reenter()
    assert n.h.store(n.vm, 0, base + 0x100000, 5).outcome[0] == bm.FIXED
    assert np.unpackbits(n.h.get_dirty_log(n.vm, 2).view(np.uint8), bitorder="little")[0] == 1
    assert n.h.store(n.vm, 0, base + 0x100000, 6).outcome[0] == bm.FIXED     # re-protected by the GET
    assert np.unpackbits(n.h.get_dirty_log(n.vm, 2).view(np.uint8), bitorder="little")[0] == 1
    assert n.read(0x4000000) == 6


# ------------------------------------------------------------------ review findings (each once a bug)
def test_spte_dump_while_a_vcpu_runs_l2():
    """spte_dump lists the VM's direct TDP mappings by L1 gfn, also while a vCPU runs L2 on the shadow EPT (a
    5-level VM with a 4-level EPTP once made it walk EPT02 as the direct root)."""
    h = bm.Host(memory="1GiB", tdp_mmu=Nest.tdp_mmu)
    vm = int(h.create_vms(1, memory="16MiB", tdp_levels=5, nested=True)[0])
    h.access(vm, 0, 0x5000, bm.ACC_WRITE)
    before = h.spte_dump(vm)
    h.write_guest_memory(vm, 0x100000, [0x101000 | 7])
    h.write_guest_memory(vm, 0x101000, [0x102000 | 7])
    h.write_guest_memory(vm, 0x102000, [0x103000 | 7])
    h.write_guest_memory(vm, 0x103000, [0x200000 | 7 | WB])
    h.nested_enter(vm, 0, eptp=0x100000 | 0x5E, cr0=0x11, cr3=0, cr4=0, efer=0)
    assert h.access(vm, 0, 0x0, 0).outcome[0] == bm.FIXED
    after = h.spte_dump(vm)     # L1's 2M mapping, write-protected now (EPT12's tables lie in it: account_shadowed)
    assert after.keys() == before.keys() and after[0][0] == before[0][0] == 2
    assert not after[0][1] & 2 and before[0][1] & 2


def test_l2_without_nested_paging_keeps_guest_mmu_cached(l0_mmu):
    """An L2 without nested paging runs on root_mmu: guest_mmu's cached EPT02 root stays, and L1's root waits in
    root_mmu's prev_roots (fast_pgd_switch)."""
    n = Nest()
    n.ept_map(0x200000, 0x2000000)
    n.h.access(n.vm, 0, 0x3000000, 0)
    l1_root = int(n.h.vr.root[0])
    n.enter(paging=False)
    n.h.access(n.vm, 0, 0x200000, 0)
    ept_root = int(n.h.vr.root[0])
    n.h.nested_exit(n.vm, 0)
    if l0_mmu:   # the TDP MMU: L1's and L2's roots are the VM's (vt), the vCPU's role picks one
        l1_root = int(n.h.vt.root[n.vm])
        n.h.nested_enter(n.vm, 0, cr0=0x11, cr3=0, cr4=0, efer=0)
        assert int(n.h.vr.rec[0, S.VR_ALT_ROOT]) == ept_root                 # guest_mmu untouched
        assert n.h.access(n.vm, 0, 0x3000000, 0).outcome[0] == bm.FIXED       # its own guest_mode root
        n.h.nested_exit(n.vm, 0)
        assert int(n.h.vt.root[n.vm]) == l1_root and n.h.access(n.vm, 0, 0x3000000, 0).outcome[0] == bm.HIT
        n.reenter()
        assert int(n.h.vr.root[0]) == ept_root and n.h.access(n.vm, 0, 0x200000, 0).outcome[0] == bm.HIT
        return
    n.h.nested_enter(n.vm, 0, cr0=0x11, cr3=0, cr4=0, efer=0)           # no EPTP
    assert int(n.h.vr.rec[0, S.VR_ALT_ROOT]) == ept_root                 # guest_mmu untouched
    assert n.h.access(n.vm, 0, 0x3000000, 0).outcome[0] == bm.FIXED       # its own guest_mode root
    assert int(n.h.vr.prev_root[0, 0]) == l1_root
    n.h.nested_exit(n.vm, 0)
    assert int(n.h.vr.root[0]) == l1_root and n.h.access(n.vm, 0, 0x3000000, 0).outcome[0] == bm.HIT
    n.reenter()
    assert int(n.h.vr.root[0]) == ept_root and n.h.access(n.vm, 0, 0x200000, 0).outcome[0] == bm.HIT


def test_refusals_found_by_review():
    n = Nest(svm=True)
    n.h.set_vcpu_regs(n.vm, 0, cr4=CR4_PAE | (1 << 12))                  # L1 with LA57: 5-level NPT12
    with pytest.raises(bm.BatchMMUError, match="4-level long mode"):
        n.h.nested_enter(n.vm, 0, ncr3=n.root)
    n.h.set_vcpu_regs(n.vm, 0, cr4=CR4_PAE)
    n.enter(paging=False)
    with pytest.raises(bm.BatchMMUError, match="runs L2"):
        n.h.set_vcpu_regs(n.vm, 0, cr4=CR4_PAE | 0x20)


# ------------------------------------------------------------------ the bundled scenarios
def _cases(name, *sets, workers=1):
    rep = bm.run_scenario(name, sets=[_mmu_set(), *sets], workers=workers)
    return rep.phases[0]["nested_cases"]


def _want(want, bits):
    return "ok" if want is None else "misconfig" if want == MISCONFIG else want | bits


@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_ept_access_scenario_reports_what_the_tests_here_expect(fmt):
    """`batchmmu run ept_access` (both vendors, 2 VMs over 2 shards): every case of every VM, against this file's
    own tables of kvm-unit-tests' expectations."""
    cases = _cases("ept_access", f"tdp_format={fmt}", "vms=2", workers=2)
    if fmt == "ept":
        want = [(f"ept_access_test_{name}", op, _want(w, QV | QT)) for _level in range(4)
                for name, _perms, expect in EPT_ACCESS for op, w in expect.items()]
        want += [(f"ept_access_test_{name}", op, _want(w, QV)) for name, _ad, _perms, w in PADDR for op in OPS]
    else:
        kinds = {0: "read", bm.ACC_WRITE: "write", bm.ACC_FETCH: "exec"}
        want = [(name, kinds[kind], w) for name, _flags, kind, w in NPT_CASES if name != "npt_rsvd_pte"] + \
            [("npt_rw_pfwalk", "read", NPF_PAGE | 0x7)]
    assert [c["vm"] for c in cases] == [0] * len(want) + [1] * len(want)
    assert [(c["case"], c["access"], c["got"]) for c in cases] == want * 2


@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_nested_tdp_fault_scenario(fmt):
    cases = _cases("nested_tdp_fault", f"tdp_format={fmt}")
    want = [0x181, 0x083, 0x1AA, 0x0AB] if fmt == "ept" else \
        [NPF_FINAL | 0x4, NPF_PAGE | 0x6, NPF_FINAL | 0x7, NPF_PAGE | 0x7]
    assert [c["got"] for c in cases] == want
    assert [c["access"] for c in cases] == ["read", "read", "write", "read"]


@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_nested_dirty_log_scenario(fmt):
    """nested_dirty_log_test (VMX and SVM): after each L2 step the log (by L1 gpa) holds exactly the page that
    step dirtied."""
    cases = _cases("nested_dirty_log", f"tdp_format={fmt}")
    assert [c["got"] for c in cases] == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0],
                                         [0, 0, 0, 0]]


@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_nested_ops_in_one_scenario_use_fresh_tables(fmt):
    """Review regression: a second nested op on the same VM writes its tables where no earlier case's were, so
    no shadow page or cached root of the first op's tables answers for it; L1 runs after each op."""
    from batchmmu.spec import load_scenario
    data = load_scenario("ept_access")[0]
    data = dict(data, phase=[{"name": "a", "op": "ept_access"}, {"name": "b", "op": "nested_tdp_fault"},
                             {"name": "c", "op": "ept_access"}])
    rep = bm.run_scenario(data, sets=[_mmu_set(), f"tdp_format={fmt}"])
    a, b, c = (p["nested_cases"] for p in rep.phases)
    assert [x["got"] for x in a] == [x["want"] for x in a] == [x["got"] for x in c]
    assert [x["got"] for x in b] == [x["want"] for x in b]
    assert rep.phases[-1]["stats"]["guest_mode"] == 0   # vCPUs back in L1


def test_nested_scenario_refusals_and_a_case_that_disagrees(monkeypatch):
    from batchmmu import nestedops
    # an expectation the simulator does not meet stops the run, naming the case and both values
    monkeypatch.setattr(nestedops, "TDP_FAULT", (("final_page_not_present", "read", 0x182, 0),))
    with pytest.raises(bm.BatchMMUError, match=r"1 of 1 cases.*final_page_not_present read: want 0x182, got 0x181"):
        _cases("nested_tdp_fault")
    with pytest.raises(bm.BatchMMUError, match="l2=\"identity\".*needs an EPT VM|an NPT VM takes l2"):
        bm.run_scenario("ept_access", sets=["vm_group.l2=identity", "tdp_format=npt"])
    for bad, field in (("vm_group.memory=16MiB", "vm_group.memory"), ("vm_group.maxphyaddr=36", "maxphyaddr"),
                       ("vm_group.ept_ad=false", "EPT A/D")):
        with pytest.raises(bm.BatchMMUError, match=field):
            bm.run_scenario("ept_access", sets=[bad])



# ------------------------------------------------------------------ L2 MMIO: EPT02 / NPT02 MMIO SPTEs
@pytest.mark.parametrize("svm", [False, True])
def test_l2_mmio_sptes(svm):
    """EPT12 / NPT12 maps an L2 page outside L1's memslots: L0's fault emulates it and, with MMIO caching, leaves
    an MMIO SPTE in EPT02 (kvm_handle_noslot_fault, mark_mmio_spte); the next access is an EPT misconfiguration
    (#NPF with RSVD) that handle_mmio_page_fault emulates at once, no page fault; a memslot change makes it
    stale (the generation), and a sync of the unsync leaf table drops it once L1 maps the page elsewhere
    (sync_mmio_spte).  Without MMIO caching every access is a page fault."""
    mmio = 0x40000000                                   # an L1 gpa in no memslot (slot 0: 64 MiB)
    gpa = 0x200000
    n = Nest(svm=svm)
    h, vm = n.h, n.vm
    n.ept_map(gpa, mmio)
    n.ept_map(gpa + 4096, 0x2000000)
    n.enter(paging=False)

    def counters():
        s = h.stats(vm)
        return s["pf_taken"], s["pf_emulate"], s["pf_mmio_spte_created"]

    assert h.access(vm, 0, gpa, 0).outcome[0] == bm.MMIO and counters() == (1, 1, 1)
    assert h.access(vm, 0, gpa, 0).outcome[0] == bm.MMIO and counters() == (1, 1, 1)    # the MMIO SPTE
    r = h.store(vm, 0, gpa, 5)
    assert r.outcome[0] == bm.MMIO and counters() == (1, 1, 1)
    h.set_memslot(vm, 3, 1 << 31, 4096)                 # a new generation: the SPTE is stale, faulted again
    assert h.access(vm, 0, gpa, 0).outcome[0] == bm.MMIO and counters() == (2, 2, 2)
    # L1 points the leaf at memory: its table is unsync; a sync (new root, or SVM's VMRUN) drops the MMIO SPTE
    h.nested_exit(vm, 0)
    assert h.store(vm, 0, n.ept_entry_gpa(gpa), 0x2001000 | n.full | (0 if svm else WB)).outcome[0] in OK
    if not svm:
        h.invept(vm, 0)
    n.reenter()
    assert h.store(vm, 0, gpa, 7).outcome[0] == bm.FIXED and counters()[2] == 2
    assert h.read_guest_memory(vm, 0x2001000, 1)[0] == 7
    # without MMIO caching: no SPTE, every access faults
    n2 = Nest(svm=svm, mmio_caching=False)
    n2.ept_map(gpa, mmio)
    n2.enter(paging=False)
    for k in (1, 2):
        assert n2.h.access(n2.vm, 0, gpa, 0).outcome[0] == bm.MMIO
        s = n2.h.stats(n2.vm)
        assert (s["pf_taken"], s["pf_mmio_spte_created"]) == (k, 0)


# ------------------------------------------------------------------ PML: guest_mode SPTEs log through write protection
def test_l2_writes_are_logged_through_write_protection_under_pml():
    """Host(pml=True): PML is never on in hardware while L2 runs (and would log L2 gpas), so KVM gives EPT02's
    SPTEs SPTE_TDP_AD_WRPROT_ONLY (kvm_mmu_page_ad_need_write_protect): clearing the dirty log write-protects
    them instead of clearing their D bit, and the next L2 write faults and is logged by L1 gpa.  L1's own
    writes still go through PML."""
    n = Nest(pml=True)
    h, vm = n.h, n.vm
    base = 0xc0000000
    h.set_memslot(vm, 1, base, 4 * 4096, flags=bm.MEM_LOG_DIRTY_PAGES)
    for k in range(2):
        n.ept_map(base + 4096 * k, base + 4096 * k)
    n.enter(paging=False)

    def log():
        return np.unpackbits(h.get_dirty_log(vm, 1).view(np.uint8), bitorder="little")[:4].tolist()

    assert h.store(vm, 0, base, 1).outcome[0] == bm.FIXED and log() == [1, 0, 0, 0]
    pte = h.stats(vm)["pf_fixed"]
    assert h.store(vm, 0, base, 2).outcome[0] == bm.FIXED            # write-protected by the GET, not D-cleared
    assert h.stats(vm)["pf_fixed"] == pte + 1 and log() == [1, 0, 0, 0]
    assert h.store(vm, 0, base + 4096, 3).outcome[0] == bm.FIXED and log() == [0, 1, 0, 0]
    h.nested_exit(vm, 0)
    assert h.store(vm, 0, base + 2 * 4096, 4).outcome[0] in OK           # L1: a fault, then PML from the GET on
    assert log() == [0, 0, 1, 0]
    taken = h.stats(vm)["pf_taken"]
    assert h.store(vm, 0, base + 2 * 4096, 5).outcome[0] == bm.HIT       # D cleared, still writable: PML logs it
    h.kick_vcpus(vm)
    assert log() == [0, 0, 1, 0] and h.stats(vm)["pf_taken"] == taken and h.stats(vm)["pml_flushes"] > 0
    assert [n.read(base + 4096 * k) for k in range(3)] == [2, 3, 5]


# ------------------------------------------------------------------ an L2 in PAE paging under nested EPT
def _pae_tables(rng, write, nmaps=32):
    """32-bit PAE tables at L1 = L2 gpa 0x10000 (PDPT), 0x11000.. (PDs, PTs): ``nmaps`` random gvas below 4 GiB
    -> data pages from 0x1000000, PDPTE 3 not present.  ``write(page, words)`` stores a table; returns (gvas,
    the four PDPTEs)."""
    pdpt = [0] * 4
    tables, nxt = {}, [0x11000]

    def table():
        nxt[0] += 4096
        return nxt[0] - 4096

    gvas = []
    for k in range(nmaps):
        q, d, t = rng.randrange(3), rng.randrange(512), rng.randrange(512)
        gva = (q << 30) | (d << 21) | (t << 12)
        if not pdpt[q]:
            pdpt[q] = table() | P
            tables[pdpt[q] & ~0xFFF] = [0] * 512
        pd = tables[pdpt[q] & ~0xFFF]
        if not pd[d]:
            pd[d] = table() | P | RW | US
            tables[pd[d] & ~0xFFF] = [0] * 512
        tables[pd[d] & ~0xFFF][t] = (0x1000000 + 4096 * k) | rng.choice([P | RW | US, P | US, P | RW, 0])
        gvas.append(gva)
    for page, words in tables.items():
        write(page, words)
    write(0x10000, pdpt + [0] * 508)
    return gvas, pdpt


def test_pae_l2_under_nested_ept():
    """VM-entry loads the PDPTE registers from vmcs12 (``pdptrs``): an L2 in PAE paging walks from them, its
    tables through EPT02, and gives the same outcomes, #PF error codes and guest memory as the same guest run as a
    plain PAE VM; a PDPTE rewritten in memory changes nothing until L1 enters again with the new value."""
    rng = random.Random(5)
    n = Nest()
    for k in range(32):                                   # EPT12 maps L2's first 64 MiB 1:1
        n.ept_map(k << 21, k << 21, R | W | X, level=2)
    n.flush()
    gvas, pdpt = _pae_tables(rng, lambda pg, w: n.h.write_guest_memory(n.vm, pg, w))
    regs = dict(cr0=CR0_PG_PE, cr3=0x10000, cr4=CR4_PAE, efer=0)
    n.h.nested_enter(n.vm, 0, eptp=n.eptp, pdptrs=pdpt, **regs)
    plain = bm.Host(memory="4GiB")
    vm = int(plain.create_vms(1, memory="64MiB")[0])
    _pae_tables(random.Random(5), lambda pg, w: plain.write_guest_memory(vm, pg, w))
    plain.set_vcpu_regs(vm, 0, **regs)
    _same_as_plain(n, plain, vm, rng, gvas, [0, 2, 4, 6],
                   [0x1000000 + 4096 * k for k in range(32)] + list(range(0x10000, 0x20000, 4096)))
    # PDPTE 0 cleared in memory: the registers still hold it until the next VM-entry loads the new one
    q0 = next(g for g in gvas if g >> 30 == 0)
    before = _outcome(int(n.h.access(n.vm, 0, q0, 0).outcome[0]))
    n.h.write_guest_memory(n.vm, 0x10000, [0])
    assert _outcome(int(n.h.access(n.vm, 0, q0, 0).outcome[0])) == before
    n.h.nested_exit(n.vm, 0)
    n.h.nested_enter(n.vm, 0, eptp=n.eptp, pdptrs=[0] + pdpt[1:], **regs)
    r = n.h.access(n.vm, 0, q0, bm.ACC_WRITE)
    assert r.outcome[0] == bm.GUEST_FAULT and r.error_code[0] == 0x2      # not present, a write
    with pytest.raises(bm.BatchMMUError, match="PDPTEs through EPT12"):
        n.h.mov_cr3(n.vm, 0, 0x10000)
    n.h.nested_exit(n.vm, 0)
    assert list(n.h.vr.pdptr[0]) == [0, 0, 0, 0]                         # L1's (no PAE) back


def test_pae_l2_refusals():
    n = Nest()
    regs = dict(cr0=CR0_PG_PE, cr3=0x10000, cr4=CR4_PAE, efer=0)
    for pdptrs, what in ((None, "takes its PDPTEs from vmcs12"), ([1, 0, 0], "four"),
                         ([0x2000 | 1 | 2, 0, 0, 0], "reserved bits"), ([(1 << 50) | 1, 0, 0, 0], "reserved bits"),
                         ([1.5, 0, 0, 0], "pdptrs")):
        with pytest.raises(bm.BatchMMUError, match=what):
            n.h.nested_enter(n.vm, 0, eptp=n.eptp, pdptrs=pdptrs, **regs)
    with pytest.raises(bm.BatchMMUError, match="only for an L2 in PAE paging"):
        n.h.nested_enter(n.vm, 0, eptp=n.eptp, pdptrs=[0, 0, 0, 0], cr0=0x11, cr3=0, cr4=0, efer=0)
    assert n.h.stats(n.vm)["nested_run"] == 0 and not n.h.vr.guest_mode[0]
    s = Nest(svm=True)
    with pytest.raises(bm.BatchMMUError, match="nested NPT"):
        s.h.nested_enter(s.vm, 0, ncr3=s.root, **regs)


def test_guest_mmu_keeps_to_the_tdp_huge_page_level():
    """max_huge_page_level is the TDP one on a TDP host (__kvm_mmu_max_mapping_level): with tdp_huge_page_level=1
    a 2M EPT12 leaf is shadowed with 4K SPTEs, and disabling dirty logging leaves those 4K SPTEs alone
    (kvm_rmap_zap_collapsible_sptes sees nothing larger to make).  Review findings, on either L0 MMU."""
    n = Nest(tdp_huge_page_level=1)
    h, vm = n.h, n.vm
    n.ept_map(0x40000000, 0x1000000, level=2)
    n.enter(paging=False)
    assert h.access(vm, 0, 0x40000000, 0).outcome[0] == bm.FIXED
    assert h.stats(vm)["pages_2m"] == 0
    h.nested_exit(vm, 0)
    h.set_memslot(vm, 0, 0, 64 << 20, flags=bm.MEM_LOG_DIRTY_PAGES)
    h.set_memslot(vm, 0, 0, 64 << 20, flags=0)
    n.reenter()
    taken = h.stats(vm)["pf_taken"]
    assert h.access(vm, 0, 0x40000000, 0).outcome[0] == bm.HIT and h.stats(vm)["pf_taken"] == taken


def test_pae_pdptes_are_loaded_and_checked_at_entry_and_exit(l0_mmu):
    """Review findings.  Without nested paging a PAE L2's PDPTEs come from L1 memory at its CR3 and a reserved bit
    fails the VM-entry (nested_vmx_load_cr3 / nested_svm_load_cr3 -> load_pdptrs); at VM-exit a PAE L1's PDPTEs
    are read again from memory (load_vmcs12_host_state, nested_svm_vmexit), not restored from before the entry."""
    for svm in (False, True):
        if l0_mmu and svm:
            continue   # (the TDP MMU path is the same code)
        n = Nest(svm=svm)
        h, vm = n.h, n.vm
        h.write_guest_memory(vm, 0x10000, [0x11000 | P | 0x6, 0, 0, 0])      # PDPTE 0 with bits 1-2 set
        with pytest.raises(bm.BatchMMUError, match="reserved bits"):
            h.nested_enter(vm, 0, cr0=CR0_PG_PE, cr3=0x10000, cr4=CR4_PAE, efer=0)
        assert not h.vr.guest_mode[0] and h.stats(vm)["nested_run"] == 0
    n = Nest()                                # L1 in PAE paging: PDPT 0x20000 -> PD 0x21000 -> PT 0x22000
    h, vm = n.h, n.vm
    h.write_guest_memory(vm, 0x21000, [0x22000 | P | RW | US])
    h.write_guest_memory(vm, 0x22000, [0x3000000 | P | RW | US])
    h.write_guest_memory(vm, 0x20000, [0x21000 | P, 0, 0, 0])
    h.set_vcpu_regs(vm, 0, cr0=CR0_PG_PE, cr3=0x20000, cr4=CR4_PAE, efer=0)
    assert h.access(vm, 0, 0, 0).outcome[0] in OK
    h.write_guest_memory(vm, 0x20000, [0, 0, 0, 0])                         # L1 clears PDPTE 0 in memory
    n.ept_map(0, 0)
    n.flush()
    h.nested_enter(vm, 0, eptp=n.eptp, cr0=0x11, cr3=0, cr4=0, efer=0)
    h.nested_exit(vm, 0)
    assert list(h.vr.pdptr[0]) == [0, 0, 0, 0] and h.access(vm, 0, 0, 0).outcome[0] == bm.GUEST_FAULT


def test_pml_is_off_while_l2_runs_without_nested_paging(l0_mmu):
    """Review finding: an L2 on its own guest_mode root (no nested paging) on a PML host: PML is never on while L2
    runs, so its SPTEs log through write protection (SPTE_TDP_AD_WRPROT_ONLY on the TDP MMU's guest_mode root as
    on the shadow MMU's pages): after a GET the next L2 write faults and is logged, with no PML flush."""
    n = Nest(backing="4k", pml=True)
    h, vm = n.h, n.vm
    h.set_memslot(vm, 1, 0x4000000, 1 << 21, flags=bm.MEM_LOG_DIRTY_PAGES)
    h.nested_enter(vm, 0, cr0=0x11, cr3=0, cr4=0, efer=0)
    assert h.store(vm, 0, 0x4000000, 1).outcome[0] == bm.FIXED
    assert h.get_dirty_log(vm, 1)[0] == 1
    taken = h.stats(vm)["pf_taken"]
    assert h.store(vm, 0, 0x4000000, 2).outcome[0] == bm.FIXED and h.stats(vm)["pf_taken"] == taken + 1
    assert h.get_dirty_log(vm, 1)[0] == 1 and h.stats(vm)["pml_flushes"] == 0


@pytest.mark.parametrize("svm", [False, True])
def test_l2_mmio_is_emulated_through_l1s_tables(svm):
    """Review finding: KVM keeps no MMIO cache for a nested MMU (vcpu_cache_mmio_info: mmio_gva 0), so even an
    access that meets an EPT02 / NPT02 MMIO SPTE is translated again by the emulator: EPT12 / NPT12 with the
    access (A/D set in EPT12, a refusal reflected to L1: on VMX without the GVA bits, the exit being an EPT
    misconfiguration) and, with L2 paging, L2's own walk (its A/D bits set)."""
    mmio, gpa, gva = 0x40000000, 0x200000, 0x7f0000000000
    n = Nest(svm=svm)
    h, vm = n.h, n.vm
    n.ept_map(gpa, mmio, (P | US) if svm else (R | X), extra=None if svm else WB)   # read-only in L1's tables
    n.l2_map(gva, gpa, P | RW | US)
    n.enter()
    assert h.access(vm, 0, gva, 0).outcome[0] == bm.MMIO and h.stats(vm)["pf_mmio_spte_created"] == 1
    taken = h.stats(vm)["pf_taken"]
    r = h.store(vm, 0, gva, 5)
    want = (NPF_FINAL | 0x7) if svm else (0x2 | 0x1 | 0x8 | 0x20)   # a (user) write; EPT12 R, X; no GVA bits
    assert (r.outcome[0], r.error_code[0], r.fault_gpa[0]) == (bm.L1_EXIT, want, gpa)
    assert h.stats(vm)["pf_taken"] == taken                                # no page fault: the MMIO SPTE
    # writable now: the store is emulated as MMIO, EPT12's and L2's A/D bits set by the emulator's walks
    h.nested_exit(vm, 0)
    n.ept_map(gpa, mmio, n.full, extra=None if svm else WB | EPT_A)
    n.flush()
    if not svm:
        h.invept(vm, 0)
    n.reenter()
    assert h.store(vm, 0, gva, 6).outcome[0] == bm.MMIO
    leaf = n.read(n.ept_entry_gpa(gpa))
    assert leaf & (A_ if svm else EPT_A) and (svm or leaf & EPT_D)          # EPT12's A/D (NPT12: A, D as x86)
    l2pte = n.read(n.l1_of(n.l2_tables()[-1]) + 8 * ((gva >> 12) & 511))
    assert l2pte & A_ and l2pte & D_                                         # L2's own A/D
