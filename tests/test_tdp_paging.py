"""Guest paging under TDP: the processor's 2D walk (kernels/tdp2d.py) against the SDM and KVM.

Expected values come from the rules, worked out by hand for each layout: a 2D walk makes, for each
guest level, the TDP references of the table's gpa plus the gpte read, then the TDP references of the
data gpa (n*m + n + m); an EPT violation on any of those gpas is fixed by KVM's TDP fault path and
the whole access restarts from the top; a refused guest translation is a #PF that never reaches KVM
(SDM vol. 3 4.7 error codes); A/D bits are set only by a successful access.  Guest paging-structure
accesses are writes for EPT with A/D bits and for NPT, reads (unless an A/D bit is set) for EPT
without A/D bits (SDM 29.3.3.2; see the kernel's docstring).
"""

import numpy as np
import pytest
from conftest import GiB, MiB, u64

import batchmmu as bm

P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
XD = 1 << 63
ADDR = ((1 << 52) - 1) & ~0xFFF
PF_P, PF_W, PF_U, PF_RSVD, PF_I, PF_PK = 1, 2, 4, 8, 0x10, 0x20
R_, W_, U_, X_ = 0, bm.ACC_WRITE, bm.ACC_USER, bm.ACC_FETCH
CR0_PG, CR0_WP, CR0_BASE = 1 << 31, 1 << 16, 0x33  # PE MP ET NE
CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 5, 1 << 12, 1 << 20, 1 << 21, 1 << 22
EFER_LONG, EFER_NX = 0x500, 1 << 11  # LME | LMA
AC = 1 << 18
KVM_WORK = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_guest", "tlb_flush", "invlpg",
            "mmu_cache_miss", "pages_4k")


def regs(levels=4, wp=True, nx=True, smep=False, smap=False, pke=False, cr3=0x10000):
    cr4 = CR4_PAE | (CR4_LA57 if levels == 5 else 0) | (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0) \
        | (CR4_PKE if pke else 0)
    return dict(cr0=CR0_PG | CR0_BASE | (CR0_WP if wp else 0), cr4=cr4, efer=EFER_LONG | (EFER_NX if nx else 0),
                cr3=cr3)


class Tables:
    """Guest page tables built in Python (gpa -> u64 gpte), tables handed out from ``base`` on."""

    def __init__(self, levels=4, base=0x10000):
        self.levels = levels
        self.next = base
        self.mem = {}
        self.root = self.alloc()

    def alloc(self):
        g = self.next
        self.next += 0x1000
        return g

    def map(self, gva, gpa, flags=P | RW | US | A | D, size_level=1, upper=P | RW | US | A):
        """Map ``gva`` -> ``gpa`` with a leaf at ``size_level`` (1 4K, 2 2M, 3 1G); returns the gpte gpas,
        top level first (the leaf's last)."""
        table, path = self.root, []
        for level in range(self.levels, 0, -1):
            slot = table + 8 * ((gva >> (12 + 9 * (level - 1))) & 511)
            path.append(slot)
            if level == size_level:
                self.mem[slot] = gpa | flags | (PS if level > 1 else 0)
                return path
            if slot not in self.mem:
                self.mem[slot] = self.alloc() | upper
            table = self.mem[slot] & ADDR

    def write(self, host, vm):
        for gpa, v in sorted(self.mem.items()):
            host.write_guest_memory(vm, gpa, [v])


def setup(levels=4, tdp_levels=4, backing="4k", fmt="ept", ept_ad=True, pml=False, vcpus=1, **kw):
    host = bm.Host(memory="1GiB", backing=backing, pml=pml)
    vm = int(host.create_vms(1, memory=64 * MiB, vcpus=vcpus, tdp_levels=tdp_levels, tdp_format=fmt,
                             ept_ad=ept_ad, maxphyaddr=52 if tdp_levels == 5 else 46)[0])
    t = Tables(levels)
    return host, vm, t, regs(levels, **kw)


def go(host, vm, t, r, vcpu=0):
    t.write(host, vm)
    host.set_vcpu_regs(vm, vcpu, **r)


def one(host, vm, addr, kind=0, vcpu=0):
    res = host.access(vm, vcpu, addr, kind)
    return int(res.outcome[0]), int(res.error_code[0])


