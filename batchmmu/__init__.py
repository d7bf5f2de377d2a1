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
    L1_EXIT,
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
from .sweep import sweep  # the function; the module stays importable as batchmmu.sweep
from .units import parse_size

__version__ = "0.1.0"

__all__ = [
    "ACC_FETCH", "ACC_READ", "ACC_USER", "ACC_WRITE", "BACKINGS", "EMULATED", "FIXED", "GUEST_FAULT", "HIT", "L1_EXIT",
    "MEM_LOG_DIRTY_PAGES", "MEM_READONLY", "MMIO", "OUTCOME_NAMES", "PFERR_FETCH", "PFERR_PK", "PFERR_PRESENT",
    "PFERR_RSVD", "PFERR_USER", "PFERR_WRITE", "RETRY", "RING_FULL", "SPURIOUS", "STAT_NAMES", "AccessResult",
    "BatchMMUError", "Host", "HostMemoryExhausted", "InvalidationInProgress", "parse_size", "warmup",
    "run_scenario", "load_scenario", "list_scenarios",
    "sweep",
]


def warmup(progress=None, jobs=None, time_model=False):
    """Compile (or load from numba's cache) every kernel on tiny batches; returns seconds taken.

    ``progress(done, total, group, seconds)``, if given, is called after each kernel group.  With an empty
    cache the kernel groups compile in ``jobs`` processes at once (default: the usable CPUs).
    ``time_model=True``: the time model's kernels too (docs/time.md).
    """
    from .warm import warmup as _warmup
    return _warmup(progress, jobs, time_model)


def __getattr__(name):
    if name in ("run_scenario", "load_scenario", "list_scenarios"):
        from . import scenario
        return getattr(scenario, name)
    raise AttributeError(name)
