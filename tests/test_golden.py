"""Golden statistics: every bundled scenario and ``validate`` (simulator side) give exactly the recorded figures.

Refactors must keep these equal; ``python tests/golden/record.py [KEY ...]`` re-records (only for a change meant to
alter statistics, said so in its commit).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import record  # noqa: E402

SCENARIO_CASES = [pytest.param(name, tag, sets, id=name + ("-" + tag if tag else ""))
                  for name, tag, sets in record.SCENARIOS]


def _diff(a, b, path=""):
    """First differing path between two JSON-like values (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'golden' if k in a else 'run'}"
            d = _diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: golden {a!r} != run {b!r}"


def _golden(kind, key):
    path = record.golden_path(kind, key)
    assert path.exists(), f"no golden file {path.name}: run tests/golden/record.py {key}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name,tag,sets", SCENARIO_CASES)
def test_scenario_statistics_unchanged(name, tag, sets):
    key = name + ("-" + tag if tag else "")
    got = json.loads(json.dumps(record.scenario_stats(name, sets), sort_keys=True))
    want = _golden("scenario", key)
    # the simulator's own array bytes are no statistic: they follow the arena layout, not the simulated KVM
    for rep in (want, got):
        rep["footprint"].pop("simulator_bytes", None)
    # statistics recorded in the golden file must be equal; keys added to a phase later are allowed, and so are
    # parameters a scenario gained later (at their defaults the scenario runs as it did)
    for k in set(got["params"]) - set(want["params"]):
        del got["params"][k]
    for ph_want, ph_got in zip(want["phases"], got["phases"], strict=True):
        for k in set(ph_got) - set(ph_want):
            del ph_got[k]
    _drop_new_zero_stats(want, got)
    assert _diff(want, got) is None, _diff(want, got)


def _drop_new_zero_stats(want, got):
    """Statistics added after a golden file was recorded (nested_run, guest_mode) must be zero in every place the
    run reports them; they are then left out of the comparison.  Every recorded statistic stays compared."""
    if isinstance(got, dict) and isinstance(want, dict):
        known = set(want)
        for k in list(got):
            if k in NEW_STATS and k not in known:
                v = got.pop(k)
                assert v == 0 or (isinstance(v, list) and not any(v)) or isinstance(v, dict), (k, v)
                if isinstance(v, dict):
                    assert not any(v.values()), (k, v)
            elif k in known:
                _drop_new_zero_stats(want[k], got[k])
    elif isinstance(got, list) and isinstance(want, list):
        for a, b in zip(want, got, strict=False):
            _drop_new_zero_stats(a, b)


NEW_STATS = ("nested_run", "guest_mode")


@pytest.mark.parametrize("workload", record.bundled_workloads() + record.VALIDATE)
def test_validate_statistics_unchanged(workload):
    got = json.loads(json.dumps(record.validate_stats(workload), sort_keys=True))
    want = _golden("validate", workload)
    _drop_new_zero_stats(want, got)
    assert _diff(want, got) is None, _diff(want, got)
