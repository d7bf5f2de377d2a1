"""Compile and warm-up: ``bm.warmup()`` compiles every kernel with the one signature real runs use, a
run afterwards compiles nothing, the cache lives in the user's cache directory (a read-only install
works), and the scenario runner warms before its first timed phase."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import batchmmu as bm
from batchmmu import warm
from batchmmu.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Counts every numba dispatcher of batchmmu.kernels: entry points (@kernel), helpers (@helper: loaded
# inside their callers from a warm cache, so they may show none) and inline functions alike; then a
# guest_os run must add no signature to any of them.
_SIGS = r"""
import json
import batchmmu as bm
from batchmmu.warm import kernel_signatures as sigs

bm.warmup()
before = sigs()
bm.run_scenario("guest_os", sets=["memory=32MiB", "processes=2", "max_processes=4", "slices=4", "forks=2",
                                  "switch_every=64"])
print(json.dumps({"before": before, "after": sigs()}))
"""


def test_warmup_compiles_every_kernel_once_and_a_guest_os_run_compiles_nothing():
    r = subprocess.run([sys.executable, "-c", _SIGS], capture_output=True, text=True, cwd=ROOT, timeout=3600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    before, after = got["before"], got["after"]
    # what Python calls is loaded on its own (a kernel only other kernels call lives inside its callers)
    python_entries = ("fault.access_batch", "tdp2d.tdp2d_batch", "batch.shadow_event_batch", "events.validate_events",
                      "dirty.get_dirty_log_protect", "slot_rmap.shadow_get_dirty_log", "notifier.tdp_age_range",
                      "reclaim.reclaim_scan", "mmu.recover_nx_huge_pages")
    assert {n: before[n][0] for n in python_entries} == dict.fromkeys(python_entries, 1)
    assert {n: k for n, (k, *_) in before.items() if k > 1} == {}       # one signature per kernel
    assert {n: (before[n][0], k) for n, (k, *_) in after.items() if k != before[n][0]} == {}
    # arrays a compiled call passes (tuples flattened): the widest, the event loops with the 30-array MMU bundle,
    # an event record and a result record, stay within the 32 of docs/architecture.md (before: 49, 113)
    widest = max(w for *_, w in after.values())
    assert 0 < widest <= 32, {n: w for n, (*_, w) in after.items() if w > 32}


def test_warmup_progress_and_cli(capsys):
    seen = []
    bm.warmup(lambda done, total, name, s: seen.append((done, total, name, s)))
    assert [d for d, *_ in seen] == list(range(1, len(warm.GROUPS) + 1))
    assert {t for _, t, *_ in seen} == {len(warm.GROUPS)} and all(s >= 0 for *_, s in seen)
    assert main(["warmup"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("loading kernels (cache ")
    assert [line.split("]")[0] for line in out[1:-1]] == [f"[{i}/{len(warm.GROUPS)}" for i in
                                                          range(1, len(warm.GROUPS) + 1)]
    assert out[-1].startswith("kernels ready in ")
    # with the time model's kernels: two more groups, after the others
    seen.clear()
    bm.warmup(lambda done, total, name, s: seen.append((done, total, name)), time_model=True)
    n = len(warm.GROUPS) + len(warm.TIME_GROUPS)
    assert [(d, t) for d, t, _ in seen] == [(i, n) for i in range(1, n + 1)]
    assert [name for *_, name in seen[-2:]] == [g[0] for g in warm.TIME_GROUPS]
    assert main(["warmup", "--time"]) == 0
    assert capsys.readouterr().out.splitlines()[-2].startswith(f"[{n}/{n}] time model")


@pytest.mark.nojit
def test_runner_warms_before_the_first_phase_and_before_workers_start(monkeypatch, capsys):
    import batchmmu.backends as be
    order = []
    monkeypatch.setattr(warm, "READY", False)
    monkeypatch.setattr(warm, "warmup", lambda progress=None: order.append("warmup") or 0.0)

    class Stop(Exception):
        pass

    def backend(*a, **k):
        order.append("backend")
        raise Stop
    monkeypatch.setitem(be.BACKENDS, "process", backend)
    with pytest.raises(Stop):
        bm.run_scenario("demand_paging", workers=2, backend="process", sets=["vms=2", "bytes_per_vcpu=1MiB"],
                        quiet=False)
    assert order == ["warmup", "backend"]
    assert "kernels ready in " in capsys.readouterr().err


def _copy_package(dst):
    """The package as an install lays it out: batchmmu/, batchmmu/kernels/, batchmmu/scenarios/ ..."""
    pkg = dst / "batchmmu"
    shutil.copytree(ROOT / "batchmmu", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "scenarios", pkg / "scenarios", ignore=shutil.ignore_patterns("__pycache__"))
    return pkg


def test_read_only_install_caches_in_the_users_cache_dir(tmp_path):
    site, home = tmp_path / "site", tmp_path / "home"
    home.mkdir()
    pkg = _copy_package(site)
    for p in [site, *site.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    code = ("import batchmmu as bm; from batchmmu.kernels import CACHE_DIR; h = bm.Host(memory='64MiB', backing='4k'); "
            "vm = int(h.create_vms(1, memory='4MiB')[0]); h.touch_host_memory(vm, 0, 1 << 20); "
            "print(bm.__file__, CACHE_DIR, h.host_memory()[0])")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=600)
    finally:
        for p in [site, *site.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert r.returncode == 0, r.stderr
    where, cache, used = r.stdout.split()
    assert Path(where).parent == pkg and int(used) == 1 << 20
    assert Path(cache).parent == home / ".cache" / "batchmmu" and Path(cache).name.startswith("numba-")
    assert any(Path(cache).rglob("*.nbi"))               # numba wrote its index there
    assert not list(pkg.rglob("*.nbi"))


class _Proc:
    """A stand-in for a group's process: the group runs when it is first polled."""

    def __init__(self, i, log, status):
        self.i, self.log, self.status, self.returncode = i, log, status, None

    def poll(self):
        if self.returncode is None:
            self.log.append(("ran", self.i))
            self.returncode = self.status(self.i)
        return self.returncode

    def kill(self):
        self.log.append(("killed", self.i))

    def wait(self):
        return self.returncode


