"""The simulated-time scenario ops: ``dirty_rate`` and ``migrate`` (docs/time.md)."""

import pytest

import batchmmu as bm
from batchmmu.spec import load_scenario


def _run(*sets, workers=1, time=True, phases=None, **keys):
    """The bundled migrate scenario with ``--set``s, only the ``phases`` ops, and phase keys ``keys``."""
    data = load_scenario("migrate")[0]
    if phases is not None:
        data = dict(data, phase=[dict(p, **keys) for p in data["phase"] if p["op"] in phases])
    return bm.run_scenario(data, sets=list(sets), workers=workers, time=time)


def _rec(rep, op):
    return next(p for p in rep.phases if p["op"] == op)


def test_precopy_converges_and_adds_up():
    rep = _run()
    m = _rec(rep, "migrate")["migration"][0]
    region = 2 * 64 << 20
    assert m["converged"] and m["downtime_seconds"] <= 0.0003
    assert m["iterations"] == len(m["per_iteration"]) >= 2
    its = m["per_iteration"]
    assert its[0]["pages_sent"] == region // 4096
    # the rest sent with the guest stopped: the last sync's pages and what the final sync found (QEMU's
    # migration_completion), each page once
    rest = m["bytes_sent"] // 4096 - sum(i["pages_sent"] for i in its)
    assert its[-1]["dirty_pages"] <= rest <= its[-1]["dirty_pages"] + m["final_sync_pages"]
    assert m["lost_writes"] == 0 and m["pages_written"] > 0
    for a, b in zip(its, its[1:], strict=False):
        assert b["pages_sent"] == a["dirty_pages"]   # each iteration sends what the last sync found
    assert m["total_seconds"] >= sum(i["send_seconds"] + i["sync_seconds"] for i in its) + m["downtime_seconds"]
    assert m["wrprot_faults"] > 0   # the guest's writes after each CLEAR fault
    assert _rec(rep, "migrate")["sim_seconds"] == pytest.approx(m["total_seconds"], rel=1e-6)


@pytest.mark.parametrize("sets", [["manual_protect=false"], ["manual_protect=false", "dirty_ring=4096"],
                                  ["manual_protect=false", "dirty_ring=128"], ["tdp_mmu=false", "clear_chunk=1MiB"]])
def test_every_dirty_tracking_mechanism(sets):
    """The bitmap with GET re-protecting, the dirty ring (large, or small enough to fill: the VMM reaps the
    rings as they fill), the legacy MMU with CLEAR in 1 MiB chunks: the same guest gives the same exact dirty
    rate, precopy converges over each, and every page the guest wrote was found dirty by some sync."""
    base = _rec(_run(phases=("populate", "dirty_rate")), "dirty_rate")["dirty_rate"][0]
    rep = _run(*sets)
    r = _rec(rep, "dirty_rate")["dirty_rate"][0]
    if "dirty_ring=128" not in sets:   # a full ring stops its vCPU: the window holds fewer writes
        assert r["dirty_pages"] == base["dirty_pages"] > 0
    m = _rec(rep, "migrate")["migration"][0]
    assert m["converged"] and m["lost_writes"] == 0 and m["pages_written"] > 1000
    assert m["per_iteration"][0]["dirty_pages"] >= 0.9 * m["pages_written"]


def test_auto_converge_throttles_a_fast_dirtier():
    hot = ["write_percent=100", "random_access=false", "max_iterations=6", "guest_ns=200"]
    plain = _rec(_run(*hot, phases=("populate", "migrate")), "migrate")["migration"][0]
    auto = _rec(_run(*hot, "auto_converge=true", phases=("populate", "migrate")), "migrate")["migration"][0]
    assert not plain["converged"] and plain["iterations"] == 6 and plain["throttle_percent"] == 0
    assert auto["throttle_percent"] > 0
    assert auto["per_iteration"][-1]["dirty_pages"] < plain["per_iteration"][-1]["dirty_pages"]


def test_dirty_rate_exact_and_sampled():
    """The log's rate counts every page logged in the window; QEMU's page sampling sees only contents that
    changed: after populate memstress writes the value every page already holds, so it reads 0 (qemu #1200's
    'dirty rate 0'); on fresh memory it estimates the written pages' rate within its sampling error."""
    after = _rec(_run(phases=("populate", "dirty_rate")), "dirty_rate")["dirty_rate"][0]
    fresh = _rec(_run("window=0.02", phases=("dirty_rate",)), "dirty_rate")["dirty_rate"][0]
    for r in (after, fresh):
        assert r["pages_per_second"] * r["window_seconds"] == pytest.approx(r["dirty_pages"])
        assert r["sampled_pages"] == 64   # 512 per GiB of the 128 MiB region
    assert after["dirty_pages"] > 0 and after["sampled_changed"] == 0
    # QEMU's 512 pages per GiB is a coarse estimate; with 8192 samples (a quarter of the pages) it is close
    dense = _rec(_run("window=0.02", phases=("dirty_rate",), sample_pages_per_gib=65536),
                 "dirty_rate")["dirty_rate"][0]
    assert dense["sampled_pages"] == 8192 and dense["dirty_pages"] == fresh["dirty_pages"]
    written = dense["pages_written"] * 4096 / (1 << 20) / dense["window_seconds"]
    assert dense["sampled_mib_per_second"] == pytest.approx(written, rel=0.25)
    # a read that faults a page in maps it writable and logs it (make_spte): the log holds more than the writes
    assert fresh["dirty_pages"] > fresh["pages_written"] > 0