class Delta:
    def __init__(self, host, vm):
        self.host, self.vm = host, vm
        self.last = host.stats(vm)

    def __call__(self):
        now = self.host.stats(self.vm)
        d = {k: now[k] - self.last[k] for k in now if now[k] != self.last[k]}
        self.last = now
        return d


def gpte(host, vm, gpa):
    return u64(host.read_guest_memory(vm, gpa, 1)[0].astype(np.int64))


# ----------------------------------------------------------------------------- memory references
@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (4, 5), (5, 5)])
def test_walk_refs_n_times_m_plus_n_plus_m(n, m):
    h, vm, t, r = setup(levels=n, tdp_levels=m)
    gva = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x123
    if n == 5:
        gva |= 2 << 48
    t.map(gva & ~0xFFF, 0x200000)
    go(h, vm, t, r)
    d = Delta(h, vm)
    # first touch: an EPT violation for each of the n table pages and for the data page
    assert one(h, vm, gva) == (bm.FIXED, PF_U)  # the last exit: a read of a not-present data gpa
    got = d()
    assert got["pf_taken"] == got["pf_fixed"] == got["pages_4k"] == n + 1
    assert got["accesses"] == 1 and "pf_guest" not in got
    # the same access again: one full 2D walk, no exit
    assert one(h, vm, gva) == (bm.HIT, 0)
    assert d() == {"walk_refs": n * m + n + m, "accesses": 1}


def test_cold_access_restarts_the_walk_after_each_exit():
    # tables at gfns 0x10..0x13 share one last-level TDP table; data at gfn 0x200 is in the next 2M
    h, vm, t, r = setup()
    t.map(0x7000, 0x200000)
    go(h, vm, t, r)
    d = Delta(h, vm)
    assert one(h, vm, 0x7000)[0] == bm.FIXED
    # attempt 1: the empty root (1 ref); attempt k+1 (k=1..3): k tables (5 refs each) + 4 refs to
    # the missing leaf of table k; attempt 5: 4 tables + 3 refs to the missing 2M region of the data;
    # attempt 6: the whole walk (24)
    assert d()["walk_refs"] == 1 + (5 + 4) + (10 + 4) + (15 + 4) + (20 + 3) + 24


@pytest.mark.parametrize("backing,size_level,refs", [
    ("4k", 2, 3 * 4 + 3 + 4),    # 2M guest page: 3 guest levels read
    ("4k", 3, 2 * 4 + 2 + 4),    # 1G guest page: 2 guest levels read
    ("thp", 1, 4 * 3 + 4 + 3),   # 2M TDP leaves: every TDP walk is 3 references
])
def test_walk_refs_with_huge_pages(backing, size_level, refs):
    h, vm, t, r = setup(backing=backing)
    gva = (1 << 39) | (2 << 30) | (3 << 21) | 0x5000
    t.map(gva & ~((1 << (12 + 9 * (size_level - 1))) - 1), 0, size_level=size_level)
    go(h, vm, t, r)
    h.touch_host_memory(vm, 0, 64 * MiB)
    one(h, vm, gva)
    d = Delta(h, vm)
    assert one(h, vm, gva) == (bm.HIT, 0)
    assert d() == {"walk_refs": refs, "accesses": 1}


@pytest.mark.nojit
def test_paging_off_vcpu_of_the_same_vm_walks_one_dimension():
    h, vm, t, r = setup(vcpus=2)
    t.map(0x1000, 0x300000)
    go(h, vm, t, r)  # vCPU 0 pages, vCPU 1 does not
    assert one(h, vm, 0x1000) == (bm.FIXED, PF_U)
    d = Delta(h, vm)
    assert one(h, vm, 0x300000, vcpu=1) == (bm.HIT, 0)   # the gpa vCPU 0's gva reached
    assert d() == {"walk_refs": 4, "accesses": 1}
    assert one(h, vm, 0x1000, R_, vcpu=1)[0] == bm.FIXED  # gpa 0x1000, not the gva
    assert one(h, vm, 0x1000, R_, vcpu=0) == (bm.HIT, 0)