def _fake_groups(monkeypatch, status=lambda i: 0):
    import io
    log = []
    deps = ((), (), (), (1, 2), (0,), (2,))
    monkeypatch.setattr(warm, "GROUPS", tuple((f"g{i}", lambda i=i: log.append(("here", i)), deps[i])
                                              for i in range(6)))
    monkeypatch.setattr(warm, "cache_is_cold", lambda: True)
    monkeypatch.setattr(warm, "_spawn", lambda i: (log.append(("spawn", i)) or _Proc(i, log, status),
                                                   io.BytesIO(b"Traceback ...\nMemoryError\n")))
    return log


@pytest.mark.nojit
def test_cold_warmup_compiles_groups_in_processes_then_loads_them(monkeypatch):
    """With an empty cache each group runs in its own process, at most ``jobs`` at a time, each once the groups
    it reuses have run, each reported once; then every group runs here to load what they compiled."""
    import numba
    monkeypatch.setattr(numba.config, "DISABLE_JIT", False)
    log = _fake_groups(monkeypatch)
    seen = []
    warm.warmup(lambda done, total, name, s: seen.append((done, total, name)), jobs=2)
    assert sorted(i for what, i in log if what == "spawn") == list(range(6))
    for i, (_, _, after) in enumerate(warm.GROUPS):
        assert all(log.index(("ran", d)) < log.index(("spawn", i)) for d in after)    # after what it reuses
    running = 0
    for what, _ in log:                                                                # two at a time
        running += {"spawn": 1, "ran": -1}.get(what, 0)
        assert running <= 2
    assert log.index(("spawn", 2)) > log.index(("ran", 0))
    assert [x for x in log if x[0] == "here"] == [("here", i) for i in range(6)]        # then loaded here
    assert [d for d, *_ in seen] == list(range(1, 7)) and {n for *_, n in seen} == {f"g{i}" for i in range(6)}
    log.clear()
    warm.warmup(jobs=1)   # one process: no worker
    assert log == [("here", i) for i in range(6)]


