"""The guest OS workload (batchmmu.guestos): determinism, the page tables it builds, fork + COW, and
where KVM's shadow MMU pays for them (mmu.c rules) while TDP does not.

Translations are checked with the pure-Python reference walker (tests/reference/guest_walk.py) over
guest memory read back through the Host, not with the model's own bookkeeping.
"""

import numpy as np
import pytest
from reference.guest_walk import ref_walk

import batchmmu as bm
from batchmmu import guestos as gos

SMALL = dict(processes=2, code_pages=32, heap_pages=1536, mmap_pages=512, stack_pages=16, switch_every=64,
             kernel_touches=8, hot_pages=16)
QUIET = dict(SMALL, switch_every=0, kernel_touches=0)   # no random touches: directed tests only
PHYS_MASK = 0x000FFFFFFFFFF000
TDP_WHY = gos.tdp_guest_paging_unsupported()


class GuestMem(dict):
    """Guest memory as the reference walker wants it (gpa -> u64), read from the Host on demand."""

    def __init__(self, host, vm):
        super().__init__()
        self.host, self.vm = host, vm

    def get(self, gpa, default=0):
        if gpa not in self:
            self[gpa] = int(self.host.read_guest_memory(self.vm, gpa, 1)[0])
        return self[gpa]


def walk(host, vm, cr3, gva, kind):
    """(error code, gpa) of a CPL3 access by the reference walker on the VM's guest memory."""
    err, gpa, _, _ = ref_walk(GuestMem(host, vm), gos.CR0, gos.CR4, gos.EFER, 2, cr3, [0] * 4, 0, 46, gva,
                              kind | bm.ACC_USER)
    return err, gpa


def delta(host, vm):
    last = host.stats(vm)

    def d():
        nonlocal last
        now = host.stats(vm)
        out = {k: now[k] - last[k] for k in now if now[k] != last[k]}
        last = now
        return out
    return d


def make(mmus=("shadow",), params=SMALL, seed=7, vcpus=1, memory="64MiB"):
    host = bm.Host(memory="2GiB", backing="4k")
    vms = [int(host.create_vms(1, memory=memory, vcpus=vcpus, mmu=m)[0]) for m in mmus]
    g = gos.GuestOS(host, vms, seed=seed, streams=[0] * len(vms), **params)
    g.boot()
    return host, vms, g


def test_same_seed_same_stats_other_seed_differs():
    runs = []
    for seed in (7, 7, 8):
        host, vms, g = make(seed=seed)
        g.run(12, forks=2)
        runs.append((host.stats(vms[0]), g.model_counts()))
    assert runs[0] == runs[1]
    assert runs[0][0]["pf_taken"] > 0 and runs[0][1]["forks"] == 2 and runs[0][1]["cow_copies"] > 0
    assert runs[0] != runs[2]


def test_page_tables_translate_every_page_as_intended_and_share_the_kernel_half():
    host, (vm,), g = make(params=dict(SMALL, max_processes=3))
    g.run(24, forks=6)            # forks past max_processes: exits free tables, later reused as pages
    guest = g.guests[vm]
    swapper = host.read_guest_memory(vm, guest.swapper, 512)
    assert len(guest.procs) == 3 and guest.counts["exits"] >= 3
    for proc in guest.procs.values():
        pml4 = host.read_guest_memory(vm, proc.pml4, 512)
        assert (pml4[256:] == swapper[256:]).all()          # the kernel half, as pgd_alloc copies it
        assert pml4[256:].any()
        mapped = np.flatnonzero(proc.frame >= 0)
        assert mapped.size > 10
        for vpi in mapped:
            gva = int(guest.lay.gva(vpi))
            err, gpa = walk(host, vm, proc.pml4, gva, 0)
            assert err == 0 and gpa == int(proc.frame[vpi]) << 12
            writable = bool(proc.vma[vpi] & gos.VM_W) and not proc.cow[vpi]
            err, _ = walk(host, vm, proc.pml4, gva, bm.ACC_WRITE)
            assert (err == 0) == writable, (proc.pid, vpi)
            err, _ = walk(host, vm, proc.pml4, gva, bm.ACC_FETCH)
            assert (err == 0) == bool(proc.vma[vpi] & gos.VM_X)
        for vpi in np.flatnonzero(proc.frame < 0)[::61]:
            err, gpa = walk(host, vm, proc.pml4, int(guest.lay.gva(vpi)), 0)
            assert gpa is None and not err & bm.PFERR_PRESENT
        for slot in np.flatnonzero(proc.pt >= 0):    # every entry of every last-level table
            ptes = host.read_guest_memory(vm, int(proc.pt[slot]), 512).astype(np.int64)
            vpis = slot * 512 + np.arange(512)
            want = np.where(proc.frame[vpis] >= 0, proc.frame[vpis] << 12, 0)
            assert ((ptes & PHYS_MASK) == want).all() and ((ptes & 1) == (proc.frame[vpis] >= 0)).all()


