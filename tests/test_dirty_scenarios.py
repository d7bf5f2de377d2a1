"""The dirty-tracking scenarios (issue 5): dirty_log_perf, dirty_log_page_splitting, kvm_page_table, dirty_log.

Step-by-step checks follow what KVM's selftests assert (selftests.md sections 2.1, 2.2, 2.8, 2.10).
"""

import json

import numpy as np
import pytest
from test_memstress import TABLE

import batchmmu as bm
from batchmmu.cli import main
from batchmmu.scenario import load_scenario, resolve

PAGE_STATS = ("pages_4k", "pages_2m", "pages_1g")
SETTABLE = ("vms", "vcpus", "bytes_per_vcpu", "write_percent", "random_access", "overlap", "iterations", "seed",
            "backing", "manual_protect", "initially_set", "pml", "dirty_ring")


def _ph(rep, name):
    return next(p for p in rep.phases if p["name"] == name)


def _huge(p):
    return p["stats"]["pages_2m"] + p["stats"]["pages_1g"]


def _delta(rep, name, stat):
    i = next(k for k, p in enumerate(rep.phases) if p["name"] == name)
    before = rep.phases[i - 1]["stats"][stat] if i else 0
    return rep.phases[i]["stats"][stat] - before


# ----------------------------------------------------------------------------- format
def test_bundled_scenarios_listed_with_their_parameters():
    names = dict(bm.list_scenarios())
    for s in ("dirty_log_perf", "dirty_log_page_splitting", "kvm_page_table", "dirty_log", "demand_paging"):
        assert s in names and names[s]
    params = {s: set(load_scenario(s)[0]["params"]) for s in names}
    assert set(SETTABLE) <= params["dirty_log_perf"]
    assert set(SETTABLE) - {"random_access", "dirty_ring"} <= params["dirty_log_page_splitting"] | {"random_access"}
    assert {"vms", "vcpus", "backing", "pml"} <= params["kvm_page_table"]
    assert {"vms", "vcpus", "iterations", "seed", "manual_protect", "initially_set", "pml", "dirty_ring"} \
        <= params["dirty_log"]


def test_repeat_when_unless_expand_at_resolve():
    data, text, origin = load_scenario("dirty_log_perf")
    spec = resolve(data, text, origin)
    names = [p["name"] for p in spec["phases"]]
    assert names == ["Populate memory", "Enabling dirty logging",
                     "Iteration 1 dirty memory", "Iteration 1 get dirty log", "Iteration 1 clear dirty log",
                     "Iteration 2 dirty memory", "Iteration 2 get dirty log", "Iteration 2 clear dirty log",
                     "Disabling dirty logging"]
    assert [p.get("iteration") for p in spec["phases"]][2:5] == [1, 1, 1]
    d = dict(data, params=dict(data["params"], manual_protect=False, iterations=3))
    names = [p["name"] for p in resolve(d)["phases"]]
    assert len(names) == 2 + 3 * 2 + 1 and not any("clear" in n for n in names)
    d = dict(data, params=dict(data["params"], manual_protect=False, dirty_ring=1024))
    names = [p["name"] for p in resolve(d)["phases"]]
    assert "Iteration 2 harvest dirty ring" in names and not any("get" in n for n in names)
    assert resolve(dict(data, params=dict(data["params"], seed="0x6b8b4567")))["seed"] == 0x6B8B4567
    # "iterations" is a synonym of "repeat"; names without {i} get the iteration appended
    d = {"vm_group": {"count": 1}, "phase": [{"iterations": 2, "phase": [{"op": "stats", "name": "snap"}]}]}
    assert [p["name"] for p in resolve(d)["phases"]] == ["snap 1", "snap 2"]


