"""TDP MMU throughput: first-touch faults and repeat-access HITs through ``Host.access``.

    python bench/bench_tdp.py [--quick] [--json PATH] [--repeats N] [--no-reference] [--no-profile]

For each case (1 VM and 1,024 VMs, 4K backing so every first touch is one 4K fault, plus a
THP case) it measures, median of ``--repeats`` runs after an untimed warm-up:

* first-touch faults/s, random and sequential order (a fresh Host per run, built outside the timer);
* HIT translations/s, random and sequential order, on the populated Host;
* the same workloads through the pure-Python reference model ``tests/reference/model.py`` when it
  exists (fewer events, rate scaled), giving numba/reference;
* the memory probe (``probe.py``: independent random u64 loads, and a dependent chase) over an
  array the size of the populated TDP tables, giving sim/probe.

Every call is one large batch (>= 1M events in the full run) through the public
``host.access``.  A profile section then splits the time of one HIT batch into event
validation and kernel, and measures the first-touch batch with the page arena grown in advance.
Results: a table on stdout and JSON in ``bench/results/latest.json`` (``latest-quick.json`` with
``--quick``; or ``--json PATH``).
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import probe

import batchmmu as bm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"
QUICK_JSON = REPO / "bench" / "results" / "latest-quick.json"   # not committed (bench/.gitignore)
MiB = 1 << 20
GiB = 1 << 30

# Targets of the foundation issue (one core).
TARGETS = {"first_touch": 10e6, "hit_random": 30e6, "hit_sequential": 200e6, "vs_reference": 100.0}


class Case:
    """``nvm`` VMs of ``vm_bytes`` each; first touch every ``stride`` bytes; ``hits`` HIT events."""

    def __init__(self, name, nvm, vm_bytes, backing, stride=4096, hits=None, ref_events=20_000):
        self.name, self.nvm, self.vm_bytes, self.backing = name, nvm, vm_bytes, backing
        self.stride = stride
        self.touch_per_vm = vm_bytes // stride
        self.touches = nvm * self.touch_per_vm
        self.pages_4k = nvm * (vm_bytes >> 12)
        self.hits = self.pages_4k if hits is None else min(hits, self.pages_4k)
        self.ref_events = ref_events
        self.host_memory = nvm * vm_bytes + 64 * MiB

    def describe(self):
        size = f"{self.vm_bytes // GiB} GiB" if self.vm_bytes >= GiB else f"{self.vm_bytes // MiB} MiB"
        return f"{self.nvm} VM x {size} {self.backing}"


def full_cases():
    return [
        Case("1vm-4g-4k", 1, 4 * GiB, "4k"),
        Case("1024vm-4m-4k", 1024, 4 * MiB, "4k"),
        Case("1024vm-16m-4k", 1024, 16 * MiB, "4k"),
        Case("1024vm-1g-thp", 1024, 1 * GiB, "thp", stride=2 * MiB, hits=2 << 20),
    ]


def quick_cases():
    return [
        Case("1vm-1g-4k", 1, 1 * GiB, "4k", ref_events=4_000),
        Case("1024vm-1m-4k", 1024, 1 * MiB, "4k", ref_events=4_000),
        Case("1024vm-64m-thp", 1024, 64 * MiB, "thp", stride=2 * MiB, hits=256 << 10, ref_events=4_000),
    ]


# ----------------------------------------------------------------------------- workloads
def touch_events(case, order, rng):
    """One event per ``stride`` of every VM: VM-major ascending (sequential) or shuffled (random)."""
    vm = np.repeat(np.arange(case.nvm, dtype=np.int64), case.touch_per_vm)
    addr = np.tile(np.arange(case.touch_per_vm, dtype=np.int64) * case.stride, case.nvm)
    if order == "random":
        p = rng.permutation(vm.size)
        vm, addr = vm[p], addr[p]
    return vm, addr


def hit_events(case, order, rng, n=None):
    """``n`` 4K-granular accesses: the first ``n`` 4K pages VM-major (sequential) or uniform (random)."""
    n = case.hits if n is None else n
    per_vm = case.vm_bytes >> 12
    if order == "sequential":
        idx = np.arange(n, dtype=np.int64)
    elif n == case.pages_4k:
        idx = rng.permutation(n).astype(np.int64)
    else:
        idx = rng.integers(0, case.pages_4k, n, dtype=np.int64)
    return idx // per_vm, (idx % per_vm) << 12


def new_host(case, cls=bm.Host):
    h = cls(memory=case.host_memory, backing=case.backing)
    h.create_vms(case.nvm, memory=case.vm_bytes)
    return h


def populate(host, case):
    vm, addr = touch_events(case, "sequential", None)
    host.access(vm, 0, addr, bm.ACC_WRITE)


def timed(fn, repeats, setup=None):
    """Median wall time of ``fn(state)`` over ``repeats`` runs; ``setup()`` (untimed) makes the state."""
    times, last = [], None
    for _ in range(repeats):
        state = setup() if setup is not None else None
        t = time.perf_counter()
        last = fn(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, last


def check_outcomes(res, want, what):
    bad = int(np.count_nonzero(np.asarray(res.outcome) != want))
    if bad:
        raise SystemExit(f"{what}: {bad} events did not give {bm.OUTCOME_NAMES[want]} "
                         f"({np.bincount(np.asarray(res.outcome), minlength=6).tolist()})")


# ----------------------------------------------------------------------------- reference model
class Reference:
    """Adapter for the pure-Python reference model, which may not exist yet.

    It looks for ``tests/reference/model.py`` and a class there with the Host API
    (``create_vms(count, memory=...)`` and ``access(vm, vcpu, addr, kind)``); ``access`` is called
    with arrays when the model accepts them, else once per event.
    """

    CLASS_NAMES = ("Host", "RefHost", "ReferenceHost", "ModelHost", "Model", "RefModel", "ReferenceModel")

    def __init__(self):
        self.cls, self.vectorised, self.note = None, None, ""
        path = REPO / "tests" / "reference" / "model.py"
        if not path.exists():
            self.note = "tests/reference/model.py does not exist (yet)"
            return
        try:
            mod = self._import(path)
        except Exception as e:  # noqa: BLE001 - any import problem only disables the comparison
            self.note = f"import failed: {type(e).__name__}: {e}"
            return
        for name in self.CLASS_NAMES:
            c = getattr(mod, name, None)
            if isinstance(c, type) and hasattr(c, "create_vms") and hasattr(c, "access"):
                self.cls = c
                self.note = f"tests/reference/model.py:{name}"
                break
        else:
            self.note = "tests/reference/model.py has no class with create_vms() and access()"

    @staticmethod
    def _import(path):
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        try:
            return importlib.import_module("tests.reference.model")
        except ImportError:
            spec = importlib.util.spec_from_file_location("batchmmu_reference_model", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod

    @property
    def available(self):
        return self.cls is not None

    def new_host(self, case):
        try:
            h = self.cls(memory=case.host_memory, backing=case.backing)
        except TypeError:
            h = self.cls()
        h.create_vms(case.nvm, memory=case.vm_bytes)
        return h

    def access(self, h, vm, addr, kind):
        """Run the events (``vm``, ``addr``: lists); returns the outcome codes when the model gives them."""
        if self.vectorised is None:
            try:
                first = self._outcomes(h.access(vm[:1], 0, addr[:1], kind), 1)
                self.vectorised = True
            except Exception:  # noqa: BLE001 - fall back to one call per event
                self.vectorised = False
            else:
                if len(vm) == 1:
                    return first
                rest = self._outcomes(h.access(vm[1:], 0, addr[1:], kind), len(vm) - 1)
                return None if first is None or rest is None else np.concatenate([first, rest])
        if self.vectorised:
            return self._outcomes(h.access(vm, 0, addr, kind), len(vm))
        outs = [self._outcomes(h.access(v, 0, a, kind), 1) for v, a in zip(vm, addr, strict=True)]
        return None if any(o is None for o in outs) else np.concatenate(outs)

    @staticmethod
    def _outcomes(r, n):
        o = getattr(r, "outcome", None)
        if o is None and isinstance(r, tuple) and r:
            o = r[0]
        if o is None:
            o = r
        o = list(o) if isinstance(o, (list, tuple, np.ndarray)) else [o]
        names = {name: code for code, name in enumerate(bm.OUTCOME_NAMES)}
        try:
            a = np.array([names[x] if isinstance(x, str) else int(x) for x in o], np.int64)
        except (KeyError, TypeError, ValueError):
            return None
        return a if a.size == n else None


def reference_rates(ref, case, repeats, rng):
    """Reference events/s for the four workloads of ``case`` with ``case.ref_events`` events each."""
    n = case.ref_events
    out = {}
    for order in ("random", "sequential"):
        vm, addr = touch_events(case, order, rng)
        vm, addr = vm[:n].tolist(), addr[:n].tolist()
        holder = {}

        def run(h, vm=vm, addr=addr, holder=holder):
            holder["o"] = ref.access(h, vm, addr, bm.ACC_WRITE)
        med, times, _ = timed(run, repeats, setup=lambda: ref.new_host(case))
        out[f"first_touch_{order}"] = {"events": n, "median_s": med, "runs_s": times, "rate": n / med,
                                       "check": _ref_check(holder.get("o"), bm.FIXED)}
    # HITs: the reference pre-touches the n pages it will hit (untimed), then hits them.
    h = ref.new_host(case)
    vm_s, addr_s = hit_events(case, "sequential", rng, n)
    ref.access(h, vm_s.tolist(), addr_s.tolist(), bm.ACC_WRITE)
    p = rng.permutation(n)
    for order, (vm, addr) in (("random", (vm_s[p], addr_s[p])), ("sequential", (vm_s, addr_s))):
        vm, addr = vm.tolist(), addr.tolist()
        holder = {}

        def run(_, vm=vm, addr=addr, holder=holder):
            holder["o"] = ref.access(h, vm, addr, 0)
        med, times, _ = timed(run, repeats)
        out[f"hit_{order}"] = {"events": n, "median_s": med, "runs_s": times, "rate": n / med,
                               "check": _ref_check(holder.get("o"), bm.HIT)}
    return out


def _ref_check(outcomes, want):
    if outcomes is None:
        return "unchecked"
    ok = bool(np.all(outcomes == want))
    return "ok" if ok else f"MISMATCH ({np.bincount(outcomes.clip(0), minlength=6).tolist()})"


# ----------------------------------------------------------------------------- measurements
def measure_case(case, repeats, rng):
    """Numba rates of the four workloads of ``case``; returns (results dict, populated host)."""
    res = {}
    for order in ("random", "sequential"):
        vm, addr = touch_events(case, order, rng)

        def run(h, vm=vm, addr=addr):
            return h.access(vm, 0, addr, bm.ACC_WRITE)
        med, times, last = timed(run, repeats, setup=lambda: new_host(case))
        check_outcomes(last, bm.FIXED, f"{case.name} first touch {order}")
        res[f"first_touch_{order}"] = {"events": int(vm.size), "median_s": med, "runs_s": times,
                                       "rate": vm.size / med}
    host = new_host(case)
    populate(host, case)
    for order in ("random", "sequential"):
        vm, addr = hit_events(case, order, rng)
        med, times, last = timed(lambda _, vm=vm, addr=addr: host.access(vm, 0, addr, 0), repeats)
        check_outcomes(last, bm.HIT, f"{case.name} hit {order}")
        res[f"hit_{order}"] = {"events": int(vm.size), "median_s": med, "runs_s": times,
                               "rate": vm.size / med}
    return res, host


def profile_case(case, host, results, repeats, rng):
    """Where the time of a batch goes: event validation vs kernel; arena growth in first touch."""
    prof = {}
    vm, addr = hit_events(case, "random", rng)
    n = vm.size
    if hasattr(host, "_events"):
        med, _, _ = timed(lambda _: host._events(vm, 0, addr, 0), repeats)
        total = results["hit_random"]["median_s"]
        prof["validate_ns_per_event"] = med / n * 1e9
        prof["hit_random_access_ns_per_event"] = total / n * 1e9
        prof["hit_random_kernel_ns_per_event"] = max(0.0, total - med) / n * 1e9
        vs, as_ = hit_events(case, "sequential", rng)
        med_s, _, _ = timed(lambda _: host._events(vs, 0, as_, 0), repeats)
        total_s = results["hit_sequential"]["median_s"]
        prof["hit_sequential_access_ns_per_event"] = total_s / n * 1e9
        prof["hit_sequential_kernel_ns_per_event"] = max(0.0, total_s - med_s) / n * 1e9
        prof["validate_share_of_hit_sequential"] = med_s / total_s
    # first touch with the page arena grown before the timer: the cost of growth by doubling
    rows = int(host.stats()["mmu_pages"].sum()) + 64
    vm_t, addr_t = touch_events(case, "random", rng)

    def setup():
        h = new_host(case)
        h.reserve_tables(rows)
        return h
    med, _, last = timed(lambda h: h.access(vm_t, 0, addr_t, bm.ACC_WRITE), repeats, setup=setup)
    check_outcomes(last, bm.FIXED, f"{case.name} first touch (arena pre-grown)")
    prof["first_touch_random_ns_per_fault"] = results["first_touch_random"]["median_s"] / vm_t.size * 1e9
    prof["first_touch_random_pregrown_ns_per_fault"] = med / vm_t.size * 1e9
    return prof


def warmup(cases):
    """Compile every kernel (or load numba's cache) and run each case shape once on a tiny scale."""
    t = time.perf_counter()
    bm.warmup()
    probe.warmup()
    rng = np.random.default_rng(0)
    for c in cases:
        tiny = Case("warm", min(c.nvm, 4), c.stride * 4, c.backing, stride=c.stride)
        h = new_host(tiny)
        vm, addr = touch_events(tiny, "random", rng)
        h.access(vm, 0, addr, bm.ACC_WRITE)
        h.access(vm, 0, addr, 0)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- report
def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    thp = "?"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        pass
    commit = "?"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "loadavg_at_start": list(os.getloadavg()),
            "git": commit,
            "platform": platform.platform(),
            "python": platform.python_version(), "numba": numba.__version__, "numpy": np.__version__,
            "batchmmu": getattr(bm, "__version__", "?"), "thp": thp}


