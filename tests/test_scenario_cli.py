"""Scenarios and the command line: demand_paging reports what KVM would for the same workload."""

import json
import subprocess
import sys

import pytest

import batchmmu as bm
from batchmmu.cli import main


@pytest.mark.parametrize("backing,page_bytes,stat", [
    ("4k", 4096, "pages_4k"), ("thp", 2 << 20, "pages_2m"), ("hugetlb-2m", 2 << 20, "pages_2m"),
    ("hugetlb-1g", 1 << 30, "pages_1g"),
])
def test_demand_paging_matches_kvm(backing, page_bytes, stat):
    vms, vcpus, bpv = 3, 2, (2 << 30 if backing == "hugetlb-1g" else 8 << 20)
    rep = bm.run_scenario("demand_paging", sets=[f"vms={vms}", f"vcpus={vcpus}", f"bytes_per_vcpu={bpv}",
                                                 f"backing={backing}"])
    # Each vCPU first-touches every page of its partition once: one fixed fault per host-sized
    # page (the test slot is aligned to the backing, so every mapping is as large as the backing).
    expect = vms * vcpus * bpv // page_bytes
    assert rep.totals[stat] == expect
    assert rep.totals["pf_fixed"] == expect == rep.totals["pf_taken"]
    assert rep.totals["accesses"] == vms * vcpus * bpv // 4096
    for other in ("pages_4k", "pages_2m", "pages_1g"):
        if other != stat:
            assert rep.totals[other] == 0
    assert rep.per_vm["pf_fixed"] == [expect // vms] * vms
    assert rep.footprint["guest_memory"] == vms * vcpus * bpv


def test_demand_paging_second_pass_hits_and_random_order_same_stats():
    a = bm.run_scenario("demand_paging", sets=["vms=2", "bytes_per_vcpu=4MiB", "passes=2"])
    assert a.totals["pf_fixed"] == 2 * 2 * 1024
    assert a.totals["accesses"] == 2 * a.totals["pf_fixed"]
    b = bm.run_scenario("demand_paging", seed=5, sets=["vms=2", "bytes_per_vcpu=4MiB", "passes=2",
                                                       "access_order=random"])
    c = bm.run_scenario("demand_paging", seed=5, sets=["vms=2", "bytes_per_vcpu=4MiB", "passes=2",
                                                       "access_order=random"])
    assert b.totals == c.totals and b.per_vm == c.per_vm  # same seed, same statistics
    for k in ("pages_4k", "pf_fixed", "mmu_pages"):
        assert b.totals[k] == a.totals[k]


def test_cli_run_json_and_list(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "demand_paging", "--set", "vms=2", "--set", "bytes_per_vcpu=1MiB", "--json", str(out),
                 "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert set(d) == {"scenario", "params", "resolved", "provenance", "totals", "per_vm", "vm_groups", "phases",
                      "footprint", "legend"}
    assert d["totals"]["pf_fixed"] == 2 * 2 * 256
    assert d["phases"][0]["name"] == "populate" and d["phases"][0]["seconds"] > 0
    assert len(d["per_vm"]["pages_4k"]) == 2
    assert main(["list"]) == 0
    assert "demand_paging" in capsys.readouterr().out


def test_cli_errors_name_the_key(tmp_path, capsys):
    assert main(["run", "demand_paging", "--set", "nosuch=3", "--quiet"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["run", "no_such_scenario", "--quiet"]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\nmemory = "1GiB"\n\n[[vm_group]]\ncount = 1\ncolour = "red"\n\n[[phase]]\nop = "access"\n')
    assert main(["run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "vm_group.colour" in err and "line 6" in err
    assert main(["run", "demand_paging", "--workers", "0", "--quiet"]) == 2


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "batchmmu.cli", "list"], capture_output=True, text=True, check=True)
    assert "demand_paging" in r.stdout


@pytest.mark.nojit
def test_warmup_runs():
    assert bm.warmup() > 0


def test_report_table_and_plot(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["run", "demand_paging", "--set", "vms=2", "--set", "bytes_per_vcpu=1MiB", "--set", "passes=2",
                 "--json", str(a), "--quiet"]) == 0
    assert main(["run", "demand_paging", "--set", "vms=6", "--set", "bytes_per_vcpu=1MiB", "--json", str(b),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(a)]) == 0
    out = capsys.readouterr().out
    assert "populate" in out and "pf_fixed" in out and "1,024" in out  # 2 VMs x 2 vCPUs x 256 pages
    pytest.importorskip("matplotlib", reason="plots need the plot extra")
    png = tmp_path / "p.png"
    assert main(["report", str(a), str(b), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def test_memory_guard_refuses_runs_that_do_not_fit(capsys):
    with pytest.raises(bm.BatchMMUError, match="needs about .* of memory"):
        bm.run_scenario("demand_paging", sets=["vms=100000", "bytes_per_vcpu=1TiB"])
    from batchmmu.arena import table_rows
    # 256 MiB of 4K pages: 128 page tables (+1 for a misaligned start), 1+1 directories, 1+1 PDPTs, root
    assert table_rows(65536, 1, 4) == 1 + 129 + 2 + 2
    assert table_rows(65536, 2, 4) == 1 + 2 + 2