# ----------------------------------------------------------------------------- EPT violations on tables
def test_tables_are_mapped_before_the_guest_fault_they_lead_to():
    # PDPTE not present: the processor reads the PML4 and the PDPT (each through the TDP) and then
    # delivers #PF to the guest; KVM fixes the two EPT violations and never sees the #PF
    h, vm, t, r = setup()
    t.mem[t.root] = 0x11000 | P | RW | US | A
    go(h, vm, t, r)
    d = Delta(h, vm)
    assert one(h, vm, 0x1234, W_) == (bm.GUEST_FAULT, PF_W)
    got = d()
    assert got["pf_fixed"] == got["pf_taken"] == 2 and "pf_guest" not in got
    assert one(h, vm, 0x1234, W_) == (bm.GUEST_FAULT, PF_W)
    assert d() == {"walk_refs": 2 * (4 + 1), "accesses": 1}


@pytest.mark.parametrize("fmt,ept_ad,err", [("ept", True, PF_W), ("ept", False, PF_U), ("npt", True, PF_W | PF_U)])
def test_table_access_kind_seen_by_kvm(fmt, ept_ad, err):
    # everything but the PML4 page is in the TDP; the one exit is on the PML4 page: a write with EPT
    # A/D and on NPT (a user write there), a read (reported as PFERR_USER by __vmx_handle_ept_violation)
    # without EPT A/D bits when no A/D bit is to be set
    h, vm, t, r = setup(fmt=fmt, ept_ad=ept_ad, vcpus=2)
    path = t.map(0x1000, 0x300000)
    go(h, vm, t, r)
    for g in path[1:] + [0x300000]:
        one(h, vm, g & ~0xFFF, vcpu=1)
    d = Delta(h, vm)
    assert one(h, vm, 0x1000) == (bm.FIXED, err)
    got = d()
    assert (got["pf_taken"], got["pf_fixed"], got["pages_4k"]) == (1, 1, 1)


def test_table_outside_every_memslot_is_a_guest_fault_through_the_emulator():
    # PML4E -> a PDPT at 1 GiB, beyond the 64 MiB slot: the processor's read of it exits (no memslot:
    # KVM caches an MMIO SPTE and emulates); the emulator's walk finds no memslot and injects #PF
    h, vm, t, r = setup()
    t.mem[t.root] = GiB | P | RW | US | A
    go(h, vm, t, r)
    d = Delta(h, vm)
    assert one(h, vm, 0x1000, U_)[0] == bm.GUEST_FAULT
    assert int(h.access(vm, 0, 0x1000, U_).error_code[0]) == PF_U
    got = d()
    assert got["pf_guest"] == 2 and got["pf_emulate"] == 1 and got["pf_mmio_spte_created"] == 1


# ----------------------------------------------------------------------------- guest faults
GVA = (1 << 39) | (1 << 30) | (1 << 21) | 0x3000


def _fault_case(name):
    """(leaf flags, upper flags at the PDE, regs kwargs, kind, expected code or None, rflags, pkru)."""
    cases = {
        "pte_not_present_user_write": (0, P | RW | US | A, {}, W_ | U_, PF_W | PF_U, 0, 0),
        "pde_rsvd_bit51": (P | RW | US | A, P | RW | US | A | (1 << 51), {}, R_, PF_P | PF_RSVD, 0, 0),
        "pde_rsvd_fetch": (P | RW | US | A, P | RW | US | A | (1 << 51), {}, X_, PF_P | PF_RSVD | PF_I, 0, 0),
        "xd_without_nxe_is_rsvd": (P | RW | US | A | XD, P | RW | US | A, dict(nx=False), R_, PF_P | PF_RSVD, 0, 0),
        "xd_fetch": (P | RW | US | A | XD, P | RW | US | A, {}, X_, PF_P | PF_I, 0, 0),
        "xd_in_pde_fetch": (P | RW | US | A, P | RW | US | A | XD, {}, X_ | U_, PF_P | PF_I | PF_U, 0, 0),
        "fetch_no_nxe_no_smep_notpresent": (0, P | RW | US | A, dict(nx=False), X_, 0, 0, 0),
        "user_read_supervisor_page": (P | RW | A, P | RW | US | A, {}, U_, PF_P | PF_U, 0, 0),
        "user_read_supervisor_pde": (P | RW | US | A, P | RW | A, {}, U_, PF_P | PF_U, 0, 0),
        "sup_write_ro_wp": (P | US | A, P | RW | US | A, {}, W_, PF_P | PF_W, 0, 0),
        "sup_write_ro_pde_wp": (P | RW | US | A, P | US | A, {}, W_, PF_P | PF_W, 0, 0),
        "sup_write_ro_nowp": (P | US | A, P | RW | US | A, dict(wp=False), W_, None, 0, 0),
        "user_write_ro_nowp": (P | US | A, P | RW | US | A, dict(wp=False), W_ | U_, PF_P | PF_W | PF_U, 0, 0),
        "smep_fetch_user_page": (P | RW | US | A, P | RW | US | A, dict(smep=True), X_, PF_P | PF_I, 0, 0),
        "smep_user_fetch_ok": (P | RW | US | A, P | RW | US | A, dict(smep=True), X_ | U_, None, 0, 0),
        "smap_read_user_page": (P | RW | US | A, P | RW | US | A, dict(smap=True), R_, PF_P, 0, 0),
        "smap_ac_allows": (P | RW | US | A, P | RW | US | A, dict(smap=True), W_, None, AC, 0),
        "smap_fetch_not_smap": (P | RW | US | A, P | RW | US | A, dict(smap=True), X_, None, 0, 0),
        "pkey_access_disable": (P | RW | US | A | (3 << 59), P | RW | US | A, dict(pke=True), U_,
                                PF_P | PF_U | PF_PK, 0, 1 << 6),
        "pkey_write_disable_sup_wp": (P | RW | US | A | (3 << 59), P | RW | US | A, dict(pke=True), W_,
                                      PF_P | PF_W | PF_PK, 0, 2 << 6),
        "pkey_other_key_ok": (P | RW | US | A | (2 << 59), P | RW | US | A, dict(pke=True), U_ | W_, None, 0, 3 << 6),
    }
    return cases[name]


