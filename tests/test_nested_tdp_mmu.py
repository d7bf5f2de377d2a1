"""Nested EPT / NPT with L0 on the TDP MMU (kvm.tdp_mmu=Y, KVM's default): both MMUs in one VM.

L1's own tables are TDP MMU pages; guest_mmu's shadow pages (EPT02 / NPT02) appear with the first nested root
(mmu_first_shadow_root_alloc: rmaps and write tracking for every memslot), and from then on every host-side
operation walks both.  tests/test_nested.py runs its whole file on both MMUs; this file checks what only the
combination has: the two MMUs against each other, the metadata that appears, the TDP MMU's fault path honouring
guest_mmu's write tracking, and host events reaching both.
"""

import random

import numpy as np
import pytest
from test_nested import WB, Nest, R, W, X, _outcome

import batchmmu as bm


# ------------------------------------------------------------------ the TDP MMU: both MMUs in one VM
def _ept12_stream(n, rng, steps):
    """A random nested run: L2 accesses and stores, L1's stores into EPT12 (leaf and upper tables) with INVEPT,
    host events (an MMU-notifier invalidation, a dirty-log GET) between them.  Returns what L1, L2 and the host
    saw: outcomes, error codes, fault gpas, dirty bitmaps, and then guest memory."""
    data = 0x200000
    n.h.set_memslot(n.vm, 1, 0x4000000, 64 * 4096, flags=bm.MEM_LOG_DIRTY_PAGES)
    backs = [0x1000000 + 4096 * k for k in range(32)] + [0x4000000 + 4096 * k for k in range(32)]
    for k in range(48):
        n.ept_map(data + 4096 * k, rng.choice(backs), rng.choice([n.full] * 4 + [n.full & ~W, R | X, 0]))
    n.enter(paging=False)
    seen = []
    in_l2 = True
    hva = int(n.h.memslots(n.vm)[0]["hva"])
    for _ in range(steps):
        r = rng.random()
        if r < 0.08:
            if in_l2:
                n.h.nested_exit(n.vm, 0)
            level = rng.choice([1, 1, 1, 2])
            gpa = n.ept_entry_gpa(data + 4096 * rng.randrange(48), level)
            if level == 2:     # an upper-level entry keeps its table, with the write permission toggled
                word = n.mem[gpa] ^ W
            else:              # a leaf: rewritten, or pointed somewhere else with new permissions
                word = n.mem.get(gpa, 0) if rng.random() < 0.3 else \
                    rng.choice(backs) | rng.choice([n.full, R]) | (0 if n.svm else WB)
            res = n.h.store(n.vm, 0, gpa, word)
            seen.append(("l1 store", int(res.outcome[0])))
            n.mem[gpa] = n.read(gpa) & ((1 << 64) - 1)
            if rng.random() < 0.5 and not n.svm:
                n.h.invept(n.vm, 0)
            n.reenter()
            in_l2 = True
        elif r < 0.10:   # a stretch of L2 without nested paging (L1 gpas, its own guest_mode root), then back
            if in_l2:
                n.h.nested_exit(n.vm, 0)
            n.h.nested_enter(n.vm, 0, cr0=0x11, cr3=0, cr4=0, efer=0)
            for _ in range(rng.randrange(1, 12)):
                res = n.h.store(n.vm, 0, rng.choice(backs) + 8 * rng.randrange(512), rng.getrandbits(64))
                seen.append(("no nested paging", _outcome(int(res.outcome[0]))))
            n.h.nested_exit(n.vm, 0)
            n.reenter()
            in_l2 = True
        elif r < 0.14:
            g = rng.randrange(0, 32)
            seen.append(("zapped", n.h.invalidate_hva_range(n.vm, hva + 0x1000000 + 4096 * g,
                                                            hva + 0x1000000 + 4096 * (g + 4)) > 0))
        elif r < 0.17:
            seen.append(("dirty", n.h.get_dirty_log(n.vm, 1).tolist()))
        else:
            gpa = data + 4096 * rng.randrange(48) + 8 * rng.randrange(512)
            if rng.random() < 0.4:
                res = n.h.store(n.vm, 0, gpa, rng.getrandbits(64))
            else:
                res = n.h.access(n.vm, 0, gpa, rng.choice([0, bm.ACC_WRITE, bm.ACC_FETCH]))
            seen.append((_outcome(int(res.outcome[0])), int(res.error_code[0]), int(res.fault_gpa[0])))
    mem = [n.h.read_guest_memory(n.vm, pg, 512).tolist() for pg in backs]
    return seen, mem


