"""The shadow MMU on long-mode guests: prefetch, D-clean read-only mappings, unsync and sync, write
tracking and emulation, write flooding, CR3 switches, dirty logging, 2M guest pages.

Expected values are derived from the guest layout each test builds (which pages, which tables), by the
rules of mmu.c / paging_tmpl.h; the real kernel gave the same numbers for the same layouts
(reference/realkvm.md and tests/test_validate.py).
"""

import numpy as np
import pytest

import batchmmu as bm

pytestmark = pytest.mark.nojit  # fast enough in pure Python too (NUMBA_DISABLE_JIT=1)

P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
CODE, DATA = 0x100000, 0x400000
PML4, PDPT, PD, PT0 = 0x10000, 0x11000, 0x12000, 0x13000
MEM = 64 << 20


def build(ad=True, backing="4k", huge_from=None, dclean_huge=False):
    """An identity-mapped long-mode guest: tables at 0x10000.., 4K leaves (2M leaves from PD index
    ``huge_from`` on); host memory populated like a VMM's memset."""
    host = bm.Host(memory="1GiB", backing=backing, mmio_caching=False)
    vm = int(host.create_vms(1, memory=MEM, mmu="shadow")[0])
    leaf = P | W | U | (A | D if ad else 0)
    nl = P | W | U | (A if ad else 0)
    npt = MEM >> 21
    host.write_guest_memory(vm, PML4, [PDPT | nl])
    host.write_guest_memory(vm, PDPT, [PD | nl])
    pde = []
    for i in range(npt):
        if huge_from is not None and i >= huge_from:
            pde.append((i << 21) | P | W | U | A | PS | (0 if dclean_huge else D))
        else:
            pde.append((PT0 + i * 0x1000) | nl)
    host.write_guest_memory(vm, PD, pde)
    for t in range(npt if huge_from is None else huge_from):
        host.write_guest_memory(vm, PT0 + t * 0x1000, [((t * 512 + i) << 12) | leaf for i in range(512)])
    host.touch_host_memory(vm, 0, MEM)
    host.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=PML4)
    return host, vm


def run3(host, vm, gvas, kind=bm.ACC_USER):
    """A CPL3 program: its code page is fetched, then the data accesses run in order."""
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)
    return host.access(vm, 0, np.asarray(gvas, np.int64), kind)


class Delta:
    def __init__(self, host, vm):
        self.host, self.vm = host, vm
        self.last = host.stats(vm)

    def __call__(self):
        now = self.host.stats(self.vm)
        d = {k: now[k] - self.last[k] for k in now if now[k] != self.last[k]}
        self.last = now
        return d


def groups_of_8(pages):
    return len({p >> 3 for p in pages})


@pytest.mark.parametrize("n", [1, 10, 100, 1000])
def test_prefetch_maps_groups_of_eight_accessed_gptes(n):
    host, vm = build(ad=True)
    d = Delta(host, vm)
    pages = [(DATA >> 12) + i for i in range(n)]
    assert (run3(host, vm, [p << 12 for p in pages]).outcome != bm.GUEST_FAULT).all()
    got = d()
    faults = groups_of_8(pages) + 1  # + the code page's group
    assert got["pf_fixed"] == got["pf_taken"] == faults
    assert got["pages_4k"] == 8 * faults
    # root, PDPT, PD, the table of the code page, one per 2 MiB of data
    assert got["mmu_cache_miss"] == 4 + len({p >> 9 for p in pages})
    # write and read again: D preset, so the read faults already mapped the pages writable
    run3(host, vm, [p << 12 for p in pages], bm.ACC_USER | bm.ACC_WRITE)
    run3(host, vm, [p << 12 for p in pages])
    assert d() == {"accesses": 2 * n + 2, "walk_refs": 4 * (2 * n + 2)}