@pytest.mark.parametrize("name", [
    "pte_not_present_user_write", "pde_rsvd_bit51", "pde_rsvd_fetch", "xd_without_nxe_is_rsvd", "xd_fetch",
    "xd_in_pde_fetch", "fetch_no_nxe_no_smep_notpresent", "user_read_supervisor_page", "user_read_supervisor_pde",
    "sup_write_ro_wp", "sup_write_ro_pde_wp", "sup_write_ro_nowp", "user_write_ro_nowp", "smep_fetch_user_page",
    "smep_user_fetch_ok", "smap_read_user_page", "smap_ac_allows", "smap_fetch_not_smap", "pkey_access_disable",
    "pkey_write_disable_sup_wp", "pkey_other_key_ok"])
def test_guest_fault_error_codes_and_no_kvm_work(name):
    leaf, pde, kw, kind, code, rflags, pkru = _fault_case(name)
    h, vm, t, r = setup(vcpus=2, **kw)
    path = t.map(GVA, 0x300000, flags=leaf)
    t.mem[path[2]] = (t.mem[path[2]] & ADDR) | pde
    go(h, vm, t, r)
    h.set_vcpu_regs(vm, 0, rflags=2 | rflags, pkru=pkru)
    for g in path + [0x300000]:
        one(h, vm, g & ~0xFFF, vcpu=1)  # vCPU 1 (paging off) puts every page in the TDP first
    before = {g: gpte(h, vm, g) for g in path}
    d = Delta(h, vm)
    out = one(h, vm, GVA, kind)
    got = d()
    assert all(k not in got for k in KVM_WORK)
    if code is None:
        assert out == (bm.HIT, 0)
        assert gpte(h, vm, path[-1]) & A
    else:
        assert out == (bm.GUEST_FAULT, code)
        assert {g: gpte(h, vm, g) for g in path} == before  # a refused access sets no A/D bit


# ----------------------------------------------------------------------------- A/D bits
@pytest.mark.parametrize("size_level", [1, 2, 3])
def test_ad_bits_written_as_the_architecture_says(size_level):
    h, vm, t, r = setup()
    gva = (2 << 39) | (3 << 30) | (4 << 21) | (5 << 12)
    base = gva & ~((1 << (12 + 9 * (size_level - 1))) - 1)
    path = t.map(base, 0 if size_level == 3 else 0x400000 if size_level == 2 else 0x5000, flags=P | RW | US,
                 size_level=size_level, upper=P | RW | US)
    go(h, vm, t, r)
    flags = [gpte(h, vm, g) & (A | D) for g in path]
    assert flags == [0] * len(path)
    assert one(h, vm, gva, U_)[0] == bm.FIXED          # read: A at every level, no D
    assert [gpte(h, vm, g) & (A | D) for g in path] == [A] * len(path)
    assert one(h, vm, gva, U_ | W_)[0] in (bm.HIT, bm.FIXED)   # write: D on the leaf only
    assert [gpte(h, vm, g) & (A | D) for g in path] == [A] * (len(path) - 1) + [A | D]
    assert [gpte(h, vm, g) & ADDR for g in path] == [t.mem[g] & ADDR for g in path]