@pytest.mark.nojit
def test_a_failed_warmup_process_stops_the_others_and_says_which(monkeypatch):
    import numba
    monkeypatch.setattr(numba.config, "DISABLE_JIT", False)
    log = _fake_groups(monkeypatch, status=lambda i: 137 if i == 1 else 0)
    with pytest.raises(RuntimeError, match=r"(?s)'g1' failed .*exit status 137.*MemoryError"):
        warm.warmup(jobs=3)
    assert ("killed", 2) in log or ("ran", 2) in log
    assert not [x for x in log if x[0] == "here"]


def test_a_warmup_group_runs_as_its_own_program():
    """``python -m batchmmu.warm I``, what the parallel warm-up starts (the last group; and a time-model group,
    whose wrappers must then be in the cache)."""
    from batchmmu.timemodel import timed_kernels_cold
    for i in (len(warm.GROUPS) - 1, len(warm.GROUPS) + 1):
        r = subprocess.run([sys.executable, "-m", "batchmmu.warm", str(i)], capture_output=True, text=True, cwd=ROOT,
                           timeout=600)
        assert r.returncode == 0, r.stderr
    assert not timed_kernels_cold()


_INLINE_TREE = r"""
import numpy as np
from numba import njit
from numba.core import inline_closurecall, targetconfig
from batchmmu.kernels import jit

assert isinstance(inline_closurecall.copy, jit._OneMemoPerIRCopy)
assert targetconfig.TargetConfig.values is jit._config_values
from numba.core import analysis, ir_utils, ssa
assert analysis.compute_live_map is ir_utils.compute_live_map is jit._live_map and ssa._run_ssa is jit._run_ssa

@njit(inline="always")
def leaf(a, i):
    t = 0
    for k in range(i):
        if a[k] & 1:
            t += a[k]
        else:
            t -= 1
    return t

@njit(inline="always")
def mid(a, i):
    x = leaf(a, i)
    y = leaf(a, i + 1)
    return x * 3 + y if x > y else y - x

@njit
def top(a):
    s = 0
    for i in range(a.size - 2):
        s += mid(a, i) - mid(a, i + 1)
    return s

a = np.arange(1, 40, dtype=np.int64) * 7 % 11
print(top(a), top.py_func(a))
"""


def test_the_inliner_patches_are_in_place_and_inline_trees_still_compute_the_same():
    """kernels/jit.py makes numba's IR inliner copy a callee once per call site (not once per block) and compares
    compile flags without a property call per option; a nested inline tree inlined at several sites must still
    compute what Python computes (in a fresh interpreter, so numba compiles it here)."""
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules.pop('batchmmu', None)\n" + _INLINE_TREE],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    got, want = r.stdout.split()
    assert got == want


@pytest.mark.nojit
def test_one_ir_copy_shares_one_scope_and_a_second_copy_gets_its_own():
    from batchmmu.kernels import jit
    from numba.core import ir
    loc = ir.Loc("f", 1)
    scope = ir.Scope(None, loc)
    v = scope.define("v", loc)
    blocks = [ir.Block(scope, loc) for _ in range(3)]
    for b in blocks:
        b.append(ir.Assign(ir.Const(1, loc), v, loc))
    c = jit._OneMemoPerIRCopy()
    first = [c.deepcopy(b) for b in blocks]
    assert len({id(b.scope) for b in first}) == 1 and first[0].scope is not scope
    assert first[0].body[0].target is first[2].body[0].target                   # one variable, as in the original
    second = [c.deepcopy(b) for b in blocks]                                     # the same blocks again: a new copy
    assert second[0].scope is not first[0].scope
    assert c.deepcopy([1, [2]]) == [1, [2]]


def test_a_second_copy_of_a_fresh_copy_is_not_made():
    """inline_ir copies the callee, then copies that copy only to return it (both callers drop it): the
    second copy hands the fresh blocks back instead of copying them again."""
    from batchmmu.kernels import jit
    from numba.core import ir
    loc = ir.Loc("f", 1)
    scope = ir.Scope(None, loc)
    blocks = [ir.Block(scope, loc) for _ in range(2)]
    c = jit._OneMemoPerIRCopy()
    first = [c.deepcopy(b) for b in blocks]
    second = [c.deepcopy(b) for b in first]
    assert all(x is y for x, y in zip(second, first, strict=True))
    again = c.deepcopy(blocks[0])   # the original again: a real copy
    assert again is not blocks[0] and again.scope is not scope