def test_fork_then_cow_gives_each_process_its_own_page():
    host, (vm,), g = make(params=dict(QUIET, processes=1))
    guest = g.guests[vm]
    heap = guest.lay.code + np.arange(8)
    g.user_access(0, heap, bm.ACC_WRITE)
    parent = guest.procs[guest.current[0]]
    child = guest.procs[g.fork(0)]
    gvas = [int(x) for x in guest.lay.gva(heap)]
    for p in (parent, child):   # both sides share the frames, write-protected
        for gva, f in zip(gvas, parent.frame[heap], strict=True):
            assert walk(host, vm, p.pml4, gva, 0) == (0, int(f) << 12)
            assert walk(host, vm, p.pml4, gva, bm.ACC_WRITE)[0] == bm.PFERR_PRESENT | bm.PFERR_WRITE | bm.PFERR_USER
    old = int(parent.frame[heap[0]])
    # the child writes: a fault, a copy; the parent writes: the page is its own again (reuse in place)
    g.switch(0, child.pid)
    first = g.user_access(0, heap[:1], bm.ACC_WRITE)
    assert first[0] == bm.GUEST_FAULT
    g.switch(0, parent.pid)
    assert g.user_access(0, heap[:1], bm.ACC_WRITE)[0] == bm.GUEST_FAULT
    e_child, gpa_child = walk(host, vm, child.pml4, gvas[0], bm.ACC_WRITE)
    e_parent, gpa_parent = walk(host, vm, parent.pml4, gvas[0], bm.ACC_WRITE)
    assert e_child == e_parent == 0 and gpa_parent == old << 12 and gpa_child != gpa_parent
    assert walk(host, vm, child.pml4, gvas[1], 0)[1] == walk(host, vm, parent.pml4, gvas[1], 0)[1]
    # their stores land in different pages
    host.store(vm, 0, gvas[0], 0x2222, bm.ACC_USER)
    g.switch(0, child.pid)
    host.store(vm, 0, gvas[0], 0x1111, bm.ACC_USER)
    assert int(host.read_guest_memory(vm, gpa_child, 1)[0]) == 0x1111
    assert int(host.read_guest_memory(vm, gpa_parent, 1)[0]) == 0x2222
    assert guest.counts["cow_copies"] == 1 and guest.counts["cow_reuses"] == 1


def test_shadow_pays_where_kvm_rules_say():
    host, (vm,), g = make(params=dict(QUIET, processes=2))
    guest = g.guests[vm]
    d = delta(host, vm)
    heap = guest.lay.code
    g.user_access(0, [heap], bm.ACC_WRITE)        # first user page: PDPT, PD and PT for window 0
    d()
    # a PDE store into the shadowed PD (an upper-level table KVM write-tracks): emulated
    g.user_access(0, [heap + 512], bm.ACC_WRITE)
    got = d()
    assert got["pf_emulate"] == 1 and got["mmu_pte_write"] == 1 and "mmu_unsync" not in got
    # a PTE store into a shadowed last-level table: KVM unsyncs it, no emulation
    g.user_access(0, [heap + 1], 0)
    got = d()
    assert got["mmu_unsync"] == 1 and "pf_emulate" not in got and "mmu_pte_write" not in got
    # fork write-protects the parent's PTEs (that table is unsync: plain stores) and flushes: KVM syncs
    # the unsync table on the flush; the child's root is a new shadow page, the parent's a prev_root
    parent = guest.current[0]
    child = g.fork(0)
    got = d()
    assert got["mmu_unsync"] == -1 and got["tlb_flush"] == 1 and "pf_emulate" not in got
    g.switch(0, child)
    assert d()["mmu_cache_miss"] == 1
    g.switch(0, parent)
    assert "mmu_cache_miss" not in d()


