"""Guest memory contents belong to host memory (the hva behind a gpa), as in KVM; the key hash spreads VMs.

Host-side reads and writes go through the memslots (kvm_read_guest / kvm_write_guest); guest page tables are
read the same way by the shadow MMU's walker and by the processor's 2D walk.  MADV_DONTNEED'd anonymous
memory reads back as zeros, swapped memory keeps its data.
"""

import errno

import numpy as np
import pytest
from batchmmu.kernels import gmem as GM
from batchmmu.kernels.state import GMH_KEY, NGMH, GuestMem

import batchmmu as bm

pytestmark = pytest.mark.nojit

MiB = 1 << 20
GiB = 1 << 30
HVA = 1 << 40                     # slot 0 of every VM is mapped here
P, W, U, A, D = 1, 2, 4, 0x20, 0x40


def words(h, vm, gpa, n=1):
    return [int(x) for x in h.read_guest_memory(vm, gpa, n)]


# ----------------------------------------------------------------------------- host side
def test_move_keeps_contents_and_old_gpa_has_none():
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.set_memslot(vm, 1, GiB, 2 * MiB)
    h.write_guest_memory(vm, GiB + 0x1008, [0xDEADBEEF, 7])
    h.set_memslot(vm, 1, 2 * GiB, 2 * MiB)               # a move: same hva, another gpa
    assert words(h, vm, 2 * GiB + 0x1008, 2) == [0xDEADBEEF, 7]
    with pytest.raises(bm.BatchMMUError) as e:            # the old gpa is in no memslot now
        h.read_guest_memory(vm, GiB + 0x1008, 1)
    assert e.value.field == "gpa" and e.value.errno == errno.EFAULT


def test_slot_over_another_hva_is_fresh_memory():
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.set_memslot(vm, 1, GiB, 2 * MiB, hva=HVA + GiB)
    h.write_guest_memory(vm, GiB, [1, 2, 3])
    h.set_memslot(vm, 1, GiB, 0)
    h.set_memslot(vm, 1, GiB, 2 * MiB, hva=HVA + 2 * GiB)  # same gpa, other host memory
    assert words(h, vm, GiB, 3) == [0, 0, 0]
    h.write_guest_memory(vm, GiB, [4])
    h.set_memslot(vm, 1, GiB, 0)                           # the VMM unmaps the memory with the slot ...
    h.set_memslot(vm, 1, GiB, 2 * MiB, hva=HVA + 2 * GiB)  # ... so a new mapping there is zeroed too
    assert words(h, vm, GiB) == [0]


def test_aliased_slots_share_contents():
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.set_memslot(vm, 1, GiB, 2 * MiB, hva=HVA + GiB)
    h.set_memslot(vm, 2, 2 * GiB, 2 * MiB, hva=HVA + GiB)          # one memfd in two slots
    h.set_memslot(vm, 3, 3 * GiB, 1 * MiB, hva=HVA + GiB + MiB)    # a partial overlap of the second MiB
    h.write_guest_memory(vm, GiB + MiB + 8, [0x55])
    assert words(h, vm, 2 * GiB + MiB + 8) == [0x55] and words(h, vm, 3 * GiB + 8) == [0x55]
    h.write_guest_memory(vm, 2 * GiB + 16, [0x66])
    assert words(h, vm, GiB + 16) == [0x66]
    h.set_memslot(vm, 1, GiB, 0)                        # an alias remains: nothing is unmapped
    h.set_memslot(vm, 2, 2 * GiB, 0)                    # the last full alias goes: the overlap stays mapped
    assert words(h, vm, 3 * GiB + 8) == [0x55]
    h.set_memslot(vm, 2, 2 * GiB, 2 * MiB, hva=HVA + GiB)
    assert words(h, vm, 2 * GiB + 16) == [0] and words(h, vm, 2 * GiB + MiB + 8) == [0x55]


