"""``bm.warmup()``: compile (or load from numba's on-disk cache) every kernel before anything is timed.

Each group drives one family of kernels through the public API on a tiny host, with the argument
types real runs use, so that later calls find their one compiled signature.  ``batchmmu warmup``
prints the groups as they finish.
"""

import gc
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .constants import ACC_FETCH, ACC_USER, ACC_WRITE, MEM_LOG_DIRTY_PAGES
from .host import Host

_P, _W, _U, _A, _D = 1, 2, 4, 0x20, 0x40
_TABLE = _P | _W | _U
_CODE, _DATA = 0x100000, 0x400000
# guest paging modes: (name, cr0, cr4, efer, levels, gpte bytes)
_MODES = (
    ("32-bit", 0x80010011, 0x10, 0, 2, 4),
    ("PAE", 0x80010011, 0x20, 0x800, 3, 8),
    ("4-level", 0x80010011, 0x20, 0xD00, 4, 8),
    ("5-level", 0x80010011, 0x1020, 0xD00, 5, 8),
)


def _dirty_modes(h, vm, slot_gpa):
    """Bitmap GET (and CLEAR with manual protect), then the dirty ring, on one VM."""
    h.set_memslot(vm, 1, slot_gpa, 1 << 21, flags=MEM_LOG_DIRTY_PAGES)
    h.access(vm, 0, [slot_gpa, slot_gpa + 4096], [ACC_WRITE, 0])
    h.get_dirty_log(vm, 1)
    h.set_memslot(vm, 1, slot_gpa, 1 << 21, flags=0)
    h.set_memslot(vm, 1, slot_gpa, 0)


def _manual_and_ring(h):
    """Manual protect with INITIALLY_SET (CLEAR, then GET), then the dirty ring, each on a new VM of ``h``'s
    kind; returns the ring's VM."""
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.enable_manual_dirty_log_protect(vm, initially_set=True)
    h.access(vm, 0, 0, ACC_WRITE)
    h.set_memslot(vm, 0, 0, 4 << 20, flags=MEM_LOG_DIRTY_PAGES)
    h.clear_dirty_log(vm, 0, 0, 64, [-1])
    h.get_dirty_log(vm, 0)
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.enable_dirty_ring(vm, 1024)
    h.set_memslot(vm, 0, 0, 4 << 20, flags=MEM_LOG_DIRTY_PAGES)
    h.access(vm, 0, 0, ACC_WRITE)
    h.harvest_dirty_ring(vm, 0)
    h.reset_dirty_rings(vm)
    return vm


def _tdp():
    """TDP MMU (EPT / NPT, 4 / 5 levels, with and without EPT A/D bits) and dirty logging."""
    for pml in (False, True):
        h = Host(memory="64MiB", backing="thp", pml=pml)
        for fmt, levels, ad in (("ept", 4, True), ("npt", 4, True), ("ept", 5, False)):
            if pml and (fmt != "ept" or not ad):
                continue
            vm = int(h.create_vms(1, memory="4MiB", vcpus=2, tdp_format=fmt, tdp_levels=levels, ept_ad=ad)[0])
            h.access([vm, vm, vm], 0, [0, 0x1000, 1 << 30], [0, ACC_WRITE, ACC_FETCH])
            h.access(vm, 1, 1 << 30, 0)
            h.spte_dump(vm)
            _dirty_modes(h, vm, 1 << 30)
        vm = int(h.create_vms(1, memory="4MiB")[0])
        h.access([vm, vm - 1], 0, [0, 0], [0, 0])   # VMs out of order: grouped, then ungrouped
        _manual_and_ring(h)


def _notifiers():
    """MMU notifiers (invalidate, age, test_young, release), NX huge page recovery, the shrinker."""
    h = Host(memory="64MiB", backing="thp", nx_huge_pages=True, nx_huge_pages_recovery_ratio=1)
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.access(vm, 0, [0, 1 << 21], [ACC_FETCH, ACC_WRITE])
    h.advance_time(3600)   # one pass of the recovery worker (ratio 1: every hour)
    h.age_hva_range(vm, 1 << 40, (1 << 40) + (4 << 20))
    h.test_young(vm, 1 << 40, (1 << 40) + (4 << 20))
    h.invalidate_hva_range(vm, 1 << 40, (1 << 40) + (1 << 20))
    h.mmu_notifier_release(vm)
    h.footprint()