def test_fetch_sets_accessed_and_a_faulting_write_sets_nothing():
    h, vm, t, r = setup()
    path = t.map(0x8000, 0x9000, flags=P | US, upper=P | RW | US)
    go(h, vm, t, r)
    assert one(h, vm, 0x8000, W_ | U_) == (bm.GUEST_FAULT, PF_P | PF_W | PF_U)
    assert [gpte(h, vm, g) & (A | D) for g in path] == [0, 0, 0, 0]
    assert one(h, vm, 0x8000, X_ | U_)[0] == bm.FIXED
    assert [gpte(h, vm, g) & (A | D) for g in path] == [A, A, A, A]


# ----------------------------------------------------------------------------- stores
def test_store_writes_the_translated_gpa():
    h, vm, t, r = setup()
    t.map(0x40000000, 0x600000)
    t.map(0x40001000, 0x500000)           # the next virtual page is physically below
    t.map(0x40002000, 0x700000, flags=P | US | A | D)   # read-only
    go(h, vm, t, r)
    assert h.store(vm, 0, 0x40000010, 0x1122334455667788).outcome[0] == bm.FIXED
    assert u64(h.read_guest_memory(vm, 0x600010, 1)[0]) == 0x1122334455667788
    # a page-crossing store: 4 bytes at the end of gpa 0x600000's page, 4 at the start of 0x500000's
    assert h.store(vm, 0, 0x40000FFC, 0xAAAAAAAABBBBBBBB).outcome[0] in (bm.HIT, bm.FIXED)
    assert u64(h.read_guest_memory(vm, 0x600FF8, 1)[0]) >> 32 == 0xBBBBBBBB
    assert u64(h.read_guest_memory(vm, 0x500000, 1)[0]) & 0xFFFFFFFF == 0xAAAAAAAA
    res = h.store(vm, 0, 0x40002000, 0x55)   # read-only with CR0.WP: #PF, memory unchanged
    assert (int(res.outcome[0]), int(res.error_code[0])) == (bm.GUEST_FAULT, PF_P | PF_W)
    assert u64(h.read_guest_memory(vm, 0x700000, 1)[0]) == 0


def test_guest_rewrites_its_own_pte_without_any_exit():
    # the PT page is mapped at gva 0x3000 (a self-mapping): the guest changes a PTE through it; under
    # TDP nothing traps (no write protection of guest tables); INVLPG, MOV CR3 and TLB flushes do not
    # exit; the next walk sees the new PTE
    h, vm, t, r = setup()
    path = t.map(0x5000, 0x800000)
    pt = path[-1] & ~0xFFF
    t.map(0x3000, pt)
    go(h, vm, t, r)
    assert one(h, vm, 0x5000)[0] == bm.FIXED
    assert one(h, vm, 0x3000, W_) == (bm.HIT, 0)  # the PT page is in the TDP already
    d = Delta(h, vm)
    assert h.store(vm, 0, 0x3000 + 8 * 5, 0x900000 | P | RW | US | A | D).outcome[0] == bm.HIT
    h.invlpg(vm, 0, 0x5000)
    h.flush_tlb(vm, 0)
    h.mov_cr3(vm, 0, t.root)
    assert h.store(vm, 0, 0x5008, 0x77).outcome[0] == bm.FIXED   # gpa 0x900000: a new page for the TDP
    assert u64(h.read_guest_memory(vm, 0x900008, 1)[0]) == 0x77
    assert u64(h.read_guest_memory(vm, 0x800008, 1)[0]) == 0
    got = d()
    assert (got["pf_fixed"], got.get("invlpg", 0), got.get("tlb_flush", 0), got["accesses"]) == (1, 0, 0, 2)