def test_unmapped_gpa_is_refused_and_nothing_is_written():
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="4MiB")[0])
    for gpa, n in ((16 * MiB, 1), (4 * MiB - 8, 2)):   # in a hole; straddling the end of slot 0
        with pytest.raises(bm.BatchMMUError) as e:
            h.write_guest_memory(vm, gpa, list(range(1, n + 1)))
        assert (e.value.field, e.value.value, e.value.errno) == ("gpa", 4 * MiB if n == 2 else gpa, errno.EFAULT)
        assert f"{4 * MiB if n == 2 else gpa:#x}" in str(e.value)
    assert words(h, vm, 4 * MiB - 8) == [0]
    with pytest.raises(bm.BatchMMUError, match="no memslot"):
        h.read_guest_memory(vm, 4 * MiB, 1)


def test_gpas_are_bounded_by_maxphyaddr_and_vms_never_alias():
    h = bm.Host(memory="1GiB", backing="4k")
    a, b = (int(v) for v in h.create_vms(2, memory="4MiB", maxphyaddr=36))
    h.write_guest_memory(b, 0, [0x1234])
    for gpa, n in ((1 << 52, 1), (1 << 40, 1), ((1 << 36) - 8, 2), (0, 1 << 61)):
        with pytest.raises(bm.BatchMMUError) as e:
            h.read_guest_memory(a, gpa, n)
        field = "n" if 8 * n > 1 << 36 else "gpa"  # a count larger than the whole space is the count's fault
        assert e.value.field == field and "MAXPHYADDR 36" in str(e.value) and f"{1 << 36:#x}" in str(e.value)
        if n < 8:
            with pytest.raises(bm.BatchMMUError, match="MAXPHYADDR 36"):
                h.write_guest_memory(a, gpa, [1] * n)
    assert words(h, a, 0) == [0] and words(h, b, 0) == [0x1234]


def test_guest_store_to_no_memslot_is_mmio_and_stores_nothing():
    h = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = int(h.create_vms(1, memory="4MiB")[0])
    r = h.store(vm, 0, GiB, 0xABCD)
    assert int(r.outcome[0]) == bm.MMIO
    h.set_memslot(vm, 1, GiB, 2 * MiB)
    assert words(h, vm, GiB) == [0]


# ----------------------------------------------------------------------------- discard and swap
@pytest.mark.parametrize("backing", ["4k", "thp", "hugetlb-2m"])
def test_madv_dontneed_zeroes_anonymous_memory(backing):
    h = bm.Host(memory="1GiB", backing=backing)
    vm = int(h.create_vms(1, memory="4MiB")[0])
    pages = [0, 1, 2, 3, 600]
    for p in pages:
        h.write_guest_memory(vm, p << 12, [p + 1])
    h.discard_hva_range(vm, HVA + 0x1000, HVA + 0x3000)        # pages 1 and 2
    kept = [p + 1 for p in pages] if backing == "hugetlb-2m" else [1, 0, 0, 4, 601]  # a 2M page goes whole only
    assert [words(h, vm, p << 12)[0] for p in pages] == kept
    h.discard_hva_range(vm, HVA, HVA + 2 * MiB)
    assert [words(h, vm, p << 12)[0] for p in pages] == [0, 0, 0, 0, 601]


def test_gm_discard_slots_zeroes_the_madvised_pages():
    from batchmmu.kernels.gmem import gm_discard_slots
    from batchmmu.kernels.reclaim import madvise_dontneed
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.write_guest_memory(vm, 0x5000, [9])
    h.write_guest_memory(vm, 0x9000, [10])
    recs, p0, p1 = np.zeros(1, np.int64), np.array([5], np.int64), np.array([6], np.int64)
    madvise_dontneed(h._mmu_bundle(), vm, np.stack([recs, p0, p1]))
    assert gm_discard_slots(h.gm, h.st, vm, recs, p0, p1) == 1
    assert words(h, vm, 0x5000) == [0] and words(h, vm, 0x9000) == [10]