def test_no_prefetch_without_accessed_bits_and_clean_reads_map_read_only():
    host, vm = build(ad=False)
    d = Delta(host, vm)
    n = 100
    gvas = DATA + 4096 * np.arange(n)
    run3(host, vm, gvas)
    got = d()
    assert got["pf_fixed"] == n + 1 and got["pages_4k"] == n + 1
    run3(host, vm, gvas, bm.ACC_USER | bm.ACC_WRITE)
    got = d()
    assert got["pf_fixed"] == n and "pages_4k" not in got  # made writable in place
    # KVM's walker set A, then D, in the guest's PTE
    pte = int(host.read_guest_memory(vm, PT0 + 2 * 0x1000, 1)[0])
    assert pte & (A | D) == A | D


def test_unsync_invlpg_and_cr3_sync():
    host, vm = build(ad=False)
    d = Delta(host, vm)
    run3(host, vm, DATA + 4096 * np.arange(16))
    d()
    pte_gpa = PT0 + 2 * 0x1000       # the PTE of DATA (PT of 4..6 MiB, entry 0)
    alt = DATA + (16 << 20)
    host.write_guest_memory(vm, alt, [0xA17])
    host.write_guest_memory(vm, DATA, [0xDA7A])
    # a CPL3 store to a last-level guest table: the table goes unsync, no emulation
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)
    r = host.store(vm, 0, pte_gpa, alt | P | W | U, bm.ACC_USER)
    assert r.outcome[0] == bm.FIXED
    got = d()
    assert got["mmu_unsync"] == 1 and got["pf_fixed"] == 1 and "pf_emulate" not in got
    # the stale SPTE still maps the old page, like a stale TLB entry
    assert host.access(vm, 0, DATA, bm.ACC_USER).outcome[0] == bm.HIT
    d()
    # INVLPG re-syncs that one SPTE: the gfn changed, so it is dropped (the page stays unsync)
    host.invlpg(vm, 0, DATA)
    got = d()
    assert got == {"pages_4k": -1, "rmap_entries": -1, "remote_tlb_flush_requests": 1, "remote_tlb_flush": 1,
                   "invlpg": 1}
    run3(host, vm, [DATA])
    assert d()["pf_fixed"] == 1
    # MOV CR3 (same value) syncs the whole unsync page and write-protects the table again
    host.mov_cr3(vm, 0, PML4)
    got = d()
    assert got["mmu_unsync"] == -1 and got["remote_tlb_flush_requests"] == 1


def test_upper_level_writes_are_emulated_and_flood_resets():
    host, vm = build(ad=False)
    d = Delta(host, vm)
    run3(host, vm, DATA + 4096 * np.arange(4))
    d()
    newpt = 0x90000
    host.write_guest_memory(vm, newpt, [(((0x3000000 >> 12) + i) << 12) | P | W | U for i in range(512)])
    # a CPL3 store to a PDE: first a not-present fault maps the PD page read-only, the write is emulated
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)
    r = host.store(vm, 0, PD + 8 * 100, newpt | P | W | U, bm.ACC_USER)
    assert r.outcome[0] == bm.EMULATED
    got = d()
    assert got["pf_emulate"] == 1 and got["mmu_pte_write"] == 1 and got["mmu_pde_zapped"] == 1
    assert int(host.read_guest_memory(vm, PD + 8 * 100, 1)[0]) == newpt | P | W | U
    # four more emulated PDE writes: each write fault walks through the PD page and resets its
    # flood counter, so the page is never zapped
    for k in range(4):
        host.store(vm, 0, PD + 8 * (101 + k), newpt | P | W | U, bm.ACC_USER)
    got = d()
    assert got["pf_emulate"] == 4 and got["mmu_pde_zapped"] == 4 and "mmu_flooded" not in got
    # three emulated (CPL0) writes in a row, no fault between them: flooding zaps the page
    for k in range(3):
        host.emulated_access(vm, 0, PD + 8 * (110 + k), bm.ACC_WRITE, 0)
    got = d()
    assert got["mmu_flooded"] == 1 and got["mmu_shadow_zapped"] == 1


