"""Host-side work on shadow-MMU VMs: the shadow-page budget (n_max_mmu_pages, mmu_recycled), the
shrinker, MMU-notifier invalidation and aging through the rmaps, and the footprint categories."""

import numpy as np
import pytest
from test_shadow import CODE, PS, A, D, P, U, W, run3

import batchmmu as bm

pytestmark = pytest.mark.nojit


def guest(host, mem, ad=True):
    """A long-mode guest mapping ``mem`` bytes 1:1 with 4K pages; tables from 0x10000."""
    vm = int(host.create_vms(1, memory=mem, mmu="shadow")[0])
    npt = mem >> 21
    flags = P | W | U | (A | D if ad else 0)
    host.write_guest_memory(vm, 0x10000, [0x11000 | P | W | U | A])
    host.write_guest_memory(vm, 0x11000, [(0x12000 + k * 0x1000) | P | W | U | A for k in range(max(1, npt // 512))])
    pts = 0x1000000  # page tables at 16 MiB, out of the way
    for k in range(max(1, npt // 512)):
        host.write_guest_memory(vm, 0x12000 + k * 0x1000,
                                [(pts + (k * 512 + i) * 0x1000) | P | W | U | A for i in range(min(512, npt))])
    words = ((np.arange(npt * 512, dtype=np.uint64) << np.uint64(12)) | np.uint64(flags))
    host.write_guest_memory(vm, pts, words)
    host.touch_host_memory(vm, 0, mem)
    host.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=0x10000)
    return vm


def test_default_budget_and_recycling():
    host = bm.Host(memory="2GiB", backing="4k")
    vm = guest(host, 512 << 20)
    # n_max = max(pages / 50, 64): 131072 / 50
    assert host.footprint(vm)["shadow_page_tables"] == 0
    host.set_nr_mmu_pages(vm, 64)
    # one read in each of 200 2 MiB regions: 200 last-level shadow pages are needed, 64 allowed
    gvas = (32 << 20) + (np.arange(200) << 21)
    r = run3(host, vm, gvas)
    assert (r.outcome == bm.FIXED).all()
    s = host.stats(vm)
    assert s["mmu_pages"] <= 64
    assert s["mmu_recycled"] > 0
    # every page created is either still there or was recycled
    assert s["mmu_cache_miss"] - s["mmu_recycled"] == s["mmu_pages"]
    # recycled pages took their SPTEs with them
    assert s["pages_4k"] < 8 * 201
    # the translation is rebuilt on demand
    r = run3(host, vm, gvas[:5])
    assert (r.outcome != bm.GUEST_FAULT).all()


def test_budget_shrinks_when_set_below_use():
    host = bm.Host(memory="2GiB", backing="4k")
    vm = guest(host, 512 << 20)
    run3(host, vm, (32 << 20) + (np.arange(150) << 21))
    used = host.stats(vm)["mmu_pages"]
    assert used > 100
    host.set_nr_mmu_pages(vm, 100)  # kvm_mmu_change_mmu_pages zaps the oldest down to the goal
    s = host.stats(vm)
    assert s["mmu_pages"] == 100 and s["mmu_recycled"] == used - 100
    with pytest.raises(bm.BatchMMUError, match="n"):
        host.set_nr_mmu_pages(vm, 10)


def test_shrinker_takes_one_vm_per_scan_and_rotates():
    host = bm.Host(memory="4GiB", backing="4k")
    a = guest(host, 256 << 20)
    b = guest(host, 256 << 20)
    for vm in (a, b):
        run3(host, vm, (32 << 20) + (np.arange(40) << 21))
    before = {vm: host.stats(vm)["mmu_pages"] for vm in (a, b)}
    assert host.shrink_count() == sum(before.values())
    assert host.shrink(10) == 10
    assert host.stats(a)["mmu_pages"] == before[a] - 10 and host.stats(b)["mmu_pages"] == before[b]
    assert host.shrink(10) == 10  # VM a went to the tail of vm_list
    assert host.stats(b)["mmu_pages"] == before[b] - 10
    assert host.stats(a)["mmu_recycled"] == 10 and host.stats(b)["mmu_recycled"] == 10
    assert host.shrink(5, mode="caches") == 0
    assert host.shrink_count() == sum(before.values()) - 20


def test_invalidate_and_age_through_rmaps():
    host = bm.Host(memory="2GiB", backing="4k")
    vm = guest(host, 64 << 20)
    hva0 = host.memslots(vm)[0]["hva"]
    data = 32 << 20
    run3(host, vm, data + 4096 * np.arange(64))
    young = host.test_young(vm, hva0 + data, hva0 + data + (64 << 12))
    assert young.all()
    assert host.age_hva_range(vm, hva0 + data, hva0 + data + (64 << 12)).all()
    assert not host.test_young(vm, hva0 + data, hva0 + data + (64 << 12)).any()
    run3(host, vm, data + 4096 * np.arange(0, 64, 2))
    young = host.test_young(vm, hva0 + data, hva0 + data + (64 << 12))
    assert young[::2].all() and not young[1::2].any()
    before = host.stats(vm)["pages_4k"]
    zapped = host.invalidate_hva_range(vm, hva0 + data, hva0 + data + (16 << 12))
    assert zapped == 16 and host.stats(vm)["pages_4k"] == before - 16
    r = run3(host, vm, data + 4096 * np.arange(16))
    assert (r.outcome == bm.FIXED).sum() == 2  # two prefetch groups of 8 refault


def test_footprint_categories_of_a_shadow_vm():
    host = bm.Host(memory="2GiB", backing="4k")
    vm = guest(host, 64 << 20)
    run3(host, vm, (32 << 20) + 4096 * np.arange(1000))
    f = host.footprint(vm)
    s = host.stats(vm)
    assert f["shadow_page_tables"] == 4096 * s["mmu_pages"] and f["tdp_page_tables"] == 0
    assert f["shadowed_translation"] == 4096 * s["mmu_pages"]  # every page has gptes here
    pages = (64 << 20) >> 12
    assert f["rmaps"] == 8 * (pages + pages // 512 + 1)      # heads at 4K, 2M, 1G
    assert f["write_track"] == 2 * pages
    assert f["kvm_total"] > f["shadow_page_tables"]


def test_huge_guest_pages_map_2m_with_thp_except_over_shadowed_tables():
    host = bm.Host(memory="2GiB", backing="thp")
    vm = int(host.create_vms(1, memory=64 << 20, mmu="shadow")[0])
    host.write_guest_memory(vm, 0x10000, [0x11000 | P | W | U | A])
    host.write_guest_memory(vm, 0x11000, [0x12000 | P | W | U | A])
    host.write_guest_memory(vm, 0x12000, [(i << 21) | P | W | U | A | D | PS for i in range(32)])
    host.touch_host_memory(vm, 0, 64 << 20)
    host.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=0x10000)
    host.access(vm, 0, 32 << 20, bm.ACC_USER)
    assert host.stats(vm)["pages_2m"] == 1
    # the first 2 MiB hold the guest's page tables: shadowed gfns disallow a huge mapping there
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)
    s = host.stats(vm)
    assert s["pages_2m"] == 1 and s["pages_4k"] >= 1


def _shadow_fleet(memory="1GiB"):
    h = bm.Host(memory=memory, backing="4k")
    vms = [guest(h, 32 << 20, ad=ad) for ad in (True, False, True)]
    nonpaging = int(h.create_vms(1, memory=8 << 20, mmu="shadow")[0])   # CR0.PG=0 after RESET
    return h, vms + [nonpaging]


def test_interleaved_shadow_batch_equals_each_vm_alone():
    """A batch that interleaves shadow-MMU VMs runs VM by VM (each VM's events in order): results in the
    caller's order, statistics, SPTEs and guest memory equal those of each VM's events alone."""
    rng = np.random.default_rng(11)
    n = 1500
    h1, vms = _shadow_fleet()
    h2, _ = _shadow_fleet()
    ev_vm = rng.choice(np.array(vms), n)
    addr = rng.integers(0, (8 << 20) // 8, n) * 8
    kind = rng.choice(np.array([0, bm.ACC_WRITE, bm.ACC_USER, bm.ACC_WRITE | bm.ACC_USER]), n)
    value = rng.integers(0, 1 << 62, n)
    for op in ("access", "store"):
        res = h1.access(ev_vm, 0, addr, kind) if op == "access" else h1.store(ev_vm, 0, addr, value)
        for v in vms:
            sel = ev_vm == v
            r = h2.access(v, 0, addr[sel], kind[sel]) if op == "access" else h2.store(v, 0, addr[sel], value[sel])
            np.testing.assert_array_equal(res.outcome[sel], r.outcome)
            np.testing.assert_array_equal(res.error_code[sel], r.error_code)
    for v in vms:
        assert h1.stats(v) == h2.stats(v)
        assert h1.spte_dump(v) == h2.spte_dump(v)
        np.testing.assert_array_equal(h1.read_guest_memory(v, 0, (8 << 20) // 8),
                                      h2.read_guest_memory(v, 0, (8 << 20) // 8))
    assert h1.stats()["pf_fixed"].sum() > 0


def test_budget_exhausted_in_an_interleaved_shadow_batch_applies_vm_by_vm():
    h = bm.Host(memory="64KiB", backing="4k")                            # 16 host pages
    v0, v1 = (int(v) for v in h.create_vms(2, memory="1MiB", mmu="shadow"))   # paging off
    vms = np.array([v1, v0] * 10)
    addrs = np.repeat(np.arange(10) * 0x10000, 2)                        # 64 KiB apart: no prefetched neighbour
    with pytest.raises(bm.HostMemoryExhausted) as ei:
        h.access(vms, 0, addrs, bm.ACC_WRITE)
    for v, k in ((v0, 10), (v1, 6)):
        assert h.stats(v)["pf_fixed"] == k
    assert list(ei.value.applied) == [True, True] * 6 + [False, True] * 4


@pytest.mark.parametrize("kinds", [("shadow", "shadow"), ("legacy", "legacy"), ("tdp", "tdp"), ("tdp", "shadow"),
                                   ("legacy", "shadow")])
def test_direct_reclaim_batches_run_in_the_callers_order(kinds):
    """With overcommit=True a fault that finds the host full evicts pages of every VM, so a batch runs in the
    caller's order, across VMs and MMUs: the same as its events one at a time."""
    def fleet():
        h = bm.Host(memory="64KiB", backing="4k", overcommit=True, tdp_mmu="legacy" not in kinds)
        return h, [int(h.create_vms(1, memory="1MiB", **({"mmu": "shadow"} if k == "shadow" else {}))[0])
                   for k in kinds]
    h1, vms = fleet()
    h2, _ = fleet()
    rng = np.random.default_rng(3)
    n = 60
    vm = rng.choice(np.array(vms), n)
    addr = rng.integers(0, 24, n) * 0x10000 % (1 << 20)
    kind = rng.choice(np.array([0, bm.ACC_WRITE]), n)
    r1 = h1.access(vm, 0, addr, kind)
    r2 = [h2.access(int(v), 0, int(a), int(k)) for v, a, k in zip(vm, addr, kind, strict=True)]
    assert r1.outcome.tolist() == [int(r.outcome[0]) for r in r2]
    assert r1.error_code.tolist() == [int(r.error_code[0]) for r in r2]
    for v in vms:
        assert h1.stats(v) == h2.stats(v)
    assert sum(h1.stats(v)["host_pages_reclaimed"] for v in vms) > 0