def test_swapped_memory_keeps_its_data():
    # a guard (it held before contents moved to host memory): reclaim to swap and a refault keep the data
    h = bm.Host(memory="64MiB", backing="4k", overcommit=True)
    vm = int(h.create_vms(1, memory="1MiB")[0])
    h.write_guest_memory(vm, 0, np.arange(1, 513, dtype=np.uint64))
    h.write_guest_memory(vm, 0x1000, [77])
    h.reclaim_scan()
    assert int(h.reclaim_evict(0, [256])[vm]) == 2      # the two pages the VMM touched
    assert h.host_pages(vm, 0)["swapped"][:2].all()
    assert words(h, vm, 0, 512) == list(range(1, 513)) and words(h, vm, 0x1000) == [77]
    h.access(vm, 0, [0, 0x1000], bm.ACC_WRITE)                 # major faults: swapped in
    assert h.stats(vm)["host_major_faults"] == 2
    assert words(h, vm, 0x1000) == [77]


# ----------------------------------------------------------------------------- guest page tables
TBL = GiB             # the guest's tables live in slot 1


def tables(h, vm, where, base):
    """A long-mode identity map of gva [0, 2 MiB) with its 4 tables at gpa ``base``, written at gpa ``where``."""
    nl = P | W | U | A
    h.write_guest_memory(vm, where, [(base + 0x1000) | nl])
    h.write_guest_memory(vm, where + 0x1000, [(base + 0x2000) | nl])
    h.write_guest_memory(vm, where + 0x2000, [(base + 0x3000) | nl])
    h.write_guest_memory(vm, where + 0x3000, [(i << 12) | P | W | U for i in range(512)])


def paging_guest(mmu):
    h = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = int(h.create_vms(1, memory="4MiB", mmu=mmu)[0])
    h.touch_host_memory(vm, 0, 4 * MiB)
    h.set_memslot(vm, 1, TBL, 2 * MiB, hva=HVA + GiB)
    return h, vm


def enter(h, vm, cr3):
    h.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=cr3)
    return int(h.access(vm, 0, 0x5000, bm.ACC_WRITE | bm.ACC_USER).outcome[0])


@pytest.mark.parametrize("mmu", ["shadow", "tdp"])
def test_walkers_read_tables_through_an_alias(mmu):
    h, vm = paging_guest(mmu)
    h.set_memslot(vm, 2, 2 * GiB, 2 * MiB, hva=HVA + GiB)
    tables(h, vm, 2 * GiB, TBL)                       # written through the alias, walked at TBL
    assert enter(h, vm, TBL) != bm.GUEST_FAULT
    assert words(h, vm, 2 * GiB + 0x3000 + 8 * 5)[0] & (A | D) == A | D   # the walker's A/D, seen via the alias


@pytest.mark.parametrize("mmu", ["shadow", "tdp"])
def test_walkers_follow_a_moved_table_slot(mmu):
    h, vm = paging_guest(mmu)
    tables(h, vm, TBL, 3 * GiB)                       # tables that will be at 3 GiB
    h.set_memslot(vm, 1, 3 * GiB, 2 * MiB)
    assert enter(h, vm, 3 * GiB) != bm.GUEST_FAULT


@pytest.mark.parametrize("mmu", ["shadow", "tdp"])
def test_walkers_do_not_see_a_replaced_slots_tables(mmu):
    h, vm = paging_guest(mmu)
    tables(h, vm, TBL, TBL)
    assert enter(h, vm, TBL) != bm.GUEST_FAULT
    h.set_memslot(vm, 1, TBL, 0)
    h.set_memslot(vm, 1, TBL, 2 * MiB, hva=HVA + 2 * GiB)
    h.set_vcpu_regs(vm, 0, cr3=TBL + 0x1000)          # a CR3 load: no cached translation survives
    assert enter(h, vm, TBL) == bm.GUEST_FAULT


# ----------------------------------------------------------------------------- the key table
def test_hash_spreads_vms():
    """Probes per lookup stay near 1 with many VMs (the old hash folded the VM id to bit 11: ~350 at 64)."""
    mem = 16 * MiB
    h = bm.Host(memory=64 * mem + GiB, backing="4k")
    vms = h.create_vms(64, memory=mem)
    for vm in vms.tolist():
        tables(h, vm, 0x10000, 0x10000)
        h.write_guest_memory(vm, 0x14000, [(i << 12) | P for i in range(4096)])   # 8 PT pages
    key = h.gm.key
    mask = key.size - 1
    occ = np.flatnonzero(key != -1)
    probes = np.array([((int(i) - int(GM.gm_hash(int(key[i]), mask))) & mask) + 1 for i in occ])
    assert occ.size == 64 * 12 and probes.mean() < 1.5 and probes.max() <= 12