def test_misaligned_write_zaps_and_the_next_fault_is_spurious():
    host, vm = build(ad=False)
    d = Delta(host, vm)
    run3(host, vm, DATA + 4096 * np.arange(4))
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)
    host.store(vm, 0, PD + 8 * 100, 0, bm.ACC_USER)  # map the PD page (read-only) first
    d()
    host.store(vm, 0, PD + 8 * 110 + 4, 0, bm.ACC_USER)  # 8 bytes across two PDEs
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)  # the next instruction
    got = d()
    assert got["mmu_flooded"] == 1 and got["mmu_shadow_zapped"] == 1
    # the PD page is rebuilt; its old child tables are still in the hash with their SPTEs
    assert got["mmu_cache_miss"] == 1 and got["pf_spurious"] == 1 and "pages_4k" not in got


def test_cr3_switches_reuse_cached_and_hashed_roots():
    host, vm = build(ad=True)
    # a second tree at 0x40000 mapping DATA.. to DATA+16M..
    base = 0x40000
    host.write_guest_memory(vm, base, [(base + 0x1000) | P | W | U | A])
    host.write_guest_memory(vm, base + 0x1000, [(base + 0x2000) | P | W | U | A])
    host.write_guest_memory(vm, base + 0x2000, [(base + 0x3000 + i * 0x1000) | P | W | U | A for i in range(32)])
    for t in range(32):
        shift = (16 << 20) if 2 <= t < 6 else 0
        host.write_guest_memory(vm, base + 0x3000 + t * 0x1000,
                                [(((t * 512 + i) << 12) + shift) | P | W | U | A | D for i in range(512)])
    d = Delta(host, vm)
    run3(host, vm, DATA + 4096 * np.arange(512))
    d()
    host.mov_cr3(vm, 0, base)
    assert d()["mmu_cache_miss"] == 1  # the new root
    run3(host, vm, DATA + 4096 * np.arange(512))
    got = d()
    assert got["mmu_cache_miss"] == 4 and got["pf_fixed"] == 65
    host.mov_cr3(vm, 0, PML4)          # back: a prev_root
    run3(host, vm, DATA + 4096 * np.arange(512))
    host.set_vcpu_regs(vm, 0, cr3=base)  # KVM_SET_SREGS: context reset, the root is found in the hash
    run3(host, vm, DATA + 4096 * np.arange(512))
    got = d()
    assert "pf_taken" not in got and "mmu_cache_miss" not in got


@pytest.mark.parametrize("manual", [False, True])
def test_dirty_logging_write_protects_and_get_reprotects(manual):
    host, vm = build(ad=True)
    if manual:
        host.enable_manual_dirty_log_protect(vm, initially_set=False)
    n = 300
    gvas = DATA + 4096 * np.arange(n)
    run3(host, vm, gvas)
    d = Delta(host, vm)
    host.set_memslot(vm, 0, 0, MEM, flags=bm.MEM_LOG_DIRTY_PAGES)
    assert d()["remote_tlb_flush_requests"] == 1
    run3(host, vm, gvas, bm.ACC_USER | bm.ACC_WRITE)
    assert d()["pf_fixed"] == n
    bits = np.unpackbits(host.get_dirty_log(vm, 0).view(np.uint8), bitorder="little")
    assert set(np.nonzero(bits)[0]) == set(range(DATA >> 12, (DATA >> 12) + n))
    d()
    run3(host, vm, gvas, bm.ACC_USER | bm.ACC_WRITE)
    # without manual protect GET re-protected the pages; with it only CLEAR does
    assert d().get("pf_fixed", 0) == (0 if manual else n)