def test_mov_cr3_switches_address_space():
    h, vm, t, r = setup()
    t.map(0x5000, 0x800000)
    t2 = Tables(4, base=0x20000)
    t2.map(0x5000, 0x900000)
    go(h, vm, t, r)
    t2.write(h, vm)
    h.store(vm, 0, 0x5000, 1)
    h.mov_cr3(vm, 0, t2.root)
    h.store(vm, 0, 0x5000, 2)
    assert [u64(h.read_guest_memory(vm, g, 1)[0]) for g in (0x800000, 0x900000)] == [1, 2]


# ----------------------------------------------------------------------------- dirty logging
def _dirty_gfns(h, vm):
    bm_words = h.get_dirty_log(vm, 0)
    bits = np.unpackbits(bm_words.view(np.uint8), bitorder="little")
    return set(int(x) for x in np.nonzero(bits)[0])


@pytest.mark.parametrize("fmt,ept_ad,pml", [("ept", True, False), ("ept", False, False), ("npt", True, False),
                                            ("ept", True, True)])
def test_dirty_log_sees_page_table_pages(fmt, ept_ad, pml):
    h, vm, t, r = setup(fmt=fmt, ept_ad=ept_ad, pml=pml, vcpus=2)
    path = t.map(0x5000, 0x800000, flags=P | RW | US, upper=P | RW | US)   # no A/D anywhere
    tables = {g >> 12 for g in path}
    go(h, vm, t, r)
    for g in sorted(tables) + [0x800]:
        one(h, vm, g << 12, vcpu=1)   # vCPU 1 (paging off) faults every page into the TDP first
    h.set_memslot(vm, 0, 0, 64 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    assert _dirty_gfns(h, vm) == set()
    tables_always = fmt == "npt" or ept_ad   # guest paging-structure accesses are writes for the TDP
    # 1. a read that sets A at every level: the four table pages are written
    assert one(h, vm, 0x5000)[0] in (bm.HIT, bm.FIXED)
    assert _dirty_gfns(h, vm) == tables
    # 2. the same read: no A/D to set
    assert one(h, vm, 0x5000)[0] in (bm.HIT, bm.FIXED)
    assert _dirty_gfns(h, vm) == (tables if tables_always else set())
    # 3. a write: D on the leaf (in the last table) and the data page
    assert one(h, vm, 0x5000, W_)[0] in (bm.HIT, bm.FIXED)
    assert _dirty_gfns(h, vm) == (tables if tables_always else {path[-1] >> 12}) | {0x800}
    assert gpte(h, vm, path[-1]) & (A | D) == A | D


# ----------------------------------------------------------------------------- 32-bit and PAE guests
def _put32(host, vm, gpa, value):
    word = u64(host.read_guest_memory(vm, gpa & ~7, 1)[0].astype(np.int64))
    sh = 8 * (gpa & 4)
    host.write_guest_memory(vm, gpa & ~7, [(word & ~(0xFFFFFFFF << sh) & ((1 << 64) - 1)) | (value << sh)])


def test_32bit_guest_two_levels_of_4_byte_gptes():
    h, vm, _t, _r = setup()
    pd, pt, gva = 0x10000, 0x11000, (5 << 22) | (7 << 12) | 0x10
    _put32(h, vm, pd + 4 * 5, pt | P | RW | US)
    _put32(h, vm, pt + 4 * 7, 0x600000 | P | RW | US)
    _put32(h, vm, pd + 4 * 6, 0x800000 | P | RW | US | PS)    # a 4M page (CR4.PSE)
    h.set_vcpu_regs(vm, 0, cr0=CR0_PG | CR0_WP | CR0_BASE, cr4=1 << 4, efer=0, cr3=pd)
    assert one(h, vm, gva, W_)[0] == bm.FIXED
    assert gpte(h, vm, pt + 24) >> 32 & (A | D) == A | D   # the 4-byte PTE at pt + 28
    assert gpte(h, vm, pd + 16) >> 32 & (A | D) == A       # the PDE at pd + 20
    d = Delta(h, vm)
    assert h.store(vm, 0, gva, 0x42).outcome[0] == bm.HIT
    assert d() == {"walk_refs": 2 * 4 + 2 + 4, "accesses": 1}
    assert u64(h.read_guest_memory(vm, 0x600010, 1)[0]) == 0x42
    assert h.store(vm, 0, (6 << 22) | 0x123458, 0x43).outcome[0] == bm.FIXED
    assert u64(h.read_guest_memory(vm, 0x923458, 1)[0]) == 0x43
    assert one(h, vm, 7 << 22, U_) == (bm.GUEST_FAULT, PF_U)     # PDE not present


def test_pae_guest_pdptes_come_from_registers():
    # PAE: the PDPTEs are loaded at CR3 load (here set_vcpu_regs and MOV CR3), not read by the walk:
    # 2 levels read + the data, 2 * 4 + 2 + 4 references
    h, vm, _t, _r = setup()
    pdpt, pd, pt = 0x10000, 0x11000, 0x12000
    h.write_guest_memory(vm, pdpt, [0, pd | P])
    h.write_guest_memory(vm, pd + 8 * 3, [pt | P | RW | US])
    h.write_guest_memory(vm, pt + 8 * 4, [0x700000 | P | RW | US])
    gva = (1 << 30) | (3 << 21) | (4 << 12)
    h.set_vcpu_regs(vm, 0, cr0=CR0_PG | CR0_WP | CR0_BASE, cr4=CR4_PAE, efer=EFER_NX, cr3=pdpt)
    assert one(h, vm, gva, W_)[0] == bm.FIXED
    d = Delta(h, vm)
    assert one(h, vm, gva) == (bm.HIT, 0)
    assert d() == {"walk_refs": 2 * 4 + 2 + 4, "accesses": 1}
    assert one(h, vm, 0x1000) == (bm.GUEST_FAULT, 0)            # PDPTE 0 not present
    h.write_guest_memory(vm, 0x20000, [pd | P])                  # a second PDPT: gva 0 -> same PD
    h.mov_cr3(vm, 0, 0x20000)
    assert one(h, vm, (3 << 21) | (4 << 12)) == (bm.HIT, 0)
    assert gpte(h, vm, pt + 8 * 4) & (A | D) == A | D


# ----------------------------------------------------------------------------- where the tables live
@pytest.mark.nojit
@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_walks_follow_their_table_pages_through_memslot_changes_and_discards(mmu):
    # the walker remembers where each level's table page was (kernels/guest_walk.py walk_table_row): a table
    # slot recreated over other host memory, recreated over the old memory, and a table page dropped by
    # MADV_DONTNEED must each be what the next walk reads
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory=64 * MiB, mmu=mmu)[0])
    base, hva0, hva1 = 64 * MiB, 1 << 40, (1 << 40) + 16 * MiB
    h.set_memslot(vm, 1, base, 2 * MiB, hva=hva0)
    t = Tables(4, base=base)
    t.map(0x5000, 0x800000)
    t.map(0x6000, 0x801000)
    go(h, vm, t, regs(cr3=t.root))
    assert one(h, vm, 0x5000)[0] == bm.FIXED
    h.set_memslot(vm, 1, base, 0)                      # delete, then the same gpas over other host memory
    h.set_memslot(vm, 1, base, 2 * MiB, hva=hva1)
    assert one(h, vm, 0x6000) == (bm.GUEST_FAULT, 0)   # its tables read as zeros: not present
    h.set_memslot(vm, 1, base, 0)
    h.set_memslot(vm, 1, base, 2 * MiB, hva=hva0)      # the old host pages, contents kept
    assert one(h, vm, 0x6000)[0] in (bm.FIXED, bm.HIT)
    t.write(h, vm)
    h.discard_hva_range(vm, hva0, hva0 + 2 * MiB)      # every table page gone: zeros again
    assert one(h, vm, 0x5000) == (bm.GUEST_FAULT, 0)
    go(h, vm, t, regs(cr3=t.root))                               # written back: walks again
    assert one(h, vm, 0x5000)[0] in (bm.FIXED, bm.HIT)


@pytest.mark.nojit
@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_pml4e_bit8_is_reserved_for_an_amd_guest_only(fmt):
    # KVM's nonleaf_bit8_rsvd: an AMD CPU (an NPT host's guest) reserves bit 8 of a PML4E; Intel ignores it
    h, vm, t, r = setup(fmt=fmt)
    path = t.map(0x5000, 0x800000)
    t.mem[path[0]] |= 1 << 8
    go(h, vm, t, r)
    got = one(h, vm, 0x5000)
    assert got == (bm.GUEST_FAULT, PF_P | PF_RSVD) if fmt == "npt" else got[0] == bm.FIXED
