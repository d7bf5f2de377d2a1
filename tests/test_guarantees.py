"""Security and data guarantees (docs/guarantees.md), one directed test per defect of issue 15:
read-only memslots stay read-only under shadow prefetch, nothing maps an hva under an MMU-notifier
invalidation (memslot changes are refused meanwhile, huge mappings and huge-page recovery stay clear of
it), every write reaches the dirty ring on shadow VMs, and host out-of-memory errors say exactly what
took effect.  tests/test_invariant_fuzz.py checks the same properties on random sequences."""

import numpy as np
import pytest
from invariant_fuzz import HVA1, PML4, SLOT1, WINDOWS, VMState, _identity_tables, check, leaves

import batchmmu as bm

MiB, GiB = 1 << 20, 1 << 30
G = WINDOWS[0]


def shadow_vm(h, vcpus=1, huge=False):
    """A shadow-MMU VM with an identity map of slot 0 and of the [1G, 1G+4M) and [2G, 2G+4M) windows."""
    vm = int(h.create_vms(1, memory=16 * MiB, vcpus=vcpus, mmu="shadow")[0])
    _identity_tables(h, vm, huge_windows=huge)
    for c in range(vcpus):
        h.set_vcpu_regs(vm, c, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=PML4)
    return vm


def outcome(res):
    return [bm.OUTCOME_NAMES[int(o)] for o in res.outcome]


# ----------------------------------------------------------------------------- 1: read-only slots
def test_shadow_prefetch_never_maps_a_read_only_slot():
    h = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = shadow_vm(h)
    h.set_memslot(vm, 1, G, SLOT1, flags=bm.MEM_READONLY, hva=HVA1[0])
    h.touch_host_memory(vm, G, SLOT1)                      # the neighbours are resident: prefetchable
    before = h.read_guest_memory(vm, G + 0x1000, 1)[0]
    assert outcome(h.access(vm, 0, G, bm.ACC_USER)) == ["FIXED"]
    # KVM: kvm_prefetch_pages fails for a read-only slot, so only the faulting page is mapped
    assert [gfn for gfn, _, _ in leaves(h, vm) if gfn >= G >> 12] == [G >> 12]
    res = h.store(vm, 0, G + 0x1000, 0xDEAD, kind=bm.ACC_WRITE | bm.ACC_USER)
    assert outcome(res) == ["EMULATED"]                    # the write exits to userspace (MMIO-like)
    assert h.read_guest_memory(vm, G + 0x1000, 1)[0] == before
    check(VMState(h, vm, "shadow", "get", None), [])


# ----------------------------------------------------------------------------- 4: memslots vs invalidations
@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_memslot_changes_wait_for_invalidations(mmu):
    h = bm.Host(memory="1GiB", backing="4k")
    vm = shadow_vm(h) if mmu == "shadow" else int(h.create_vms(1, memory=16 * MiB)[0])
    h.set_memslot(vm, 1, G, SLOT1, hva=HVA1[0])
    h.invalidate_range_start(vm, HVA1[0], HVA1[0] + 0x1000)
    slots, gen = h.memslots(vm), h.memslots_generation(vm)
    for args, kw in [((1, WINDOWS[1], SLOT1), {}),                        # move
                     ((2, WINDOWS[1], SLOT1), {"hva": HVA1[0]}),          # a new alias of the hva
                     ((1, G, SLOT1), {"flags": bm.MEM_LOG_DIRTY_PAGES}),  # flags
                     ((1, G, 0), {})]:                                    # delete
        with pytest.raises(bm.InvalidationInProgress) as e:
            h.set_memslot(vm, *args, **kw)
        assert e.value.field == "vm" and isinstance(e.value, bm.BatchMMUError)
        assert h.memslots(vm) == slots and h.memslots_generation(vm) == gen
    h.set_memslot(vm, 1, G, SLOT1)                         # no change: nothing to wait for
    h.invalidate_range_end(vm)
    h.set_memslot(vm, 2, WINDOWS[1], SLOT1, hva=HVA1[0])
    assert h.access(vm, 0, WINDOWS[1], bm.ACC_USER).outcome[0] == bm.FIXED


# ----------------------------------------------------------------------------- 5: huge pages vs invalidations
@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_a_huge_mapping_never_covers_an_hva_under_invalidation(mmu):
    h = bm.Host(memory="1GiB", backing="thp", mmio_caching=False)
    vm = shadow_vm(h, huge=True) if mmu == "shadow" else int(h.create_vms(1, memory=16 * MiB)[0])
    h.set_memslot(vm, 1, G, SLOT1, hva=HVA1[0])
    h.touch_host_memory(vm, G, SLOT1)
    st = VMState(h, vm, mmu, "get", None)
    st.invals = [(HVA1[0] + 0x5000, HVA1[0] + 0x6000)]
    h.invalidate_range_start(vm, *st.invals[0])
    assert h.access(vm, 0, G + 0x5000, bm.ACC_USER).outcome[0] == bm.RETRY
    assert h.access(vm, 0, G + 0x100000, bm.ACC_USER).outcome[0] == bm.FIXED
    check(st, [])                                          # 4K, not a 2M page over [0x5000, 0x6000)
    assert {lv for gfn, lv, _ in leaves(h, vm) if gfn >= G >> 12} == {1}
    assert h.access(vm, 0, G + 0x200000, bm.ACC_USER).outcome[0] == bm.FIXED  # the next 2M: huge
    assert {lv for gfn, lv, _ in leaves(h, vm) if gfn >= (G + 0x200000) >> 12} == {2}
    h.invalidate_range_end(vm)


