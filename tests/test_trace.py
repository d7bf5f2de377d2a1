"""Trace replay: every format read in chunks, the injective placement, and the replay's statistics."""

import gzip
import re
import shutil
import subprocess

import numpy as np
import pytest

import batchmmu as bm
from batchmmu import trace

LACKEY = """==123== Lackey, an example Valgrind tool
==123== Command: ./a.out
I  0401ab70,3
 S 1fff000778,8
 L 04029c78,8
 M 0402a000,4
I  0401b770,1
 L 1fff000770,8
==123== exit
"""

DRCACHESIM = """Output format:
<--record#-> <--instr#->: <---tid---> <record details>
------------------------------------------------------------
           1           0:     2765542 <marker: version 6>
       47444       37769:     2765543 ifetch       6 byte(s) @ 0x0000000000404a78 0f 84 5b 01 00 00    jz
       47446       37770:     2765543 read         8 byte(s) @ 0x00007fdf64e2adc8 by PC 0x0000000000404a7e
       47447       37771:     2765542 write        8 byte(s) @ 0x00007fdf64e2b000 by PC 0x0000000000404a7e
       47448       37771:     2765542 <marker: timestamp 13>
"""


def _naive_lackey(text):
    """A line-by-line reference parser: (vcpu, addr, kind) lists."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(I | [LSM]) +([0-9a-fA-F]+),\d+", line)
        if m:
            k = {"I ": bm.ACC_FETCH, " L": 0, " S": bm.ACC_WRITE, " M": bm.ACC_WRITE}[m.group(1)[:2]]
            out.append((0, int(m.group(2), 16), k))
    return out


def _all(path, fmt, chunk=trace.CHUNK):
    parts = list(trace.records(path, fmt, chunk))
    return [tuple(int(x) for x in rec) for v, a, k in parts for rec in zip(v, a, k, strict=True)]


@pytest.mark.nojit
def test_text_formats_parse_like_a_line_by_line_reader(tmp_path, monkeypatch):
    p = tmp_path / "t.lackey"
    p.write_text(LACKEY * 50)
    monkeypatch.setattr(trace, "TEXT_BLOCK", 97)      # blocks end mid-line: lines are carried over
    assert _all(p, "lackey") == _naive_lackey(LACKEY * 50)
    assert trace.guess_format(p) == "lackey"
    gz = tmp_path / "t.txt.gz"
    gz.write_bytes(gzip.compress(LACKEY.encode()))
    assert trace.guess_format(gz) == "lackey" and _all(gz, "lackey") == _naive_lackey(LACKEY)
    d = tmp_path / "d.txt"
    d.write_text(DRCACHESIM)
    assert trace.guess_format(d) == "drcachesim"
    assert _all(d, "drcachesim") == [(2765543, 0x404A78, bm.ACC_FETCH), (2765543, 0x7FDF64E2ADC8, 0),
                                     (2765542, 0x7FDF64E2B000, bm.ACC_WRITE)]
    info = trace.scan(d, "drcachesim")
    assert info["threads"] == 2 and list(info["trank"][np.searchsorted(info["tids"], [2765543, 2765542])]) == [0, 1]
    c = tmp_path / "c.csv"
    c.write_text("kind,addr,vcpu\nw,0x1000,1\nr,4096,0\nfetch,0x2fff,3\n2,0x10000,2\n")
    assert _all(c, "csv", chunk=3) == [(1, 0x1000, 2), (0, 4096, 0), (3, 0x2FFF, 16), (2, 0x10000, 2)]
    c2 = tmp_path / "c2.csv"
    c2.write_text("0x1000,w\n0x2000,r\n")
    assert _all(c2, "csv") == [(0, 0x1000, 2), (0, 0x2000, 0)]


@pytest.mark.nojit
def test_binary_formats_and_chunks(tmp_path):
    rng = np.random.default_rng(1)
    addr = rng.integers(0, 1 << 40, 1000).astype(np.uint64)
    kind = rng.choice([0, 2, 16], 1000)
    vcpu = rng.integers(0, 4, 1000)
    want = list(zip(vcpu.tolist(), addr.tolist(), kind.tolist(), strict=True))
    np.savez(tmp_path / "a.npz", addr=addr, kind=kind, vcpu=vcpu)
    rec = np.zeros(1000, [("vcpu", "i4"), ("addr", "u8"), ("kind", "u1")])
    rec["vcpu"], rec["addr"], rec["kind"] = vcpu, addr, kind
    np.save(tmp_path / "s.npy", rec)
    np.save(tmp_path / "m.npy", np.stack([vcpu, addr.astype(np.int64), kind], axis=1))
    for name in ("a.npz", "s.npy", "m.npy"):
        p = tmp_path / name
        fmt = trace.guess_format(p)
        assert _all(p, fmt, chunk=77) == want, name
        assert [c[1].size for c in trace.records(p, fmt, 300)] == [300, 300, 300, 100]


@pytest.mark.nojit
def test_scan_and_placement_are_injective_in_order_of_first_use(tmp_path):
    pages = np.array([900, 5, 900, 7, 5, 1 << 30, 7, 6], np.int64)
    np.save(tmp_path / "p.npy", (pages << 12) + 8)
    info = trace.scan(tmp_path / "p.npy", "npy")
    assert info["pages"] == 5 and info["records"] == 8
    t = {"layout": "compact", "scale": 1, "offset": 0, "base_page": 0}
    placed = trace.place(t, info, ((pages << 12) + 8).astype(np.uint64))
    assert list(placed >> 12) == [0, 1, 0, 2, 1, 3, 2, 4] and set(placed & 0xFFF) == {8}
    t = dict(t, layout="keep", scale=3, offset=8192)
    keep = trace.place(t, info, np.array([5 << 12, 7 << 12], np.uint64))
    assert list(keep) == [2 * 4096 + 5 * 3 * 4096, 2 * 4096 + 7 * 3 * 4096]


@pytest.mark.nojit
def test_bad_traces_name_the_problem(tmp_path):
    bad = tmp_path / "k.csv"
    bad.write_text("addr,kind\n0x1000,q\n")
    with pytest.raises(bm.BatchMMUError, match="kind 'q'"):
        _all(bad, "csv")
    bad.write_text("addr\n0x10zz\n")
    with pytest.raises(bm.BatchMMUError, match="'10zz' is not a number"):
        _all(bad, "csv")
    np.save(tmp_path / "k.npy", np.array([[0, 4096, 64]]))
    with pytest.raises(bm.BatchMMUError, match="record 0: kind 64"):
        _all(tmp_path / "k.npy", "npy")
    for value, msg in ((str(tmp_path / "missing.npz"), "no such file"), (str(tmp_path), "is a directory")):
        with pytest.raises(bm.BatchMMUError, match=msg):
            bm.run_scenario("trace_replay", sets=[f"trace={value}"])
    (tmp_path / "x.bin").write_bytes(b"\x00\x01 nothing")
    with pytest.raises(bm.BatchMMUError, match="format"):
        bm.run_scenario("trace_replay", sets=[f"trace={tmp_path / 'x.bin'}"])
    np.save(tmp_path / "big.npy", np.arange(0, 1 << 24, 4096, dtype=np.int64))
    with pytest.raises(bm.BatchMMUError, match="memory=.*needs 16777216 bytes"):
        bm.run_scenario("trace_replay", sets=[f"trace={tmp_path / 'big.npy'}", "memory=8MiB"])


# ----------------------------------------------------------------------------- replay (kernels)
def test_replay_places_distinct_pages_any_chunking_and_workers(tmp_path):
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 1 << 28, 600)              # spread over 1 TiB: compacted
    addr = np.concatenate([pages, pages[::-1], pages[:50]]) << 12
    kind = rng.choice([0, 2, 16], addr.size)
    vcpu = rng.integers(0, 3, addr.size)
    np.savez(tmp_path / "t.npz", addr=addr, kind=kind, vcpu=vcpu)
    distinct = np.unique(pages).size
    base = ["vms=3", "vcpus=2", f"trace={tmp_path / 't.npz'}"]
    a = bm.run_scenario("trace_replay", sets=base)
    assert a.totals["pages_4k"] == 3 * distinct and a.totals["accesses"] == 3 * addr.size
    assert a.per_vm["pages_4k"] == [distinct] * 3 and a.footprint["guest_memory"] == 3 * distinct * 4096
    b = bm.run_scenario("trace_replay", workers=2, sets=base + ["workload.trace_chunk=97", "repeat=2"])
    assert b.totals["pages_4k"] == a.totals["pages_4k"] and b.totals["accesses"] == 2 * a.totals["accesses"]
    assert b.totals["pf_fixed"] == a.totals["pf_fixed"]   # the second replay only hits
    c = bm.run_scenario("trace_replay", sets=base + ["workload.trace_chunk=97"])
    assert c.totals == a.totals and c.per_vm == a.per_vm


def test_replay_keeps_a_layout_that_fits_and_scales(tmp_path):
    # 2 MiB regions 0, 1 and 3 of a 8 MiB trace: kept in place, THP maps one 2 MiB page per region
    pages = np.array([0, 1, 511, 512, 1536, 1600], np.int64) + 1024 * 512
    np.save(tmp_path / "f.npy", pages << 12)
    keep = bm.run_scenario("trace_replay", sets=[f"trace={tmp_path / 'f.npy'}", "backing=thp"])
    assert keep.totals["pages_2m"] == 3 and keep.totals["pages_4k"] == 0
    compact = bm.run_scenario("trace_replay", sets=[f"trace={tmp_path / 'f.npy'}", "backing=thp", "layout=compact"])
    assert compact.totals["pages_2m"] == 1                 # six pages side by side
    spread = bm.run_scenario("trace_replay", sets=[f"trace={tmp_path / 'f.npy'}", "backing=thp", "layout=compact",
                                                    "scale=512"])
    assert spread.totals["pages_2m"] == 6                  # each page in its own 2 MiB
    four = bm.run_scenario("trace_replay", sets=[f"trace={tmp_path / 'f.npy'}", "vm_offset=4096", "vms=2"])
    assert four.per_vm["pages_4k"] == [6, 6]


def test_replay_the_bundled_trace_and_drcachesim_threads(tmp_path):
    rep = bm.run_scenario("trace_replay", sets=["vms=2"])
    info = trace.scan(trace._path("bundled:true.lackey.gz"), "lackey")
    assert rep.totals["pages_4k"] == 2 * info["pages"] and rep.totals["accesses"] == 2 * info["records"]
    d = tmp_path / "d.txt"
    d.write_text(DRCACHESIM)
    rep = bm.run_scenario("trace_replay", sets=[f"trace={d}", "vcpus=2"])
    assert rep.totals["pages_4k"] == 3 and rep.totals["accesses"] == 3


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
def test_replay_a_real_valgrind_trace(tmp_path):
    log = tmp_path / "ls.lackey"
    subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={log}", "/bin/ls", "/"],
                   check=True, capture_output=True, timeout=120)
    recs = _naive_lackey(log.read_text())
    distinct = len({a >> 12 for _, a, _ in recs})
    assert len(recs) > 10_000
    rep = bm.run_scenario("trace_replay", sets=[f"trace={log}", "vms=2", "format=lackey"])
    assert rep.totals["pages_4k"] == 2 * distinct
    assert rep.totals["accesses"] == 2 * len(recs)
    assert rep.totals["pf_fixed"] == 2 * distinct          # one first-touch fault per distinct page
