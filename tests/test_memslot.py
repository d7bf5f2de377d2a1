"""KVM_SET_USER_MEMORY_REGION against virt/kvm/kvm_main.c and arch/x86/kvm/x86.c.

__kvm_set_memory_region: unknown flags, unaligned size/gpa/hva, as_id >= 2 (x86 with
SMM), id >= KVM_USER_MEM_SLOTS (32764), npages > KVM_MEM_MAX_NR_PAGES, deleting a
slot that does not exist, changing hva/npages/READONLY of an existing slot -> EINVAL;
CREATE/MOVE overlapping another slot of the same address space -> EEXIST.  Nothing
changes on an error; "nothing to change" returns 0 before any memslot swap.

Generations (kvm_swap_active_memslots): each swap adds kvm_arch_nr_memslot_as_ids = 2;
address space i starts at generation i.  CREATE and FLAGS_ONLY swap once, DELETE and
MOVE twice (kvm_invalidate_memslot swaps in an INVALID copy first).  DELETE/MOVE zap
every SPTE of the VM (kvm_arch_flush_shadow_memslot -> kvm_mmu_zap_all_fast with the
default KVM_X86_QUIRK_SLOT_ZAP_ALL).
"""

import errno

import numpy as np
import pytest
from conftest import GiB, MiB, one

import batchmmu as bm

HVA_BASE = 1 << 40          # where the simulated VMM maps guest RAM (batchmmu.memslot.HVA_BASE)


def _vm(host, memory="1GiB", **kw):
    vm = int(host.create_vms(1, memory=memory, **kw)[0])
    host.set_memslot(vm, 1, 4 * GiB, 2 * MiB)
    return vm


def _snapshot(h, vm):
    return (h.memslots_generation(vm), h.memslots(vm), h.stats(vm), h.host_memory(), h.spte_dump(vm))


# (description, kwargs of set_memslot, errno)
ERROR_CASES = [
    ("unknown flag bit 8", dict(slot=2, gpa=8 * GiB, size=2 * MiB, flags=1 << 8), errno.EINVAL),
    ("unknown flag bit 5", dict(slot=2, gpa=8 * GiB, size=2 * MiB, flags=1 << 5), errno.EINVAL),
    ("unaligned gpa", dict(slot=2, gpa=8 * GiB + 0x800, size=2 * MiB), errno.EINVAL),
    ("unaligned size", dict(slot=2, gpa=8 * GiB, size=0x1800), errno.EINVAL),
    ("unaligned hva", dict(slot=2, gpa=8 * GiB, size=2 * MiB, hva=HVA_BASE + 8 * GiB + 0x10), errno.EINVAL),
    ("hva beyond user space", dict(slot=2, gpa=8 * GiB, size=2 * MiB, hva=1 << 57), errno.EINVAL),
    ("slot id 32764", dict(slot=32764, gpa=8 * GiB, size=2 * MiB), errno.EINVAL),
    ("slot id 32767", dict(slot=32767, gpa=8 * GiB, size=2 * MiB), errno.EINVAL),
    ("as_id 2", dict(slot=2 << 16, gpa=8 * GiB, size=2 * MiB), errno.EINVAL),
    ("as_id 2 id 5", dict(slot=(2 << 16) | 5, gpa=8 * GiB, size=2 * MiB), errno.EINVAL),
    ("npages > KVM_MEM_MAX_NR_PAGES", dict(slot=2, gpa=8 * GiB, size=(1 << 31) << 12), errno.EINVAL),
    ("change size", dict(slot=1, gpa=4 * GiB, size=4 * MiB), errno.EINVAL),
    ("change hva", dict(slot=1, gpa=4 * GiB, size=2 * MiB, hva=HVA_BASE + 16 * GiB), errno.EINVAL),
    ("set READONLY", dict(slot=1, gpa=4 * GiB, size=2 * MiB, flags=bm.MEM_READONLY), errno.EINVAL),
    ("move and set READONLY", dict(slot=1, gpa=8 * GiB, size=2 * MiB, flags=bm.MEM_READONLY), errno.EINVAL),
    ("delete empty slot", dict(slot=7, gpa=0, size=0), errno.EINVAL),
    ("delete empty AS1 slot", dict(slot=(1 << 16) | 1, gpa=0, size=0), errno.EINVAL),
    ("create inside slot 0", dict(slot=2, gpa=512 * MiB, size=2 * MiB), errno.EEXIST),
    ("create over slot 1 start", dict(slot=2, gpa=4 * GiB - MiB, size=2 * MiB), errno.EEXIST),
    ("create over slot 1 end", dict(slot=2, gpa=4 * GiB + MiB, size=2 * MiB), errno.EEXIST),
    ("create covering slot 1", dict(slot=2, gpa=2 * GiB, size=4 * GiB), errno.EEXIST),
    ("move onto slot 0", dict(slot=1, gpa=GiB - MiB, size=2 * MiB), errno.EEXIST),
]


