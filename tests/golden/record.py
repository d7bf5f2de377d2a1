"""Golden statistics: every bundled scenario (serial, fixed seed) and ``validate`` on the simulator side.

Refactors of the kernel layer must leave these identical.  ``python tests/golden/record.py`` rewrites
the files (only after a change that is meant to alter statistics; say so in the commit);
``tests/test_golden.py`` compares.  Scenarios run with the overrides below so the whole set stays within
a minute or two once the kernels are compiled.
"""

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (scenario, variant tag, --set overrides): small sizes; every phase of the scenario still runs
SCENARIOS = [
    ("access_tracking_perf", "", ["vcpus=2", "bytes_per_vcpu=8MiB"]),
    ("access_tracking_perf", "noad", ["vcpus=2", "bytes_per_vcpu=8MiB", "ept_ad=false"]),
    ("demand_paging", "", ["vms=3", "vcpus=2", "bytes_per_vcpu=8MiB"]),
    ("demand_paging", "legacy", ["vms=2", "vcpus=2", "bytes_per_vcpu=8MiB", "tdp_mmu=false", "backing=thp"]),
    ("demand_paging", "thp-npt-random", ["vms=2", "bytes_per_vcpu=8MiB", "backing=thp", "tdp_format=npt",
                                         "access_order=random", "write_percent=50"]),
    ("dirty_log", "", ["pages=4099", "iterations=3", "writes=512"]),
    ("dirty_log", "manual", ["pages=4099", "iterations=3", "writes=512", "manual_protect=true"]),
    ("dirty_log", "ring", ["pages=4099", "iterations=3", "writes=512", "dirty_ring=1024"]),
    ("dirty_log", "pml", ["pages=4099", "iterations=3", "writes=512", "pml=true"]),
    ("dirty_log_page_splitting", "", ["bytes_per_vcpu=8MiB"]),
    ("dirty_log_perf", "", ["vms=2", "bytes_per_vcpu=8MiB"]),
    ("dirty_log_perf", "thp-get", ["bytes_per_vcpu=8MiB", "backing=thp", "manual_protect=false",
                                   "random_access=true", "write_percent=30"]),
    ("guest_os", "", ["memory=64MiB", "slices=40", "processes=4", "forks=4"]),
    ("kvm_page_table", "", ["test_mem_size=16MiB"]),
    ("max_guest_memory", "", ["max_mem=16GiB"]),
    ("memslot_modification_stress", "", ["bytes_per_vcpu=16MiB", "ops=4"]),
    ("memslot_perf", "", ["slots=64", "loops=2"]),
    ("nx_huge_pages", "", []),
    ("overcommit", "", ["busy_vms=4", "idle_vms=4", "bytes_per_vcpu=8MiB", "memory=48MiB"]),
    ("tdp_vs_legacy", "", ["vms=1", "bytes_per_vcpu=4MiB", "iterations=2"]),
    ("tdp_vs_legacy", "pml-thp", ["vms=1", "bytes_per_vcpu=4MiB", "pml=true", "backing=thp", "manual_protect=false"]),
    ("trace_replay", "", ["vms=2", "vcpus=2"]),
    ("trace_replay", "thp-npt", ["backing=thp", "tdp_format=npt", "repeat=2", "vcpus=2"]),
    ("ept_access", "", []),
    ("ept_access", "legacy", ["tdp_mmu=false"]),
    ("migrate", "", ["bytes_per_vcpu=16MiB"]),
    ("nested_dirty_log", "", []),
    ("nested_dirty_log", "svm", ["tdp_format=npt"]),
    ("nested_dirty_log", "legacy", ["tdp_mmu=false"]),
    ("nested_dirty_log", "svm-legacy", ["tdp_format=npt", "tdp_mmu=false"]),
    ("nested_tdp_fault", "", []),
    ("nested_tdp_fault", "svm", ["tdp_format=npt"]),
    ("nested_tdp_fault", "legacy", ["tdp_mmu=false"]),
    ("nested_tdp_fault", "svm-legacy", ["tdp_format=npt", "tdp_mmu=false"]),
]
VALIDATE = ["random:0:200", "random:1:200"]
SEED = 7


def scenario_stats(name, sets):
    """The deterministic part of a run's report (no timings)."""
    from batchmmu import scenario as sc
    from batchmmu.migrate import OPS as TIMED_OPS
    # one seed per run (docs/scenarios.md): a scenario that declares one (its memstress guest's) runs with it
    spec = sc.load_scenario(name)[0]
    seed = None if "seed" in spec.get("params", {}) else SEED
    timed = any(ph.get("op") in TIMED_OPS for ph in spec.get("phase", []))   # migrate: on the default cost model
    rep = sc.run_scenario(name, workers=1, backend="serial", seed=seed, sets=sets, time=True if timed else None)
    drop = {"seconds", "worker_seconds", "events_per_s", "wall_seconds", "sim_seconds"}
    phases = [{k: v for k, v in p.items() if k not in drop and not k.endswith("_seconds") and not k.endswith("_time")}
              for p in rep.phases]
    return {"params": rep.params, "totals": rep.totals, "per_vm": rep.per_vm, "phases": phases,
            "footprint": rep.footprint}


def validate_stats(workload):
    from batchmmu import validate
    rep = validate.validate(workload, sides="sim")
    return {"sim": rep["sim"]}


def bundled_workloads():
    from batchmmu.workload import list_workloads
    return [n for n, _ in list_workloads()]


def golden_path(kind, name):
    return HERE / f"{kind}-{name.replace(':', '_')}.json"


def record(which=None):
    from batchmmu import scenario as sc
    missing = {n for n, _ in sc.list_scenarios()} - {n for n, _, _ in SCENARIOS}
    if missing:
        sys.exit(f"add overrides for new scenarios: {sorted(missing)}")
    for name, tag, sets in SCENARIOS:
        key = name + ("-" + tag if tag else "")
        if which and key not in which:
            continue
        t = time.perf_counter()
        data = scenario_stats(name, sets)
        golden_path("scenario", key).write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
        print(f"recorded scenario {key} ({time.perf_counter() - t:.1f} s)", flush=True)
    for wl in bundled_workloads() + VALIDATE:
        if which and wl not in which:
            continue
        golden_path("validate", wl).write_text(json.dumps(validate_stats(wl), indent=0, sort_keys=True) + "\n")
        print("recorded validate", wl)


if __name__ == "__main__":
    record(set(sys.argv[1:]) or None)
