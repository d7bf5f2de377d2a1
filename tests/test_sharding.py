"""Sharding: identical statistics for any backend and worker count; failing workers surface."""

import pytest

import batchmmu as bm
from batchmmu.backends import ProcessBackend
from batchmmu.errors import BatchMMUError
from batchmmu.scenario import load_scenario, resolve
from batchmmu.shard import split

SETS = ["vms=5", "vcpus=2", "bytes_per_vcpu=2MiB", "access_order=random", "write_percent=50", "passes=2"]


def _mixed():
    data, _, _ = load_scenario("demand_paging")
    data = dict(data)
    # two groups of different sizes so the split by weight is uneven
    g = dict(data["vm_group"][0])
    data["vm_group"] = [g, dict(g, count=3, vcpus=1)]
    return data


def test_split_by_weight_is_deterministic_and_complete():
    spec = resolve(_mixed() | {"params": {**_mixed()["params"], "vms": 7}})
    for w in (1, 2, 3, 16):
        parts = split(spec, w)
        assert sorted(v for p in parts for v in p) == list(range(10))
        assert parts == split(spec, w)
    with pytest.raises(BatchMMUError):
        split(spec, 0)


@pytest.mark.parametrize("workers", [2, 3])
def test_serial_workers_same_stats(workers):
    a = bm.run_scenario(_mixed(), workers=1, seed=7, sets=SETS)
    b = bm.run_scenario(_mixed(), workers=workers, seed=7, sets=SETS)
    assert a.totals == b.totals
    assert a.per_vm == b.per_vm
    assert [p["stats"] for p in a.phases] == [p["stats"] for p in b.phases]
    c = bm.run_scenario(_mixed(), workers=1, seed=8, sets=SETS)
    assert c.per_vm["host_pages_faulted_in"] == a.per_vm["host_pages_faulted_in"]
    assert a.per_vm["accesses"] == c.per_vm["accesses"]


def test_process_backend_same_stats():
    a = bm.run_scenario(_mixed(), workers=1, seed=3, sets=SETS)
    for w in (1, 2, 3):
        b = bm.run_scenario(_mixed(), workers=w, backend="process", seed=3, sets=SETS)
        assert a.totals == b.totals and a.per_vm == b.per_vm
        assert b.footprint["guest_memory"] == a.footprint["guest_memory"]


def test_process_worker_death_is_reported_quickly():
    spec = resolve(_mixed())
    be = ProcessBackend(spec, 0, split(spec, 2))
    try:
        be.crash_worker(1, code=9)
        with pytest.raises(BatchMMUError, match="worker 1 died with exit code 9"):
            be.run_phase(0)
    finally:
        be.close()


def test_process_worker_error_is_reported():
    data = _mixed()
    data["host"] = dict(data["host"], memory="64MiB")  # too small: the worker raises
    # the worker's error comes back as a message (no traceback), in the scenario's words
    with pytest.raises(BatchMMUError, match=r"^host.memory=64 MiB: the host ran out of memory at VM \d"):
        bm.run_scenario(data, workers=2, backend="process", sets=["vms=2", "bytes_per_vcpu=64MiB"])


def test_ray_backend_same_stats():
    pytest.importorskip("ray", reason="Ray is an optional extra (batchmmu[cluster])")
    a = bm.run_scenario(_mixed(), workers=2, seed=3, sets=SETS)
    for w in (1, 2, 3):
        b = bm.run_scenario(_mixed(), workers=w, backend="ray", seed=3, sets=SETS)
        assert a.totals == b.totals and a.per_vm == b.per_vm
