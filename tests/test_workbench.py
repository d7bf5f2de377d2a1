"""The researcher's workbench: sweeps -> tidy tables, plots, selftest command lines, ``run --all``."""

import csv
import importlib
import io
import math

import pytest

import batchmmu as bm
from batchmmu import plot as bplot
from batchmmu import selftest, suite
from batchmmu.cli import main

bsweep = importlib.import_module("batchmmu.sweep")   # the module (bm.sweep is the function)

MiB = 1 << 20


# ----------------------------------------------------------------------------- sweep planning (no kernels)
@pytest.mark.nojit
def test_grid_parsing_and_errors():
    assert bsweep.parse_grid(["vms=1,10,100", "backing=4k,thp"]) == {"vms": ["1", "10", "100"],
                                                                    "backing": ["4k", "thp"]}
    for bad in (["vms"], ["vms="], ["vms=1,,2"], ["vms=1", "vms=2"], ["1x=3"]):
        with pytest.raises(bm.BatchMMUError, match="grid"):
            bsweep.parse_grid(bad)


@pytest.mark.nojit
def test_sweep_checks_every_run_before_running(tmp_path):
    # a bad value in the last grid point is found before the first run (no kernel is loaded for it)
    with pytest.raises(bm.BatchMMUError, match="write_percent=101"):
        bsweep.plan("demand_paging", {"vms": [1, 2], "write_percent": [100, 101]})
    with pytest.raises(bm.BatchMMUError, match="nosuch"):
        bsweep.plan("demand_paging", {"nosuch": [1]})
    with pytest.raises(bm.BatchMMUError, match="repeat"):
        bsweep.plan("demand_paging", {"vms": [1]}, repeat=0)
    with pytest.raises(bm.BatchMMUError, match="no such directory"):
        bsweep.check_out(tmp_path / "missing" / "r.csv")
    with pytest.raises(bm.BatchMMUError, match=".csv or .parquet"):
        bsweep.check_out(tmp_path / "r.txt")
    _, runs = bsweep.plan("demand_paging", {"vms": [1, 2], "backing": ["4k", "thp"]}, repeat=2, seed=7)
    assert len(runs) == 8
    assert [r["seed"] for r in runs[:2]] == [7, 8] and [r["repeat"] for r in runs[:2]] == [0, 1]
    assert runs[-1]["params"] == {"vms": 2, "backing": "thp"}