@pytest.mark.nojit
@pytest.mark.parametrize("kw,err", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_set_memslot_errors(host4k, kw, err):
    h = host4k
    vm = _vm(h)
    h.access(vm, 0, [0x1000, 4 * GiB + 0x1000, 3 * GiB], [bm.ACC_WRITE, 0, 0])  # RAM, RAM, MMIO
    before = _snapshot(h, vm)
    with pytest.raises(bm.BatchMMUError) as ei:
        h.set_memslot(vm, **kw)
    assert ei.value.errno == err
    assert isinstance(ei.value, ValueError)
    assert _snapshot(h, vm) == before
    # the VM still runs as before: the RAM pages and the MMIO SPTE are all still there
    r = h.access(vm, 0, [0x1000, 4 * GiB + 0x1000, 3 * GiB], [bm.ACC_WRITE, 0, 0])
    assert list(r.outcome) == [bm.HIT, bm.HIT, bm.MMIO]
    assert h.stats(vm)["pf_taken"] == before[2]["pf_taken"]


@pytest.mark.nojit
def test_accepted_edge_cases(host4k):
    h = host4k
    vm = _vm(h)
    h.set_memslot(vm, 32763, 64 * GiB, 2 * MiB)                 # highest user slot id
    h.set_memslot(vm, 2, 4 * GiB + 2 * MiB, 2 * MiB)            # adjacent to slot 1, no overlap
    h.set_memslot(vm, 3, 4 * GiB - 2 * MiB, 2 * MiB)            # adjacent below slot 1
    h.set_memslot(vm, 1 << 16, 0, 2 * MiB)                      # AS1 overlapping AS0's slot 0: other space
    h.set_memslot(vm, 4, 32 * GiB, 2 * MiB, flags=bm.MEM_READONLY | bm.MEM_LOG_DIRTY_PAGES)
    slots = {m["slot"]: m for m in h.memslots(vm)}
    assert set(slots) == {0, 1, 2, 3, 4, 32763, 1 << 16}
    assert slots[4]["flags"] == bm.MEM_READONLY | bm.MEM_LOG_DIRTY_PAGES


@pytest.mark.nojit
def test_move_may_overlap_its_own_old_range(host4k):
    # kvm_check_memslot_overlap skips the slot being moved
    h = host4k
    vm = _vm(h)
    h.set_memslot(vm, 1, 4 * GiB + MiB, 2 * MiB)
    s = next(m for m in h.memslots(vm) if m["slot"] == 1)
    assert s["gpa"] == 4 * GiB + MiB and s["size"] == 2 * MiB


@pytest.mark.nojit
def test_noop_succeeds_without_generation_bump(host4k):
    h = host4k
    vm = _vm(h)
    one(h, vm, 4 * GiB, bm.ACC_WRITE)
    before = _snapshot(h, vm)
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB)
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB, hva=HVA_BASE + 4 * GiB)   # the same hva, spelled out
    h.set_memslot(vm, 0, 0, GiB)
    assert _snapshot(h, vm) == before


@pytest.mark.nojit
def test_generation_counts_memslot_swaps(host4k):
    h = host4k
    vm = int(h.create_vms(1, memory="1GiB")[0])
    assert h.memslots_generation(vm) == 2                      # AS0 starts at 0; creating slot 0 = 1 swap
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB)                      # CREATE: 1 swap
    assert h.memslots_generation(vm) == 4
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)   # FLAGS_ONLY: 1 swap
    assert h.memslots_generation(vm) == 6
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB)                      # FLAGS_ONLY back: 1 swap
    assert h.memslots_generation(vm) == 8
    h.set_memslot(vm, 1, 8 * GiB, 2 * MiB)                      # MOVE: invalidate + commit
    assert h.memslots_generation(vm) == 12
    h.set_memslot(vm, 1, 8 * GiB, 0)                            # DELETE: invalidate + commit
    assert h.memslots_generation(vm) == 16
    h.set_memslot(vm, 1, 8 * GiB, 2 * MiB)                      # re-CREATE the id
    assert h.memslots_generation(vm) == 18
    assert h.memslots_generation(vm) % 2 == 0                  # AS0 generations stay even