def test_2m_guest_pages_on_thp_are_huge_and_split_lazily_under_logging():
    host, vm = build(ad=True, backing="thp", huge_from=2)
    d = Delta(host, vm)
    gvas = DATA + 4096 * np.arange(1000)
    run3(host, vm, gvas)
    got = d()
    assert got["pages_2m"] == 2 and got["pf_fixed"] == 3
    host.set_memslot(vm, 0, 0, MEM, flags=bm.MEM_LOG_DIRTY_PAGES)
    run3(host, vm, gvas, bm.ACC_USER | bm.ACC_WRITE)
    got = d()
    assert got["pages_2m"] == -2 and got["pages_4k"] == 1000 and got["pf_fixed"] == 1000
    host.set_memslot(vm, 0, 0, MEM, flags=0)
    assert d()["pages_4k"] == -1000  # collapsible SPTEs of the direct pages are zapped
    run3(host, vm, gvas, bm.ACC_USER | bm.ACC_WRITE)
    assert d()["pages_2m"] == 2


def test_2m_guest_pages_on_4k_host_use_direct_pages_and_dirty_bit_changes_their_role():
    host, vm = build(ad=True, huge_from=2, dclean_huge=True)
    d = Delta(host, vm)
    gvas = DATA + 4096 * np.arange(1000)
    run3(host, vm, gvas)
    got = d()
    assert got["pf_fixed"] == groups_of_8(range(1000)) + 1 and got["pages_4k"] == 1008
    run3(host, vm, gvas, bm.ACC_USER | bm.ACC_WRITE)
    got = d()
    # the 2M gptes were D-clean: writing needs direct pages with write access, a new role each
    assert got["mmu_cache_miss"] == 2 and got["pages_4k"] == 1000 and got["max_mmu_rmap_size"] == 1


def test_guest_fault_is_reflected_with_the_walkers_error_code():
    host, vm = build(ad=True)
    host.write_guest_memory(vm, PT0 + 2 * 0x1000, [DATA | P | U | A | D])  # read-only user page
    r = run3(host, vm, [DATA], bm.ACC_USER | bm.ACC_WRITE)
    assert r.outcome[0] == bm.GUEST_FAULT and r.error_code[0] == (bm.PFERR_PRESENT | bm.PFERR_WRITE | bm.PFERR_USER)
    assert host.stats(vm)["pf_guest"] == 1
    r = run3(host, vm, [DATA + (100 << 20)])
    assert r.outcome[0] == bm.GUEST_FAULT and r.error_code[0] == bm.PFERR_USER


def test_slot_delete_zaps_every_shadow_page():
    host, vm = build(ad=True)
    run3(host, vm, DATA + 4096 * np.arange(64))
    host.set_memslot(vm, 1, 1 << 30, 1 << 21)
    host.set_memslot(vm, 1, 1 << 30, 0)  # delete: kvm_mmu_zap_all_fast
    s = host.stats(vm)
    assert s["pages_4k"] == 0 and s["mmu_unsync"] == 0
    assert s["mmu_pages"] == 1  # the pinned root stays until the vCPU drops it
    run3(host, vm, [DATA])
    assert host.stats(vm)["mmu_pages"] == 5


def test_shadow_without_paging_takes_32_bit_gpas_and_no_pkeys():
    host = bm.Host(memory="1GiB")
    vm = int(host.create_vms(1, memory="16MiB", mmu="shadow")[0])
    assert host.access(vm, 0, 0x1000).outcome[0] == bm.FIXED      # paging off: the nonpaging context
    with pytest.raises(bm.BatchMMUError, match="addr"):
        host.access(vm, 0, 1 << 32)
    with pytest.raises(bm.BatchMMUError, match="cr4"):
        host.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=0x20 | (1 << 22), efer=0xD01, cr3=0x10000)
    assert host.vcpu_regs(vm, 0)["cr0"] == 0x60000010  # nothing changed on error


