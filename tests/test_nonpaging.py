"""Shadow-MMU guests with paging off (CR0.PG=0: real mode, boot code, unpaged test guests): KVM's nonpaging
context maps gpas through direct shadow pages behind four PAE roots (mmu_alloc_direct_roots), faults take
nonpaging_page_fault -> direct_page_fault (fast_page_fault, direct_map, direct_pte_prefetch).  Checked against
the reference model (tests/reference/shadow_model.py) and against a TDP VM running the same unpaged guest."""

import numpy as np
import pytest
from reference.shadow_model import RefShadowHost
from test_shadow_reference_diff import COMPARED, RngDraw, run_stream, twin

import batchmmu as bm

MiB = 1 << 20
RESET = dict(cr0=0x60000010, cr4=0, efer=0)        # CR0 after RESET: paging (and protection) off


def pair(memory=32 * MiB, backing="4k"):
    """A shadow VM with paging off in a Host and in the model, host memory resident."""
    h = bm.Host(memory="1GiB", backing=backing, mmio_caching=False)
    vm = int(h.create_vms(1, memory=memory, mmu="shadow")[0])
    m = RefShadowHost(memory, backing)
    h.touch_host_memory(vm, 0, memory)
    m.touch_host_memory(0, memory)

    def both(name, *args, **kw):
        a = getattr(h, name)(vm, 0, *args, **kw) if name not in ("set_memslot", "get_dirty_log") \
            else getattr(h, name)(vm, *args, **kw)
        b = getattr(m, name)(*args, **kw)
        if name in ("access", "store", "emulated_access"):
            a = (int(a.outcome[0]), int(a.error_code[0]))
        assert a == b if name != "get_dirty_log" else [int(x) for x in a] == b, (name, args, a, b)
        hs, ms = {k: h.stats(vm)[k] for k in COMPARED}, {k: m.stats()[k] for k in COMPARED}
        assert hs == ms, (name, args, {k: (hs[k], ms[k]) for k in hs if hs[k] != ms[k]})
        return a
    return h, vm, m, both


@pytest.mark.nojit
def test_gpas_map_through_four_direct_roots_and_prefetch_their_neighbours():
    h, vm, m, both = pair()
    assert both("access", 0x5000, 0) == (bm.FIXED, 0)
    s = h.stats(vm)
    assert s["mmu_pages"] == 5 and s["mmu_cache_miss"] == 5     # 4 level-2 roots (one per GiB) + a PT
    assert s["pages_4k"] == 8                                    # the fault and 7 prefetched neighbours
    assert both("access", 0x5000, bm.ACC_WRITE) == (bm.HIT, 0)    # ACC_ALL: mapped writable
    assert both("access", 0x7008, bm.ACC_FETCH | bm.ACC_USER) == (bm.HIT, 0)
    both("store", 0x5ff8, 0x1122334455667788)
    both("store", 0x6ffc, 0x0102030405060708)                     # crosses into the next page
    assert [int(x) for x in h.read_guest_memory(vm, 0x6ff8, 2)] == m.read_guest_memory(0x6ff8, 2)
    assert both("access", 0x40000000, 0)[0] == bm.MMIO             # no memslot there: emulated MMIO
    both("invlpg", 0x5000)
    both("mov_cr3", 0x1000)                                       # CR3 is unused, roots are reloaded
    assert both("access", 0x5000, bm.ACC_WRITE) == (bm.HIT, 0)


@pytest.mark.parametrize("backing", ["thp", "hugetlb-1g"])
def test_huge_pages_with_paging_off_are_2m_at_most(backing):
    """nonpaging_page_fault sets max_level = PG_LEVEL_2M: the PAE-shaped tables have no 1G leaves."""
    h = bm.Host(memory="4GiB", backing=backing, mmio_caching=False)
    vm = int(h.create_vms(1, memory="1GiB", mmu="shadow", backing=backing)[0])
    res = h.access(vm, 0, np.arange(0, 1 << 30, 2 * MiB, dtype=np.int64), 0)
    assert (res.outcome == bm.FIXED).all()
    s = h.stats(vm)
    assert s["pages_2m"] == 512 and s["pages_1g"] == 0 and s["pages_4k"] == 0