def _legacy():
    """The legacy TDP MMU (kvm.tdp_mmu=N): faults and MMIO SPTEs in direct shadow pages, dirty logging with and
    without PML, notifiers, NX recovery over shadow pages, n_max_mmu_pages, memslot deletion."""
    for pml in (False, True):
        h = Host(memory="64MiB", backing="thp", pml=pml, tdp_mmu=False, nx_huge_pages=True,
                 nx_huge_pages_recovery_ratio=1)
        for fmt, ad in (("ept", True), ("npt", True), ("ept", False)):
            if pml and (fmt != "ept" or not ad):
                continue
            vm = int(h.create_vms(1, memory="4MiB", vcpus=2, tdp_format=fmt, ept_ad=ad)[0])
            h.access([vm, vm, vm], [0, 1, 0], [0, 0x1000, 1 << 30], [ACC_FETCH, ACC_WRITE, 0])
            h.spte_dump(vm)
            _dirty_modes(h, vm, 1 << 30)
        if not pml:
            h.access([vm, vm - 1], 0, 0x2000, ACC_WRITE)   # VMs interleaved: grouped by VM (group_records_by_vm)
        h.advance_time(3600)
        h.age_hva_range(vm, 1 << 40, (1 << 40) + (4 << 20))
        h.invalidate_hva_range(vm, 1 << 40, (1 << 40) + (1 << 20))
        vm = _manual_and_ring(h)
        h.set_nr_mmu_pages(vm, 64)
        h.shrink(10)
        h.footprint()


def _nested_paging():
    """L2 guests on nested paging (nested.l2_batch and guest_mmu's fault path)."""
    h = Host(memory="64MiB", backing="thp", tdp_mmu=False)
    _nested(h)
    h.footprint()


def _nested(h):
    """An L2 guest under nested EPT: EPT12 at 1 MiB mapping L2 gpa 0 -> L1 2 MiB (4K), L2 with paging off and on,
    an L1 exit, INVEPT, L1's store into EPT12 (emulated), L2 without nested EPT; then under nested NPT."""
    vm = int(h.create_vms(1, memory="4MiB", vcpus=2, nested=True)[0])
    words = np.zeros(4 * 512, np.int64)
    for lv in range(3):                                   # PML4 -> PDPT -> PD -> PT, RWX tables
        words[512 * lv] = (0x101000 + 0x1000 * lv) | 7
    words[3 * 512:3 * 512 + 16] = 0x200000 + 0x1000 * np.arange(16) | 7 | (6 << 3)
    h.write_guest_memory(vm, 0x100000, words.view(np.uint64))
    pt = np.zeros(3 * 512, np.int64)                      # L2's 4-level tables at L2 gpa 0x1000.. (one 4K page)
    pt[0], pt[512], pt[1024] = 0x2000 | 7, 0x3000 | 7, 0x4000 | 7
    h.write_guest_memory(vm, 0x201000, pt.view(np.uint64))
    h.write_guest_memory(vm, 0x204000, np.array([0x5000 | 7], np.uint64))
    eptp = 0x100000 | 6 | (3 << 3) | (1 << 6)
    h.nested_enter(vm, 0, eptp=eptp, cr0=0x11, cr3=0, cr4=0, efer=0)
    h.access(vm, 0, [0x5000, 0x5000, 0x6000, 1 << 30], [0, ACC_WRITE, ACC_FETCH, 0])
    h.store(vm, 0, 0x5008, 1)
    h.nested_exit(vm, 0)
    h.nested_enter(vm, 0, eptp=eptp, cr0=0x80000011, cr3=0x1000, cr4=0x20, efer=0x500)
    h.access(vm, 0, [0, 8, 0x1000], [0, ACC_WRITE, 0])
    h.store(vm, 0, 16, 2)
    h.nested_exit(vm, 0)
    h.store(vm, 0, 0x101000, 0x102000 | 7)               # a write-tracked EPT12 table: emulated
    h.invept(vm, 0, eptp)
    h.invept(vm, 0)
    h.nested_enter(vm, 1, cr0=0x11, cr3=0, cr4=0, efer=0)
    h.access(vm, 1, 0x5000, 0)
    h.nested_exit(vm, 1)
    # SVM: nested NPT (NPT12 is x86 paging: the same tables read as P|RW|US entries), L1 in long mode
    vm = int(h.create_vms(1, memory="4MiB", nested=True, tdp_format="npt")[0])
    h.write_guest_memory(vm, 0x100000, words.view(np.uint64) & ~np.uint64(6 << 3))
    h.write_guest_memory(vm, 0x300000, np.array([0x301000 | 7, 0], np.uint64))       # L1's own 1G identity map
    h.write_guest_memory(vm, 0x301000, np.array([0x87], np.uint64))
    h.set_vcpu_regs(vm, 0, cr0=0x80000011, cr3=0x300000, cr4=0x20, efer=0xD00)
    h.nested_enter(vm, 0, ncr3=0x100000, cr0=0x11, cr3=0, cr4=0, efer=0)
    h.access(vm, 0, [0x5000, 0x5000, 1 << 30], [0, ACC_WRITE, 0])
    h.nested_exit(vm, 0)