@pytest.mark.parametrize("seed,svm", [(21, False), (22, True), (23, False)])
def test_legacy_and_tdp_mmu_give_l1_and_l2_the_same_run(seed, svm):
    """Legacy vs TDP MMU under nested EPT/NPT: L1 and L2 cannot tell (every outcome, exit qualification or
    exit_info_1, fault gpa, dirty bitmap and the guest memory are the same); the statistics differ where KVM's do
    (L1's own tables: rmap entries on the legacy MMU only).  The stream keeps to what KVM's two MMUs also agree
    on: L1 writes no logged memory itself (the legacy MMU's prefetch and the TDP MMU's writable read faults mark
    different pages dirty), no page budget pressure, no eager splits of L1's huge pages."""
    runs, stats = [], []
    for tdp in (False, True):
        n = Nest(svm=svm, tdp_mmu=tdp)
        runs.append(_ept12_stream(n, random.Random(seed), 400))
        stats.append(n.h.stats(n.vm))
    assert runs[0] == runs[1]
    legacy, tdp = stats
    for name in ("nested_run", "pf_guest", "mmu_unsync", "mmu_pte_write", "mmu_flooded"):
        assert legacy.get(name) == tdp.get(name), name
    assert legacy["mmu_pte_write"] > 0 and legacy["mmu_unsync"] > 0


