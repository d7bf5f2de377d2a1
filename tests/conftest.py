"""Shared helpers for the directed KVM-semantics tests.

SPTEs live in int64 arrays (bit 63 set = negative); tests compare them as unsigned
Python ints, bit by bit, against patterns derived from KVM's ``spte.c`` / ``spte.h``.
"""

import numpy as np
import pytest

import batchmmu as bm

U64 = (1 << 64) - 1
GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10


def pytest_sessionstart(session):
    """With an empty kernel cache, compile every kernel first in one process per CPU (bm.warmup) instead of
    one by one inside the first tests that need them."""
    import os

    from batchmmu.warm import cache_is_cold
    if os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0") and cache_is_cold():
        print(f"\nempty kernel cache: compiling every kernel first ({bm.warmup(time_model=True):.0f} s)", flush=True)


def u64(x):
    """An SPTE (np.int64, negative when bit 63 is set) as an unsigned Python int."""
    return int(x) & U64


def s64(x):
    """An unsigned 64-bit pattern as the np.int64 the kernels take."""
    return np.array([x & U64], dtype=np.uint64).view(np.int64)[0]


def bits(*ns):
    return sum(1 << n for n in ns)


def bit_range(lo, hi):
    """Mask of bits lo..hi inclusive."""
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


def leaf(host, vm, gfn):
    """(level, spte as unsigned) of the leaf or MMIO SPTE that maps ``gfn`` (its aligned base)."""
    dump = host.spte_dump(vm)
    for level, span in ((1, 1), (2, 512), (3, 512 * 512)):
        base = gfn & ~(span - 1)
        if base in dump and dump[base][0] == level:
            return dump[base][0], u64(dump[base][1])
    return None


def one(host, vm, addr, kind=0, vcpu=0):
    """One access; returns (outcome, error_code) as ints."""
    r = host.access(vm, vcpu, addr, kind)
    return int(r.outcome[0]), int(r.error_code[0])


@pytest.fixture
def host4k():
    """A host whose guest RAM is backed by 4 KiB pages (no huge mappings anywhere)."""
    return bm.Host(memory="8GiB", backing="4k")