def test_format_errors_name_the_key():
    data, text, origin = load_scenario("dirty_log_perf")
    bad = dict(data, phase=[{"op": "get_dirty_logs"}])
    with pytest.raises(bm.BatchMMUError, match="phase.op='get_dirty_logs'"):
        resolve(bad)
    bad = dict(data, phase=[{"repeat": 2, "phase": [{"op": "stats", "colour": 1}]}])
    with pytest.raises(bm.BatchMMUError, match="phase.colour"):
        resolve(bad)
    bad = dict(data, phase=[{"repeat": 2, "op": "stats", "phase": [{"op": "stats"}]}])
    with pytest.raises(bm.BatchMMUError, match="repeat phase takes only"):
        resolve(bad)
    with pytest.raises(bm.BatchMMUError, match="manual_protect=false"):
        bm.run_scenario("dirty_log_perf", sets=["dirty_ring=1024"])
    with pytest.raises(bm.BatchMMUError, match=r"^slots=3: .*\(it sets workload.slots\)"):
        bm.run_scenario("dirty_log_perf", sets=["slots=3", "bytes_per_vcpu=4MiB"])


# ----------------------------------------------------------------------------- dirty_log_perf
def test_dirty_log_perf_runs_and_reports_per_phase(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "dirty_log_perf", "--set", "vms=3", "--set", "bytes_per_vcpu=4MiB", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    for line in ("Populate memory time: ", "Enabling dirty logging time: ", "Iteration 2 dirty memory time: ",
                 "Iteration 1 get dirty log time: ", "Iteration 2 clear dirty log time: ",
                 "Disabling dirty logging time: ", "Get dirty log over 2 iterations took ",
                 "Clear dirty log over 2 iterations took "):
        assert line in err, line
    d = json.loads(out.read_text())
    pages = 3 * 2 * 1024                       # 3 VMs x 2 vCPUs x 4 MiB
    for p in d["phases"]:
        assert set(p["stats"]) == set(bm.STAT_NAMES) and p["seconds"] >= 0
        assert ("dirty_pages" in p) == (p["op"] == "get_dirty_log")
    assert [p["dirty_pages"] for p in d["phases"] if p["op"] == "get_dirty_log"] == [pages, pages]
    assert [p["cleared_pages"] for p in d["phases"] if p["op"] == "clear_dirty_log"] == [pages, pages]
    assert d["params"]["seed"] == 1 == d["provenance"]["seed"] == d["resolved"]["workload"]["seed"]


@pytest.mark.parametrize("manual", [True, False])
def test_dirty_log_perf_write_protection_faults_land_where_kvm_puts_them(manual):
    """Manual protect + INITIALLY_SET: enabling neither write-protects nor splits, iteration 1 takes no
    write-protection faults and the first CLEAR moves them to iteration 2.  Without (-g): the enable
    write-protects, iteration 1 takes them, each GET re-protects."""
    pages = 2 * 1024
    rep = bm.run_scenario("dirty_log_perf", sets=["bytes_per_vcpu=4MiB", f"manual_protect={str(manual).lower()}",
                                                  "verify=exact", "iterations=3"])
    assert _ph(rep, "Populate memory")["stats"]["pf_fixed"] == pages
    assert _delta(rep, "Iteration 1 dirty memory", "pf_fast") == (0 if manual else pages)
    assert _delta(rep, "Iteration 2 dirty memory", "pf_fast") == pages
    assert _delta(rep, "Iteration 3 dirty memory", "pf_fast") == pages
    for i in (1, 2, 3):
        assert _ph(rep, f"Iteration {i} get dirty log")["dirty_pages"] == pages
        assert _ph(rep, f"Iteration {i} dirty memory")["writes"] == pages


@pytest.mark.parametrize("manual", [False, True])
def test_dirty_log_perf_reproduces_the_derived_page_sets(manual):
    """selftests.md 2.1 table, through the whole scenario: 1 vCPU x 1 GiB, -w 50 -a, seed 1."""
    rep = bm.run_scenario("dirty_log_perf", sets=["vcpus=1", "bytes_per_vcpu=1GiB", "iterations=3",
                                                  "write_percent=50", "random_access=true",
                                                  f"manual_protect={str(manual).lower()}"])
    for i, (writes, distinct) in enumerate(TABLE[(50, True)], 1):
        assert _ph(rep, f"Iteration {i} dirty memory")["writes"] == writes
        want = 262144 if manual and i == 1 else distinct      # INITIALLY_SET: iteration 1 reads all ones
        assert _ph(rep, f"Iteration {i} get dirty log")["dirty_pages"] == want


def test_dirty_log_perf_ring_mode_and_pml():
    pages = 2 * 1024
    rep = bm.run_scenario("dirty_log_perf", sets=["bytes_per_vcpu=4MiB", "manual_protect=false", "dirty_ring=1024",
                                                  "verify=exact", "pml=true"])
    for i in (1, 2):
        # every page dirtied once per iteration reaches a ring: during the pass (full rings) or at harvest
        got = _ph(rep, f"Iteration {i} dirty memory").get("dirty_pages", 0) \
            + _ph(rep, f"Iteration {i} harvest dirty ring")["dirty_pages"]
        assert got == pages
        assert _ph(rep, f"Iteration {i} dirty memory")["ring_full_exits"] > 0


# ----------------------------------------------------------------------------- dirty_log_page_splitting
@pytest.mark.parametrize("backing,bpv", [("hugetlb-2m", "64MiB"), ("thp", "32MiB"), ("hugetlb-1g", "1GiB")])
@pytest.mark.parametrize("manual", [False, True])
def test_dirty_log_page_splitting_matches_the_selftest_asserts(backing, bpv, manual):
    rep = bm.run_scenario("dirty_log_page_splitting", sets=[f"backing={backing}", f"bytes_per_vcpu={bpv}",
                                                            f"manual_protect={str(manual).lower()}"])
    host_num_pages = 2 * bm.parse_size(bpv) // 4096
    assert host_num_pages % 512 == 0
    populated = _ph(rep, "populating memory")["stats"]
    assert populated["pages_2m"] * 512 + populated["pages_1g"] * 512 * 512 == host_num_pages
    if backing == "hugetlb-1g":
        assert (populated["pages_1g"], populated["pages_2m"]) == (host_num_pages // 262144, 0)
    else:
        assert (populated["pages_2m"], populated["pages_1g"]) == (host_num_pages // 512, 0)
    enabled = _ph(rep, "enabling dirty logging")
    if manual:
        # INITIALLY_SET: enabling neither splits nor write-protects; the first CLEAR splits everything
        assert _huge(enabled) == populated["pages_2m"] + populated["pages_1g"]
        cleared = _ph(rep, "clearing dirty log 1")
        assert _huge(cleared) == 0
        assert cleared["stats"]["pages_4k"] >= host_num_pages
        assert cleared["stats"]["pages_4k"] == host_num_pages          # slot 0 is never touched here
        assert _ph(rep, "get dirty log 1")["dirty_pages"] == host_num_pages   # all ones
    else:
        assert _huge(enabled) == 0
        assert enabled["stats"]["pages_4k"] >= host_num_pages
        assert enabled["stats"]["pages_4k"] == host_num_pages
        assert not any(p["op"] == "clear_dirty_log" for p in rep.phases)
    for i in (1, 2):
        assert _huge(_ph(rep, f"dirtying memory {i}")) == (_huge(enabled) if manual and i == 1 else 0)
        assert _ph(rep, f"get dirty log {i}")["dirty_pages"] == host_num_pages
    disabled = _ph(rep, "disabling dirty logging")["stats"]
    repop = _ph(rep, "repopulating memory")["stats"]
    assert (repop["pages_2m"], repop["pages_1g"]) == (populated["pages_2m"], populated["pages_1g"])
    assert disabled["pages_2m"] + disabled["pages_1g"] <= repop["pages_2m"] + repop["pages_1g"]
    assert repop["pages_4k"] == 0


# ----------------------------------------------------------------------------- kvm_page_table
@pytest.mark.parametrize("backing", ["4k", "thp", "hugetlb-2m"])
def test_kvm_page_table_stages(backing):
    size = 32 << 20
    rep = bm.run_scenario("kvm_page_table", sets=[f"backing={backing}", f"test_mem_size={size}", "vcpus=3"])
    n4k, n2m = size // 4096, size // (2 << 20)
    create = _ph(rep, "KVM_CREATE_MAPPINGS")
    update = _ph(rep, "KVM_UPDATE_MAPPINGS")
    adjust = _ph(rep, "KVM_ADJUST_MAPPINGS")
    enable = _ph(rep, "enable dirty logging")["stats"]
    if backing == "4k":
        assert create["events"] == 3 * n4k and create["writes"] == 2 * n4k       # vCPUs 0 and 2 write
        assert create["stats"]["pages_4k"] == n4k
        assert update["writes"] == 3 * n4k
        assert _delta(rep, "KVM_UPDATE_MAPPINGS", "pf_fast") == n4k              # RO -> RW, once per page
        assert adjust["stats"]["pages_4k"] == n4k
    else:
        assert create["events"] == 3 * n2m and create["stats"]["pages_2m"] == n2m
        assert (enable["pages_2m"], enable["pages_4k"]) == (0, n4k)               # eager split at enable
        assert update["events"] == 3 * n2m * (1 + 256) and update["writes"] == 3 * n2m
        assert update["stats"]["pages_2m"] == 0
        assert (adjust["stats"]["pages_2m"], adjust["stats"]["pages_4k"]) == (n2m, 0)   # coalesced again
    assert adjust["writes"] == 0 and adjust["events"] == 3 * n4k


# ----------------------------------------------------------------------------- dirty_log (correctness)
MODES = {
    "dirty-log": [],
    "clear-log": ["manual_protect=true"],
    "dirty-ring": ["dirty_ring=512"],
    "dirty-log pml": ["pml=true"],
    "clear-log pml": ["manual_protect=true", "pml=true"],
    "dirty-ring pml": ["dirty_ring=1024", "pml=true"],
    "clear-log npt": ["manual_protect=true", "tdp_format=npt"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_dirty_log_every_bit_checked(mode):
    rep = bm.run_scenario("dirty_log", sets=["iterations=4", "vms=2", *MODES[mode]])
    pages = 16387
    collects = [p for p in rep.phases if p["op"] == "collect_dirty_log"]
    assert len(collects) == 8
    for p in collects:
        assert "dirty_pages" in p
        assert p.get("bits_checked_dirty", 0) + p.get("bits_checked_clean", 0) > 0
    writes = [p for p in rep.phases if p["op"] == "random_writes"]
    assert all(p["writes"] == 2 * 2048 for p in writes)
    total = sum(p.get("dirty_pages", 0) for p in rep.phases)
    assert total >= sum(p["writes"] for p in writes) // 2   # random pages repeat, but not that often
    if "ring" in mode:
        assert sum(p.get("ring_full_exits", 0) for p in rep.phases) > 0
        assert sum(p.get("ring_entries", 0) for p in rep.phases) == sum(p.get("ring_reset", 0) for p in rep.phases)
    if "clear" in mode:
        assert collects[0]["dirty_pages"] == 2 * pages       # INITIALLY_SET: the first GET is all ones
        assert all(p["cleared_pages"] == p["dirty_pages"] for p in collects)
    else:
        assert collects[0]["dirty_pages"] < 2 * 2048


def test_dirty_log_fails_loudly_on_a_lost_write(monkeypatch):
    real = bm.Host.get_dirty_log

    def lossy(self, vm, slot):
        words = real(self, vm, slot).copy()
        nz = np.nonzero(words)[0]
        if nz.size:
            w = int(words[nz[-1]])
            words[nz[-1]] = np.uint64(w & (w - 1))     # drop one dirty bit
        return words

    monkeypatch.setattr(bm.Host, "get_dirty_log", lossy)
    with pytest.raises(bm.BatchMMUError, match=r"lost write \(1 pages written but not in the dirty log\): VM 0 "
                                               r"slot 1 page \d+ \(gpa 0x[0-9a-f]+\), phase 'iteration 1 collect"):
        bm.run_scenario("dirty_log", sets=["iterations=2"])


def test_dirty_log_fails_on_a_lost_ring_entry_and_on_an_unwritten_dirty_page(monkeypatch):
    real_h, real_r = bm.Host.harvest_dirty_ring, bm.Host.reset_dirty_rings
    monkeypatch.setattr(bm.Host, "harvest_dirty_ring", lambda self, vm, vcpu: real_h(self, vm, vcpu)[1:])
    # dirty_log_test's own assertion: the entries reset are the entries collected
    with pytest.raises(bm.BatchMMUError, match="KVM_RESET_DIRTY_RINGS reset 1934 entries but 1933 were harvested"):
        bm.run_scenario("dirty_log", sets=["iterations=2", "dirty_ring=4096"])
    monkeypatch.setattr(bm.Host, "reset_dirty_rings", lambda self, vm: real_r(self, vm) - 1)
    with pytest.raises(bm.BatchMMUError, match="lost write"):
        bm.run_scenario("dirty_log", sets=["iterations=2", "dirty_ring=4096"])
    monkeypatch.undo()
    real = bm.Host.get_dirty_log

    def noisy(self, vm, slot):
        words = real(self, vm, slot).copy()
        words[-1] |= np.uint64(4)    # page 64k+2: almost never written in the first collections
        return words

    monkeypatch.setattr(bm.Host, "get_dirty_log", noisy)
    with pytest.raises(bm.BatchMMUError, match="dirty page that was not written"):
        bm.run_scenario("dirty_log", sets=["iterations=2"])
    # "writes" checks only for lost writes, and counts the extra bits
    rep = bm.run_scenario("dirty_log", sets=["iterations=2", "verify=writes"])
    assert sum(p.get("dirty_unwritten", 0) for p in rep.phases) > 0


# ----------------------------------------------------------------------------- determinism
DET = ["vms=5", "vcpus=2", "bytes_per_vcpu=2MiB", "random_access=true", "write_percent=50", "iterations=3",
       "verify=exact"]


def _same(a, b):
    assert a.totals == b.totals and a.per_vm == b.per_vm
    strip = [{k: v for k, v in p.items() if k not in ("seconds", "worker_seconds", "events_per_s")} for p in a.phases]
    assert strip == [{k: v for k, v in p.items() if k not in ("seconds", "worker_seconds", "events_per_s")}
                     for p in b.phases]


@pytest.mark.parametrize("sets", [DET, DET + ["manual_protect=false", "backing=thp", "overlap=true"]])
def test_dirty_log_perf_same_for_any_workers(sets):
    a = bm.run_scenario("dirty_log_perf", workers=1, sets=sets)
    _same(a, bm.run_scenario("dirty_log_perf", workers=2, sets=sets))
    _same(a, bm.run_scenario("dirty_log_perf", workers=3, sets=sets))


def test_dirty_scenarios_same_on_process_backend():
    a = bm.run_scenario("dirty_log_perf", workers=1, sets=DET)
    _same(a, bm.run_scenario("dirty_log_perf", workers=2, backend="process", sets=DET))
    sets = ["vms=3", "iterations=3", "dirty_ring=512"]
    _same(bm.run_scenario("dirty_log", workers=1, sets=sets),
          bm.run_scenario("dirty_log", workers=2, backend="process", sets=sets))


def test_process_worker_reports_a_lost_write():
    data, _, _ = load_scenario("dirty_log")
    data = dict(data, phase=[{"op": "random_writes", "writes": 100}, {"op": "enable_logging"},
                             {"op": "random_writes", "writes": 100}, {"op": "collect_dirty_log"}])
    rep = bm.run_scenario(data, workers=2, backend="process", sets=["vms=2"])
    assert rep.phases[-1]["dirty_pages"] > 0
    # writes made before logging was enabled are not expected in the log; with logging on from the start
    # and a second collection of nothing, the run still passes
    data["phase"] += [{"op": "collect_dirty_log"}]
    assert bm.run_scenario(data, workers=2, backend="process", sets=["vms=2"]).phases[-1]["dirty_pages"] == 0