def _reclaim():
    """Overcommitted host: reclaim, refaults, discard (MADV_DONTNEED)."""
    from .kernels.reclaim import madvise_dontneed
    h = Host(memory="4MiB", backing="thp", overcommit=True)
    vm = int(h.create_vms(1, memory="8MiB")[0])
    h.access(vm, 0, [0, 1 << 21, 2 << 21, 4096], [ACC_WRITE, ACC_WRITE, ACC_WRITE, 0])
    h.discard_hva_range(vm, 1 << 40, (1 << 40) + 4096)
    madvise_dontneed(h._mmu_bundle(), vm, np.array([[0], [0], [1]], np.int64))


def _paging_guest(h, vm, cr0, cr4, efer, levels, size):
    """Page tables at 0x10000.. mapping themselves, _CODE and two _DATA pages (4K leaves, A/D clear);
    the vCPU in that mode."""
    tables = [0x10000 + 0x1000 * i for i in range(levels)]
    shifts = (12, 21, 30, 39, 48) if size == 8 else (12, 22)
    for gva in (_CODE, _DATA, _DATA + 4096, *tables):
        for k in range(levels - 1):      # table k (top down) points at table k + 1
            level = levels - k
            idx = (gva >> shifts[level - 1]) & (511 if size == 8 else 1023)
            entry = tables[k + 1] | (_P if size == 8 and levels == 3 and k == 0 else _TABLE)
            _put(h, vm, tables[k] + idx * size, entry, size)
        _put(h, vm, tables[-1] + ((gva >> 12) & (511 if size == 8 else 1023)) * size, gva | _TABLE, size)
    h.set_vcpu_regs(vm, 0, cr0=cr0, cr4=cr4, efer=efer, cr3=tables[0])
    return tables


def _put(h, vm, gpa, value, size):
    """Write one gpte of ``size`` bytes (4: into its half of the aligned u64)."""
    word = gpa & ~7
    old = int(h.read_guest_memory(vm, word, 1)[0])
    if size == 4:
        shift = 8 * (gpa & 4)
        value = (old & ~(0xFFFFFFFF << shift)) | (value << shift)
    h.write_guest_memory(vm, word, [value])