# ----------------------------------------------------------------------------- sweep -> table -> plot
def test_sweep_tidy_table_csv_parquet_and_plot(tmp_path, capsys):
    out = tmp_path / "res.csv"
    assert main(["sweep", "demand_paging", "--grid", "vms=1,3", "--grid", "backing=4k,thp", "--set",
                 "bytes_per_vcpu=4MiB", "--repeat", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("sweep [") == 8 and "sweep [8/8] vms=3 backing=thp repeat 1" in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for r in rows:
        vms, pages = int(r["vms"]), int(r["vms"]) * 2 * 1024      # 2 vCPUs x 4 MiB each
        if r["backing"] == "4k":
            assert int(r["pages_4k"]) == pages and int(r["pages_2m"]) == 0
        else:
            assert int(r["pages_2m"]) == pages // 512 and int(r["pages_4k"]) == 0
        assert int(r["n_vms"]) == vms and int(r["seed"]) == int(r["repeat"])
        # per-phase columns carry what the phase added; one phase here, so they equal the totals
        assert int(r["phase.populate.pf_fixed"]) == int(r["pf_fixed"]) > 0
        assert int(r["guest_memory_bytes"]) == pages * 4096
        assert float(r["wall_seconds"]) > 0
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    t = pq.read_table(out.with_suffix(".parquet"))
    assert t.num_rows == 8 and t.column("pf_fixed").to_pylist() == [int(r["pf_fixed"]) for r in rows]
    png = tmp_path / "pt.png"
    assert main(["plot", str(out), "--x", "vms", "--y", "tdp_page_tables_bytes", "--hue", "backing", "--out",
                 str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_bm_sweep_dataframe_with_phase_deltas():
    df = bm.sweep("dirty_log_perf", grid={"write_percent": [0, 100]},
                  sets=["bytes_per_vcpu=2MiB", "vcpus=1", "iterations=2"])
    rows = df.to_dict("records") if hasattr(df, "to_dict") else df
    by = {r["write_percent"]: r for r in rows}
    # a read-only dirty pass dirties nothing; a write pass dirties every page of the vCPU's 2 MiB
    assert by[0]["phase.iteration_2_get_dirty_log.dirty_pages"] == 0
    assert by[100]["phase.iteration_2_get_dirty_log.dirty_pages"] == 512
    # deltas add up to the totals (for counters)
    for r in rows:
        phase_cols = [k for k in r if k.startswith("phase.") and k.endswith(".pf_fixed")]
        assert sum(r[k] for k in phase_cols) == r["pf_fixed"]


def test_bm_sweep_without_pandas_gives_dicts(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pandas", None)        # import pandas raises ImportError
    rows = bm.sweep("demand_paging", grid={"vms": [1, 2]}, sets=["bytes_per_vcpu=1MiB"])
    assert isinstance(rows, list) and [r["vms"] for r in rows] == [1, 2]
    assert [r["pf_fixed"] for r in rows] == [512, 1024] and list(rows[0]) == list(rows[1])


# ----------------------------------------------------------------------------- plots (no kernels)
def _table(tmp_path, rows):
    p = tmp_path / "t.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return p


@pytest.mark.nojit
def test_plot_axes_units_log_x_and_error_bars(tmp_path):
    rows = []
    for vms in (1, 10, 100, 1000):
        for backing in ("4k", "thp"):
            for rep in (0, 1):
                rows.append({"run": len(rows), "scenario": "demand_paging", "vms": vms, "backing": backing,
                             "repeat": rep, "tdp_page_tables_bytes": vms * (5 if backing == "4k" else 1) * MiB
                             + rep * 4096, "wall_seconds": 0.1 * vms})
    p = _table(tmp_path, rows)
    fig = bplot.draw(p, "vms", "tdp_page_tables_bytes", hue="backing")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"                       # 1..1000 spans three decades
    assert ax.get_yscale() == "log"                       # and so do the values: log-log
    assert ax.get_xlabel() == "vms (VMs)" and ax.get_ylabel() == "tdp_page_tables_bytes (GiB)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["backing = 4k", "backing = thp"]
    assert len(ax.containers) == 2 and all(c.has_yerr for c in ax.containers)   # sd over 2 repeats
    line = ax.containers[0].lines[0]
    assert list(line.get_xdata()) == [1, 10, 100, 1000]
    assert math.isclose(line.get_ydata()[-1], (1000 * 5 * MiB + 2048) / (1 << 30))
    assert "over 2 repeats" in ax.get_title()
    # a small span stays linear; sizes as x values are read as bytes
    rows2 = [{"scenario": "s", "bytes_per_vcpu": b, "repeat": 0, "wall_seconds": i + 1}
             for i, b in enumerate(("1MiB", "2MiB", "4MiB"))]
    ax = bplot.draw(_table(tmp_path, rows2), "bytes_per_vcpu", "wall_seconds").axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlabel() == "bytes_per_vcpu (MiB)"
    assert ax.get_ylabel() == "wall_seconds (s)"
    assert list(ax.containers[0].lines[0].get_xdata()) == [1, 2, 4]


@pytest.mark.nojit
def test_plot_refuses_what_would_mislead(tmp_path):
    rows = [{"scenario": "s", "vms": v, "backing": b, "repeat": 0, "pf_fixed": v} for v in (1, 2)
            for b in ("4k", "thp")]
    p = _table(tmp_path, rows)
    with pytest.raises(bm.BatchMMUError, match="backing also varies"):
        bplot.plot(p, "vms", "pf_fixed", out=tmp_path / "a.png")
    assert bplot.plot(p, "vms", "pf_fixed", where=["backing=thp"], out=tmp_path / "a.png").exists()
    with pytest.raises(bm.BatchMMUError, match="did you mean"):
        bplot.plot(p, "vms", "pf_fixd_x", hue="backing", out=tmp_path / "b.png")
    with pytest.raises(bm.BatchMMUError, match=".png, .pdf or .svg"):
        bplot.plot(p, "vms", "pf_fixed", hue="backing", out=tmp_path / "b.jpeg")
    with pytest.raises(bm.BatchMMUError, match="not a numeric"):
        bplot.plot(p, "vms", "backing", out=tmp_path / "c.png", where=["backing=4k"])
    assert main(["plot", str(tmp_path / "nope.csv"), "--x", "vms", "--y", "pf_fixed"]) == 2


# ----------------------------------------------------------------------------- selftest command lines
@pytest.mark.nojit
def test_selftest_flags_map_onto_scenario_parameters():
    runs, notes = selftest.translate("dirty_log_perf_test", "-v 4 -b 1G -s anonymous_thp -i 5".split())
    (r,) = runs
    assert r.scenario == "dirty_log_perf"
    sets = dict(s.split("=", 1) for s in r.sets)
    assert sets["vcpus"] == "4" and sets["bytes_per_vcpu"] == str(1 << 30) and sets["backing"] == "thp"
    assert sets["iterations"] == "5" and sets["seed"] == "1" and sets["manual_protect"] == "true"
    sets = dict(s.split("=", 1) for s in selftest.translate("dirty_log_perf_test", ["-g", "-a", "-w", "30",
                                                                                    "-s", "anonymous_hugetlb_1gb"])
                [0][0].sets)
    assert (sets["manual_protect"], sets["random_access"], sets["write_percent"], sets["backing"]) == \
        ("false", "true", "30", "hugetlb-1g")
    runs, _ = selftest.translate("demand_paging_test", ["-v", "2", "-s", "anonymous_hugetlb"])
    assert dict(s.split("=", 1) for s in runs[0].sets)["backing"] == "hugetlb-2m"
    runs, _ = selftest.translate("dirty_log_test", ["-i", "3"])
    assert [r.label for r in runs] == ["dirty-log", "clear-log", "dirty-ring"]
    ring = dict(s.split("=", 1) for s in runs[2].sets)
    assert ring["dirty_ring"] == "65536" and ring["iterations"] == "3" and ring["pages"] == str((1 << 18) + 3)
    runs, _ = selftest.translate("dirty_log_test", ["-M", "dirty-ring", "-c", "1000"])
    assert len(runs) == 1 and dict(s.split("=", 1) for s in runs[0].sets)["dirty_ring"] == "512"
    runs, _ = selftest.translate("memslot_perf_test", ["-f", "1", "-e", "2", "-s", "100"])
    assert runs[0].phases == ("unmap", "unmap chunked") and "slots=100" in runs[0].sets
    runs, notes = selftest.translate("access_tracking_perf_test", ["-o", "-c", "0-3"])
    assert "workload.overlap=true" in runs[0].sets and any("-c 0-3 ignored" in n for n in notes)


@pytest.mark.nojit
def test_selftest_unknown_and_unmodelled_flags_are_errors(capsys):
    with pytest.raises(bm.BatchMMUError, match="-z"):
        selftest.translate("dirty_log_perf_test", ["-z"])
    with pytest.raises(bm.BatchMMUError, match="-n.*nested"):
        selftest.translate("dirty_log_perf_test", ["-n"])
    with pytest.raises(bm.BatchMMUError, match="2 MiB and 1 GiB"):
        selftest.translate("dirty_log_perf_test", ["-s", "anonymous_hugetlb_16kb"])
    with pytest.raises(bm.BatchMMUError, match="at least 2"):
        selftest.translate("dirty_log_perf_test", ["-i", "1"])
    with pytest.raises(bm.BatchMMUError, match="not mapped"):
        selftest.translate("no_such_test", [])
    assert main(["selftest", "dirty_log_perf_test", "-q"]) == 2
    assert "-q" in capsys.readouterr().err
    assert main(["selftest", "--dry-run", "dirty_log_perf_test", "-v", "4", "-b", "1G", "-s", "anonymous_thp",
                 "-i", "5"]) == 0
    err = capsys.readouterr().err
    assert "batchmmu run dirty_log_perf --set vms=1 --set vcpus=4 --set bytes_per_vcpu=1073741824" in err
    assert main(["selftest", "dirty_log_perf_test", "-h"]) == 0
    assert "-v  -> vcpus" in capsys.readouterr().out


def test_selftest_runs_the_scenario(capsys):
    assert main(["selftest", "--quiet", "demand_paging_test", "-v", "2", "-b", "4M", "-s",
                 "anonymous_hugetlb_2mb"]) == 0
    runs, _ = selftest.translate("demand_paging_test", ["-v", "2", "-b", "4M", "-s", "anonymous_hugetlb_2mb"])
    rep = selftest.execute(runs[0], quiet=True)
    assert rep.totals["pages_2m"] == 2 * 2 and rep.totals["pf_fixed"] == 4 and rep.params["vcpus"] == 2


# ----------------------------------------------------------------------------- run --all
def test_run_all_small_is_a_tap_suite():
    out = io.StringIO()
    names = ["nx_huge_pages", "dirty_log", "demand_paging", "trace_replay"]
    failed = suite.run_all(small=True, names=names, out=out)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["TAP version 13", "1..4"]
    assert [ln.split(" # ")[0] for ln in lines[2:6]] == [
        "ok 1 - nx_huge_pages", "ok 2 - dirty_log (pages=4099 iterations=2 writes=512)",
        "ok 3 - demand_paging (vms=2 bytes_per_vcpu=4MiB)", "ok 4 - trace_replay"]
    assert failed == 0


def test_run_all_reports_a_failing_check(monkeypatch):
    monkeypatch.setitem(suite.CHECKS, "nx_huge_pages", lambda rep: "pages_2m wrong")
    out = io.StringIO()
    assert suite.run_all(small=True, names=["nx_huge_pages"], out=out) == 1
    assert "not ok 1 - nx_huge_pages" in out.getvalue() and "  # pages_2m wrong" in out.getvalue()
    assert main(["run", "--all", "--set", "vms=2"]) == 2
    assert main(["run"]) == 2