def test_huge_page_recovery_waits_for_invalidations():
    h = bm.Host(memory="1GiB", backing="thp")
    vm = int(h.create_vms(1, memory=16 * MiB)[0])
    h.set_memslot(vm, 1, G, SLOT1, flags=bm.MEM_LOG_DIRTY_PAGES, hva=HVA1[0])
    h.access(vm, 0, G + 4096 * np.arange(1024), bm.ACC_WRITE)      # logging: 4K mappings
    st = VMState(h, vm, "tdp", "get", None)
    st.invals = [(HVA1[0] + 0x3000, HVA1[0] + 0x4000)]
    h.invalidate_range_start(vm, *st.invals[0])
    with pytest.raises(bm.InvalidationInProgress):      # logging off would recover 2M pages over it
        h.set_memslot(vm, 1, G, SLOT1, flags=0)
    check(st, [])
    h.invalidate_range_end(vm)
    h.set_memslot(vm, 1, G, SLOT1, flags=0)
    assert {lv for gfn, lv, _ in leaves(h, vm) if gfn >= G >> 12} == {2}


# ----------------------------------------------------------------------------- 7: dirty ring on every MMU
@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_every_write_reaches_the_dirty_ring(mmu):
    h = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = shadow_vm(h) if mmu == "shadow" else int(h.create_vms(1, memory=16 * MiB)[0])
    h.enable_dirty_ring(vm, 128)
    h.set_memslot(vm, 1, G, SLOT1, flags=bm.MEM_LOG_DIRTY_PAGES, hva=HVA1[0])
    pages = np.arange(8) * 3
    res = h.access(vm, 0, G + pages * 4096, bm.ACC_WRITE | bm.ACC_USER)
    assert outcome(res) == ["FIXED"] * 8
    assert sorted(h.harvest_dirty_ring(vm, 0).tolist()) == [[1, int(p)] for p in pages]
    assert h.reset_dirty_rings(vm) == 8                    # re-protected: the next writes log again
    res = h.access(vm, 0, G + pages * 4096, bm.ACC_WRITE | bm.ACC_USER)
    assert sorted(h.harvest_dirty_ring(vm, 0).tolist()) == [[1, int(p)] for p in pages]


def test_shadow_ring_full_stops_the_vcpu():
    h = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = shadow_vm(h)
    h.enable_dirty_ring(vm, 128)                           # soft limit 128 - 64 = 64
    h.set_memslot(vm, 1, G, SLOT1, flags=bm.MEM_LOG_DIRTY_PAGES, hva=HVA1[0])
    res = h.access(vm, 0, G + 4096 * np.arange(0, 700, 10), bm.ACC_WRITE | bm.ACC_USER)
    assert (res.outcome == bm.RING_FULL).sum() == 6 and h.stats(vm)["dirty_ring_full"] == 6
    assert len(h.harvest_dirty_ring(vm, 0)) == 64


@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_the_dirty_ring_is_enabled_before_the_vcpus_run(mmu):
    h = bm.Host(memory="1GiB", backing="4k")
    vm = shadow_vm(h) if mmu == "shadow" else int(h.create_vms(1, memory=16 * MiB)[0])
    h.access(vm, 0, 0x400000, bm.ACC_USER)
    with pytest.raises(bm.BatchMMUError) as e:
        h.enable_dirty_ring(vm, 128)
    assert e.value.errno == 22


# ----------------------------------------------------------------------------- 9: out of host memory
def test_a_mixed_batch_out_of_memory_says_which_events_ran():
    h = bm.Host(memory="1MiB", backing="4k")               # 256 host pages, ~20 of them for page tables
    shv = shadow_vm(h)
    vms = h.create_vms(2, memory=16 * MiB)
    vm_a = np.array([shv, int(vms[0]), shv, int(vms[1])] * 100)
    addr = np.repeat(np.arange(100) * 4096 + 0x400000, 4)
    with pytest.raises(bm.HostMemoryExhausted) as e:
        h.access(vm_a, 0, addr, 0)
    ex = e.value
    assert ex.applied.shape == vm_a.shape and 0 < ex.applied.sum() < vm_a.size
    # what ran is exactly what the stats count
    for vm in (shv, int(vms[0]), int(vms[1])):
        assert h.stats(vm)["accesses"] == int(ex.applied[vm_a == vm].sum())
    assert (ex.outcome[~ex.applied] == 0).all()


def test_store_out_of_memory_keeps_the_values_of_the_stores_that_ran():
    h = bm.Host(memory="64KiB", backing="4k")              # 16 host pages
    vm = int(h.create_vms(1, memory=16 * MiB)[0])
    addr = np.arange(40) * 4096 + 8
    with pytest.raises(bm.HostMemoryExhausted) as e:
        h.store(vm, 0, addr, np.arange(40) + 100)
    ran = np.nonzero(e.value.applied)[0]
    assert ran.size == 16 and (e.value.outcome[ran] == bm.FIXED).all()
    got = [int(h.read_guest_memory(vm, int(a), 1)[0]) for a in addr[:20]]
    assert got == [100 + i if i < 16 else 0 for i in range(20)]


def test_write_guest_memory_out_of_memory_changes_nothing():
    h = bm.Host(memory="64KiB", backing="4k")
    vm = int(h.create_vms(1, memory=16 * MiB)[0])
    used = h.host_memory()
    with pytest.raises(bm.HostMemoryExhausted):
        h.write_guest_memory(vm, 0, np.arange(512 * 20))
    assert h.host_memory() == used
    assert not h.read_guest_memory(vm, 0, 512 * 20).any()
