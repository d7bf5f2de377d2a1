"""The real KVM on this machine (skipped, with the reason, where /dev/kvm cannot create VMs or run guests)."""

import os
import time

import pytest

import batchmmu as bm
from batchmmu import guestimage as gi
from batchmmu import realkvm
from batchmmu import validate as V
from batchmmu import workload as W

PROBE = realkvm.probe()
GUEST = realkvm.probe_guest() if PROBE["available"] else {**PROBE, "guest": False}
needs_kvm = pytest.mark.skipif(not PROBE["available"], reason=f"no usable /dev/kvm: {PROBE['reason']}")
needs_guest = pytest.mark.skipif(not GUEST["guest"], reason=f"cannot run KVM guests here: {GUEST['reason']}")
DATA = gi.DATA_GPA


@pytest.mark.nojit
def test_probe_reports_why():
    assert isinstance(PROBE["available"], bool)
    assert PROBE["available"] or PROBE["reason"]
    assert not realkvm.probe("/nonexistent/kvm")["available"]
    assert "cannot open" in realkvm.probe("/nonexistent/kvm")["reason"]
    g = realkvm.probe_guest("/nonexistent/kvm")
    assert not g["guest"] and "cannot open" in g["reason"]


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
    bm.Host(**realkvm.sim_host_options(PROBE["params"]))


class Guest:
    """A fresh VM with the image loaded; ``touch`` runs a CPL3 (or CPL0) loop and returns stat deltas."""

    def __init__(self, memory="64MiB", ad=False, **kw):
        self.img = gi.GuestImage(memory, ad=ad)
        self.vm = realkvm.KvmVm(self.img.memory, **kw)
        for gpa, words in self.img.initial_writes():
            self.vm.write(gpa, words)
        self.vm.set_control_regs(**self.img.regs())

    def touch(self, start, count, write=False, stride=gi.PAGE, cpl=3):
        s0 = self.vm.stats()
        self.vm.run(gi.touch_program(write), {"rax": start, "rcx": start + count * stride, "rdx": stride}, cpl=cpl)
        s1 = self.vm.stats()
        return {k: s1[k] - s0[k] for k in s1}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.vm.close()


@needs_guest
@pytest.mark.realkvm
def test_a_cpl3_program_reaches_its_out_and_reads_guest_memory():
    with Guest() as g:
        d = g.touch(DATA + 5 * gi.PAGE, 3)
        assert g.vm.regs()["rbx"] == DATA + 7 * gi.PAGE        # each page starts with its own gpa
        assert d["exits"] >= 1 and d["pf_fixed"] >= 1
        assert g.vm.read(DATA + 7 * gi.PAGE, 1)[0] == DATA + 7 * gi.PAGE


@needs_guest
@pytest.mark.realkvm
def test_a_clear_one_fault_per_page_write_after_read_faults_again_second_pass_free():
    n = 37
    with Guest(ad=False) as g:
        first = g.touch(DATA, n)
        assert first["pf_fixed"] == first["pf_taken"] == n + 1          # + the code page
        assert first["pages_4k"] == n + 1
        assert g.touch(DATA, n)["pf_taken"] == 0
        w = g.touch(DATA, n, write=True)
        assert w["pf_fixed"] == n and w["pages_4k"] == 0                 # read-only SPTEs made writable in place
        assert g.touch(DATA, n, write=True)["pf_taken"] == 0
        # KVM's walker set A and D in the guest PTE
        pte = int(g.vm.read(g.img.pte_gpa("main", DATA, 1), 1)[0])
        assert pte & (gi.PTE_A | gi.PTE_D) == gi.PTE_A | gi.PTE_D


@needs_guest
@pytest.mark.realkvm
def test_a_preset_prefetches_aligned_groups_of_8():
    start, n = DATA + 3 * gi.PAGE, 100
    with Guest(ad=True) as g:
        d = g.touch(start, n)
        groups = {(start + k * gi.PAGE) >> 15 for k in range(n)} | {gi.CODE_GPA >> 15}
        assert d["pf_fixed"] == len(groups)
        assert d["pages_4k"] == 8 * d["pf_fixed"]
        assert g.touch(start, n, write=True)["pf_taken"] == 0            # D preset: already writable


@needs_guest
@pytest.mark.realkvm
def test_cpl0_code_is_emulated_and_takes_no_page_faults():
    with Guest() as g:
        d = g.touch(DATA, 16, cpl=0)
        assert d["pf_taken"] == 0 and d["pages_4k"] == 0
        assert d["insn_emulation"] >= 4 * 16
        assert g.vm.regs()["rbx"] == DATA + 15 * gi.PAGE


@needs_guest
@pytest.mark.realkvm
def test_guest_errors_timeouts_and_no_leaked_fds():
    fds = len(os.listdir("/proc/self/fd"))
    with Guest("8MiB") as g:
        with pytest.raises(realkvm.GuestError, match="SHUTDOWN"):
            g.touch(16 << 20, 1)                                         # unmapped: #PF -> triple fault
        t = time.monotonic()
        with pytest.raises(realkvm.GuestTimeout):
            g.vm.run(b"\xEB\xFE", {}, timeout=0.3)                       # jmp $
        assert time.monotonic() - t < 3
        assert g.touch(DATA, 1)["pf_taken"] >= 1                        # the vCPU still runs
    assert len(os.listdir("/proc/self/fd")) == fds


def kernel(steps, **config):
    rep = V.validate({"config": {"memory": "64MiB", **config}, "steps": steps}, sides="kernel")
    assert rep["kernel"]["error"] is None, rep["kernel"]["error"]
    return rep["kernel"]["steps"]