def test_migration_is_deterministic_over_workers():
    a, b = (_run("vms=2", workers=w) for w in (1, 2))
    assert _rec(a, "migrate")["migration"] == _rec(b, "migrate")["migration"]
    assert _rec(a, "dirty_rate")["dirty_rate"] == _rec(b, "dirty_rate")["dirty_rate"]


def test_migration_refusals():
    with pytest.raises(bm.BatchMMUError, match="simulated time"):
        _run(time=None)
    with pytest.raises(bm.BatchMMUError, match="clear_chunk"):
        _run("clear_chunk=4KiB")
    with pytest.raises(bm.BatchMMUError, match="bandwidth"):
        _run("bandwidth=0")
    with pytest.raises(bm.BatchMMUError, match="max_downtime"):
        _run("max_downtime=-1")


def test_phase_keys_are_checked_and_groups_respected():
    for bad in ("max_downtime=1e400", "max_iterations=2.5", "auto_converge=maybe"):
        with pytest.raises(bm.BatchMMUError):
            _run(bad)
    data = load_scenario("migrate")[0]
    data = dict(data, phase=[dict(p, **({"groups": [0]} if p["op"] != "populate" else {})) for p in data["phase"]])
    data["vm_group"] = [dict(data["vm_group"][0], count=1), dict(data["vm_group"][0], count=1)]
    rep = bm.run_scenario(data, sets=["bytes_per_vcpu=4MiB"], time=True)
    assert [m["vm"] for m in _rec(rep, "migrate")["migration"]] == [0]


def test_sync_time_is_charged():
    """Review regression: enabling logging and the syncs of a dirty-rate window cost the VM's thread time."""
    r = _rec(_run(phases=("populate", "dirty_rate")), "dirty_rate")
    assert r["sim_seconds"] > r["dirty_rate"][0]["window_seconds"]


def test_clear_in_chunks_lets_vcpus_in_during_a_migration():
    """During precopy the VMM's CLEARs run while the guest runs.  With huge pages and no eager splitting the
    guest's writes need the lock (split on fault, read lock under the TDP MMU): one CLEAR of the whole slot
    holds them up for its whole walk, CLEARs in 2 MiB chunks let them in between (cloud-hypervisor #8899)."""
    thp = ["workload.slot_backing=thp", "host.eager_page_split=false"]
    out = {}
    for chunk in ("0", "2MiB"):
        rec = _rec(_run(*thp, f"clear_chunk={chunk}", phases=("populate", "migrate")), "migrate")
        m = rec["migration"][0]
        clears = (m["iterations"] + 2) * (1 if chunk == "0" else 64)   # 128 MiB slot; the first and final syncs
        assert rec["sim"]["mmu_lock"]["write_acquisitions"] == clears
        first = m["per_iteration"][0]   # its sync CLEARs the most words: the longest hold
        out[chunk] = (rec["sim"]["fault_latency"]["max_ns"], first["vcpu_mmu_lock_wait_seconds"],
                      first["sync_mmu_lock_seconds"])
    (whole_max, whole_wait, whole_hold), (chunk_max, chunk_wait, chunk_hold) = out["0"], out["2MiB"]
    assert whole_wait > 10 * chunk_wait and whole_hold > 8 * chunk_hold / 64   # one CLEAR's hold vs one chunk's
    assert whole_max > whole_hold * 1e9 / 2 > 5 * chunk_max   # a fault waited for a good part of one CLEAR


@pytest.mark.parametrize("manual", [True, False])
def test_lost_writes_sees_a_dropped_log(monkeypatch, manual):
    """``lost_writes`` counts pages written since the VMM last took them from the log: GETs that drop their bits
    from the second sync on (as a KVM bug would) leave them counted, with or without manual protect."""
    calls = []
    real = bm.Host.get_dirty_log

    def dropping(self, vm, slot):
        words = real(self, vm, slot)
        calls.append(1)
        return words * 0 if len(calls) >= 3 else words
    monkeypatch.setattr(bm.Host, "get_dirty_log", dropping)
    m = _rec(_run(f"manual_protect={str(manual).lower()}", phases=("populate", "migrate")), "migrate")["migration"][0]
    assert m["lost_writes"] > 0
