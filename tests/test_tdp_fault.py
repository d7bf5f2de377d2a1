"""The TDP fault path against KVM (arch/x86/kvm/mmu/mmu.c, tdp_mmu.c, vmx/common.h, svm).

Counters follow kvm_mmu_do_page_fault: pf_taken for every fault that reaches the MMU
(not for MMIO SPTE hits handled by handle_mmio_page_fault), then pf_fixed /
pf_emulate / pf_spurious by the RET_PF_* result; pf_fast when fast_page_fault
returns anything but RET_PF_INVALID.  Error codes: EPT violations are converted by
__vmx_handle_ept_violation (ACC_READ -> PFERR_USER, ACC_WRITE -> WRITE, ACC_INSTR ->
FETCH, any PROT bit -> PRESENT), an EPT misconfiguration is PFERR_RSVD_MASK alone
(handle_ept_misconfig); #NPF uses the hardware error code, where nested-page-table
accesses are user accesses (U=1).  Only the low 32 bits are compared (bits 32/33,
GUEST_FINAL/GUEST_PAGE, are outside AccessResult.error_code).
"""

import numpy as np
import pytest
from conftest import GiB, MiB, leaf, one

import batchmmu as bm

P, W, U, RSVD, F = bm.PFERR_PRESENT, bm.PFERR_WRITE, bm.PFERR_USER, bm.PFERR_RSVD, bm.PFERR_FETCH
R_, W_, X_ = 0, bm.ACC_WRITE, bm.ACC_FETCH


def _vm(h, **kw):
    kw.setdefault("memory", "16MiB")
    return int(h.create_vms(1, **kw)[0])


def _delta(after, before, *names):
    return tuple(after[n] - before[n] for n in names)


# ----------------------------------------------------------------------------- basic faults
@pytest.mark.nojit
def test_first_touch_fixed_second_hit(host4k):
    h = host4k
    vm = _vm(h)
    assert one(h, vm, 0x3000) == (bm.FIXED, U)
    s = h.stats(vm)
    assert (s["pf_taken"], s["pf_fixed"], s["pf_fast"], s["pf_emulate"], s["pages_4k"]) == (1, 1, 0, 0, 1)
    assert s["accesses"] == 1
    assert one(h, vm, 0x3008, bm.ACC_WRITE) == (bm.HIT, 0)    # the SPTE is writable from the start
    assert one(h, vm, 0x3010, bm.ACC_FETCH) == (bm.HIT, 0)
    s2 = h.stats(vm)
    assert (s2["pf_taken"], s2["pf_fixed"], s2["accesses"]) == (1, 1, 3)


def test_readonly_slot(host4k):
    h = host4k
    vm = _vm(h)
    h.set_memslot(vm, 1, GiB, 2 * MiB, flags=bm.MEM_READONLY)
    assert one(h, vm, GiB + 0x1000)[0] == bm.FIXED
    spte = leaf(h, vm, (GiB >> 12) + 1)
    before = h.stats(vm)
    # write: EPT violation (present, not writable) -> fast path cannot help (not MMU-writable) ->
    # faultin gets KVM_PFN_ERR_RO_FAULT -> RET_PF_EMULATE; the SPTE is left alone
    assert one(h, vm, GiB + 0x1000, bm.ACC_WRITE) == (bm.EMULATED, P | W)
    after = h.stats(vm)
    assert _delta(after, before, "pf_taken", "pf_emulate", "pf_fixed", "pf_fast", "pf_spurious") == \
        (1, 1, 0, 0, 0)
    assert leaf(h, vm, (GiB >> 12) + 1) == spte
    assert one(h, vm, GiB + 0x1000) == (bm.HIT, 0)
    # a write to a page never read: emulated, and no SPTE is created at all
    assert one(h, vm, GiB + 0x5000, bm.ACC_WRITE) == (bm.EMULATED, W)
    assert leaf(h, vm, (GiB >> 12) + 5) is None
    assert h.stats(vm)["pages_4k"] == after["pages_4k"]
    # emulated writes do not write guest memory
    h.write_guest_memory(vm, GiB + 0x1000, [7])
    h.store(vm, 0, GiB + 0x1000, 99)
    assert int(h.read_guest_memory(vm, GiB + 0x1000, 1)[0]) == 7


