"""The real KVM on this machine (skipped where /dev/kvm cannot create VMs)."""

import pytest

import batchmmu as bm
from batchmmu import realkvm

PROBE = realkvm.probe()
needs_kvm = pytest.mark.skipif(not PROBE["available"], reason=f"no usable /dev/kvm: {PROBE['reason']}")


@pytest.mark.nojit
def test_probe_reports_why():
    assert isinstance(PROBE["available"], bool)
    assert PROBE["available"] or PROBE["reason"]
    assert not realkvm.probe("/nonexistent/kvm")["available"]
    assert "cannot open" in realkvm.probe("/nonexistent/kvm")["reason"]


@needs_kvm
@pytest.mark.realkvm
def test_kernel_reports_the_stats_the_simulator_names():
    assert PROBE["api_version"] == 12 and PROBE["caps"]["BINARY_STATS_FD"] == 1
    vm_id, stats = realkvm.vm_stats_of_new_vm()
    assert vm_id.startswith("kvm-")
    # every per-VM MMU statistic the kernel keeps carries the same name in batchmmu, starting at 0
    mmu = {"mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_recycled",
           "mmu_cache_miss", "mmu_unsync", "pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits",
           "max_mmu_rmap_size", "remote_tlb_flush", "remote_tlb_flush_requests"}
    assert mmu <= set(stats) and mmu <= set(bm.STAT_NAMES)
    assert all(stats[k] == 0 for k in mmu)
    # the simulator can be configured like this host's kvm module
    params = PROBE["params"]
    if "mmio_caching" in params:
        bm.Host(mmio_caching=params["mmio_caching"] == "Y",
                nx_huge_pages=params.get("nx_huge_pages", "N") not in ("N", "never", "off"),
                eager_page_split=params.get("eager_page_split", "Y") == "Y")