def _guest_paging(mmu, pml=False):
    """Accesses, stores into guest tables, INVLPG, MOV CR3, flushes, dirty logging under guest paging."""
    h = Host(memory="256MiB", backing="4k", pml=pml)
    for _name, cr0, cr4, efer, levels, size in _MODES:
        for fmt in ("ept", "npt") if mmu == "tdp" and not pml else ("ept",):
            vm = int(h.create_vms(1, memory="8MiB", mmu=mmu, tdp_format=fmt)[0])
            tables = _paging_guest(h, vm, cr0, cr4, efer, levels, size)
            h.access(vm, 0, [_CODE, _DATA, _DATA + 4096, 1 << 31], [ACC_FETCH | ACC_USER, ACC_USER, ACC_WRITE, 0])
            h.store(vm, 0, _DATA, 0x1234, ACC_WRITE | ACC_USER)
            h.store(vm, 0, tables[-1] + 8, (_DATA + 4096) | _TABLE, ACC_WRITE)  # a gpte write
            h.store(vm, 0, tables[-2] + 3, 0, ACC_WRITE)                       # misaligned, emulated
            if mmu == "shadow":
                h.emulated_access(vm, 0, _DATA, ACC_WRITE, 5, 4)
            h.invlpg(vm, 0, _DATA)
            h.flush_tlb(vm, 0)
            h.mov_cr3(vm, 0, tables[0])
            h.access(vm, 0, _DATA, ACC_WRITE)
            _dirty_modes(h, vm, 0x40000000)
            h.set_memslot(vm, 0, 0, 8 << 20, flags=MEM_LOG_DIRTY_PAGES)
            h.access(vm, 0, _DATA, ACC_WRITE)
            h.get_dirty_log(vm, 0)
            h.age_hva_range(vm, 1 << 40, (1 << 40) + (8 << 20))
            h.test_young(vm, 1 << 40, (1 << 40) + (8 << 20))
            h.invalidate_hva_range(vm, 1 << 40, (1 << 40) + (8 << 20))
            h.set_vcpu_regs(vm, 0, cr0=cr0)
    vm = int(h.create_vms(1, memory="8MiB", mmu=mmu)[0])
    tables = _paging_guest(h, vm, *_MODES[2][1:])
    h.enable_manual_dirty_log_protect(vm, initially_set=True)
    h.set_memslot(vm, 0, 0, 8 << 20, flags=MEM_LOG_DIRTY_PAGES)
    h.access(vm, 0, [_CODE, _DATA], [ACC_FETCH, ACC_WRITE])
    h.clear_dirty_log(vm, 0, 0, 64, [-1])
    vm = int(h.create_vms(1, memory="8MiB", mmu=mmu)[0])
    tables = _paging_guest(h, vm, *_MODES[2][1:])
    h.enable_dirty_ring(vm, 1024)
    h.set_memslot(vm, 0, 0, 8 << 20, flags=MEM_LOG_DIRTY_PAGES)
    h.access(vm, 0, [_CODE, _DATA], [ACC_FETCH, ACC_WRITE])
    h.harvest_dirty_ring(vm, 0)
    h.reset_dirty_rings(vm)
    h.set_memslot(vm, 0, 0, 8 << 20, flags=0)
    if mmu == "shadow":
        h.set_nr_mmu_pages(vm, 64)
        h.shrink(10)
    h.mmu_notifier_release(vm)
    h.footprint()


def _shadow_host():
    """The shadow MMU's host side on VMs whose vCPUs have not run (memslot flags, GET / CLEAR, the dirty ring,
    notifiers, KVM_SET_NR_MMU_PAGES, the shrinker, footprint): compiled beside the shadow fault path, which then
    finds these kernels in the cache."""
    h = Host(memory="64MiB", backing="4k")
    vm, vm2, vm3 = (int(v) for v in h.create_vms(3, memory="8MiB", mmu="shadow"))
    h.set_memslot(vm, 1, 1 << 30, 1 << 21, flags=MEM_LOG_DIRTY_PAGES)
    h.get_dirty_log(vm, 1)
    h.set_memslot(vm, 1, 1 << 30, 1 << 21, flags=0)
    h.set_memslot(vm, 1, 1 << 30, 0)
    h.enable_manual_dirty_log_protect(vm2, initially_set=True)
    h.set_memslot(vm2, 0, 0, 8 << 20, flags=MEM_LOG_DIRTY_PAGES)
    h.clear_dirty_log(vm2, 0, 0, 64, [-1])
    h.get_dirty_log(vm2, 0)
    h.enable_dirty_ring(vm3, 1024)
    h.set_memslot(vm3, 0, 0, 8 << 20, flags=MEM_LOG_DIRTY_PAGES)
    h.harvest_dirty_ring(vm3, 0)
    h.reset_dirty_rings(vm3)
    h.age_hva_range(vm, 1 << 40, (1 << 40) + (8 << 20))
    h.test_young(vm, 1 << 40, (1 << 40) + (8 << 20))
    h.invalidate_hva_range(vm, 1 << 40, (1 << 40) + (8 << 20))
    h.set_nr_mmu_pages(vm, 64)
    h.shrink(10)
    h.mmu_notifier_release(vm)
    h.footprint()