# ----------------------------------------------------------------------------- MMIO
@pytest.mark.nojit
def test_mmio_spte_created_then_fast_path(host4k):
    h = host4k
    vm = _vm(h)
    gpa = 3 * GiB + 0x10
    # first access: EPT violation (read, not present) -> no slot -> MMIO SPTE, RET_PF_EMULATE
    assert one(h, vm, gpa) == (bm.MMIO, U)
    s = h.stats(vm)
    assert (s["pf_taken"], s["pf_emulate"], s["pf_mmio_spte_created"], s["pf_fixed"]) == (1, 1, 1, 0)
    assert s["pages_4k"] == 0
    # next accesses: EPT misconfiguration -> handle_mmio_page_fault -> emulate, no pf_taken/pf_emulate
    assert one(h, vm, gpa)[0] == bm.MMIO
    assert one(h, vm, gpa + 8, bm.ACC_WRITE)[0] == bm.MMIO
    s2 = h.stats(vm)
    assert (s2["pf_taken"], s2["pf_emulate"], s2["pf_mmio_spte_created"]) == (1, 1, 1)
    assert s2["accesses"] == 3


@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_mmio_fast_path_stats(host4k, fmt):
    h = host4k
    vm = _vm(h, tdp_format=fmt)
    for kind in (0, bm.ACC_WRITE, 0, bm.ACC_FETCH):
        assert one(h, vm, 3 * GiB, kind)[0] == bm.MMIO
    s = h.stats(vm)
    assert (s["pf_taken"], s["pf_emulate"], s["pf_mmio_spte_created"], s["accesses"]) == (1, 1, 1, 4)


def test_mmio_error_code_ept_misconfig(host4k):
    # handle_ept_misconfig: kvm_mmu_page_fault(vcpu, gpa, PFERR_RSVD_MASK, NULL, 0) - RSVD alone,
    # whatever the access ("Note, EPT Misconfigs do NOT set the PRESENT flag!", mmu.c)
    h = host4k
    vm = _vm(h)
    one(h, vm, 3 * GiB)
    one(h, vm, 4 * GiB)
    assert one(h, vm, 3 * GiB) == (bm.MMIO, RSVD)
    assert one(h, vm, 3 * GiB, bm.ACC_WRITE) == (bm.MMIO, RSVD)
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB)
    assert one(h, vm, 3 * GiB) == (bm.MMIO, RSVD)             # stale generation: slow path, same exit
    assert one(h, vm, 4 * GiB) == (bm.FIXED, RSVD)            # stale MMIO SPTE, now RAM


def test_mmio_error_codes_npt(host4k):
    h = host4k
    vm = _vm(h, tdp_format="npt")
    gpa = 3 * GiB
    assert one(h, vm, gpa) == (bm.MMIO, U)                    # #NPF, not present, user walk
    assert one(h, vm, gpa) == (bm.MMIO, P | U | RSVD)         # reserved bit 51 in a present entry
    assert one(h, vm, gpa, bm.ACC_WRITE) == (bm.MMIO, P | W | U | RSVD)


