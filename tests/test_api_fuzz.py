"""Property test over every public Host method: bad input is refused with BatchMMUError naming the
argument, and a refused call changes nothing (tests/apifuzz.py; bench/fuzz_api.py runs many more)."""

import os

import apifuzz
import numpy as np
import pytest

import batchmmu as bm

CASES = int(os.environ.get("BATCHMMU_FUZZ_CASES", "160"))


def test_every_method_is_listed():
    public = {n for n in dir(bm.Host) if not n.startswith("_") and callable(getattr(bm.Host, n))}
    no_args = {"host_memory", "nx_recovery_period", "reclaim_scan", "shrink_count", "swapped_bytes", "sim_begin",
               "sim_end"}
    assert public - no_args == {m for m, _ in apifuzz.METHODS}


@pytest.mark.parametrize("seed", [0, 1])
def test_refused_calls_change_nothing(seed):
    counts = apifuzz.run(seed, CASES // 2)
    assert counts.bad_cases > CASES // 4
    assert not counts.failures, f"{counts}\n" + "\n".join(counts.failures[:10])


@pytest.mark.nojit
@pytest.mark.parametrize("kw,field", [
    (dict(memory="9007199254740993x"), "memory"), (dict(memory=1.5e9), "memory"), (dict(mmio_caching="no"),
                                                                                      "mmio_caching"),
    (dict(pml=2), "pml"), (dict(tdp_huge_page_level=2.0), "tdp_huge_page_level"),
    (dict(nx_huge_pages_recovery_ratio=np.float64(1)), "nx_huge_pages_recovery_ratio"),
    (dict(watermarks=("0.5", "0.9")), "watermarks"), (dict(watermarks=(0.5, float("nan"))), "watermarks"),
    (dict(overcommit="yes"), "overcommit"), (dict(memory=2 ** 64), "memory"),
])
def test_host_constructor_refuses(kw, field):
    with pytest.raises(bm.BatchMMUError) as ei:
        bm.Host(**kw)
    assert ei.value.field == field


@pytest.mark.nojit
def test_sizes_are_exact():
    assert bm.Host(memory="9007199254740993").memory == 9007199254740993   # not rounded through a float
    assert bm.Host(memory=np.int64(1 << 30)).memory == 1 << 30
    assert bm.parse_size("1.5KiB") == 1536
