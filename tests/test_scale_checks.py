"""A run too large for this machine is refused from the VM groups alone, before any per-VM list is built
(issue 15 item 14: ``--set vms=1000000000`` used to grow to 20 GiB before any check)."""

import time
import tracemalloc

import pytest

from batchmmu import BatchMMUError, cli
from batchmmu.scenario import check_memory
from batchmmu.shard import estimate_groups, estimate_memory, split
from batchmmu.spec import prepare


@pytest.mark.nojit
def test_a_billion_vms_is_refused_in_constant_memory(capsys):
    tracemalloc.start()
    t = time.perf_counter()
    rc = cli.main(["run", "demand_paging", "--set", "vms=1000000000", "--dry-run"])
    took = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    err = capsys.readouterr().err
    assert rc == 2
    assert "1,000,000,000 VMs" in err and "--set vms=" in err
    assert peak < 64 << 20 and took < 10


@pytest.mark.nojit
def test_group_estimate_matches_the_per_shard_sum():
    spec = prepare("demand_paging", ["vms=7", "vcpus=3"]).spec
    parts = split(spec, 3)
    per_shard = sum(estimate_memory(spec, p) for p in parts)
    # an upper bound of the per-shard sum (each shard's event chunk counted at the whole run's size)
    assert per_shard <= estimate_groups(spec, len(parts)) <= 3 * per_shard
    assert check_memory(spec, parts, "serial") == estimate_groups(spec, len(parts))


@pytest.mark.nojit
def test_refused_before_split_builds_per_vm_lists():
    spec = prepare("demand_paging", ["vms=1000000000"]).spec
    with pytest.raises(BatchMMUError, match="1,000,000,000 VMs"):
        split(spec, 1)