def test_mmio_stale_generation_takes_slow_path(host4k):
    h = host4k
    vm = _vm(h)
    gpa = 3 * GiB
    one(h, vm, 0x1000)
    one(h, vm, gpa)
    one(h, vm, gpa)
    before = h.stats(vm)
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB)                     # unrelated CREATE: generation + 2
    assert h.stats(vm)["pages_4k"] == 1                        # CREATE zaps nothing
    assert one(h, vm, 0x1000)[0] == bm.HIT
    # MMIO SPTE generation mismatch -> RET_PF_INVALID -> full fault -> a fresh MMIO SPTE, emulate
    assert one(h, vm, gpa)[0] == bm.MMIO
    after = h.stats(vm)
    assert _delta(after, before, "pf_taken", "pf_emulate", "pf_mmio_spte_created", "pf_fixed") == (1, 1, 1, 0)
    assert one(h, vm, gpa)[0] == bm.MMIO
    assert h.stats(vm)["pf_taken"] == after["pf_taken"]        # fast path again
    _, spte = leaf(h, vm, gpa >> 12)
    gen = h.memslots_generation(vm) & 0x7FFFF
    assert ((spte >> 3) & 0xFF) | (((spte >> 52) & 0x7FF) << 8) == gen


def test_mmio_gfn_becomes_ram_after_slot_creation(host4k):
    h = host4k
    vm = _vm(h)
    assert one(h, vm, 4 * GiB)[0] == bm.MMIO
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB)
    before = h.stats(vm)
    assert one(h, vm, 4 * GiB)[0] == bm.FIXED
    after = h.stats(vm)
    assert _delta(after, before, "pf_taken", "pf_fixed", "pages_4k", "pf_mmio_spte_created") == (1, 1, 1, 0)
    assert one(h, vm, 4 * GiB, bm.ACC_WRITE)[0] == bm.HIT


def test_mmio_without_caching_always_faults():
    h = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = _vm(h)
    for _ in range(3):
        assert one(h, vm, 3 * GiB) == (bm.MMIO, U)
    assert one(h, vm, 3 * GiB, bm.ACC_WRITE) == (bm.MMIO, W)
    s = h.stats(vm)
    assert (s["pf_taken"], s["pf_emulate"], s["pf_mmio_spte_created"]) == (4, 4, 0)
    assert h.spte_dump(vm) == {}


# ----------------------------------------------------------------------------- error codes
@pytest.mark.parametrize("fmt,cases", [
    ("ept", [(R_, U), (W_, W), (X_, F), (W_ | bm.ACC_USER, W), (R_ | bm.ACC_USER, U)]),
    ("npt", [(R_, U), (W_, W | U), (X_, F | U), (W_ | bm.ACC_USER, W | U), (R_ | bm.ACC_USER, U)]),
])
def test_error_codes_not_present(host4k, fmt, cases):
    h = host4k
    vm = _vm(h, tdp_format=fmt)
    for k, (kind, err) in enumerate(cases):
        assert one(h, vm, 0x1000 * (k + 1), kind) == (bm.FIXED, err), (kind, err)


@pytest.mark.parametrize("fmt,err", [("ept", P | W), ("npt", P | W | U)])
def test_error_code_write_to_readonly(host4k, fmt, err):
    h = host4k
    vm = _vm(h, tdp_format=fmt)
    h.set_memslot(vm, 1, GiB, 2 * MiB, flags=bm.MEM_READONLY)
    one(h, vm, GiB)
    assert one(h, vm, GiB, bm.ACC_WRITE) == (bm.EMULATED, err)


# ----------------------------------------------------------------------------- walks and tables
@pytest.mark.nojit
@pytest.mark.parametrize("levels", [4, 5])
def test_walk_refs_and_mmu_pages(levels):
    h = bm.Host(memory="8GiB", backing="4k")
    vm = _vm(h, memory="2GiB", tdp_levels=levels)
    one(h, vm, 0x1000)
    s = h.stats(vm)
    # faulting walk stops at the empty top-level entry (1 ref), the retried walk reads every level
    assert s["walk_refs"] == 1 + levels
    assert s["mmu_pages"] == levels                            # root + one table per lower level
    one(h, vm, 0x1008)
    assert h.stats(vm)["walk_refs"] == 1 + 2 * levels          # a hit: one full walk
    one(h, vm, 0x2000)                                         # same 4K table, entry empty
    assert h.stats(vm)["walk_refs"] == 1 + 4 * levels
    assert h.stats(vm)["mmu_pages"] == levels
    one(h, vm, 0x400000)                                       # another 2M region: one new PT
    assert h.stats(vm)["mmu_pages"] == levels + 1
    one(h, vm, GiB + 0x1000)                                   # another 1G region: PD + PT
    assert h.stats(vm)["mmu_pages"] == levels + 3
    assert h.stats(vm)["pages_4k"] == 4


