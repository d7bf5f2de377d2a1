"""The memslot selftest scenarios (max_guest_memory, memslot_perf, memslot_modification_stress) and
the overcommit scenario's CLI outputs, each in a small configuration."""

import json

import pytest

import batchmmu as bm
from batchmmu.cli import main
from batchmmu.scenario import list_scenarios, load_scenario

MiB = 1 << 20


def _by_name(rep):
    return {p["name"]: p for p in rep.phases}


@pytest.mark.parametrize("backing,page", [("4k", 4096), ("hugetlb-2m", 2 * MiB)])
def test_max_guest_memory(backing, page, capsys):
    slot, slots = 64 * MiB, 4
    rep = bm.run_scenario("max_guest_memory", quiet=False, sets=[
        "max_mem=256MiB", "slot_size=64MiB", "vcpus=3", f"backing={backing}"])
    ph = _by_name(rep)
    leaves = slots * slot // page
    lvl = "pages_4k" if page == 4096 else "pages_2m"
    assert ph["create slots"]["slots_added"] == slots
    run1, reset, run2 = ph["run1"]["stats"], ph["reset"]["stats"], ph["run2"]["stats"]
    # each vCPU writes every 4K page of its third once per run (the remainder of the split is left out)
    writes = 3 * ((slots * slot // 3) & ~4095) // 4096
    assert run1["accesses"] == writes and run2["accesses"] == 2 * writes
    assert run1["pf_fixed"] == run1[lvl] == -(-writes * 4096 // page) <= leaves
    assert reset == run1                                   # a CR0.WP toggle changes nothing under TDP
    assert run2["pf_fixed"] == run1["pf_fixed"] and run2[lvl] == run1[lvl]
    # the four slots alias one memfd: the host backs it once
    assert run1["host_pages_faulted_in"] == slot // page
    assert ph["delete even slots"]["slots_deleted"] == 2
    assert ph["delete even slots"]["stats"][lvl] == 0      # a delete zaps everything (SLOT_ZAP_ALL quirk)
    assert ph["munmap half of the backing"]["bytes_freed"] == slot // 2
    assert rep.footprint["guest_memory"] == slot // 2
    assert ph["mmu_notifier release"]["stats"]["mmu_pages"] == 0
    err = capsys.readouterr().err
    assert "Running with 0gb of guest memory and 3 vCPUs" in err and "run1 = " in err and ", run2 = " in err


def _only(name, tests, **params):
    data, _, _ = load_scenario(name)
    data = dict(data, phase=[p for p in data["phase"] if p.get("test") in tests])
    data["params"] = dict(data["params"], **params)
    return data


def test_memslot_perf_counts():
    loops = 2
    rep = bm.run_scenario(_only("memslot_perf", ("map", "unmap", "unmap_chunked", "move_active", "rw"),
                                slots=2049, loops=loops))
    ph = {p["name"]: p for p in rep.phases}
    before = {}
    last = dict.fromkeys(rep.totals, 0)
    for p in rep.phases:
        before[p["name"]], last = last, p["stats"]

    def delta(name, stat):
        return ph[name]["stats"][stat] - before[name][stat]

    half = (32 << 20) // 4096 // 2
    # map: the guest maps one half while the host MADV_DONTNEEDs the other, which was mapped (but in
    # the very first call): every write is a fault on a fresh page
    assert ph["map"]["pages_per_slot"] == 4 and ph["map"]["extra_pages_last"] == 16
    assert delta("map", "pf_fixed") == loops * 2 * half + 1          # + the sync page
    assert delta("map", "mmu_notifier_zapped") == (2 * loops - 1) * half
    assert delta("map", "host_pages_faulted_in") == loops * 2 * half + 1
    # unmap: one page mapped per half, the host unmaps 64 MiB 4K by 4K (2M at a time: fewer calls)
    for name in ("unmap", "unmap chunked"):
        assert delta(name, "mmu_notifier_zapped") == 2 * loops
        assert delta(name, "remote_tlb_flush") == 2 * loops
        assert ph[name]["events"] == 4 * loops
    # move active area: half the area lies in the slot that moves away: an MMIO exit per page
    assert ph["move active area"]["mmio_exits"] == loops * 24
    assert delta("move active area", "pf_mmio_spte_created") == loops * 24
    assert ph["RW"]["events"] == loops * (3 * ((512 << 20) // 4096) + 2)


def test_memslot_perf_too_many_slots(capsys):
    rep = bm.run_scenario(_only("memslot_perf", ("map",), slots=8210, loops=1), quiet=False)
    assert rep.phases[0]["max_slots"] == 8209 and rep.phases[0]["events"] == 0
    assert "Memslot count too high for this test, decrease the cap (max is 8209)" in capsys.readouterr().err


def test_memslot_modification_stress_refaults():
    ops, passes, pages = 4, 2, 4096
    rep = bm.run_scenario("memslot_modification_stress", sets=[
        "bytes_per_vcpu=16MiB", f"ops={ops}", f"passes={passes}"])
    # the expected faults, computed independently: the passes are cut into equal slices, a slot
    # delete (which zaps every SPTE) after each of the first `ops` slices
    n = -(-(ops + 1) // passes)
    mapped, faults = set(), 0
    for j in range(passes * n):
        s = j % n
        for p in range(pages * s // n, pages * (s + 1) // n):
            faults += p not in mapped
            mapped.add(p)
        if j < ops:
            mapped = set()
    p = rep.phases[0]
    assert p["memslot_ops"] == ops and p["events"] == passes * pages
    assert p["stats"]["pf_fixed"] == faults and p["stats"]["pages_4k"] == len(mapped)
    assert p["stats"]["host_pages_faulted_in"] == pages


def test_overcommit_cli_writes_plot_and_timeline(tmp_path):
    png, js = tmp_path / "oc.png", tmp_path / "oc.json"
    assert main(["run", "overcommit", "--quiet", "--plot", str(png), "--json", str(js), "--set", "busy_vms=2",
                 "--set", "idle_vms=2", "--set", "bytes_per_vcpu=4MiB", "--set", "memory=12MiB"]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    d = json.loads(js.read_text())
    epochs = [e for p in d["phases"] for e in p["epochs"]]
    assert len(epochs) == 8 + 3 * 8 + 8          # populate, 3 busy passes, idle wake: 8 epochs per pass
    assert max(e["host_resident"] for e in epochs) <= 12 * MiB + 2 * MiB
    assert epochs[-1]["host_major_faults"] == d["totals"]["host_major_faults"] > 0
    assert d["footprint"]["guest_swapped"] == 4096 * d["totals"]["host_pages_swapped"]


def test_list_names_the_new_scenarios():
    names = dict(list_scenarios())
    for n in ("max_guest_memory", "memslot_perf", "memslot_modification_stress", "overcommit"):
        assert names[n]