def test_as1_update_leaves_as0_generation_and_mmio_sptes(host4k):
    # Each address space has its own kvm_memslots and generation (kvm_create_vm: generation = as_id);
    # kvm_swap_active_memslots(kvm, as_id) only bumps that space's.  The vCPU (not in SMM) uses AS0, so
    # its MMIO SPTEs, stamped with AS0's generation, stay valid across AS1 (SMRAM) updates.
    h = host4k
    vm = _vm(h)
    assert one(h, vm, 3 * GiB)[0] == bm.MMIO                     # installs an MMIO SPTE
    gen = h.memslots_generation(vm)
    taken = h.stats(vm)["pf_taken"]
    h.set_memslot(vm, (1 << 16) | 1, 0, 2 * MiB)                # create a slot in AS1
    assert h.memslots_generation(vm) == gen
    assert one(h, vm, 3 * GiB)[0] == bm.MMIO
    assert h.stats(vm)["pf_taken"] == taken                    # still the MMIO fast path


# ----------------------------------------------------------------------------- zapping
def _touch_all(h, vm):
    r = h.access(vm, 0, [0x1000, 0x200000, 4 * GiB, 4 * GiB + 0x1000], bm.ACC_WRITE)
    assert list(r.outcome) == [bm.FIXED] * 4


@pytest.mark.parametrize("change", ["move", "delete"])
def test_move_and_delete_zap_every_mapping(host4k, change):
    h = host4k
    vm = _vm(h)
    h.set_memslot(vm, 2, 2 * GiB, 2 * MiB)
    _touch_all(h, vm)
    h.access(vm, 0, 2 * GiB, 0)
    s = h.stats(vm)
    assert s["pages_4k"] == 5 and s["mmu_pages"] > 0
    if change == "move":
        h.set_memslot(vm, 1, 8 * GiB, 2 * MiB)
    else:
        h.set_memslot(vm, 1, 0, 0)
    s = h.stats(vm)
    assert (s["pages_4k"], s["pages_2m"], s["pages_1g"], s["mmu_pages"]) == (0, 0, 0, 0)
    assert h.spte_dump(vm) == {}
    # slot 0 and slot 2 refault (they were zapped too); the old slot-1 range is MMIO now
    taken = s["pf_taken"]
    r = h.access(vm, 0, [0x1000, 2 * GiB, 4 * GiB], 0)
    assert list(r.outcome) == [bm.FIXED, bm.FIXED, bm.MMIO]
    assert h.stats(vm)["pf_taken"] == taken + 3
    if change == "move":
        assert one(h, vm, 8 * GiB + 0x1000, bm.ACC_WRITE)[0] == bm.FIXED