def test_walk_refs_huge_mappings():
    h = bm.Host(memory="8GiB", backing="hugetlb-1g")
    vm = _vm(h, memory="1GiB")
    h.set_memslot(vm, 1, 2 * GiB, 4 * MiB, backing="hugetlb-2m")
    one(h, vm, 0x1000)
    one(h, vm, 2 * GiB)
    before = h.stats(vm)["walk_refs"]
    one(h, vm, 0x5000)                                         # 1G leaf at level 3: 2 refs
    assert h.stats(vm)["walk_refs"] - before == 2
    one(h, vm, 2 * GiB + 0x5000)                               # 2M leaf at level 2: 3 refs
    assert h.stats(vm)["walk_refs"] - before == 5


# ----------------------------------------------------------------------------- NX huge pages
def test_nx_huge_pages_fetch_maps_4k_and_counts_split():
    h = bm.Host(memory="8GiB", backing="thp", nx_huge_pages=True)
    vm = _vm(h)
    assert one(h, vm, 0x201000, bm.ACC_FETCH) == (bm.FIXED, F)
    s = h.stats(vm)
    # huge_page_disallowed: goal 4K; the new PT is NX-disallowed and, as req_level (2M) >= its parent
    # level, tracked as a possible NX huge page
    assert (s["pages_4k"], s["pages_2m"], s["nx_lpage_splits"]) == (1, 0, 1)
    # a read in the same 2M region: the PD entry points to a disallowed table ->
    # disallowed_hugepage_adjust lowers the goal to 4K
    assert one(h, vm, 0x205000)[0] == bm.FIXED
    s = h.stats(vm)
    assert (s["pages_4k"], s["pages_2m"], s["nx_lpage_splits"]) == (2, 0, 1)
    # a read elsewhere maps 2M, non-executable
    assert one(h, vm, 0x401000)[0] == bm.FIXED
    s = h.stats(vm)
    assert (s["pages_4k"], s["pages_2m"], s["nx_lpage_splits"]) == (2, 1, 1)
    _, spte = leaf(h, vm, 0x401)
    assert spte & 0b111 == 0b011                               # EPT R|W, no X


def test_nx_huge_pages_counts_one_split_per_level_for_1g():
    h = bm.Host(memory="8GiB", backing="hugetlb-1g", nx_huge_pages=True)
    vm = _vm(h, memory="1GiB")
    one(h, vm, 0x1000, bm.ACC_FETCH)
    s = h.stats(vm)
    # req_level = 1G: the PD (parent level 3) and the PT (parent level 2) are both tracked
    assert (s["pages_4k"], s["pages_1g"], s["nx_lpage_splits"]) == (1, 0, 2)


@pytest.mark.parametrize("fmt,err", [("ept", P | F), ("npt", P | U | F)])
def test_nx_huge_pages_fetch_on_huge_page_splits_in_place(fmt, err):
    h = bm.Host(memory="8GiB", backing="thp", nx_huge_pages=True)
    vm = _vm(h, tdp_format=fmt)
    one(h, vm, 0x203000, bm.ACC_WRITE)
    _, huge = leaf(h, vm, 0x203)
    assert h.stats(vm)["pages_2m"] == 1
    before = h.stats(vm)
    # exec fault on the NX huge page: split in place (tdp_mmu_split_huge_page, 512 children, the
    # 4K children made executable); the target child then equals what make_spte builds -> SPURIOUS
    assert one(h, vm, 0x205000, bm.ACC_FETCH) == (bm.SPURIOUS, err)
    s = h.stats(vm)
    assert (s["pages_2m"], s["pages_4k"], s["nx_lpage_splits"]) == (0, 512, 1)
    assert _delta(s, before, "pf_taken", "pf_spurious", "pf_fixed", "pf_fast", "mmu_pages") == (1, 1, 0, 0, 1)
    dump = h.spte_dump(vm)
    pfn0 = (huge >> 12) & ((1 << 40) - 1)
    for i in (0, 3, 5, 511):
        level, spte = dump[0x200 + i]
        assert level == 1
        assert (int(spte) >> 12) & ((1 << 40) - 1) == pfn0 + i
        assert int(spte) & (1 << 7) == 0
    assert one(h, vm, 0x3FF000, bm.ACC_FETCH) == (bm.HIT, 0)


