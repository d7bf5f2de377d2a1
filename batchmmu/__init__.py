"""batchmmu: a faithful, fast simulator of the Linux KVM x86 MMU for thousands of VMs at once."""

from .constants import (
    ACC_FETCH,
    ACC_READ,
    ACC_USER,
    ACC_WRITE,
    BACKINGS,
    EMULATED,
    FIXED,
    GUEST_FAULT,
    HIT,
    MEM_LOG_DIRTY_PAGES,
    MEM_READONLY,
    MMIO,
    OUTCOME_NAMES,
    PFERR_FETCH,
    PFERR_PK,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    RETRY,
    RING_FULL,
    SPURIOUS,
    STAT_NAMES,
)
from .errors import BatchMMUError, HostMemoryExhausted, InvalidationInProgress
from .host import AccessResult, Host
from .units import parse_size

__version__ = "0.1.0"

__all__ = [
    "ACC_FETCH", "ACC_READ", "ACC_USER", "ACC_WRITE", "BACKINGS", "EMULATED", "FIXED", "GUEST_FAULT", "HIT",
    "MEM_LOG_DIRTY_PAGES", "MEM_READONLY", "MMIO", "OUTCOME_NAMES", "PFERR_FETCH", "PFERR_PK", "PFERR_PRESENT",
    "PFERR_RSVD", "PFERR_USER", "PFERR_WRITE", "RETRY", "RING_FULL", "SPURIOUS", "STAT_NAMES", "AccessResult",
    "BatchMMUError", "Host", "HostMemoryExhausted", "InvalidationInProgress", "parse_size", "warmup",
    "run_scenario", "load_scenario", "list_scenarios",
]


def warmup():
    """Compile (or load from numba's cache) every kernel on a tiny batch; returns seconds taken."""
    import time
    t = time.perf_counter()
    for pml in (False, True):
        h = Host(memory="64MiB", backing="thp", pml=pml)
        for fmt in ("ept",) if pml else ("ept", "npt"):
            vm = int(h.create_vms(1, memory="4MiB", vcpus=2, tdp_format=fmt)[0])
            h.access([vm, vm, vm], 0, [0, 0x1000, 1 << 30], [0, ACC_WRITE, 0])
            h.access(vm, 0, 1 << 30, 0)
            h.set_memslot(vm, 1, 1 << 30, 1 << 21, flags=MEM_LOG_DIRTY_PAGES)
            h.access(vm, 1, 1 << 30, ACC_WRITE)
            h.get_dirty_log(vm, 1)
            h.set_memslot(vm, 1, 1 << 30, 1 << 21, flags=0)
            h.set_memslot(vm, 1, 1 << 30, 0)
        vm = int(h.create_vms(1, memory="4MiB")[0])
        h.enable_manual_dirty_log_protect(vm, initially_set=True)
        h.access(vm, 0, 0, ACC_WRITE)
        h.set_memslot(vm, 0, 0, 4 << 20, flags=MEM_LOG_DIRTY_PAGES)
        h.clear_dirty_log(vm, 0, 0, 64, [-1])
        vm = int(h.create_vms(1, memory="4MiB")[0])
        h.enable_dirty_ring(vm, 1024)
        h.set_memslot(vm, 0, 0, 4 << 20, flags=MEM_LOG_DIRTY_PAGES)
        h.access(vm, 0, 0, ACC_WRITE)
        h.harvest_dirty_ring(vm, 0)
        h.reset_dirty_rings(vm)
        h.age_hva_range(vm, 1 << 40, (1 << 40) + (1 << 20))
        h.invalidate_hva_range(vm, 1 << 40, (1 << 40) + (1 << 20))
    h = Host(memory="64MiB", backing="thp", nx_huge_pages=True, nx_huge_pages_recovery_ratio=1)
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.access(vm, 0, [0, 1 << 21], [ACC_FETCH, 0])
    h.advance_time(60)
    h = Host(memory="4MiB", backing="thp", overcommit=True)   # reclaim, refaults, MADV_DONTNEED
    vm = int(h.create_vms(1, memory="8MiB")[0])
    h.access(vm, 0, [0, 1 << 21, 2 << 21, 4096], [ACC_WRITE, ACC_WRITE, ACC_WRITE, 0])
    h.discard_hva_range(vm, 1 << 40, (1 << 40) + 4096)
    import numpy as np

    from .hostops import madvise_dontneed
    madvise_dontneed(h.pa, h.vt, h.st, h.host_ctl, vm, np.zeros(1, np.int64), np.zeros(1, np.int64),
                     np.ones(1, np.int64))
    return time.perf_counter() - t


def __getattr__(name):
    if name in ("run_scenario", "load_scenario", "list_scenarios"):
        from . import scenario
        return getattr(scenario, name)
    raise AttributeError(name)