def fmt_rate(r):
    if r is None:
        return "n/a"
    if r >= 1e9:
        return f"{r / 1e9:.2f} G/s"
    if r >= 1e6:
        return f"{r / 1e6:.1f} M/s"
    return f"{r / 1e3:.1f} k/s"


def target_for(metric, backing):
    if metric.startswith("first_touch"):
        return TARGETS["first_touch"] if backing == "4k" else None
    return TARGETS.get(metric)


def build_rows(cases, numba_res, ref_res, probes):
    rows = []
    for c in cases:
        for metric in ("first_touch_random", "first_touch_sequential", "hit_random", "hit_sequential"):
            r = numba_res[c.name][metric]
            rr = ref_res.get(c.name, {}).get(metric)
            pr = probes[c.name]
            tgt = target_for(metric, c.backing)
            rows.append({
                "case": c.name, "case_desc": c.describe(), "metric": metric, "events": r["events"],
                "rate": r["rate"], "median_s": r["median_s"], "runs_s": r["runs_s"],
                "ref_rate": rr["rate"] if rr else None, "ref_events": rr["events"] if rr else None,
                "ref_check": rr["check"] if rr else None,
                "ratio_vs_ref": r["rate"] / rr["rate"] if rr else None,
                "probe_gather_rate": pr["gather_loads_per_s"],
                "ratio_vs_probe": r["rate"] / pr["gather_loads_per_s"],
                "target": tgt, "meets_target": None if tgt is None else bool(r["rate"] >= tgt),
            })
    return rows