def build32(pae):
    """A 32-bit (or PAE) guest: identity map of 64 MiB with 4K pages, tables at 0x10000.."""
    host = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = int(host.create_vms(1, memory=MEM, mmu="shadow")[0])
    if pae:
        host.write_guest_memory(vm, 0x10000, [0x11000 | P] + [0] * 3)  # PDPT: first GiB only
        host.write_guest_memory(vm, 0x11000, [(0x12000 + i * 0x1000) | P | W | U | A for i in range(32)])
        for t in range(32):
            host.write_guest_memory(vm, 0x12000 + t * 0x1000, [((t * 512 + i) << 12) | P | W | U | A | D
                                                               for i in range(512)])
        cr4, pd_entry_span = 0x20, 2 << 20
    else:
        words = [(0x11000 + i * 0x1000) | P | W | U | A for i in range(16)]  # 4-byte PDEs, 4 MiB each
        host.write_guest_memory(vm, 0x10000, [w | (words[2 * k + 1] << 32) for k, w in enumerate(words[::2])])
        for t in range(16):
            ptes = [((t * 1024 + i) << 12) | P | W | U | A | D for i in range(1024)]
            host.write_guest_memory(vm, 0x11000 + t * 0x1000, [ptes[2 * k] | (ptes[2 * k + 1] << 32)
                                                               for k in range(512)])
        cr4, pd_entry_span = 0, 4 << 20
    host.touch_host_memory(vm, 0, MEM)
    host.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=cr4, efer=0, cr3=0x10000)
    return host, vm, pd_entry_span


@pytest.mark.parametrize("pae", [False, True])
def test_32bit_and_pae_guests(pae):
    host, vm, span = build32(pae)
    d = Delta(host, vm)
    pages = [(DATA >> 12) + i for i in range(1000)]
    r = run3(host, vm, [p << 12 for p in pages])
    assert (r.outcome != bm.GUEST_FAULT).all()
    got = d()
    assert got["pf_fixed"] == groups_of_8(pages) + 1 and got["pages_4k"] == 8 * got["pf_fixed"]
    # roots: 4 PAE roots (PAE: one per present PDPTE); one last-level shadow page per 2 MiB touched
    # (a 4 KiB 32-bit table is shadowed by two pages, one per quadrant)
    roots = 4 if not pae else 1
    assert got["mmu_cache_miss"] == roots + 1 + len({p >> 9 for p in pages})
    # a native write to a guest last-level table unsyncs it; INVLPG drops the stale SPTE
    pte_gpa = (0x11000 + (DATA >> 22) * 0x1000) if not pae else (0x12000 + (DATA >> 21) * 0x1000)
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)
    r = host.store(vm, 0, pte_gpa, ((DATA + (32 << 20)) | P | W | U | A | D) if pae else
                   (((DATA + (32 << 20)) | P | W | U | A | D) | ((DATA + 0x1000 | P | W | U | A | D) << 32)),
                   bm.ACC_USER)
    assert r.outcome[0] == bm.FIXED
    # every shadow page of that table goes unsync: a 32-bit table touched in both halves has two
    shadows = 1 if pae else len({p >> 9 for p in pages if p >> 10 == DATA >> 22})
    assert d()["mmu_unsync"] == shadows
    host.invlpg(vm, 0, DATA)
    got = d()
    assert got["pages_4k"] == -1 and got["invlpg"] == 1
    # CR3 reload: sync, and PAE roots are not cached (found again in the hash: no cache miss)
    host.mov_cr3(vm, 0, 0x10000)
    got = d()
    assert got["mmu_unsync"] == -shadows and "mmu_cache_miss" not in got
    # an emulated 4-byte write into a guest upper-level table zaps the SPTE(s) it shadows
    pde_gpa = 0x10000 + 4 * (DATA >> 22) if not pae else 0x11000 + 8 * (DATA >> 21)
    host.emulated_access(vm, 0, pde_gpa, bm.ACC_WRITE, 0, size=4)
    assert d()["mmu_pte_write"] == 1
    # the shadow entry is gone with the guest's: the next access is the guest's own #PF, not a stale hit
    r = host.access(vm, 0, DATA + 0x1000, bm.ACC_USER)
    assert r.outcome[0] == bm.GUEST_FAULT and r.error_code[0] == bm.PFERR_USER