# ----------------------------------------------------------------------------- dirty logging
def test_dirty_logging_write_protect_and_fast_path(host4k):
    h = host4k
    vm = _vm(h)
    base = GiB
    h.set_memslot(vm, 1, base, 2 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    r = h.access(vm, 0, [base + 3 * 4096, base + 70 * 4096], bm.ACC_WRITE)
    assert list(r.outcome) == [bm.FIXED, bm.FIXED]
    # make_spte: a writable SPTE in a dirty-logged slot marks the page dirty - even on a read fault
    assert one(h, vm, base + 100 * 4096)[0] == bm.FIXED
    words = [int(w) for w in h.get_dirty_log(vm, 1)]
    assert words == [1 << 3, (1 << 6) | (1 << 36), 0, 0, 0, 0, 0, 0]
    assert [int(w) for w in h.get_dirty_log(vm, 1)] == [0] * 8     # returned and cleared
    # the dirty pages are write-protected but stay MMU-writable
    _, spte = leaf(h, vm, (base >> 12) + 3)
    assert spte & (1 << 1) == 0 and spte & (1 << 58) and spte & (1 << 57)
    before = h.stats(vm)
    assert one(h, vm, base + 3 * 4096 + 8) == (bm.HIT, 0)          # reads still hit
    # a write faults; fast_page_fault restores W locklessly -> RET_PF_FIXED via the fast path
    assert one(h, vm, base + 3 * 4096, bm.ACC_WRITE) == (bm.FIXED, P | W)
    after = h.stats(vm)
    assert _delta(after, before, "pf_taken", "pf_fast", "pf_fixed", "pf_spurious", "pages_4k") == (1, 1, 1, 0, 0)
    assert leaf(h, vm, (base >> 12) + 3)[1] == spte | (1 << 1)
    assert one(h, vm, base + 3 * 4096, bm.ACC_WRITE) == (bm.HIT, 0)
    assert [int(w) for w in h.get_dirty_log(vm, 1)] == [1 << 3, 0, 0, 0, 0, 0, 0, 0]


def test_dirty_logging_maps_4k_even_with_huge_backing():
    h = bm.Host(memory="8GiB", backing="hugetlb-2m")
    vm = _vm(h)
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    h.access(vm, 0, [GiB, GiB + 0x201000], bm.ACC_WRITE)
    s = h.stats(vm)
    assert (s["pages_4k"], s["pages_2m"]) == (2, 0)


def test_enabling_dirty_logging_splits_a_huge_page_on_write():
    # kvm_mmu_slot_apply_flags (no PML, eager_page_split off): write-protect the slot at every level;
    # a write to the 2M page: fast path refuses (huge SPTE in a logged slot), the slow path maps 4K
    # by splitting the huge page in place, only the written page becomes writable and dirty
    h = bm.Host(memory="8GiB", backing="thp", eager_page_split=False)
    vm = _vm(h)
    h.set_memslot(vm, 1, GiB, 4 * MiB)
    one(h, vm, GiB + 0x1000, bm.ACC_WRITE)
    assert h.stats(vm)["pages_2m"] == 1
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    _, huge = leaf(h, vm, GiB >> 12)
    assert huge & (1 << 1) == 0                                 # write-protected
    assert one(h, vm, GiB + 0x1000) == (bm.HIT, 0)              # reads still hit the huge page
    before = h.stats(vm)
    assert one(h, vm, GiB + 0x5000, bm.ACC_WRITE) == (bm.FIXED, P | W)
    s = h.stats(vm)
    assert (s["pages_2m"], s["pages_4k"]) == (0, 512)
    assert _delta(s, before, "pf_taken", "pf_fixed", "pf_fast") == (1, 1, 0)
    words = [int(w) for w in h.get_dirty_log(vm, 1)]
    assert words[0] == 1 << 5 and not any(words[1:])
    assert one(h, vm, GiB + 0x6000, bm.ACC_WRITE)[0] == bm.FIXED   # its neighbour is a split child: fast
    assert h.stats(vm)["pf_fast"] == before["pf_fast"] + 1


def test_eager_page_split_on_enable():
    # eager_page_split (the default): enabling logging splits the 2M page into 512 write-protected
    # 4K SPTEs at once (+1 flush); a write then takes the fast path, the huge page never faults
    h = bm.Host(memory="8GiB", backing="thp")
    vm = _vm(h)
    h.set_memslot(vm, 1, GiB, 4 * MiB)
    one(h, vm, GiB + 0x1000, bm.ACC_WRITE)
    base = h.stats(vm)
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    s = h.stats(vm)
    assert (s["pages_2m"], s["pages_4k"], s["mmu_pages"] - base["mmu_pages"]) == (0, 512, 1)
    assert s["remote_tlb_flush"] - base["remote_tlb_flush"] == 1
    assert one(h, vm, GiB + 0x5000, bm.ACC_WRITE) == (bm.FIXED, P | W)
    assert _delta(h.stats(vm), s, "pf_taken", "pf_fixed", "pf_fast") == (1, 1, 1)
    assert [int(w) for w in h.get_dirty_log(vm, 1)][0] == 1 << 5


def test_disabling_dirty_logging_brings_huge_pages_back():
    # kvm_mmu_slot_apply_flags, logging turned off: kvm_mmu_recover_huge_pages (6.13+) replaces the 4K
    # tables by huge SPTEs (older kernels: kvm_mmu_zap_collapsible_sptes, and the next fault maps 2M).
    # Either way, once the page is touched again it is mapped 2M.
    h = bm.Host(memory="8GiB", backing="thp")
    vm = _vm(h)
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    one(h, vm, GiB + 0x1000, bm.ACC_WRITE)
    assert h.stats(vm)["pages_4k"] == 1
    h.set_memslot(vm, 1, GiB, 4 * MiB, flags=0)
    one(h, vm, GiB + 0x1000)
    s = h.stats(vm)
    assert (s["pages_4k"], s["pages_2m"]) == (0, 1)


# ----------------------------------------------------------------------------- host memory
def test_host_memory_exhausted_applies_earlier_events():
    h = bm.Host(memory="64KiB", backing="4k")                  # 16 host pages
    v0, v1 = (int(v) for v in h.create_vms(2, memory="1MiB"))
    h.set_memslot(v0, 1, GiB, 2 * MiB, flags=bm.MEM_READONLY)
    vms = np.array([v0, v1] * 10)
    addrs = np.repeat(np.arange(10) * 4096, 2)
    with pytest.raises(bm.HostMemoryExhausted) as ei:
        h.access(vms, 0, addrs, bm.ACC_WRITE)
    assert isinstance(ei.value, bm.BatchMMUError) and ei.value.field == "memory"
    # VMs are independent: an interleaved batch runs VM by VM (each VM's events in order), so
    # v0's ten pages come first and v1 gets the remaining six of the sixteen host pages.
    for v, n in ((v0, 10), (v1, 6)):
        s = h.stats(v)
        assert (s["pf_taken"], s["pf_fixed"], s["pages_4k"], s["accesses"]) == (n, n, n, n)
    assert list(ei.value.applied) == [True] * 13 + [False, True, False, True, False, True, False]
    assert h.host_memory() == (64 * 1024, 64 * 1024)
    # what needs no new host page still works: hits, MMIO, writes to a read-only slot
    r = h.access(v0, 0, [0, 3 * GiB, 3 * GiB, GiB], [bm.ACC_WRITE, 0, 0, bm.ACC_WRITE])
    assert list(r.outcome) == [bm.HIT, bm.MMIO, bm.MMIO, bm.EMULATED]
    with pytest.raises(bm.HostMemoryExhausted):
        h.access(v1, 0, 8 * 4096, 0)
    assert h.stats(v1)["pf_taken"] == 6


# ----------------------------------------------------------------------------- many VMs
def _fleet(seed_cfgs):
    h = bm.Host(memory="64GiB", backing="thp")
    vms = []
    for kw in seed_cfgs:
        vms += [int(v) for v in h.create_vms(6, memory="16MiB", vcpus=2, **kw)]
    for v in vms:
        h.set_memslot(v, 1, GiB, 4 * MiB, flags=bm.MEM_READONLY)
        h.set_memslot(v, 2, 2 * GiB, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES, backing="4k")
    return h, vms


CFGS = [dict(), dict(tdp_format="npt"), dict(tdp_levels=5), dict(ept_ad=False)]


def test_interleaved_batch_equals_each_vm_alone():
    rng = np.random.default_rng(2024)
    n = 6000
    h1, vms = _fleet(CFGS)
    h2, _ = _fleet(CFGS)
    ev_vm = rng.choice(np.array(vms), n)
    region = rng.choice(np.array([0, GiB, 2 * GiB, 3 * GiB]), n)
    addr = region + rng.integers(0, 4 * MiB // 8, n) * 8
    addr = np.where(region == 0, addr % (16 * MiB), addr)
    kind = rng.choice(np.array([0, bm.ACC_WRITE, bm.ACC_FETCH, bm.ACC_USER]), n)
    vcpu = rng.integers(0, 2, n)
    res = h1.access(ev_vm, vcpu, addr, kind)
    for v in vms:
        sel = ev_vm == v
        r = h2.access(v, vcpu[sel], addr[sel], kind[sel])
        np.testing.assert_array_equal(res.outcome[sel], r.outcome)
        np.testing.assert_array_equal(res.error_code[sel], r.error_code)
        assert h1.stats(v) == h2.stats(v)
        assert h1.spte_dump(v) == h2.spte_dump(v)
        np.testing.assert_array_equal(h1.get_dirty_log(v, 2), h2.get_dirty_log(v, 2))
    s = h1.stats()
    assert s["pf_mmio_spte_created"].sum() > 0 and s["pf_emulate"].sum() > s["pf_mmio_spte_created"].sum()
    assert s["pages_2m"].sum() > 0 and s["pages_4k"].sum() > 0


@pytest.mark.nojit
def test_store_writes_guest_memory_unless_emulated():
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="8KiB")[0])
    h.set_memslot(vm, 1, 8192, 4096, flags=bm.MEM_READONLY)
    r = h.store(vm, 0, [16, 8192, 4092], [0x1122334455667788, 7, 0xAABBCCDDEEFF0011], bm.ACC_WRITE)
    # plain store; store to a read-only slot (emulated: memory unchanged); a store crossing into page 1
    assert list(r.outcome) == [bm.FIXED, bm.EMULATED, bm.HIT]        # page 0 is mapped by then
    assert int(h.read_guest_memory(vm, 16, 1)[0]) == 0x1122334455667788
    assert int(h.read_guest_memory(vm, 8192, 1)[0]) == 0
    lo, hi = (int(x) for x in h.read_guest_memory(vm, 4088, 2))
    assert lo >> 32 == 0xEEFF0011 and hi & 0xFFFFFFFF == 0xAABBCCDD
    # crossing from page 1 into the read-only page: the second half is emulated, nothing is written
    r = h.store(vm, 0, 8188, 0x0102030405060708)
    assert r.outcome[0] == bm.EMULATED
    assert int(h.read_guest_memory(vm, 8184, 1)[0]) >> 32 == 0