def _guest_os():
    """The guest OS workload (batchmmu.guestos) on both MMUs."""
    from .guestos import GuestOS, tdp_guest_paging_unsupported
    h = Host(memory="512MiB", backing="4k")
    mmus = ("shadow",) if tdp_guest_paging_unsupported() else ("tdp", "shadow")
    vms = [int(h.create_vms(1, memory="32MiB", mmu=m)[0]) for m in mmus]
    g = GuestOS(h, vms, seed=1, streams=[0] * len(vms), processes=2, max_processes=4, code_pages=8,
                heap_pages=64, mmap_pages=32, stack_pages=4, switch_every=16, kernel_touches=2, hot_pages=4,
                mmap_rate=0.5, munmap_rate=0.5, max_mmap_pages=4)
    g.boot()
    g.run(4, forks=2)
    g.exit_all()


READY = False   # set once every group ran in this process
# (name, run, the groups whose kernels it reuses): a parallel warm-up starts a group once those are compiled;
# of the groups ready, the first listed (the longer ones first)
GROUPS = (
    ("shadow MMU, all guest modes", lambda: _guest_paging("shadow"), ()),
    ("shadow MMU host side", _shadow_host, ()),
    ("TDP MMU and dirty logging", _tdp, ()),
    ("2D walks (guest paging under EPT/NPT)", lambda: _guest_paging("tdp"), ()),
    ("reclaim", _reclaim, (1, 2)),
    ("notifiers, NX recovery, shrinker", _notifiers, (1, 2)),
    ("2D walks with PML", lambda: _guest_paging("tdp", pml=True), (2, 3)),
    ("guest OS workload", _guest_os, (0, 3)),
    ("legacy TDP MMU", _legacy, (0, 1, 3)),
    ("nested paging (L2 guests)", _nested_paging, (0, 1, 3)),
)
_INDEPENDENT = sum(1 for g in GROUPS if not g[2])   # groups that can start at once


def _timed_tdp_shadow():
    """The time model's wrappers of the TDP-MMU access batch and of the shadow MMU's event batch."""
    h = Host(memory="256MiB", backing="4k", time=True)
    vm = int(h.create_vms(1, memory="8MiB", vcpus=2)[0])
    h.access([vm, vm], [0, 1], [0x1000, 0x1000], [ACC_WRITE, 0])
    s = int(h.create_vms(1, memory="8MiB", mmu="shadow")[0])
    _paging_guest(h, s, 0x80010011, 0x20, 0xD00, 4, 8)
    h.access(s, 0, [_DATA, _DATA], [ACC_WRITE, 0])


def _timed_2d_l2():
    """The time model's wrappers of the 2D-walk batch and of the L2 batch (nested paging)."""
    h = Host(memory="256MiB", backing="4k", time=True)
    vm = int(h.create_vms(1, memory="8MiB")[0])
    _paging_guest(h, vm, 0x80010011, 0x20, 0xD00, 4, 8)
    h.access(vm, 0, [_DATA, _DATA], [ACC_WRITE, 0])
    _nested(Host(memory="64MiB", backing="thp", tdp_mmu=False, time=True))


# the time model's kernels (kernels/timeline.py: each links its batch kernel's code, ~15-25 s apiece), compiled
# only with warmup(time=True): after the groups whose batch kernels they call
TIME_GROUPS = (
    ("time model: TDP and shadow MMU", _timed_tdp_shadow, (0, 2)),
    ("time model: 2D walks, L2 guests", _timed_2d_l2, (3, 9)),
)


def _run_group(i):
    """Run group ``i`` (of GROUPS, then TIME_GROUPS) with the collector off (numba's compiler makes millions of
    objects); its seconds."""
    t = time.perf_counter()
    gc_on = gc.isenabled()
    gc.disable()
    try:
        (GROUPS + TIME_GROUPS)[i][1]()
    finally:
        if gc_on:
            gc.enable()
    gc.collect()
    return time.perf_counter() - t


def cache_is_cold():
    """True when numba's cache directory of these kernel sources holds no compiled function yet."""
    from .kernels import CACHE_DIR
    return not Path(CACHE_DIR).exists() or not any(Path(CACHE_DIR).rglob("*.nbi"))


def warm_jobs(jobs=None):
    """Processes a cold warm-up compiles in: ``jobs`` (default: the CPUs this process may use), at most as many
    as there are independent groups."""
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(jobs), _INDEPENDENT))


