"""Backends that run shards: ``serial`` (in this process), ``process`` (multiprocessing, spawn),
``ray`` (Ray actors, extra ``batchmmu[cluster]``).  All speak the same protocol: build the
shards, run phase k on all of them (an epoch), collect results, read footprints, close.
"""

import logging
import logging.handlers
import multiprocessing as mp
import os
import re
import signal
import time
import traceback
from multiprocessing.connection import wait

from . import errors
from .errors import BatchMMUError
from .shard import Shard

STOPPED_GRACE_S = 3.0    # a worker stopped (SIGSTOP, a debugger) this long fails the run

log = logging.getLogger("batchmmu")


class SerialBackend:
    """Shards one after the other in this process (any number of workers: same results)."""

    def __init__(self, spec, seed, parts, progress=None):
        self.shards = [Shard(spec, seed, p) for p in parts]
        self.progress = progress

    def run_phase(self, k):
        out = []
        for s in self.shards:
            try:
                out.append(s.run_phase(k, self.progress))
            except BatchMMUError as e:
                raise globalize(e, s.gids) from None
        return out

    def footprints(self):
        return [s.footprint() for s in self.shards]

    def close(self):
        self.shards = []


# ----------------------------------------------------------------------------- process
def globalize(e, gids):
    """The same error with the shard-local VM ids in its message (``VM 3``, ``vm=3``) replaced by the
    run's global ids."""
    def sub(m):
        v = int(m.group(2))
        return m.group(1) + (str(int(gids[v])) if 0 <= v < len(gids) else m.group(2))
    msg = re.sub(r"(\bVM |\bvm=)(\d+)\b", sub, str(e))
    out = type(e)(msg, field=e.field, value=e.value, errno=e.errno)
    if getattr(e, "applied", None) is not None:
        out.applied = e.applied
    return out


def _error_payload(exc):
    """What a worker sends back for an exception: (class name, message, traceback)."""
    return type(exc).__name__, str(exc), traceback.format_exc()


def _raise_worker_error(i, payload):
    """The parent's error for worker ``i``'s (class, message, traceback): a BatchMMUError (or
    HostMemoryExhausted) keeps its message; anything else is a bug and keeps its traceback."""
    kind, msg, tb = payload
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, BatchMMUError):
        raise cls(msg, field="workers", value=i)
    raise BatchMMUError(f"worker {i} failed:\n{tb}", field="workers", value=i)


