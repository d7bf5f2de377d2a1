"""Workload format, guest image, op translation and comparison of ``batchmmu validate`` (no /dev/kvm needed:
the simulator side runs on a recording fake host)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

import batchmmu as bm
from batchmmu import guestimage as gi
from batchmmu import validate as V
from batchmmu import workload as W
from batchmmu.cli import main as cli_main

pytestmark = pytest.mark.nojit

MiB = 1 << 20


def wl(steps, **config):
    return W.parse({"config": {"memory": "16MiB", **config}, "steps": steps})


# ---------------------------------------------------------------------------- guest image
def test_image_layout_follows_the_pool_order():
    img = gi.GuestImage("64MiB")
    writes = dict((gpa, w) for gpa, w in img.initial_writes())
    t = img.trees["main"]
    assert t.root == gi.POOL_START
    # PML4, PDPT, PD, then one PT per 2 MiB in address order
    assert img.table_gpas("main", 3) == [gi.POOL_START + 0x1000]
    assert img.table_gpas("main", 2) == [gi.POOL_START + 0x2000]
    pts = img.table_gpas("main", 1)
    assert pts == [gi.POOL_START + 0x3000 + k * 0x1000 for k in range(64 * MiB // gi.HUGE)]
    # every entry points down the tree; leaves map gva -> gva with U/S, no A/D
    assert int(writes[t.root][0]) == (gi.POOL_START + 0x1000) | 0x7
    for gva in (0, gi.CODE_GPA, gi.DATA_GPA, 64 * MiB - gi.PAGE):
        pte = img.pte_gpa("main", gva, 1)
        page = writes[pte & ~0xFFF]
        assert int(page[(pte & 0xFFF) // 8]) == gva | gi.PTE_P | gi.PTE_RW | gi.PTE_US
        pde = img.pte_gpa("main", gva, 2)
        assert int(writes[pde & ~0xFFF][(pde & 0xFFF) // 8]) == (pte & ~0xFFF) | 0x7
    # the whole slot and nothing beyond it is mapped
    assert int(writes[gi.POOL_START + 0x2000][64 * MiB // gi.HUGE]) == 0
    assert {gi.GDT_GPA, gi.IDT_GPA, gi.TSS_GPA} <= set(writes)


def test_image_ad_preset_2m_leaves_and_remapped_trees():
    img = gi.GuestImage("32MiB", ad=True, guest_2m=True)
    writes = dict(img.initial_writes())
    pde = img.pte_gpa("main", gi.DATA_GPA, 2)
    assert int(writes[pde & ~0xFFF][(pde & 0xFFF) // 8]) == gi.DATA_GPA | 0xE7          # P RW US A D PS
    low = img.pte_gpa("main", gi.CODE_GPA, 1)
    assert int(writes[low & ~0xFFF][(low & 0xFFF) // 8]) == gi.CODE_GPA | 0x67
    assert len(img.table_gpas("main", 1)) == 2                                          # only below DATA
    with pytest.raises(bm.BatchMMUError):
        img.pte_gpa("main", gi.DATA_GPA, 1)                                             # no PT there
    before = img.next_table
    new = dict(img.new_tree("B", [{"from": 0x600000, "to": 0x1000000, "size": 0x400000}]))
    assert min(new) == before and img.trees["B"].root == before
    assert img.translate("B", 0x600000 + 0x1234) == 0x1001234 and img.translate("B", 0x400000) == 0x400000
    pde = img.pte_gpa("B", 0x800000, 2)
    assert int(new[pde & ~0xFFF][(pde & 0xFFF) // 8]) == 0x1200000 | 0xE7
    with pytest.raises(bm.BatchMMUError, match="remap"):
        img.new_tree("C", [{"from": 0x100000, "to": 0x800000, "size": 0x200000}])     # image area
    with pytest.raises(bm.BatchMMUError, match="multiples"):
        img.new_tree("C", [{"from": 0x400000, "to": 0x801000, "size": 0x200000}])     # not 2M aligned
    assert "C" not in img.trees and img.next_table == before + len(new) * gi.PAGE


def test_image_rejects_bad_memory_and_a_full_pool():
    for mem in ("3MiB", "4MiB", 5 * MiB):
        with pytest.raises(bm.BatchMMUError, match="memory"):
            gi.GuestImage(mem)
    img = gi.GuestImage("64MiB")
    img.initial_writes()
    with pytest.raises(bm.BatchMMUError, match="pool"):
        for k in range(10):
            img.new_tree(f"t{k}")
    assert len(img.trees) == (gi.POOL_END - gi.POOL_START) // (35 * gi.PAGE)


def test_programs_loop_back_and_end_with_out():
    for write in (False, True):
        code = gi.touch_program(write)
        jb = code.index(0x72)
        assert jb + 2 + (code[jb + 1] - 256) == 0          # the loop branch targets the first instruction
        assert code[jb + 2:] == bytes([0xE6, gi.EXIT_PORT, 0xEB, 0xFE])
    assert gi.store_program(4)[:2] == b"\x89\x18" and gi.store_program(8)[:3] == b"\x48\x89\x18"
    with pytest.raises(bm.BatchMMUError, match="size"):
        gi.store_program(3)


# ---------------------------------------------------------------------------- workload format
@pytest.mark.parametrize("data, field", [
    ({"steps": [{"op": "touch"}], "config": {"memroy": "16MiB"}}, "config.memroy"),
    ({"steps": [{"op": "touch"}], "config": {"memory": "5MiB"}}, "config.memory"),
    ({"steps": [{"op": "touch"}], "config": {"backing": "1g"}}, "config.backing"),
    ({"steps": [{"op": "touch"}], "config": {"initially_set": True}}, "config.initially_set"),
    ({"steps": []}, "workload.steps"),
    ({"steps": [{"op": "touch"}], "stpes": 1}, "workload.stpes"),
    ({"steps": [{"op": "touch"}, {"op": "jump"}]}, "steps[1].op"),
    ({"steps": [{"op": "touch", "start": 0x400000, "count": 0}]}, "steps[0].count"),
    ({"steps": [{"op": "touch", "start": 0x400000, "strid": 8}]}, "steps[0].strid"),
    ({"steps": [{"op": "touch", "start": 0x400000, "count": 20000}]}, "steps[0].start"),
    ({"steps": [{"op": "touch", "cpl": 1}]}, "steps[0].cpl"),
    ({"steps": [{"op": "store", "value": 1}]}, "steps[0].gva"),
    ({"steps": [{"op": "store", "gva": 0x400000}]}, "steps[0].value"),
    ({"steps": [{"op": "store", "gva": 0x400000, "value": 1, "size": 4}]}, "steps[0].size"),
    ({"steps": [{"op": "store", "gva": 0x400000, "point_to": 0x401008}]}, "steps[0].point_to"),
    ({"steps": [{"op": "store", "pte_of": {"tree": "B", "gva": 0}, "value": 1}]}, "steps[0].pte_of.tree"),
    ({"steps": [{"op": "store", "pte_of": {"gva": 0, "level": 5}, "value": 1}]}, "steps[0].pte_of.level"),
    ({"steps": [{"op": "invlpg"}]}, "steps[0].gva"),
    ({"steps": [{"op": "mov_cr3", "tree": "nope"}]}, "steps[0].tree"),
    ({"steps": [{"op": "set_cr3"}]}, "steps[0].tree"),
    ({"steps": [{"op": "new_tree", "name": "main"}]}, "steps[0].name"),
    ({"steps": [{"op": "new_tree", "name": "B", "remap": [{"from": 0x400000, "to": 0}]}]}, "steps[0].remap[0]"),
    ({"steps": [{"op": "get_dirty_log"}]}, "steps[0].op"),
    ({"steps": [{"op": "dirty_log", "enable": True}, {"op": "clear_dirty_log"}]}, "steps[1].op"),
    ({"steps": [{"op": "dirty_log", "enable": True, "slot": 1}]}, "steps[0].slot"),
    ({"steps": [{"op": "dirty_log", "enable": True}, {"op": "clear_dirty_log", "first": 10}],
      "config": {"manual_protect": True}}, "steps[1].first"),
])
def test_bad_workloads_name_the_key(data, field):
    with pytest.raises(bm.BatchMMUError) as e:
        W.parse(data)
    assert e.value.field == field, str(e.value)
    assert field in str(e.value)


def test_bundled_workloads_parse_and_cover_each_experiment_group():
    names = dict(W.list_workloads())
    assert len(names) >= 8 and all(names.values())
    ops = set()
    for name in names:
        w = W.load(name)
        c = W.compile_workload(w)
        assert len(c.steps) == len(w.steps)
        ops |= {s["op"] for s in w.steps}
    assert ops == set(W.STEP_KEYS)                     # every op is exercised by some bundled workload
    cfgs = [W.load(n).config for n in names]
    assert {c["ad"] for c in cfgs} == {True, False} and any(c["guest_2m"] and c["backing"] == "thp" for c in cfgs)
    assert any(c["manual_protect"] and c["initially_set"] for c in cfgs)


def test_load_reads_json_files_and_reports_parse_errors(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"config": {"memory": 16 * MiB}, "steps": [{"op": "touch", "start": "0x400000"}]}))
    w = W.load(str(p))
    assert w.name == "w" and w.steps[0]["start"] == 0x400000 and w.config["memory"] == 16 * MiB
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [\n")
    with pytest.raises(bm.BatchMMUError, match="bad.toml"):
        W.load(str(bad))
    with pytest.raises(bm.BatchMMUError, match="no bundled workload"):
        W.load("no_such_workload")


def test_random_steps_are_seeded_and_keep_the_guest_in_bounds():
    assert W.random_steps(5, 60) == W.random_steps(5, 60)
    assert W.random_steps(5, 60) != W.random_steps(6, 60)
    for seed in range(12):
        w = W.random_workload(seed, 80)
        mem = w.config["memory"]
        assert len(w.steps) == 80
        for s in w.steps:
            if s["op"] == "touch":
                assert gi.DATA_GPA <= s["start"] and s["start"] + (s["count"] - 1) * s["stride"] + 8 <= mem
            if s["op"] == "store" and "point_to" in s and s["pte_of"]["gva"] < mem:
                assert gi.DATA_GPA <= s["point_to"] < mem or s["point_to"] < gi.CODE_GPA  # data page or a PT
            if s["op"] == "clear_dirty_log":
                assert w.config["manual_protect"]


# ---------------------------------------------------------------------------- op translation (fake host)
class FakeHost:
    """Records every call; counts a fault per access to a page not seen before (pages_4k = pages seen)."""

    def __init__(self):
        self.calls = []
        self.seen = set()
        self.counters = {"pf_taken": 0, "pf_fixed": 0, "tlb_flush": 0, "mmu_pte_write": 0}
        self.bitmap = np.array([0b1011, 0, 1 << 63, 5], np.uint64)

    def create_vms(self, n, memory, vcpus, mmu):
        self.calls.append(("create_vms", n, memory, vcpus, mmu))
        return np.array([7])

    def stats(self, vm):
        return {**self.counters, "pages_4k": len(self.seen), "mmu_unsync": 0, "pages_2m": 0}

    def access(self, vm, vcpu, gvas, kinds):
        gvas, kinds = np.asarray(gvas), np.asarray(kinds)
        self.calls.append(("access", vm, vcpu, gvas.tolist(), kinds.tolist()))
        for g in gvas.tolist():
            if g >> 12 not in self.seen:
                self.seen.add(g >> 12)
                self.counters["pf_taken"] += 1
                self.counters["pf_fixed"] += 1
        return SimpleNamespace(outcome=np.zeros(gvas.size, np.int8), error_code=np.zeros(gvas.size, np.int32))

    def store(self, vm, vcpu, gvas, values, kinds):
        plain = lambda x: np.asarray(x).tolist()  # noqa: E731  (scalars stay scalars)
        self.calls.append(("store", vm, vcpu, plain(gvas), plain(values), plain(kinds)))
        gvas = np.atleast_1d(np.asarray(gvas))
        for g in gvas.tolist():
            for page in {g >> 12, (g + 7) >> 12}:
                if page not in self.seen:
                    self.seen.add(page)
                    self.counters["pf_taken"] += 1
                    self.counters["pf_fixed"] += 1
        return SimpleNamespace(outcome=np.zeros(gvas.size, np.int8), error_code=np.zeros(gvas.size, np.int32))

    def emulated_access(self, vm, vcpu, gva, kind, value=0, size=8):
        self.calls.append(("emulated_access", vm, vcpu, gva, kind, value, size))
        if kind & bm.ACC_WRITE:
            self.counters["mmu_pte_write"] += 1

    def get_dirty_log(self, vm, slot):
        self.calls.append(("get_dirty_log", vm, slot))
        return self.bitmap

    def __getattr__(self, name):
        def rec(*args, **kw):
            self.calls.append((name,) + args + tuple(sorted(kw.items())))
        return rec


def sim(w, **kw):
    fake = FakeHost()
    c = W.compile_workload(w)
    side = V.SimSide(c, params={"mmio_caching": "N", "eager_page_split": "Y"}, host=fake)
    init = len(fake.calls)
    return fake, side, c, init


def test_setup_builds_the_image_and_registers_on_the_host():
    fake, side, c, init = sim(wl([{"op": "touch", "start": 0x400000}], manual_protect=True, initially_set=True))
    assert fake.calls[0] == ("create_vms", 1, 16 * MiB, 1, "shadow")
    assert ("enable_manual_dirty_log_protect", 7, ("initially_set", True)) in fake.calls
    assert ("touch_host_memory", 7, 0, 16 * MiB) in fake.calls       # as the kernel side populates its memory
    writes = [cl for cl in fake.calls if cl[0] == "write_guest_memory"]
    assert [cl[2] for cl in writes] == [gpa for gpa, _ in c.initial_writes]
    regs = [cl for cl in fake.calls if cl[0] == "set_vcpu_regs"][0]
    assert dict(regs[3:]) == {"cr0": gi.CR0, "cr3": gi.POOL_START, "cr4": gi.CR4, "efer": gi.EFER,
                              "rflags": gi.RFLAGS}
    assert side.options == {"mmio_caching": False, "nx_huge_pages": False, "eager_page_split": True}


def test_cpl3_touch_is_a_code_fetch_the_data_pages_and_the_out_fetch():
    w = wl([{"op": "touch", "start": 0x400ffc, "count": 3, "stride": 0x800}])
    fake, side, c, init = sim(w)
    res = V.run_side(side, c)
    (name, vm, vcpu, gvas, kinds), = fake.calls[init:]
    assert (name, vm, vcpu) == ("access", 7, 0)
    # 0x400ffc and 0x401ffc cross into the next page; 0x4017fc and 0x401ffc repeat page 0x401: left out
    assert gvas == [gi.CODE_GPA, 0x400ffc, 0x401000, 0x402000, gi.CODE_GPA]
    fetch, rd = bm.ACC_FETCH | bm.ACC_USER, bm.ACC_USER
    assert kinds == [fetch, rd, rd, rd, fetch]
    assert res["error"] is None and res["steps"][0]["stats"]["pf_taken"] == 4


def test_cpl3_write_touch_stores_each_address_into_itself():
    # the loop is mov [rax], rax: the simulator stores the same values, so guest memory matches too
    w = wl([{"op": "touch", "start": 0x400ffc, "count": 3, "stride": 0x800, "write": True}])
    fake, side, c, init = sim(w)
    res = V.run_side(side, c)
    fetch = bm.ACC_FETCH | bm.ACC_USER
    first, store, last = fake.calls[init:]
    assert first == ("access", 7, 0, [gi.CODE_GPA], [fetch]) and last == first
    addrs = [0x400ffc, 0x4017fc, 0x401ffc]
    assert store == ("store", 7, 0, addrs, addrs, [bm.ACC_WRITE | bm.ACC_USER] * 3)
    assert res["error"] is None and res["steps"][0]["stats"]["pf_taken"] == 4


def test_cpl0_ops_go_through_the_emulator_and_end_with_a_guest_entry():
    w = wl([{"op": "new_tree", "name": "B"}, {"op": "mov_cr3", "tree": "B"},
            {"op": "store", "pte_of": {"gva": 0x400000, "level": 2}, "offset": 4, "value": 0x1234, "cpl": 0,
             "size": 2},
            {"op": "touch", "start": 0x400000, "count": 2, "stride": 8, "cpl": 0},
            {"op": "invlpg", "gva": 0x401000}, {"op": "set_cr3", "tree": "main"},
            {"op": "store", "pte_of": {"gva": 0x400000}, "point_to": 0x800000}])
    fake, side, c, init = sim(w)
    res = V.run_side(side, c)
    assert res["error"] is None
    calls = fake.calls[init:]
    settle = ("access", 7, 0, [gi.CODE_GPA], [bm.ACC_FETCH | bm.ACC_USER])
    efetch = ("emulated_access", 7, 0, gi.CODE_GPA, bm.ACC_FETCH, 0, 8)
    b_root = c.image.trees["B"].root
    pde = c.image.pte_gpa("B", 0x400000, 2)       # pte_of defaults to the current tree: B
    pte = c.image.pte_gpa("main", 0x400000, 1)    # ... and main again after set_cr3
    n = len(c.image.trees["B"].tables)
    assert calls[:n] == [("write_guest_memory", 7, gpa, words) for gpa, words in c.steps[0][0].args[0]]
    assert calls[n:] == [
        settle,
        efetch, ("mov_cr3", 7, 0, b_root), settle,
        efetch, ("emulated_access", 7, 0, pde + 4, bm.ACC_WRITE, 0x1234, 2), settle,
        efetch, ("emulated_access", 7, 0, 0x400000, 0, 0, 8), ("emulated_access", 7, 0, 0x400008, 0, 0, 8), settle,
        efetch, ("invlpg", 7, 0, 0x401000), settle,
        ("set_vcpu_regs", 7, 0, ("cr3", gi.POOL_START)), settle,
        settle, ("store", 7, 0, pte, 0x800000 | 0x7, bm.ACC_WRITE | bm.ACC_USER), settle]
    assert [s["stats"]["mmu_pte_write"] for s in res["steps"]] == [0, 0, 1, 0, 0, 0, 0]


def test_dirty_log_steps_and_the_bitmap_a_clear_passes():
    w = wl([{"op": "dirty_log", "enable": True}, {"op": "get_dirty_log"},
            {"op": "clear_dirty_log", "pages": "last", "first": 64, "num": 128},
            {"op": "clear_dirty_log", "num": 4096}, {"op": "dirty_log", "enable": False}],
           manual_protect=True)
    fake, side, c, init = sim(w)
    res = V.run_side(side, c)
    host = [cl for cl in fake.calls[init:] if cl[0] != "access"]
    assert host[0] == ("set_memslot", 7, 0, 0, 16 * MiB, ("flags", bm.MEM_LOG_DIRTY_PAGES))
    assert host[1] == ("get_dirty_log", 7, 0)
    assert host[2][:5] == ("clear_dirty_log", 7, 0, 64, 128) and host[2][5].tolist() == [0, 1 << 63]
    assert host[3][:5] == ("clear_dirty_log", 7, 0, 0, 4096) and host[3][5].tolist() == [2**64 - 1] * 64
    assert host[4] == ("set_memslot", 7, 0, 0, 16 * MiB, ("flags", 0))
    assert res["steps"][1]["dirty"] == [0, 1, 3, 191, 192, 194]
    assert "dirty" not in res["steps"][0]


def test_counters_are_deltas_and_gauges_absolute():
    w = wl([{"op": "touch", "start": 0x400000, "count": 3}, {"op": "touch", "start": 0x400000, "count": 5}])
    fake, side, c, init = sim(w)
    steps = V.run_side(side, c)["steps"]
    assert [s["stats"]["pf_fixed"] for s in steps] == [4, 2]          # code page + 3, then 2 new pages
    assert [s["stats"]["pages_4k"] for s in steps] == [4, 6]


def test_unavailable_simulator_is_reported_not_raised():
    class NoShadow(FakeHost):
        def create_vms(self, n, memory, vcpus, mmu):
            raise bm.BatchMMUError("mmu='shadow': the shadow MMU is not built yet", field="mmu")

    with pytest.raises(V.SimUnavailable, match="shadow MMU is not built yet"):
        V.SimSide(W.compile_workload(wl([{"op": "touch"}])), params={}, host=NoShadow())


def test_guest_fault_in_the_simulator_stops_that_side_with_the_step():
    class Faults(FakeHost):
        def access(self, vm, vcpu, gvas, kinds):
            r = super().access(vm, vcpu, gvas, kinds)
            r.outcome[-1] = bm.GUEST_FAULT
            return r

    c = W.compile_workload(wl([{"op": "invlpg", "gva": 0}, {"op": "touch"}]))
    res = V.run_side(V.SimSide(c, params={}, host=Faults()), c)
    assert res["error"]["step"] == 0 and "guest #PF" in res["error"]["message"] and res["steps"] == []


# ---------------------------------------------------------------------------- comparison and report
def step(stats, dirty=None):
    s = {"stats": dict.fromkeys(V.COMPARED + V.SHOWN, 0) | stats}
    if dirty is not None:
        s["dirty"] = dirty
    return s


def test_compare_marks_compared_stats_and_dirty_pages_only():
    assert V.compare_step(step({"exits": 5, "tlb_flush": 1}), step({"exits": 9})) == []
    assert V.compare_step(step({"pf_fixed": 2, "pages_4k": 9}), step({"pf_fixed": 2, "pages_4k": 8})) == ["pages_4k"]
    assert V.compare_step(step({}, [1, 2]), step({}, [1, 3])) == ["dirty"]
    assert V.compare_step(step({}, []), step({})) == ["dirty"]


def test_report_text_marks_differences_and_exit_codes():
    w = wl([{"op": "touch"}, {"op": "dirty_log", "enable": True}, {"op": "get_dirty_log"}])
    rep = {"workload": w.name, "description": "d", "config": w.config, "environment": V.environment(),
           "kernel_skipped": None, "sim_skipped": None, "errors": [],
           "steps": [{"index": i, "op": s["op"], "desc": W.describe(s)} for i, s in enumerate(w.steps)],
           "kernel": {"steps": [step({"pf_fixed": 2, "pages_4k": 2, "exits": 3}), step({}), step({}, [4, 5])]},
           "sim": {"steps": [step({"pf_fixed": 3, "pages_4k": 2}), step({}), step({}, [4])]}}
    for st, k, s in zip(rep["steps"], rep["kernel"]["steps"], rep["sim"]["steps"], strict=True):
        st["differences"] = V.compare_step(k, s)
    rep.update(differences=2, steps_compared=3, status="differences")
    text = V.format_report(rep)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("pf_fixed"))
    assert line.split()[1:] == ["2", "3", "<<"]
    assert "only kernel 1 [0x5]" in text and "mmu_flooded" not in text
    assert "mmu_flooded" in V.format_report(rep, full=True)
    assert V.exit_code(rep) == 1
    assert V.exit_code({**rep, "status": "ok"}) == 0 and V.exit_code({**rep, "status": "incomplete"}) == 3
    json.loads(V.to_json(rep))


def test_cli_rejects_a_bad_workload_with_its_key(tmp_path, capsys):
    p = tmp_path / "w.toml"
    p.write_text('steps = [ { op = "touch", start = 0x400000, count = 0 } ]\n')
    assert cli_main(["validate", str(p)]) == 2
    assert "steps[0].count" in capsys.readouterr().err
    assert cli_main(["validate"]) == 2
    assert "touch_4k_ad" in capsys.readouterr().err