def test_move_with_dirty_logging_toggle_in_one_call(host4k):
    h = host4k
    vm = _vm(h)
    with pytest.raises(bm.BatchMMUError) as ei:
        h.get_dirty_log(vm, 1)
    assert ei.value.errno == errno.ENOENT
    one(h, vm, 4 * GiB, bm.ACC_WRITE)
    gen = h.memslots_generation(vm)
    h.set_memslot(vm, 1, 8 * GiB, 2 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    assert h.memslots_generation(vm) == gen + 4
    s = next(m for m in h.memslots(vm) if m["slot"] == 1)
    assert (s["gpa"], s["flags"]) == (8 * GiB, bm.MEM_LOG_DIRTY_PAGES)
    assert h.stats(vm)["pages_4k"] == 0
    assert list(h.get_dirty_log(vm, 1)) == [0] * 8
    r = h.access(vm, 0, [8 * GiB + 3 * 4096, 8 * GiB + 70 * 4096, 4 * GiB], [bm.ACC_WRITE, bm.ACC_WRITE, 0])
    assert list(r.outcome) == [bm.FIXED, bm.FIXED, bm.MMIO]
    bm_words = h.get_dirty_log(vm, 1)
    assert bm_words.dtype == np.uint64
    assert [int(w) for w in bm_words] == [1 << 3, 1 << 6, 0, 0, 0, 0, 0, 0]
    # and the move back with logging off drops the bitmap
    h.set_memslot(vm, 1, 4 * GiB, 2 * MiB, flags=0)
    with pytest.raises(bm.BatchMMUError) as ei:
        h.get_dirty_log(vm, 1)
    assert ei.value.errno == errno.ENOENT


def test_get_dirty_log_errnos(host4k):
    # kvm_get_dirty_log_protect: as_id/id out of range -> EINVAL; no such slot or no bitmap -> ENOENT
    h = host4k
    vm = _vm(h)
    for slot, err in ((32764, errno.EINVAL), (2 << 16, errno.EINVAL), (1, errno.ENOENT), (9, errno.ENOENT)):
        with pytest.raises(bm.BatchMMUError) as ei:
            h.get_dirty_log(vm, slot)
        assert ei.value.errno == err, slot


# ----------------------------------------------------------------------------- lpage_info seeding
def _levels(h, vm):
    s = h.stats(vm)
    return s["pages_4k"], s["pages_2m"], s["pages_1g"]


def test_unaligned_slot_edges_map_4k_middle_maps_2m():
    # slot [1G+1M, 1G+7M): 2M regions 1G+0 (head, partial), 1G+2M, 1G+4M (whole), 1G+6M (tail, partial).
    # kvm_alloc_memslot_metadata disallows the first and last 2M entries; the middle may be huge.
    h = bm.Host(memory="8GiB", backing="thp")
    vm = int(h.create_vms(1, memory="64MiB")[0])
    h.set_memslot(vm, 1, GiB + MiB, 6 * MiB)
    r = h.access(vm, 0, [GiB + MiB, GiB + 2 * MiB + 0x5000, GiB + 4 * MiB, GiB + 6 * MiB + 0x1000], 0)
    assert list(r.outcome) == [bm.FIXED] * 4
    assert _levels(h, vm) == (2, 2, 0)
    # a second page of each edge region needs its own 4K fault; the 2M ones are hits
    r = h.access(vm, 0, [GiB + MiB + 0x1000, GiB + 3 * MiB, GiB + 5 * MiB, GiB + 6 * MiB], 0)
    assert list(r.outcome) == [bm.FIXED, bm.HIT, bm.HIT, bm.FIXED]
    assert _levels(h, vm) == (4, 2, 0)


@pytest.mark.parametrize("backing", ["thp", "hugetlb-2m"])
def test_hva_not_congruent_with_gpa_maps_only_4k(backing):
    # (base_gfn ^ (userspace_addr >> 12)) & 511 != 0 -> every 2M (and 1G) lpage entry disallowed
    h = bm.Host(memory="8GiB", backing=backing)
    vm = int(h.create_vms(1, memory="64MiB")[0])
    h.set_memslot(vm, 1, GiB + 0x1000, 8 * MiB, hva=HVA_BASE + 16 * GiB)
    r = h.access(vm, 0, [GiB + 0x1000 + k * 2 * MiB for k in range(4)], 0)
    assert list(r.outcome) == [bm.FIXED] * 4
    assert _levels(h, vm) == (4, 0, 0)


def test_congruent_but_unaligned_hva_still_maps_2m():
    # only gpa/hva congruence modulo 2M matters, not their absolute alignment
    h = bm.Host(memory="8GiB", backing="thp")
    vm = int(h.create_vms(1, memory="64MiB")[0])
    h.set_memslot(vm, 1, GiB, 8 * MiB, hva=HVA_BASE + 16 * GiB)
    h.access(vm, 0, [GiB + k * 2 * MiB for k in range(4)], 0)
    assert _levels(h, vm) == (0, 4, 0)


def test_hugetlb_1g_maps_1g():
    h = bm.Host(memory="8GiB", backing="hugetlb-1g")
    vm = int(h.create_vms(1, memory="2GiB")[0])
    r = h.access(vm, 0, [0x1000, GiB + 0x5000, 0x40000000 - 4096], 0)
    assert list(r.outcome) == [bm.FIXED, bm.FIXED, bm.HIT]
    assert _levels(h, vm) == (0, 0, 2)
    assert h.stats(vm)["mmu_pages"] == 2                      # root + one PDPT
    assert h.host_memory()[0] == 2 * GiB


def test_hugetlb_1g_limited_by_tdp_huge_page_level():
    h = bm.Host(memory="8GiB", backing="hugetlb-1g", tdp_huge_page_level=2)
    vm = int(h.create_vms(1, memory="1GiB")[0])
    h.access(vm, 0, [0x1000, 0x200000], 0)
    assert _levels(h, vm) == (0, 2, 0)


def test_thp_never_maps_1g():
    h = bm.Host(memory="8GiB", backing="thp")
    vm = int(h.create_vms(1, memory="2GiB")[0])
    r = h.access(vm, 0, [0x1000, GiB + 0x5000, GiB + 0x201000], 0)
    assert list(r.outcome) == [bm.FIXED] * 3
    assert _levels(h, vm) == (0, 3, 0)


def test_4k_backing_maps_only_4k():
    h = bm.Host(memory="8GiB", backing="4k")
    vm = int(h.create_vms(1, memory="2GiB")[0])
    r = h.access(vm, 0, [0x1000, GiB, GiB + 0x200000], 0)
    assert list(r.outcome) == [bm.FIXED] * 3
    assert _levels(h, vm) == (3, 0, 0)


def test_per_slot_backing():
    h = bm.Host(memory="8GiB", backing="4k")
    vm = int(h.create_vms(1, memory="64MiB")[0])
    h.set_memslot(vm, 1, GiB, 4 * MiB, backing="hugetlb-2m")
    h.access(vm, 0, [0x1000, GiB + 0x1000, GiB + 0x201000], 0)
    assert _levels(h, vm) == (1, 2, 0)