def _frontend_blocks(func):
    from numba.core.compiler import run_frontend
    return run_frontend(func).blocks


def _ir_text(blocks):
    import re
    return [(label, [re.sub(r" at 0x[0-9a-f]+", "", str(s)) for s in b.body]) for label, b in blocks.items()]


@pytest.mark.parametrize("name", ["batch.shadow_event_batch", "fault.access_batch", "tdp2d.tdp2d_batch",
                                  "paging_tmpl.sync_spte", "guest_walk.guest_walk"])
def test_the_live_map_and_ssa_rewrites_give_numbas_results(name):
    """kernels/jit.py replaces numba's live-variable fix point (sets of names -> bits of an int) and its SSA
    reconstruction (every block rebuilt per reassigned variable -> only the blocks that mention it): on the
    front-end IR of big kernels both give exactly what numba's own code gives."""
    import copy
    import importlib

    from batchmmu.kernels import jit
    from numba.core import analysis
    mod, fn = name.split(".")
    func = getattr(importlib.import_module(f"batchmmu.kernels.{mod}"), fn).py_func
    blocks = _frontend_blocks(func)
    cfg = analysis.compute_cfg_from_blocks(blocks)
    ud = analysis.compute_use_defs(blocks)
    assert jit._live_map(cfg, blocks, ud.usemap, ud.defmap) == jit._compute_live_map(cfg, blocks, ud.usemap,
                                                                                       ud.defmap)
    theirs = jit._numba_run_ssa(copy.deepcopy(blocks))
    ours = jit._run_ssa(blocks)
    assert _ir_text(ours) == _ir_text(theirs)
    assert sum(len(b.body) for b in ours.values()) > 100


_LINK_ONLY = r"""
import numpy as np
from numba import njit
from numba.core import codegen, postproc
from batchmmu.kernels import jit

def twice(a, i):
    return a[i] * 2 + i

def total(a):
    s = 0
    for i in range(a.size):
        s += twice_h(a, i)
    return s

twice.__module__ = total.__module__ = "batchmmu.kernels.fake"   # as if defined in the package
twice_h = njit(_nrt=False, no_cfunc_wrapper=True, no_cpython_wrapper=True)(twice)
total_k = njit(_nrt=False, no_cfunc_wrapper=True)(total)
a = np.arange(10, dtype=np.int64)
assert total_k(a) == int((a * 2 + np.arange(a.size)).sum()) == 135   # (calling twice_h from Python would crash)
lib = next(iter(twice_h.overloads.values())).library
assert lib._batchmmu_link_only and lib.get_pointer_to_function(lib.get_defined_functions().__next__().name) == 0
assert not getattr(next(iter(total_k.overloads.values())).library, "_batchmmu_link_only", False)
state = lib.serialize_using_object_code()
assert state[1] == jit._LINK_ONLY
back = lib.codegen.unserialize_library(state)
assert back._batchmmu_link_only and back._get_module_for_linking().get_function(
    lib.get_defined_functions().__next__().name) is not None
assert postproc.PostProcessor.run is jit._postproc and codegen.JITCPUCodegen.set_env is jit._set_env
print("ok")
"""


def test_helpers_are_linked_into_callers_without_machine_code_of_their_own():
    """A package helper (no CPython entry) gets an optimized module that callers link, no machine code, and a
    bitcode cache entry that loads back as a link-only library; a kernel calling it computes what Python does
    (in a fresh interpreter, so numba compiles both here)."""
    r = subprocess.run([sys.executable, "-c", _LINK_ONLY], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.nojit
def test_no_kernel_code_needs_its_numba_environment():
    """Link-only helpers have no environment set (kernels/jit.py): compiled code must not raise with run-time
    values, print or enter object mode, the uses numba keeps an environment for."""
    import ast
    found = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.name in ("jit.py", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) or (isinstance(node, ast.Name) and node.id in ("print", "objmode")):
                found.append(f"{path.name}:{node.lineno}")
    assert found == []