def _table(rows=8, hcap=32):
    ht = np.zeros((hcap, NGMH), np.int64)
    ht[:, GMH_KEY] = -1
    return GuestMem(hash=ht, page=np.zeros((rows, 512), np.int64), free=np.zeros(rows, np.int64),
                    ctl=np.zeros(GM.NGMCTL, np.int64))


def test_removal_keeps_every_other_key_findable():
    rng = np.random.default_rng(1)
    for _ in range(30):
        gm = _table()
        model = {}
        for _ in range(60):
            if len(model) < 8 and rng.random() < 0.6:
                k = int(rng.integers(0, 40)) | (int(rng.integers(0, 3)) << GM.GM_VM_SHIFT)
                r = int(GM.gm_get_or_add(gm, np.int64(k)))
                gm.page[r, 0] = k + 1
                model[k] = k + 1
            else:
                k0 = int(rng.integers(0, 40)) | (int(rng.integers(0, 3)) << GM.GM_VM_SHIFT)
                k1 = k0 + int(rng.choice([1, 3, 40]))          # per-key removal and the table scan
                gone = [k for k in model if k0 <= k < k1]
                assert int(GM.gm_drop_range(gm, np.int64(k0), np.int64(k1))) == len(gone)
                for k in gone:
                    del model[k]
            assert int(gm.ctl[GM.GM_KEYS]) == len(model) == int((gm.key != -1).sum())
            for k, v in model.items():
                r = int(GM.gm_find(gm.hash, np.int64(k)))
                assert r >= 0 and gm.page[r, 0] == v
            used = sorted(int(gm.row[i]) for i in np.flatnonzero(gm.key != -1))
            free = sorted(gm.free[:gm.ctl[GM.GM_NFREE]].tolist())
            assert sorted(used + free) == list(range(int(gm.ctl[GM.GM_USED])))   # no row lost or shared


@pytest.mark.nojit
@pytest.mark.parametrize("size", [4, 8])
def test_prefetch_group_read_matches_entry_by_entry_reads(size):
    """gm_read_group (one lookup for the 8 gptes of a prefetch group, through the walker's table-row cache)
    reads what gm_read32/gm_read64 read entry by entry: written pages, a never-written page (zeros), both
    halves of 8-byte words; the second read of a group comes from the cache."""
    from batchmmu.kernels.guest_walk import WKC_END, walk_table_row
    from numba import njit

    wk = np.full(WKC_END, -1, np.int64)

    @njit
    def group(gm, sm, vm, base, size, out, wk):
        GM.gm_read_group(gm, walk_table_row(gm, sm, vm, base, wk, 1), base, size, 8, out, 3)

    @njit
    def one(gm, sm, vm, gpa, size):
        return GM.gm_read32(gm, sm, vm, gpa) if size == 4 else GM.gm_read64(gm, sm, vm, gpa)

    h = bm.Host(memory=64 << 20)
    vm = int(h.create_vms(1, memory=8 << 20)[0])
    rng = np.random.default_rng(size)
    h.write_guest_memory(vm, 0x5000, rng.integers(-(1 << 63), 1 << 63, 512, dtype=np.int64))
    for base in (0x5000, 0x5000 + 64 * 5 + (32 if size == 4 else 0), 0x5FC0, 0x9000):   # 0x9000: never written
        base &= ~(size * 8 - 1)
        want = [one(h.gm, h._slot_map(), vm, base + size * i, size) for i in range(8)]
        for _ in range(2):
            out = np.full(12, -7, np.int64)
            group(h.gm, h._slot_map(), vm, base, size, out, wk)
            assert out[3:11].tolist() == want and out[:3].tolist() == [-7] * 3 and out[11] == -7
    assert any(out[3:11]) is False