@needs_guest
@pytest.mark.realkvm
def test_native_pte_store_unsyncs_and_the_guest_sees_the_old_page_until_invlpg():
    alt = DATA + (8 << 20)
    s = kernel([{"op": "touch", "start": DATA},
                {"op": "store", "pte_of": {"gva": DATA}, "point_to": alt},
                {"op": "touch", "start": DATA},
                {"op": "invlpg", "gva": DATA},
                {"op": "touch", "start": DATA},
                {"op": "mov_cr3"}])
    assert s[1]["stats"]["mmu_unsync"] == 1 and s[1]["stats"]["pf_emulate"] == 0
    assert s[2]["loaded"] == DATA and s[4]["loaded"] == alt
    assert s[5]["stats"]["mmu_unsync"] == 0                              # CR3 load synced the page


@needs_guest
@pytest.mark.realkvm
@pytest.mark.parametrize("ad", [True, False])
def test_dirty_log_reports_the_written_pages(ad):
    n = 300
    s = kernel([{"op": "touch", "start": DATA, "count": n}, {"op": "dirty_log", "enable": True},
                {"op": "touch", "start": DATA, "count": n, "write": True}, {"op": "get_dirty_log"},
                {"op": "get_dirty_log"}], ad=ad)
    assert s[2]["stats"]["pf_fixed"] == n                                # logging write-protected every SPTE
    data = set(range(DATA >> 12, (DATA >> 12) + n))
    got = set(s[3]["dirty"])
    assert data <= got
    extra = got - data                                                   # walker D-bit writes to guest PTs
    assert all(gi.POOL_START >> 12 <= p < gi.POOL_END >> 12 for p in extra) and (not extra if ad else extra)
    assert s[4]["dirty"] == []                                           # GET cleared the bitmap


@needs_guest
@pytest.mark.realkvm
def test_cr3_switch_runs_on_the_other_tree():
    s = kernel([{"op": "touch", "start": DATA, "count": 4},
                {"op": "new_tree", "name": "B", "remap": [{"from": DATA, "to": DATA + (16 << 20), "size": 1 << 21}]},
                {"op": "mov_cr3", "tree": "B"}, {"op": "touch", "start": DATA},
                {"op": "mov_cr3", "tree": "main"}, {"op": "touch", "start": DATA},
                {"op": "set_cr3", "tree": "B"}, {"op": "touch", "start": DATA}])
    assert s[3]["loaded"] == DATA + (16 << 20) and s[5]["loaded"] == DATA and s[7]["loaded"] == DATA + (16 << 20)
    assert s[2]["stats"]["mmu_cache_miss"] >= 1                          # B's root is a new shadow page
    assert s[5]["stats"]["pf_taken"] == 0                                # main's pages are still shadowed


@needs_guest
@pytest.mark.realkvm
@pytest.mark.parametrize("name", [n for n, _ in W.list_workloads()])
def test_bundled_workloads_run_on_the_kernel(name):
    rep = V.validate(name, sides="kernel")
    assert rep["status"] == "ok" and not rep["errors"]
    steps = rep["kernel"]["steps"]
    assert len(steps) == len(rep["steps"])
    wl = W.load(name)
    for st, s in zip(wl.steps, steps, strict=True):
        assert set(V.COMPARED) <= set(s["stats"])
        assert ("dirty" in s) == (st["op"] == "get_dirty_log")
        if st["op"] == "touch" and st["cpl"] == 3:
            assert s["stats"]["exits"] >= 1


@needs_guest
@pytest.mark.realkvm
def test_random_steps_run_and_the_kernel_is_deterministic():
    for seed in range(4):
        a = V.validate(f"random:{seed}:100", sides="kernel")
        assert a["status"] == "ok", a["errors"]
        if seed == 0:
            b = V.validate(f"random:{seed}:100", sides="kernel")
            assert all(V.compare_step(x, y) == [] for x, y in zip(a["kernel"]["steps"], b["kernel"]["steps"],
                                                                 strict=True))


def _first_difference(rep):
    for st in rep["steps"]:
        if st.get("differences"):
            i = st["index"]
            k, s = rep["kernel"]["steps"][i], rep["sim"]["steps"][i]
            return f"step {i} ({st['desc']}): " + ", ".join(
                f"{n} kernel {k['stats'].get(n, k.get(n))} sim {s['stats'].get(n, s.get(n))}"
                for n in st["differences"])
    return "; ".join(rep["errors"])


@needs_guest
@pytest.mark.realkvm
@pytest.mark.parametrize("name", [n for n, _ in W.list_workloads()])
def test_bundled_workloads_match_the_simulator(name):
    rep = V.validate(name)
    if rep["sim_skipped"]:
        pytest.skip(rep["sim_skipped"])
    assert rep["status"] == "ok", _first_difference(rep)


@needs_guest
@pytest.mark.realkvm
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_differential(seed):
    rep = V.validate(f"random:{seed}:100")
    if rep["sim_skipped"]:
        pytest.skip(rep["sim_skipped"])
    assert rep["status"] == "ok", _first_difference(rep)


@needs_guest
@pytest.mark.realkvm
def test_calibration_measures_faults_and_emulated_instructions():
    cal = realkvm.calibrate(repeats=1, pages=256, insns=400)
    for k in ("us_per_read_fault", "us_per_write_fault", "us_per_emulated_insn"):
        assert 0 < cal[k] < 10_000
    assert len(cal["runs"]["read_fault"]) == 1 and cal["pages"] == 256