def _spawn(i):
    """Group ``i`` in a fresh interpreter (``python -m batchmmu.warm i``): nothing of the caller's script runs
    there, and a worker that dies (out of memory, a crash) is seen by its exit status."""
    err = tempfile.TemporaryFile()
    return subprocess.Popen([sys.executable, "-m", "batchmmu.warm", str(i)], stdout=subprocess.DEVNULL,
                            stderr=err), err


def _compile_in_processes(jobs, progress, todo=None, total=None):
    """Run every group (or the groups ``todo``, of GROUPS then TIME_GROUPS) in its own process, ``jobs`` at a time,
    each as soon as the groups it reuses are done (the independent ones first, longest first), so that no kernel
    is compiled twice and no CPU waits for a stage.  Reports each group as it ends; a failed group stops the
    others and raises."""
    groups = GROUPS + TIME_GROUPS
    todo = list(range(len(GROUPS))) if todo is None else list(todo)
    total = len(todo) if total is None else total
    pending, finished, running = todo, set(range(len(groups))) - set(todo), {}
    done = 0
    try:
        while pending or running:
            for i in [i for i in pending if finished.issuperset(groups[i][2])]:
                if len(running) >= jobs:
                    break
                pending.remove(i)
                running[i] = (*_spawn(i), time.perf_counter())
            time.sleep(0.05)
            for i, (proc, err, t) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                if proc.returncode != 0:
                    err.seek(0)
                    tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
                    raise RuntimeError(f"warm-up group {groups[i][0]!r} failed in its process (exit status "
                                       f"{proc.returncode}):\n" + "\n".join(tail))
                err.close()
                finished.add(i)
                done += 1
                if progress is not None:
                    progress(done, total, groups[i][0], time.perf_counter() - t)
    finally:
        for proc, err, _ in running.values():
            proc.kill()
            proc.wait()
            err.close()


def warmup(progress=None, jobs=None, time_model=False):
    """Compile (or load from numba's cache) every kernel on tiny batches; returns seconds taken.

    ``progress(done, total, group, seconds)`` is called after each kernel group.  With an empty cache the
    groups compile in up to ``jobs`` processes at once (default: the CPUs this process may use), then load
    here from the cache; ``jobs=1``, a daemonic pool worker and numba's JIT switched off run them one after
    the other in this process.  ``time_model``: the time model's kernels too (TIME_GROUPS).
    """
    global READY
    import numba

    from .timemodel import timed_kernels_cold
    t0 = time.perf_counter()
    jobs = warm_jobs(jobs)
    n = len(GROUPS) + (len(TIME_GROUPS) if time_model else 0)
    main_cold = cache_is_cold()
    todo = [i for i in range(n) if (main_cold if i < len(GROUPS) else timed_kernels_cold())]
    if jobs > 1 and todo and not numba.config.DISABLE_JIT and not multiprocessing.current_process().daemon:
        _compile_in_processes(jobs, progress, todo, n)
        for i in range(n):   # load what the workers compiled (and what was cached already)
            _run_group(i)
    else:
        for i in range(n):
            seconds = _run_group(i)
            if progress is not None:
                progress(i + 1, n, (GROUPS + TIME_GROUPS)[i][0], seconds)
    READY = True
    return time.perf_counter() - t0


def _arrays_in(ty):
    """Arrays a value of numba type ``ty`` passes to a compiled call (tuples flattened, as numba does)."""
    from numba.core import types
    if isinstance(ty, types.Array):
        return 1
    if isinstance(ty, types.BaseTuple):
        return sum(_arrays_in(t) for t in ty.types)
    return 0


def kernel_signatures():
    """{"module.kernel": (compiled signatures, Python entry point?, widest signature in arrays)} for every
    numba dispatcher of ``batchmmu.kernels`` in this process (``bench/shapes.py``, ``tests/test_warmup.py``)."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    from . import kernels
    out = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"batchmmu.kernels.{info.name}")
        for name, d in vars(mod).items():
            if isinstance(d, CPUDispatcher) and d.py_func.__module__ == mod.__name__:
                entry = d._cache.__class__.__name__ != "NullCache" and not d.targetoptions.get("no_cpython_wrapper")
                width = max((sum(_arrays_in(t) for t in sig) for sig in d.signatures), default=0)
                out[f"{info.name}.{name}"] = (len(d.signatures), entry, width)
    return out


if __name__ == "__main__":   # one group of a parallel warm-up (_spawn)
    _run_group(int(sys.argv[1]))