def process_state(pid):
    """The state letter of a process from /proc (R, S, D, T stopped, t traced, Z ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _worker_main(conn, spec, seed, vm_ids, log_queue, index):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle (it stops us)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(logging.INFO)
    wlog = logging.getLogger(f"batchmmu.worker{index}")
    try:
        from . import warmup
        warmup()  # load every cached kernel before the first phase is timed
        shard = Shard(spec, seed, vm_ids)
        wlog.debug("worker %d: %d VMs ready (pid %d)", index, len(vm_ids), os.getpid())
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "phase":
                res = shard.run_phase(arg, lambda n: conn.send(("progress", n)))
                conn.send(("result", res))
            elif cmd == "footprint":
                conn.send(("result", shard.footprint()))
            elif cmd == "crash":  # for tests: die without a word
                os._exit(arg)
            else:
                break
    except Exception as e:  # noqa: BLE001 - everything goes back to the parent
        if isinstance(e, BatchMMUError):
            e = globalize(e, vm_ids)
        try:
            conn.send(("error", _error_payload(e)))
        except OSError:
            pass


class ProcessBackend:
    """One spawned process per shard.  A worker that raises or dies is reported within seconds."""

    def __init__(self, spec, seed, parts, progress=None, start_method="spawn"):
        import multiprocessing_logging
        multiprocessing_logging.install_mp_handler()
        ctx = mp.get_context(start_method)
        self.progress = progress
        self.log_queue = ctx.Queue()
        self.listener = logging.handlers.QueueListener(self.log_queue, *logging.getLogger().handlers,
                                                       respect_handler_level=True)
        self.listener.start()
        self.procs, self.conns = [], []
        for i, p in enumerate(parts):
            a, b = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(b, spec, seed, p, self.log_queue, i),
                               name=f"batchmmu-worker{i}", daemon=True)
            proc.start()
            b.close()
            self.procs.append(proc)
            self.conns.append(a)
        try:
            self._collect("ready")
        except BaseException:
            self.close()
            raise

    def _collect(self, want="result"):
        """Wait for one message of kind ``want`` from every worker; fail fast on errors and deaths."""
        out = [None] * len(self.procs)
        pending = set(range(len(self.procs)))
        stopped = {}
        while pending:
            objs = [self.conns[i] for i in pending] + [self.procs[i].sentinel for i in pending]
            wait(objs, timeout=0.5)
            self._check_stopped(pending, stopped)
            for i in sorted(pending):
                conn, proc = self.conns[i], self.procs[i]
                eof = False
                while True:
                    try:
                        if not conn.poll():
                            break
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        eof = True
                        break
                    if kind == "progress":
                        if self.progress is not None:
                            self.progress(payload)
                    elif kind == "error":
                        self.close()
                        _raise_worker_error(i, payload)
                    else:
                        out[i] = payload
                        pending.discard(i)
                        break
                if i in pending and (eof or not proc.is_alive()):
                    proc.join(timeout=5)
                    code = proc.exitcode
                    self.close()
                    why = " (killed: out of memory?)" if code in (-9, 137) else ""
                    raise BatchMMUError(f"worker {i} died with exit code {code}{why}; the run is incomplete",
                                        field="workers", value=i)
        return out

    def _check_stopped(self, pending, since):
        """A worker that stays stopped (SIGSTOP, SIGTSTP, a debugger) would make the run wait forever:
        fail with its pid once it has been stopped for STOPPED_GRACE_S."""
        now = time.monotonic()
        for i in pending:
            pid = self.procs[i].pid
            if process_state(pid) in ("T", "t"):
                if now - since.setdefault(i, now) >= STOPPED_GRACE_S:
                    self.close()
                    raise BatchMMUError(f"worker {i} (pid {pid}) is stopped (SIGSTOP or a debugger?) and has not "
                                        f"run for {STOPPED_GRACE_S:.0f} s; the run is incomplete",
                                        field="workers", value=i)
            else:
                since.pop(i, None)

    def _send_all(self, msg):
        for c in self.conns:
            try:
                c.send(msg)
            except OSError:
                pass  # a dead worker: _collect reports it with its exit code

    def run_phase(self, k):
        self._send_all(("phase", k))
        return self._collect()

    def footprints(self):
        self._send_all(("footprint", None))
        return self._collect()

    def crash_worker(self, i, code=3):
        """Testing aid: make worker ``i`` exit abruptly."""
        self.conns[i].send(("crash", code))

    def close(self):
        for c in self.conns:
            try:
                c.send(("stop", None))
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=0 if process_state(p.pid) in ("T", "t") else 2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():    # stopped: only SIGKILL reaches it
                p.kill()
                p.join(timeout=2)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []
        if getattr(self, "listener", None) is not None:
            self.listener.stop()
            self.listener = None


# ----------------------------------------------------------------------------- ray
class RayBackend:
    """One Ray actor per shard; ``address`` joins an existing cluster (else a local one starts)."""

    def __init__(self, spec, seed, parts, progress=None, address=None):
        try:
            import ray
        except ImportError:
            raise BatchMMUError("backend='ray' needs Ray: pip install 'batchmmu[cluster]'", field="backend",
                                value="ray") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        # one CPU per shard where the cluster has them; more shards than CPUs share (never wait forever)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        actor = ray.remote(num_cpus=min(1.0, cpus / len(parts)))(_RayShard)
        self.actors = [actor.remote(spec, seed, p) for p in parts]
        self._get([a.ready.remote() for a in self.actors], timeout=600)

    def _get(self, refs, timeout=None):
        try:
            return self.ray.get(refs, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - RayActorError, RayTaskError, GetTimeoutError ...
            self.close()
            raise BatchMMUError(f"a Ray worker failed: {e}", field="workers", value=None) from None

    def run_phase(self, k):
        return self._get([a.run_phase.remote(k) for a in self.actors])

    def footprints(self):
        return self._get([a.footprint.remote() for a in self.actors])

    def nodes(self):
        """The Ray node id of every shard's actor (where the shards run)."""
        return self._get([a.node.remote() for a in self.actors])

    def close(self):
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


class _RayShard:
    def __init__(self, spec, seed, vm_ids):
        from . import warmup
        warmup()
        self.shard = Shard(spec, seed, vm_ids)

    def ready(self):
        return True

    def run_phase(self, k):
        try:
            return self.shard.run_phase(k)
        except BatchMMUError as e:
            raise globalize(e, self.shard.gids) from None

    def footprint(self):
        return self.shard.footprint()

    def node(self):
        import ray
        return ray.get_runtime_context().get_node_id()


BACKENDS = {"serial": SerialBackend, "process": ProcessBackend, "ray": RayBackend}