def test_zapping_a_table_leaves_its_unsync_children_alone():
    # what the kernel does (tests/test_realkvm.py, workload random:3): the unsync child is only unlinked
    host, vm = build(ad=True)
    d = Delta(host, vm)
    run3(host, vm, DATA + 4096 * np.arange(16))
    host.access(vm, 0, CODE, bm.ACC_FETCH | bm.ACC_USER)
    host.store(vm, 0, PT0 + 2 * 0x1000, (DATA + (4 << 20)) | P | W | U | A | D, bm.ACC_USER)
    assert d()["mmu_unsync"] == 1
    host.emulated_access(vm, 0, PD + 8 * 24 + 4, bm.ACC_WRITE, 0)  # misaligned: the PD page is zapped
    got = d()
    assert got["mmu_shadow_zapped"] == 1 and got["mmu_flooded"] == 1
    assert "mmu_unsync" not in got and "pages_4k" not in got
    # the next fault rebuilds the PD and finds the (still unsync) table in the hash
    run3(host, vm, [DATA + 0x1000])
    got = d()
    assert got["mmu_cache_miss"] == 1 and "mmu_unsync" not in got


def test_hash_buckets_and_collisions_are_kvms():
    """mmu_page_hash buckets are hash_64(gfn, 12) (kvm_page_table_hashfn); max_mmu_page_hash_collisions counts the
    valid pages of other gfns a look-up passes in its bucket.  Guest tables at gfns 0x20 and 0xa38 share bucket 913:
    the second table's look-up passes the first table's page."""
    from batchmmu.kernels.shadow_mmu import hash_bucket
    from numba import njit
    from reference.shadow_model import hash_bucket as kvm_bucket

    @njit
    def buckets(gfns, out):
        for i in range(gfns.shape[0]):
            out[i] = hash_bucket(gfns[i])

    gfns = np.concatenate([np.random.default_rng(3).integers(0, 1 << 52, 5000), [0, 1, (1 << 32) - 1, 1 << 32,
                                                                               (1 << 52) - 1]]).astype(np.int64)
    out = np.zeros_like(gfns)
    buckets(gfns, out)
    assert out.tolist() == [kvm_bucket(int(g)) for g in gfns]
    assert kvm_bucket(0x20) == kvm_bucket(0xa38) == 913
    assert len({kvm_bucket(g) for g in (0x10, 0x11, 0x12, 0x20)}) == 4
    host = bm.Host(memory="1GiB", backing="4k", mmio_caching=False)
    vm = int(host.create_vms(1, memory=MEM, mmu="shadow")[0])
    nl, leaf = P | W | U | A, P | W | U | A | D
    host.write_guest_memory(vm, PML4, [PDPT | nl])
    host.write_guest_memory(vm, PDPT, [PD | nl])
    host.write_guest_memory(vm, PD, [0x20000 | nl, 0xa38000 | nl])
    host.write_guest_memory(vm, 0x20000, [(i << 12) | leaf for i in range(512)])
    host.write_guest_memory(vm, 0xa38000, [((512 + i) << 12) | leaf for i in range(512)])
    host.touch_host_memory(vm, 0, MEM)
    host.set_vcpu_regs(vm, 0, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=PML4)
    assert host.access(vm, 0, 0x1000, bm.ACC_USER).outcome[0] == bm.FIXED
    assert host.stats(vm)["max_mmu_page_hash_collisions"] == 0
    assert host.access(vm, 0, 0x201000, bm.ACC_USER).outcome[0] == bm.FIXED
    assert host.stats(vm)["max_mmu_page_hash_collisions"] == 1
