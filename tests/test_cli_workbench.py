"""The researcher's workbench (issue 14): output that says exactly what ran, one seed, checks before any
kernel loads, messages instead of tracebacks, honest headers, show / list / compare / CSV exports."""

import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import batchmmu as bm
from batchmmu import report, scenario
from batchmmu.cli import main
from batchmmu.spec import prepare

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "vms=2", "--set", "bytes_per_vcpu=1MiB"]


def _run_json(tmp_path, *argv, name="r.json"):
    out = tmp_path / name
    assert main(["run", *argv, "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- 1, 2: what ran, one seed
def test_section_override_is_in_the_output(tmp_path, capsys):
    d = _run_json(tmp_path, "demand_paging", *SMALL, "--set", "vm_group.vcpus=1")
    assert d["resolved"]["vm_group"][0]["vcpus"] == 1
    assert d["totals"]["accesses"] == 2 * 1 * 256            # 2 VMs x 1 vCPU x 1 MiB: what ran, not params
    assert d["resolved"]["overrides"] == ["vm_group.vcpus=1"]
    assert d["resolved"]["params_replaced"] == {"vcpus": ["vm_group.vcpus=1"]}
    assert main(["run", "demand_paging", *SMALL, "--set", "vm_group.vcpus=1"]) == 0
    out = capsys.readouterr()
    assert "no longer applies where vm_group.vcpus=1" in out.out and "1 vCPU(s) each" in out.err
    assert main(["show", "demand_paging", "--set", "vm_group.vcpus=1"]) == 0
    assert "[replaced by vm_group.vcpus=1]" in capsys.readouterr().out


def test_json_has_resolved_provenance_delta_and_groups(tmp_path, capsys):
    d = _run_json(tmp_path, "demand_paging", *SMALL, "--set", "passes=2", "--seed", "7")
    assert capsys.readouterr() == ("", "")                 # --quiet: silent
    assert list(d)[:9] == ["scenario", "params", "resolved", "provenance", "totals", "per_vm", "vm_groups",
                           "phases", "footprint"]
    prov = d["provenance"]
    for k in ("version", "source_hash", "argv", "seed", "backend", "workers", "python", "numba", "numpy", "cpu",
              "cores", "timestamp", "wall_seconds"):
        assert prov[k] is not None, k
    from batchmmu.kernels import SOURCE_HASH
    assert prov["source_hash"] == SOURCE_HASH and prov["seed"] == 7 == d["params"]["seed"]
    assert prov["argv"][:2] == ["batchmmu", "run"] and prov["wall_seconds"] > 0
    r = d["resolved"]
    assert r["host"]["memory"] == 1 << 30 and r["workload"]["bytes_per_vcpu"] == 1 << 20
    assert [p["name"] for p in r["phase"]] == ["populate"] and r["params"]["passes"] == 2
    assert d["vm_groups"] == [{"label": "tdp", "first": 0, "count": 2, "mmu": "tdp", "vcpus": 2, "memory": "2MiB",
                               "tdp_format": "ept", "tdp_levels": 4}]
    (p,) = d["phases"]
    assert p["stats"] == d["totals"]                       # cumulative after the (only) phase ...
    assert p["delta"] == d["totals"]                       # ... and its change from nothing
    assert "cumulative" in d["legend"]["phases.stats"]


def test_phase_delta_is_the_difference_of_cumulative_stats(tmp_path):
    d = _run_json(tmp_path, "dirty_log_perf", "--set", "bytes_per_vcpu=1MiB")
    prev = {k: 0 for k in bm.STAT_NAMES}
    for p in d["phases"]:
        assert p["delta"] == {k: p["stats"][k] - prev[k] for k in bm.STAT_NAMES}
        prev = p["stats"]
    assert sum(p["delta"]["pf_fixed"] for p in d["phases"]) == d["totals"]["pf_fixed"]


@pytest.mark.nojit
def test_one_seed():
    a = prepare("demand_paging", ["seed=5"])
    b = prepare("demand_paging", [], seed=5)
    assert a.seed == b.seed == 5 and a.spec == b.spec and a.data == b.data
    assert prepare("demand_paging").seed == 0
    assert prepare("demand_paging").spec["seed"] == 0x6b8b4567                     # the selftests' default
    d = prepare("dirty_log_perf")                                                  # declares seed = 1
    assert d.seed == 1 == d.spec["seed"]                                           # and gives it to its guest
    assert prepare("dirty_log_perf", seed=9).spec["seed"] == 9
    e = prepare("dirty_log", ["seed=0x10"])
    assert e.seed == 16 == e.spec["seed"]
    with pytest.raises(bm.BatchMMUError, match="give the seed once"):
        prepare("demand_paging", ["seed=5"], seed=6)
    with pytest.raises(bm.BatchMMUError, match="seed='x'"):
        prepare("demand_paging", ["seed=x"])
    with pytest.raises(bm.BatchMMUError, match="seed=-1: must be a non-negative integer"):
        prepare("demand_paging", seed=-1)


def test_seed_changes_memstress_results():
    sets = ["bytes_per_vcpu=1MiB", "random_access=true", "write_percent=50", "iterations=2"]
    a = bm.run_scenario("dirty_log_perf", sets=sets)
    b = bm.run_scenario("dirty_log_perf", sets=sets, seed=5)
    c = bm.run_scenario("dirty_log_perf", sets=[*sets, "seed=5"])
    assert b.per_vm == c.per_vm and b.phases[-1]["stats"] == c.phases[-1]["stats"]
    assert [p.get("dirty_pages") for p in a.phases] != [p.get("dirty_pages") for p in b.phases]


# ----------------------------------------------------------------------------- 3: checks before kernels load
_CHECKS = textwrap.dedent("""
    import json, sys, time
    import batchmmu.scenario, batchmmu.shard, batchmmu.show   # startup: imported, nothing compiled
    from batchmmu.cli import main
    def loaded():
        import numba.core.registry as r
        return sorted(f"{n}.{k}" for n, m in list(sys.modules.items()) if n.startswith("batchmmu.kernels")
                      for k, v in vars(m).items() if isinstance(v, r.CPUDispatcher) and v.signatures)
    out = []
    for argv in json.loads(sys.argv[1]):
        t = time.perf_counter()
        rc = main(argv)
        out.append([rc, time.perf_counter() - t, loaded()])
    print(json.dumps(out))
""")


def test_input_checked_before_any_kernel_loads(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = [
        ["run", "demand_pagng"],                                         # misspelled scenario
        ["run", str(tmp_path)],                                          # a directory
        ["run", "demand_paging", "--set", "vmz=3"],                      # unknown parameter
        ["run", "demand_paging", "--set", "vms=0"],                      # bad value (named as typed)
        ["run", "demand_paging", "--set", "vm_group.colour=red"],        # unknown section key
        ["run", "demand_paging", "--set", "backing=5k"],
        ["run", "demand_paging", "--set", "backing=hugetlb-1g"],           # 32 MiB slots of 1 GiB pages
        ["run", "demand_paging", "--json", str(tmp_path / "missing" / "out.json")],
        ["run", "demand_paging", "--json", str(ro / "out.json")] if not _root() else ["run", "nope"],
        ["run", "overcommit", "--plot", str(tmp_path / "mem.jpeg")],     # bad plot extension
        ["run", "demand_paging", "--set", "vms=1000", "--set", "bytes_per_vcpu=1TiB"],   # memory estimate
        ["run", "demand_paging", "--workers", "0"],
    ]
    r = subprocess.run([sys.executable, "-c", _CHECKS, json.dumps(cases)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    errs = [line for line in r.stderr.splitlines() if line.startswith("batchmmu: error:")]
    assert len(errs) == len(cases), r.stderr                  # one line each, no traceback
    for (rc, seconds, loaded), line in zip(res, errs, strict=True):
        assert rc == 2 and loaded == [], line
        assert seconds < 1.0, (seconds, line)
    for needle, line in zip(["demand_pagng", "is a directory", "vmz", "vms=0", "vm_group.colour", "backing='5k'",
                             "whole number of 1 GiB pages", "does not exist",
                             "not writable" if not _root() else "nope", ".png", "needs about", "--workers 0"],
                            errs, strict=True):
        assert needle in line, (needle, line)


def _root():
    import os
    return os.geteuid() == 0


# ----------------------------------------------------------------------------- 4, 5: files and messages
@pytest.mark.nojit
def test_unknown_sections_are_errors(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[hots]\nmemory = "1GiB"\n\n[[vm_group]]\ncount = 1\n\n[[phase]]\nop = "access"\n')
    with pytest.raises(bm.BatchMMUError, match=r"line 1\): unknown section or key 'hots'"):
        prepare(str(f))
    f.write_text('colour = "red"\n[[vm_group]]\ncount = 1\n\n[[phase]]\nop = "access"\n')
    with pytest.raises(bm.BatchMMUError, match=r"line 1\): unknown section or key 'colour'"):
        prepare(str(f))


@pytest.mark.nojit
def test_errors_name_what_the_user_typed():
    with pytest.raises(bm.BatchMMUError) as e:
        prepare("demand_paging", ["vms=0"])
    assert str(e.value).startswith("vms=0: ") and "vm_group.count" in str(e.value) and e.value.field == "vms"
    with pytest.raises(bm.BatchMMUError, match=r"^tdp_levels=3: "):
        prepare("demand_paging", ["tdp_levels=3"])
    with pytest.raises(bm.BatchMMUError, match="no section"):
        prepare("demand_paging", ["guest_os.processes=3"])


def test_ctrl_c_exits_130_and_keeps_finished_phases(tmp_path, monkeypatch, capsys):
    from batchmmu import reclaim
    real, calls = reclaim.run_phase, []

    def interrupt_second(be, spec, parts, k):
        calls.append(k)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(be, spec, parts, k)

    monkeypatch.setattr(reclaim, "run_phase", interrupt_second)
    out = tmp_path / "r.json"
    assert main(["run", "dirty_log_perf", "--set", "bytes_per_vcpu=1MiB", "--json", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    n = len(prepare("dirty_log_perf").spec["phases"])
    assert err == [f"batchmmu: interrupted after 1 of {n} phases; the finished phases are in {out}.partial"]
    d = json.loads((tmp_path / "r.json.partial").read_text())
    assert [p["name"] for p in d["phases"]] == ["Populate memory"] and not out.exists()
    assert d["totals"] == d["phases"][0]["stats"]


def test_host_memory_exhausted_names_the_setting(capsys):
    assert main(["run", "demand_paging", *SMALL, "--set", "host.memory=2MiB", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--set host.memory=" in err and "applied" not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- 6: headers and summaries
@pytest.mark.nojit
def test_headers_describe_the_scenario():
    from batchmmu.scenario import _vms_label
    from batchmmu.spec import region_label
    g = prepare("guest_os", ["vms=2"]).spec
    assert _vms_label(g) == "4 VMs (2 tdp + 2 shadow), 1 vCPU(s) each"
    assert region_label(g) == "256 MiB test region per VM"
    assert region_label(prepare("memslot_perf").spec) == "no memstress test region"
    assert region_label(prepare("dirty_log").spec).endswith("test region per VM")
    assert region_label(prepare("demand_paging").spec) == "16 MiB per vCPU"


TWO_GROUPS = """
name = "two"
[params]
vms = 2
[host]
memory = "1GiB"
backing = "4k"
[[vm_group]]
count = "${vms}"
vcpus = 1
[[vm_group]]
count = 1
vcpus = 2
tdp_format = "npt"
[workload]
bytes_per_vcpu = "1MiB"
[[phase]]
name = "touch"
op = "access"
"""


def test_groups_in_summary_table_csv_and_compare(tmp_path, capsys):
    f = tmp_path / "two.toml"
    f.write_text(TWO_GROUPS)
    d = _run_json(tmp_path, str(f))
    assert [(g["label"], g["first"], g["count"]) for g in d["vm_groups"]] == [("tdp0", 0, 2), ("tdp1", 2, 1)]
    rep = scenario.Report(**{k: d[k] for k in scenario.Report._fields})
    s = scenario.summary(rep)
    row = next(line for line in s.splitlines() if line.startswith("pf_fixed"))
    assert row.split() == ["pf_fixed", "1,024", "256.0", "512.0"]          # mean per VM of each group
    t = report.table(d)
    assert "mmu_pagesremote" not in t and re.search(r"mean tdp0 +max tdp0 +mean tdp1", t)
    csvp = tmp_path / "vms.csv"
    assert main(["report", str(tmp_path / "r.json"), "--csv", str(csvp), "--csv-phases",
                 str(tmp_path / "ph.csv")]) == 0
    rows = list(csv.DictReader(csvp.open()))
    assert [r["group"] for r in rows] == ["tdp0", "tdp0", "tdp1"] and [r["pf_fixed"] for r in rows] == ["256"] * 2 \
        + ["512"]
    ph = list(csv.DictReader((tmp_path / "ph.csv").open()))
    assert ph[0]["delta_pf_fixed"] == ph[0]["pf_fixed"] == "1024"
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "r.json")]) == 0                 # one result: its groups
    out = capsys.readouterr().out
    assert "VM group tdp1 against tdp0" in out
    line = next(x for x in out.splitlines() if x.split()[:1] == ["pf_fixed"])
    assert line.split()[1:5] == ["256", "512", "256", "2.000"]


def test_compare_two_results(tmp_path, capsys):
    _run_json(tmp_path, "demand_paging", *SMALL, name="a.json")
    _run_json(tmp_path, "demand_paging", *SMALL, "--set", "backing=thp", name="b.json")
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "parameters: backing 4k -> thp" in out
    rows = {x.split()[0]: x.split()[1:] for x in out.splitlines() if x.startswith("  ") and x.split()[0] in
            bm.STAT_NAMES}
    assert rows["pages_4k"][:3] == ["1,024", "0", "-1,024"] and rows["pages_2m"][:2] == ["0", "2"]
    assert "accesses" not in rows                                           # unchanged: left out


def test_to_dataframe(tmp_path):
    pd = pytest.importorskip("pandas", reason="pandas is the optional extra batchmmu[analysis]")
    rep = bm.run_scenario("demand_paging", sets=["vms=2", "bytes_per_vcpu=1MiB"])
    df = rep.to_dataframe()
    assert isinstance(df, pd.DataFrame) and list(df["group"]) == ["tdp", "tdp"] and df["pf_fixed"].sum() == 1024
    ph = rep.to_dataframe("phases")
    assert list(ph["name"]) == ["populate"] and ph["delta_pf_fixed"].iloc[0] == 1024


@pytest.mark.nojit
def test_to_dataframe_without_pandas_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(bm.BatchMMUError, match=r"pip install 'batchmmu\[analysis\]'"):
        report.to_dataframe({"scenario": "x", "per_vm": {}, "phases": []})


# ----------------------------------------------------------------------------- 7: memslot_perf
def test_memslot_perf_defaults_run_the_map_test(monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, enabled=True):
            self.name = None

        def start(self, name, total, unit="accesses"):
            self.name = name
            seen[name] = [total, unit, 0]

        def __call__(self, n):
            seen[self.name][2] += n

        def close(self):
            pass

    monkeypatch.setattr(scenario, "PhaseProgress", Recorder)
    data = prepare("memslot_perf", ["loops=1"]).data
    data = dict(data, phase=[p for p in data["phase"] if p["test"] in ("map", "move_active")])
    rep = bm.run_scenario(data)
    for p in rep.phases:
        assert "max_slots" not in p and "skipped" not in p and p["loops"] == 1 and p["events"] > 0, p["name"]
        assert seen[p["name"]] == [4096, "slots + loops", 4096]   # 4095 slots + 1 loop: progress by work done


def test_memslot_perf_skip_is_an_error(tmp_path, capsys):
    f = tmp_path / "m.toml"
    data = (ROOT / "scenarios" / "memslot_perf.toml").read_text()
    f.write_text(data.split("[[phase]]\nname = \"unmap\"")[0])             # the map test only
    assert main(["run", str(f), "--set", "slots=8210", "--set", "loops=1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "phase 'map' did not run: memslot count too high" in err and "--set slots=8209" in err


# ----------------------------------------------------------------------------- show, list, dry run
def test_show_list_dry_run_validate_list(capsys):
    assert main(["show", "dirty_log_perf"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  vcpus +2 +-v \[1\]", out)                           # doc from the TOML comment
    assert "memory estimate:" in out and "Iteration 1 dirty memory" in out and "accesses" in out
    assert main(["run", "demand_paging", "--dry-run", "--set", "vms=3"]) == 0
    out = capsys.readouterr().out
    assert "vms                3 (default 16)" in out and "nothing was run" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "demand_paging" in out and "bytes_per_vcpu=\"16MiB\"" in out
    assert main(["validate", "--list"]) == 0
    assert "pte_rewrite" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 8: plots
def test_report_plots_every_result(tmp_path):
    pytest.importorskip("matplotlib")
    a = _run_json(tmp_path, "demand_paging", *SMALL, name="a.json")
    b = _run_json(tmp_path, "demand_paging", *SMALL, "--set", "backing=thp", name="b.json")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    saved = []
    real = plt.Figure.savefig

    def keep(fig, *args, **kw):
        saved.append(fig)
        return real(fig, *args, **kw)

    plt.Figure.savefig = keep
    try:
        report.plot([a, b], tmp_path / "p.png", names=["4k", "thp"])
    finally:
        plt.Figure.savefig = real
    (fig,) = saved
    axes = fig.get_axes()
    titles = [ax.get_title() for ax in axes]
    assert "4k: changes during each phase" in titles and "thp: changes during each phase" in titles
    assert "results side by side" in titles
    assert all(ax.get_ylabel() for ax in axes if ax.get_visible() and ax.axison)
    hist = [ax for ax in axes if ax.get_title() == "page-table footprint per VM"][0]
    assert "TDP tables or shadow pages" in hist.get_xlabel()
    assert (tmp_path / "p.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- 9: README and docs
@pytest.mark.nojit
def test_readme_and_docs_are_self_contained():
    readme = (ROOT / "README.md").read_text()
    head = readme.split("\n## ")[0]
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && batchmmu run demand_paging" in head
    assert "pip install -e \".[test,cluster]\" && pytest -q && NUMBA_DISABLE_JIT=1 pytest -q -m nojit" in head
    assert "is for" in head and "not for" in head
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for f in docs:
        text = f.read_text()
        assert "../shared" not in text and "reference/" not in text.replace("tests/reference/", ""), f
        for link in re.findall(r"\]\(([^)#]+)", text):
            if not link.startswith("http"):
                assert (f.parent / link).exists(), (f, link)
    glossary = readme[readme.index("## Glossary"):]
    for term in ("gauge", "counter", "events", "simulator_bytes", "cumulative", "delta"):
        assert f"**{term}**" in glossary, term


def test_real_ctrl_c_with_process_workers(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does): the workers leave it to the
    parent, which stops with one line, status 130 and the finished phases in <json>.partial."""
    import os
    import signal
    out = tmp_path / "r.json"
    argv = ["run", "dirty_log_perf", "--set", "bytes_per_vcpu=64MiB", "--set", "iterations=2000", "--workers", "2",
            "--backend", "process", "--json", str(out)]
    # A terminal's shell starts the CLI with SIGINT at its default; the test process may not have it so: a thread
    # inside system(3) (somewhere in the full suite) ignores SIGINT and SIGQUIT process-wide while it runs, and a
    # child forked meanwhile inherits that (seen here: SigIgn 0x1001006).
    p = subprocess.Popen([sys.executable, "-m", "batchmmu.cli", *argv], stderr=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL),
                                             signal.signal(signal.SIGQUIT, signal.SIG_DFL)))
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if "Iteration 1 dirty memory time" in line:
                break
        with open(f"/proc/{p.pid}/status") as f:   # for the failure message: is SIGINT caught (SigCgt bit 1)?
            sig = " ".join(ln for ln in f.read().splitlines() if ln.startswith(("SigIgn", "SigBlk", "SigCgt")))
        sent = 0
        while True:   # Ctrl-C, pressed again every 5 s while the run goes on (counted in the failure message)
            os.killpg(p.pid, signal.SIGINT)
            sent += 1
            try:
                _, rest = p.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                if sent == 6:
                    raise
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err = "".join(lines) + rest
    assert p.returncode == 130, f"{sig}, SIGINT sent {sent} times\n" + "\n".join(err.splitlines()[-5:])
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"batchmmu: interrupted after \d+ of \d+ phases; the finished phases are in .*r\.json\.partial$",
                    last), last
    d = json.loads((tmp_path / "r.json.partial").read_text())
    assert [q["name"] for q in d["phases"]][:2] == ["Populate memory", "Enabling dirty logging"]
    assert not out.exists()


@pytest.mark.nojit
def test_spec_backings_are_the_kernels():
    from batchmmu.kernels.state import BACKING_NAMES

    from batchmmu import spec
    assert spec._BACKINGS == BACKING_NAMES
