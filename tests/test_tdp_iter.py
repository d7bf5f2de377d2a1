"""kernels/tdp_iter.py (KVM's tdp_iter.c) against the recursive pre-order walk of tests/reference/tdp_iter.py,
on TDP tables built by real faults (4K, 2M and 1G leaves, zapped holes), for random ranges and min levels."""

import random

import numpy as np
import pytest
from batchmmu.kernels.tdp_iter import (
    tdp_iter_next,
    tdp_iter_next_leaf,
    tdp_iter_run,
    tdp_iter_start,
    tdp_iter_start_leaf,
)
from reference.tdp_iter import for_each_tdp_pte

import batchmmu as bm


def _iterate(h, vm, min_level, start, end, runs=False, leaf=False):
    """The iterator's visits; with ``runs`` a body takes 4K leaves a run at a time (tdp_iter_run); with
    ``leaf`` the iterator steps past present tables (tdp_iter_start_leaf / tdp_iter_next_leaf)."""
    spt, meta = h.pa.spt, h.pa.meta
    root, root_level, lo = np.int64(h.vt.root[vm]), np.int64(h.vt.levels[vm]), np.int64(min_level)
    if leaf:
        row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, np.int64(start), lo)
    else:
        row, level, gfn, nlg, valid = tdp_iter_start(root, root_level, np.int64(start))
    out = []
    while valid and gfn < end:
        run = int(tdp_iter_run(gfn, level, end)) if runs else 1
        out += [(int(row), int(level), int(gfn) + k) for k in range(run)]
        gfn += run - 1
        if leaf:
            row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level, lo,
                                                             np.int64(end))
        else:
            row, level, gfn, nlg, valid = tdp_iter_next(spt, meta, row, level, gfn, nlg, root_level, lo)
    return out


def _is_table(h, row, level, gfn, min_level):
    spte = int(h.pa.spt[row, (gfn >> (9 * (level - 1))) & 511])
    return level > min_level and spte & (1 << 11) and not spte & (1 << 7)


def _host(seed, backing, levels):
    rng = random.Random(seed)
    h = bm.Host(memory="8GiB", backing=backing)
    vm = int(h.create_vms(1, memory="2GiB", tdp_levels=levels)[0])
    gpas = [rng.randrange(0, 2 << 30) & ~0xFFF for _ in range(300)] + [0x1000 * i for i in range(600)]
    h.access(vm, 0, gpas, [bm.ACC_WRITE] * len(gpas))
    for _ in range(5):   # holes: zapped leaves under present tables
        a = rng.randrange(0, 2 << 30) & ~0xFFF
        h.invalidate_hva_range(vm, (1 << 40) + a, (1 << 40) + a + rng.choice([4096, 64 << 10, 2 << 20]))
    return h, vm, rng


@pytest.mark.nojit
@pytest.mark.parametrize("backing,levels", [("4k", 4), ("thp", 4), ("hugetlb-1g", 4), ("thp", 5)])
def test_iterator_visits_what_the_reference_visits(backing, levels):
    h, vm, rng = _host(len(backing) + levels, backing, levels)
    root, root_level = int(h.vt.root[vm]), int(h.vt.levels[vm])
    assert root >= 0
    ranges = [(0, 1 << 52), (0, 1), (511, 1025), (1 << 18, (1 << 18) + 513)]
    ranges += [tuple(sorted(rng.randrange(0, 1 << 19) for _ in range(2))) for _ in range(6)]
    for start, end in ranges:
        for min_level in (1, 2, 3):
            got = _iterate(h, vm, min_level, start, end)
            want = list(for_each_tdp_pte(h.pa.spt, root, root_level, min_level, start, end))
            assert got == want, (backing, levels, start, end, min_level)
            assert got or start >= end
            assert _iterate(h, vm, min_level, start, end, runs=True) == want
            tables_skipped = [e for e in want if not _is_table(h, *e, min_level)]
            assert _iterate(h, vm, min_level, start, end, runs=True, leaf=True) == tables_skipped


@pytest.mark.nojit
def test_no_root_is_not_valid():
    *_, valid = tdp_iter_start(np.int64(-1), np.int64(4), np.int64(0))
    assert not valid
