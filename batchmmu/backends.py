"""Backends that run shards: ``serial`` (in this process), ``process`` (multiprocessing, spawn),
``ray`` (Ray actors, extra ``batchmmu[cluster]``).  All speak the same protocol: build the
shards, run phase k on all of them (an epoch), collect results, read footprints, close.
"""

import logging
import logging.handlers
import multiprocessing as mp
import os
import traceback
from multiprocessing.connection import wait

from .errors import BatchMMUError
from .shard import Shard

log = logging.getLogger("batchmmu")


class SerialBackend:
    """Shards one after the other in this process (any number of workers: same results)."""

    def __init__(self, spec, seed, parts, progress=None):
        self.shards = [Shard(spec, seed, p) for p in parts]
        self.progress = progress

    def run_phase(self, k):
        return [s.run_phase(k, self.progress) for s in self.shards]

    def footprints(self):
        return [s.footprint() for s in self.shards]

    def close(self):
        self.shards = []


# ----------------------------------------------------------------------------- process
def _worker_main(conn, spec, seed, vm_ids, log_queue, index):
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
    except Exception:  # noqa: BLE001 - everything goes back to the parent
        try:
            conn.send(("error", traceback.format_exc()))
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
        while pending:
            objs = [self.conns[i] for i in pending] + [self.procs[i].sentinel for i in pending]
            wait(objs, timeout=1.0)
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
                        raise BatchMMUError(f"worker {i} failed:\n{payload}", field="workers", value=i)
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
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
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
        return self.shard.run_phase(k)

    def footprint(self):
        return self.shard.footprint()

    def node(self):
        import ray
        return ray.get_runtime_context().get_node_id()


BACKENDS = {"serial": SerialBackend, "process": ProcessBackend, "ray": RayBackend}