def print_table(rows, probes, cases):
    head = f"{'case':<16} {'metric':<24} {'value':>11} {'vs ref':>8} {'vs probe':>9} {'target':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = f"{r['ratio_vs_ref']:.0f}x" if r["ratio_vs_ref"] is not None else "n/a"
        tgt = "" if r["target"] is None else \
            f"{'ok' if r['meets_target'] else 'MISS'} {r['target'] / 1e6:.0f}M"
        print(f"{r['case']:<16} {r['metric']:<24} {fmt_rate(r['rate']):>11} {ref:>8} "
              f"{r['ratio_vs_probe']:>8.3f}x {tgt:>9}")
    print()
    print(f"{'probe (tables of)':<16} {'MiB':>8} {'gather':>11} {'chase':>11} {'chase ns':>9}")
    for c in cases:
        p = probes[c.name]
        print(f"{c.name:<16} {p['bytes'] / MiB:8.1f} {fmt_rate(p['gather_loads_per_s']):>11} "
              f"{fmt_rate(p['chase_loads_per_s']):>11} {p['chase_ns']:9.1f}")


def print_profile(profiles):
    if not profiles:
        return
    print()
    print("profile (ns per event)")
    for name, p in profiles.items():
        parts = []
        if "validate_ns_per_event" in p:
            parts.append(f"validate {p['validate_ns_per_event']:.1f}")
            parts.append(f"hit rand access {p['hit_random_access_ns_per_event']:.1f} "
                         f"(kernel ~{p['hit_random_kernel_ns_per_event']:.1f})")
            parts.append(f"hit seq access {p['hit_sequential_access_ns_per_event']:.1f} "
                         f"(kernel ~{p['hit_sequential_kernel_ns_per_event']:.1f}, "
                         f"validation {100 * p['validate_share_of_hit_sequential']:.0f}%)")
        if "first_touch_random_pregrown_ns_per_fault" in p:
            parts.append(f"first touch rand {p['first_touch_random_ns_per_fault']:.0f}, "
                         f"arena pre-grown {p['first_touch_random_pregrown_ns_per_fault']:.0f}")
        pad = "\n  " + " " * 17
        print(f"  {name:<16} " + (";" + pad).join(parts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    ap.add_argument("--json", default=None,
                    help="where to write the results JSON (default bench/results/latest.json, "
                         "with --quick latest-quick.json)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5)")
    ap.add_argument("--no-reference", action="store_true", help="skip the pure-Python reference model")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile section")
    args = ap.parse_args(argv)
    repeats = args.repeats or 5
    cases = quick_cases() if args.quick else full_cases()
    n_loads = 1_000_000 if args.quick else 4_000_000
    t_start = time.perf_counter()
    info = machine_info()
    print(f"batchmmu TDP bench ({'quick' if args.quick else 'full'}, median of {repeats}) on "
          f"{info['nproc']} x {info['cpu_model']}; numba {info['numba']}, numpy {info['numpy']}")
    warm_s = warmup(cases)
    print(f"warm-up (compile or load cached kernels): {warm_s:.1f} s")

    ref = Reference() if not args.no_reference else None
    if ref is not None:
        print(f"reference model: {ref.note}")
    rng = np.random.default_rng(12345)
    numba_res, ref_res, probes, profiles, footprints = {}, {}, {}, {}, {}
    for c in cases:
        t = time.perf_counter()
        numba_res[c.name], host = measure_case(c, repeats, rng)
        tables = int(host.footprint()["tdp_page_tables"])
        footprints[c.name] = {"tdp_page_tables": tables, "mmu_pages": int(host.stats()["mmu_pages"].sum())}
        probes[c.name] = probe.probe(tables, n_loads=n_loads, repeats=repeats)
        if not args.no_profile:
            profiles[c.name] = profile_case(c, host, numba_res[c.name], repeats, rng)
        del host
        if ref is not None and ref.available:
            try:
                ref_res[c.name] = reference_rates(ref, c, repeats, rng)
            except Exception as e:  # noqa: BLE001 - a broken model must not lose the numba results
                ref.note += f"; failed on {c.name}: {type(e).__name__}: {e}"
                print(f"reference model failed on {c.name}: {type(e).__name__}: {e}")
        print(f"  {c.name} ({c.describe()}): {time.perf_counter() - t:.1f} s", flush=True)

    rows = build_rows(cases, numba_res, ref_res, probes)
    print()
    print_table(rows, probes, cases)
    print_profile(profiles)
    total = time.perf_counter() - t_start
    info["loadavg_at_end"] = list(os.getloadavg())
    print(f"\ntotal {total:.1f} s; load average at start {info['loadavg_at_start'][0]:.2f}, "
          f"at end {info['loadavg_at_end'][0]:.2f} (other processes on this {info['nproc']}-core machine)")
    ratios = [r["ratio_vs_ref"] for r in rows if r["ratio_vs_ref"] is not None]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full", "repeats": repeats, "machine": info,
        "warmup_s": warm_s, "total_s": total, "targets": TARGETS,
        "cases": {c.name: {"desc": c.describe(), "nvm": c.nvm, "vm_bytes": c.vm_bytes, "backing": c.backing,
                           "first_touch_stride": c.stride, **footprints[c.name]} for c in cases},
        "results": rows, "probes": probes, "profile": profiles,
        "reference": {"available": bool(ref is not None and ref.available),
                      "note": ref.note if ref is not None else "skipped (--no-reference)",
                      "min_ratio": min(ratios) if ratios else None},
    }
    path = Path(args.json) if args.json else (QUICK_JSON if args.quick else DEFAULT_JSON)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