def test_dirty_logging_with_paging_off_fixes_writes_in_the_fast_path():
    h, vm, m, both = pair(memory=8 * MiB)
    for gpa in range(0, 64 << 12, 0x1000):
        both("access", gpa, bm.ACC_WRITE)
    both("set_memslot", 0, 0, 8 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    assert both("access", 0x3000, bm.ACC_WRITE) == (bm.FIXED, bm.ACC_WRITE | 1)
    assert h.stats(vm)["pf_fast"] == 1
    assert both("access", 0x3008, bm.ACC_WRITE) == (bm.HIT, 0)
    log = both("get_dirty_log", 0)
    assert [int(x) for x in log][0] == 1 << 3


def test_paging_off_and_on_again_against_the_model():
    """A 4-level guest runs, turns paging off (its table frames stay write-tracked by their shadow pages, so a
    write to one is emulated), writes data and tables by gpa, and turns paging back on."""
    g = twin(mode="4level")
    for gva in (0x100000, 0x400000, 0x401000):
        g.both("access", gva, bm.ACC_USER | bm.ACC_WRITE)
    regs = g.h.vcpu_regs(g.vm, 0)
    g.both("set_vcpu_regs", cr0=regs["cr0"] & ~(1 << 31), efer=regs["efer"] & ~0x500)
    a, b = g.both("access", g.roots[0] + 8, bm.ACC_WRITE)          # the guest's PML4 page: write-tracked
    assert a == b and a[0] == bm.EMULATED
    for args in ((0x400000, bm.ACC_WRITE), (0x800000, 0), (0x401000, bm.ACC_WRITE | bm.ACC_USER)):
        a, b = g.both("access", *args)
        assert a == b, (args, a, b)
    g.both("set_vcpu_regs", **{k: regs[k] for k in ("cr0", "cr3", "cr4", "efer")})
    for gva in (0x100000, 0x400000, 0x402000):
        a, b = g.both("access", gva, bm.ACC_USER | bm.ACC_WRITE)
        assert a == b, (gva, a, b)
    hs, ms = g.stats()
    assert hs == ms, {k: (hs[k], ms[k]) for k in hs if hs[k] != ms[k]}


@pytest.mark.parametrize("seed", range(4))
def test_streams_that_turn_paging_off_and_on(seed):
    """The random streams of test_shadow_reference_diff toggle CR0.PG in about one step in 40; these seeds
    run long enough for several nonpaging stretches in each guest mode."""
    pair_ = run_stream(RngDraw(1000 + seed), 600, ("4level", "5level", "pae", "32bit")[seed])
    assert pair_.m.stats()["pf_taken"] > 0


def test_an_unpaged_guest_cannot_tell_the_shadow_mmu_from_tdp():
    """The same stream of gpa reads, writes, fetches and stores on a TDP VM and a shadow VM, both with paging
    off: same outcomes (faults fixed by KVM count as plain accesses), same memory, same dirty pages."""
    h = bm.Host(memory="1GiB", backing="4k")
    tdp, sh = (int(h.create_vms(1, memory="16MiB", mmu=k)[0]) for k in ("tdp", "shadow"))
    rng = np.random.default_rng(7)
    done = {bm.HIT, bm.FIXED, bm.SPURIOUS}
    for phase in range(3):
        if phase == 1:
            for vm in (tdp, sh):
                h.set_memslot(vm, 0, 0, 16 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
        n = 3000
        addr = rng.integers(0, 20 * MiB, n) & ~7          # some beyond the slot: MMIO
        kind = rng.choice([0, bm.ACC_WRITE, bm.ACC_FETCH, bm.ACC_USER], n)
        a, b = (h.access(vm, 0, addr, kind) for vm in (tdp, sh))
        ga = np.where(np.isin(a.outcome, list(done)), -1, a.outcome)
        gb = np.where(np.isin(b.outcome, list(done)), -1, b.outcome)
        assert (ga == gb).all()
        vals = rng.integers(0, 1 << 62, 200)
        at = rng.integers(0, 16 * MiB - 8, 200)
        for vm in (tdp, sh):
            for x, v in zip(at, vals, strict=True):
                h.store(vm, 0, int(x), int(v))
        if phase >= 1:
            assert (h.get_dirty_log(tdp, 0) == h.get_dirty_log(sh, 0)).all()
    assert (h.read_guest_memory(tdp, 0, 2 * 1024 * 1024) == h.read_guest_memory(sh, 0, 2 * 1024 * 1024)).all()


def test_addresses_beyond_4g_with_paging_off_are_refused():
    h = bm.Host(memory="1GiB")
    vm = int(h.create_vms(1, memory="16MiB", mmu="shadow")[0])
    before = h.stats(vm)
    with pytest.raises(bm.BatchMMUError, match="32-bit gpas") as e:
        h.access(vm, 0, [0x1000, 1 << 32], [0, 0])
    assert e.value.field == "addr" and e.value.value == 1 << 32
    assert h.stats(vm) == before                                     # nothing ran
    with pytest.raises(bm.BatchMMUError) as e:
        h.store(vm, 0, 1 << 33, 1)
    assert e.value.field == "addr"
    h2 = bm.Host(memory="1GiB")
    t = int(h2.create_vms(1, memory="16MiB", mmu="tdp", maxphyaddr=40)[0])
    assert h2.access(t, 0, 1 << 32, 0).outcome[0] == bm.MMIO          # TDP: gpas up to MAXPHYADDR


def _nx_fetches(h, vm, base):
    """A fetch, a read beside it, a read in the next 2M page, then a fetch there: (outcomes, pages_4k, pages_2m)."""
    out = []
    for addr, kind in ((base, bm.ACC_FETCH), (base, bm.ACC_FETCH), (base + 0x1000, 0),
                       (base + 2 * MiB, 0), (base + 2 * MiB + 0x3000, bm.ACC_FETCH), (base + 2 * MiB + 0x3000, 0)):
        out.append(int(h.access(vm, 0, addr, kind).outcome[0]))
    s = h.stats(vm)
    return out, s["pages_4k"], s["pages_2m"]


@pytest.mark.parametrize("paging", [False, True])
def test_nx_huge_pages_map_executable_faults_4k_and_keep_their_tables(paging):
    """kvm_mmu_hugepage_adjust: an executable fault under the NX huge page workaround maps 4K
    (huge_page_disallowed); disallowed_hugepage_adjust keeps a later read from replacing that table with a huge
    SPTE; a fetch in a region mapped 2M splits it.  (Before, the 2M SPTE lost its exec bit in make_spte and the
    fetch faulted again and again: SPURIOUS.)"""
    from invariant_fuzz import PML4, _identity_tables
    h = bm.Host(memory="1GiB", backing="thp", mmio_caching=False, nx_huge_pages=True)
    vm = int(h.create_vms(1, memory="16MiB", mmu="shadow")[0])
    base = 4 * MiB
    if paging:                                     # 2M guest pages in the [1G, 2G) window, slot 1 there
        _identity_tables(h, vm, huge_windows=True)
        h.set_memslot(vm, 1, 1 << 30, 4 * MiB, hva=1 << 40, backing="thp")
        h.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=PML4)
        base = 1 << 30
    h.touch_host_memory(vm, base, 4 * MiB)
    out, p4k, p2m = _nx_fetches(h, vm, base)
    assert out == [bm.FIXED, bm.HIT, bm.HIT if p4k > 1 else bm.FIXED, bm.FIXED, bm.FIXED, bm.HIT], out
    assert p2m == 0 and p4k >= 2                    # the second 2M page was split by the fetch
    h2 = bm.Host(memory="1GiB", backing="thp", mmio_caching=False, nx_huge_pages=False)
    vm2 = int(h2.create_vms(1, memory="16MiB", mmu="shadow")[0])
    if not paging:
        h2.touch_host_memory(vm2, base, 4 * MiB)
        assert _nx_fetches(h2, vm2, base)[2] == 2     # without the workaround both are 2M mappings