def test_first_nested_root_allocates_rmaps_and_write_tracking():
    """mmu_first_shadow_root_alloc on the TDP MMU: no rmaps, write tracking or shadow pages before the first
    guest_mmu root; then rmaps and write-track arrays for every memslot (and for memslots made later), EPT02's
    pages counted apart from the TDP MMU's (footprint, the shrinker's n_used_mmu_pages)."""
    n = Nest(tdp_mmu=True)
    h, vm = n.h, n.vm
    assert h.access(vm, 0, 0x3000000, bm.ACC_WRITE).outcome[0] == bm.FIXED      # L1 on the TDP MMU
    fp = h.footprint(vm)
    assert fp["rmaps"] == fp["write_track"] == fp["shadow_page_tables"] == 0 and fp["tdp_page_tables"] > 0
    assert h.shrink_count() == 0
    n.ept_map(0x200000, 0x2000000)
    n.enter(paging=False)
    fp1 = h.footprint(vm)
    pages = 64 << 8                                        # slot 0: 64 MiB
    assert fp1["write_track"] == 2 * pages and fp1["rmaps"] == 8 * (pages + pages // 512 + 1)
    assert h.access(vm, 0, 0x200000, bm.ACC_WRITE).outcome[0] == bm.FIXED   # EPT02: root and three tables
    fp2 = h.footprint(vm)
    assert fp2["shadow_page_tables"] == 4 * 4096 and fp2["tdp_page_tables"] >= fp["tdp_page_tables"]
    assert h.shrink_count() == 4 < h.stats(vm)["mmu_pages"]
    assert fp2["shadowed_translation"] == 4 * 4096         # every guest_mmu page has gptes
    h.nested_exit(vm, 0)
    h.set_memslot(vm, 1, 1 << 30, 1 << 21)                 # a later memslot gets both at creation
    fp3 = h.footprint(vm)
    assert fp3["write_track"] - fp2["write_track"] == 2 * 512 and fp3["rmaps"] - fp2["rmaps"] == 8 * (512 + 1 + 1)


def test_budget_counts_only_the_shadow_mmus_pages():
    """n_max_mmu_pages bounds n_used_mmu_pages, the shadow MMU code's pages: L1's TDP MMU pages, however many, do
    not make guest_mmu recycle its pages (the mmu_pages statistic counts both)."""
    n = Nest(tdp_mmu=True, memory="512MiB", backing="4k")
    h, vm = n.h, n.vm
    h.set_nr_mmu_pages(vm, 64)
    h.access(vm, 0, (np.arange(200) << 21) + 0x1000, bm.ACC_WRITE)        # 200 TDP MMU leaf tables and more
    assert h.stats(vm)["mmu_pages"] > 200
    for k in range(8):
        n.ept_map(0x200000 + (k << 21), 0x2000000 + (k << 21))         # 8 EPT12 leaf tables: 11 shadow pages
    n.enter(paging=False)
    r = h.access(vm, 0, 0x200000 + (np.arange(8) << 21), 0)
    assert (r.outcome == bm.FIXED).all() and h.shrink_count() == 11
    assert h.stats(vm)["mmu_recycled"] == 0 and (h.access(vm, 0, 0x200000 + (np.arange(8) << 21), 0).outcome
                                                == bm.HIT).all()
    h.set_nr_mmu_pages(vm, 64)
    assert h.shrink(100) == 11 - 1 and h.stats(vm)["mmu_recycled"] == 10          # the pinned root stays
    assert h.stats(vm)["mmu_pages"] > 200                                          # the TDP MMU's pages stay


def _l1_spte(h, vm, gpa):
    """L1's TDP MMU leaf SPTE mapping ``gpa`` (spte_dump keys a leaf by its first gfn)."""
    dump = h.spte_dump(vm)
    for level in (1, 2, 3):
        hit = dump.get((gpa >> 12) & ~((1 << (9 * (level - 1))) - 1))
        if hit is not None and hit[0] == level:
            return hit[1]
    return None


def test_tdp_mmu_write_protects_and_unsyncs_for_guest_mmu():
    """A shadow page for an EPT12 table write-protects L1's TDP SPTE of that frame (kvm_mmu_slot_gfn_write_protect
    reaches the TDP MMU); L1's write to a leaf table then unsyncs the page (the TDP MMU's make_spte runs
    mmu_try_to_unsync_pages) and an upper-level table's write is emulated (page tracking before the fast path)."""
    n = Nest(tdp_mmu=True)
    h, vm = n.h, n.vm
    gpa = 0x200000
    n.ept_map(gpa, 0x2000000)
    n.flush()
    leaf, pde = n.ept_entry_gpa(gpa), n.ept_entry_gpa(gpa, 2)
    h.access(vm, 0, [leaf, pde], bm.ACC_WRITE)                     # L1 maps its EPT12 frames writable first
    assert _l1_spte(h, vm, leaf) & W and _l1_spte(h, vm, pde) & W
    n.enter(paging=False)
    assert h.access(vm, 0, gpa, 0).outcome[0] == bm.FIXED
    h.nested_exit(vm, 0)
    assert not _l1_spte(h, vm, leaf) & W and not _l1_spte(h, vm, pde) & W    # write-protected in the TDP MMU
    st = h.stats(vm)
    r = h.store(vm, 0, leaf, 0x2001000 | R | W | X | WB)
    assert r.outcome[0] == bm.FIXED and h.stats(vm)["mmu_unsync"] == st["mmu_unsync"] + 1
    assert _l1_spte(h, vm, leaf) & W and n.read(leaf) == 0x2001000 | R | W | X | WB
    n.reenter()
    assert h.access(vm, 0, gpa, 0).outcome[0] == bm.HIT           # unsynced: the old translation until a sync
    h.nested_exit(vm, 0)
    r = h.store(vm, 0, pde, n.mem[pde])
    assert r.outcome[0] == bm.EMULATED and h.stats(vm)["pf_emulate"] == st["pf_emulate"] + 1
    assert h.stats(vm)["mmu_pte_write"] == st["mmu_pte_write"] + 1 and not _l1_spte(h, vm, pde) & W
    n.reenter()                                   # the emulated write zapped the PDE's SPTE: EPT02 is rebuilt
    assert h.store(vm, 0, gpa, 77).outcome[0] == bm.FIXED
    assert h.read_guest_memory(vm, 0x2001000, 1)[0] == 77 and h.read_guest_memory(vm, 0x2000000, 1)[0] == 0


def test_host_events_reach_both_mmus():
    """kvm_unmap_gfn_range, aging, dirty logging and memslot deletion act on L1's TDP MMU SPTEs and on guest_mmu's
    EPT02 SPTEs of the same L1 gfns."""
    n = Nest(tdp_mmu=True, backing="4k")
    h, vm = n.h, n.vm
    base = 0x2000000
    for k in range(4):
        n.ept_map(0x200000 + 4096 * k, base + 4096 * k)
    h.access(vm, 0, base + 4096 * np.arange(4), bm.ACC_WRITE)             # L1's own mappings (TDP MMU)
    n.enter(paging=False)
    assert (h.access(vm, 0, 0x200000 + 4096 * np.arange(4), 0).outcome == bm.FIXED).all()
    hva = int(h.memslots(vm)[0]["hva"])
    young = h.age_hva_range(vm, hva + base, hva + base + 4 * 4096)
    assert young.all() and h.stats(vm)["pages_aged"] == 8                 # 4 TDP SPTEs + 4 EPT02 SPTEs made old
    zapped = h.invalidate_hva_range(vm, hva + base, hva + base + 4 * 4096)
    assert zapped == 8 and h.stats(vm)["mmu_notifier_zapped"] == 8          # 4 TDP SPTEs + 4 EPT02 SPTEs
    assert (h.access(vm, 0, 0x200000 + 4096 * np.arange(4), 0).outcome[0]) == bm.FIXED
    # dirty logging of slot 1: an L2 write and an L1 write are logged by L1 gpa, and both re-protected by GET
    h.nested_exit(vm, 0)
    h.set_memslot(vm, 1, 0x4000000, 1 << 21, flags=bm.MEM_LOG_DIRTY_PAGES)
    n.ept_map(0x300000, 0x4000000)
    n.flush()
    n.reenter()
    assert h.store(vm, 0, 0x300000, 1).outcome[0] == bm.FIXED
    h.nested_exit(vm, 0)
    assert h.store(vm, 0, 0x4001000, 2).outcome[0] == bm.FIXED
    bits = np.unpackbits(h.get_dirty_log(vm, 1).view(np.uint8), bitorder="little")
    assert bits[:2].tolist() == [1, 1] and bits[2:].sum() == 0
    assert h.store(vm, 0, 0x4001000, 3).outcome[0] == bm.FIXED               # the TDP SPTE re-protected
    n.reenter()
    assert h.store(vm, 0, 0x300000, 4).outcome[0] == bm.FIXED                # the EPT02 SPTE re-protected
    bits = np.unpackbits(h.get_dirty_log(vm, 1).view(np.uint8), bitorder="little")
    assert bits[:2].tolist() == [1, 1]
    # a memslot deletion: kvm_mmu_zap_all_fast of both (guest_mmu's roots obsolete, the TDP MMU's root gone)
    h.nested_exit(vm, 0)
    h.set_memslot(vm, 2, 1 << 30, 4096)
    h.set_memslot(vm, 2, 1 << 30, 0)
    assert h.spte_dump(vm) == {} and h.shrink_count() <= 1
    assert h.access(vm, 0, base, 0).outcome[0] == bm.FIXED
    n.reenter()
    assert h.access(vm, 0, 0x200000, 0).outcome[0] == bm.FIXED
