"""The runner (issue 15 item 15): a stopped worker fails the run instead of hanging it, worker errors
name global VM ids, and every reported number is independent of the worker count."""

import os
import signal
import time

import numpy as np
import pytest

import batchmmu as bm
from batchmmu import backends
from batchmmu.backends import ProcessBackend, SerialBackend, globalize
from batchmmu.errors import BatchMMUError, HostMemoryExhausted
from batchmmu.shard import Shard, split
from batchmmu.spec import prepare

# phase-record keys that are timings (they differ between any two runs)
TIMING = {"seconds", "worker_seconds", "events_per_s", "slot_setup_seconds", "loop_seconds"}


def _phases(rep):
    return [{k: v for k, v in p.items() if k not in TIMING} for p in rep.phases]


@pytest.mark.nojit
def test_globalize_maps_local_vm_ids():
    gids = np.array([3, 5, 9])
    e = globalize(BatchMMUError("lost write: VM 2 slot 1 page 4; vm=1: bad; VM 7 out of range", field="verify",
                                value="writes"), gids)
    assert str(e) == "lost write: VM 9 slot 1 page 4; vm=5: bad; VM 7 out of range"
    assert e.field == "verify" and type(e) is BatchMMUError
    h = HostMemoryExhausted("VM 0 needs memory", field="memory")
    h.applied = np.ones(2, bool)
    g = globalize(h, gids)
    assert isinstance(g, HostMemoryExhausted) and str(g) == "VM 3 needs memory" and g.applied is h.applied


def test_serial_worker_error_names_the_global_vm(monkeypatch):
    spec = prepare("demand_paging", ["vms=4", "bytes_per_vcpu=1MiB"]).spec
    parts = split(spec, 2)
    be = SerialBackend(spec, 0, parts)

    def fail(self, k, progress=None):
        raise BatchMMUError("VM 1 went wrong", field="vm")

    monkeypatch.setattr(Shard, "run_phase", fail)
    with pytest.raises(BatchMMUError, match=f"^VM {parts[0][1]} went wrong$"):
        be.run_phase(0)


@pytest.mark.nojit
def test_worker_error_payload_keeps_the_message():
    try:
        raise HostMemoryExhausted("VM 4: out of host memory", field="memory")
    except HostMemoryExhausted as e:
        payload = backends._error_payload(e)
    with pytest.raises(HostMemoryExhausted, match="^VM 4: out of host memory$"):
        backends._raise_worker_error(1, payload)
    try:
        raise KeyError("bug")
    except KeyError as e:
        payload = backends._error_payload(e)
    with pytest.raises(BatchMMUError, match="worker 1 failed:\nTraceback"):
        backends._raise_worker_error(1, payload)


def test_stopped_worker_fails_the_run():
    spec = prepare("demand_paging", ["vms=2", "bytes_per_vcpu=1MiB"]).spec
    be = ProcessBackend(spec, 0, split(spec, 2))
    pid = be.procs[1].pid
    try:
        os.kill(pid, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(BatchMMUError, match=rf"worker 1 \(pid {pid}\) is stopped"):
            be.run_phase(0)
        assert time.monotonic() - t < backends.STOPPED_GRACE_S + 10
        assert not be.procs                                  # closed: the stopped worker was killed
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        be.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("name,sets,key", [
    ("memslot_modification_stress", ["vms=3", "bytes_per_vcpu=1MiB", "ops=3"], "memslot_ops"),
    ("nx_huge_pages", ["vms=3"], "nx_recovery_passes"),
])
def test_phase_figures_independent_of_workers(name, sets, key):
    a = bm.run_scenario(name, sets=sets)
    b = bm.run_scenario(name, sets=sets, workers=2, backend="process")
    assert any(key in p for p in a.phases)
    assert _phases(a) == _phases(b)
    assert a.per_vm == b.per_vm and a.totals == b.totals