def test_munmap_invlpgs_up_to_33_pages_then_flushes():
    host, (vm,), g = make(params=dict(QUIET, processes=1))
    guest = g.guests[vm]
    proc = guest.procs[guest.current[0]]
    d = delta(host, vm)
    for n in (33, 34):
        start = guest.lay.n0 + 64 * (n - 32)
        proc.vma[start:start + n] = gos.VM_R | gos.VM_W
        proc.regions = [[start, n]]
        g.user_access(0, np.arange(start, start + n), bm.ACC_WRITE)
        d()
        g.munmap(0)
        got = d()
        if n <= gos.FLUSH_CEILING:
            assert got["invlpg"] == n and "tlb_flush" not in got
        else:
            assert "invlpg" not in got and got["tlb_flush"] == 1
        ptes = host.read_guest_memory(vm, int(proc.pt[start >> 9]), 512)
        assert not ptes.any()


def _table_pages(host, vm, proc):
    return {t: host.read_guest_memory(vm, int(t), 512) for t in [proc.pml4, *proc.pdpt, *proc.pd, *proc.pt]
            if t >= 0}


@pytest.mark.skipif(TDP_WHY is not None, reason=f"TDP cannot run a paging guest yet: {TDP_WHY}")
def test_tdp_runs_the_same_guest_and_pays_nothing_for_pte_stores_and_cr3():
    host, (tv, sv), g = make(mmus=("tdp", "shadow"))
    g.run(16, forks=3)
    gt, gs = g.guests[tv], g.guests[sv]
    assert gt.counts == gs.counts and host.stats(tv)["accesses"] == host.stats(sv)["accesses"]
    for pid, pt in gt.procs.items():          # the same tables with the same A/D bits
        a, b = _table_pages(host, tv, pt), _table_pages(host, sv, gs.procs[pid])
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    st, ss = host.stats(tv), host.stats(sv)
    assert ss["pf_taken"] > st["pf_taken"] and ss["pf_emulate"] > 0 and st["pf_emulate"] == 0
    # PTE stores into tables TDP already maps and CR3 writes: no exit under TDP
    dt, ds = delta(host, tv), delta(host, sv)
    heap = gt.lay.code + np.arange(gt.lay.heap)
    cur = gt.procs[gt.current[0]]
    todo = heap[(cur.frame[heap] < 0) & (cur.pt[heap >> 9] >= 0)][:8]
    assert todo.size
    g.user_access(0, todo, 0)           # zero-page PTE stores only
    other = [p for p in gt.runq if p != gt.current[0]][0]
    g.switch(0, other)
    assert dt().get("pf_taken", 0) == 0
    assert ds()["pf_taken"] > 0


def test_scenario_compares_the_mmus_and_is_worker_independent():
    assert any(n == "guest_os" for n, _ in bm.list_scenarios())
    sets = ["vms=1", "memory=64MiB", "processes=3", "slices=4", "forks=2", "switch_every=64"]
    one = bm.run_scenario("guest_os", sets=sets, seed=3)
    two = bm.run_scenario("guest_os", sets=sets, seed=3, workers=2)
    assert one.per_vm == two.per_vm
    fork = next(p for p in one.phases if p["name"] == "fork + COW")
    assert fork["shadow.vms"] == 1 and fork["shadow.pf_taken"] > 0 and fork["shadow.guest.forks"] == 2
    assert fork["shadow.kvm_bytes"] > 0
    if TDP_WHY is None:
        assert fork["tdp.vms"] == 1 and fork["tdp.pf_emulate"] == 0
        assert fork["tdp.guest.cow_copies"] == fork["shadow.guest.cow_copies"] > 0
    else:
        assert fork["tdp.skipped"] == 1
    lines = gos.report_lines(fork)
    assert any(line.strip().startswith("shadow") for line in lines)
