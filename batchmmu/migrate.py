"""Scenario ops on simulated time (docs/time.md): ``dirty_rate`` (what the dirty log and QEMU's sampled
``calc-dirty-rate`` say about the guest's dirty rate) and ``migrate`` (QEMU-style precopy live migration over the
VM's dirty-tracking mechanism: the bitmap, manual protect with CLEAR in chunks, or the dirty ring).

Both run each VM of the shard on its own (VMs are independent): the VM's memstress guest runs until a simulated
deadline (kernels/timeline.py stops the batch there; the events left run first next time, so every vCPU keeps its
program order), while the VMM side (GET/CLEAR/harvest, page sends) advances the VM's own time.  During a
migration the VMM's ioctls run while the guest runs: the guest is run up to each ioctl, and an ioctl's work
under mmu_lock holds the lock among the vCPUs' faults (``Timing._sim_hold``).
"""

import itertools

import numpy as np

from .constants import ACC_WRITE, RING_FULL
from .errors import BatchMMUError
from .kernels import state as S
from .kernels import timeline as TL
from .units import parse_size

OPS = ("migrate", "dirty_rate")
KEYS = {"bandwidth", "max_downtime", "max_iterations", "auto_converge", "throttle_after", "throttle_initial",
        "throttle_step", "throttle_max", "clear_chunk", "sample_pages_per_gib", "guest_ns"}
PS = 10 ** 12
PAGE = 4096
DEFAULTS = {"bandwidth": "1GiB", "max_downtime": 0.3, "max_iterations": 30, "auto_converge": False,
            "throttle_after": 2, "throttle_initial": 20, "throttle_step": 10, "throttle_max": 99, "clear_chunk": 0,
            "seconds": 0.01, "sample_pages_per_gib": 512, "guest_ns": None}


def check(ph):
    """The phase's keys, checked before anything runs (spec.prepare); normalizes ``auto_converge``."""
    from . import args as A
    from .spec import _bool, _int

    def num(key, lo, hi):
        return A.number(ph.get(key, DEFAULTS[key]), f"phase.{key}", lo, hi)
    if ph.get("guest_ns") is not None:
        num("guest_ns", 0, 1e9)
    if ph["op"] == "migrate":
        bw = parse_size(ph.get("bandwidth", DEFAULTS["bandwidth"]), "phase.bandwidth")
        if not 0 < bw <= 1 << 50:
            raise BatchMMUError(f"phase.bandwidth={bw}: bytes per simulated second, in (0, 2**50]",
                                field="phase.bandwidth", value=bw)
        num("max_downtime", 0, 3600)
        _int(ph.get("max_iterations", DEFAULTS["max_iterations"]), "phase.max_iterations", 1, 100000)
        _int(ph.get("throttle_after", DEFAULTS["throttle_after"]), "phase.throttle_after", 0, 100000)
        for k in ("throttle_initial", "throttle_step", "throttle_max"):
            _int(ph.get(k, DEFAULTS[k]), f"phase.{k}", 0 if k == "throttle_step" else 1, 99)
        if ph.get("throttle_initial", DEFAULTS["throttle_initial"]) > ph.get("throttle_max", DEFAULTS["throttle_max"]):
            raise BatchMMUError(f"phase.throttle_initial={ph.get('throttle_initial', DEFAULTS['throttle_initial'])}: "
                                "above throttle_max", field="phase.throttle_initial",
                                value=ph.get("throttle_initial", DEFAULTS["throttle_initial"]))
        ph["auto_converge"] = _bool(ph.get("auto_converge", DEFAULTS["auto_converge"]), "phase.auto_converge")
        chunk = parse_size(ph.get("clear_chunk", 0), "phase.clear_chunk")
        if chunk % (64 * PAGE):
            raise BatchMMUError(f"phase.clear_chunk={chunk}: a multiple of 256KiB (64 pages: KVM_CLEAR_DIRTY_LOG "
                                "clears whole 64-page words)", field="phase.clear_chunk", value=chunk)
    else:
        num("seconds", 1e-9, 3600)
        num("sample_pages_per_gib", 1, 1 << 18)


def run(shard, ph, extra, progress):
    if not shard.host.timed:
        raise BatchMMUError(f"phase.op={ph['op']!r}: runs on simulated time: use --time (or time=True)",
                            field="phase.op", value=ph["op"])
    cm = shard.host.cost_model
    if (ph.get("guest_ns") is None and cm["guest.access"] == 0) or ph.get("guest_ns") == 0:
        if cm["guest.walk_ref"] == 0:
            raise BatchMMUError(f"phase.op={ph['op']!r}: a guest access that hits costs no time (guest.access and "
                                "guest.walk_ref are 0), so the guest never reaches a deadline; set guest_ns > 0",
                                field="phase.guest_ns", value=ph.get("guest_ns"))
    for lvm in range(shard.gids.size):
        if not shard.logging[lvm]:
            shard._set_logging(True)
            break
    events = 0
    for lvm in range(shard.gids.size):
        if not shard._runs(lvm):
            continue
        g = _Guest(shard, lvm, ph)
        if ph["op"] == "migrate":
            rec = _migrate(shard, g, ph)
            extra["migration"] = extra.get("migration", []) + [rec]
        else:
            rec = _dirty_rate(shard, g, ph)
            extra["dirty_rate"] = extra.get("dirty_rate", []) + [rec]
        events += g.events
    return events


class _Guest:
    """One VM's memstress guest, run in simulated time (passes of the workload, one after the other)."""

    def __init__(self, shard, lvm, ph):
        self.shard, self.lvm, self.host = shard, lvm, shard.host
        wp = int(ph.get("write_percent", shard.spec["write_percent"]))
        ra = bool(ph.get("random_access", shard.spec.get("random_access", False)))
        self.gen = itertools.chain.from_iterable(shard.memstress_events(wp, ra, only=lvm) for _ in itertools.count())
        self.left = None
        self.events = 0
        self.writes = 0
        v = int(shard.vcpus[lvm])
        off = int(self.host.vt.vcpu_off[lvm])
        self.vcpus = slice(off, off + v)
        self.written = np.zeros(int(shard.region_pages[lvm]), bool)   # pages written since the op started
        # pages written since the VMM last took them from the log (a GET, a CLEAR with manual protect: QEMU sends
        # a page after clearing it, or a ring reap): what is left after the final sync was lost
        self.unsynced = np.zeros(self.written.size, bool)
        self.ring_dirty = np.zeros(self.written.size, bool)   # harvested from full rings since the last sync
        self.vmm_wait = 0   # ps the VMM's ioctls waited for mmu_lock
        self.vmm_hold = 0   # ps they held it
        self.throttle = 0   # auto-converge: percent of each stretch the vCPUs sleep
        # the guest's own time per access (its think time), else the cost table's guest.access
        ns = ph.get("guest_ns")
        self.base = None if ns is None else int(round(float(ns) * 1000))

    def now(self):
        return int(self.host._tm.clock[self.vcpus].max())

    def run_until(self, deadline, sleep_to=None):
        """Run the guest until every vCPU's clock reaches ``deadline`` (ps); then, throttled, sleep to
        ``sleep_to``.  Returns the pages written (a bool array over the region)."""
        tm = self.host._tm
        wrote = np.zeros(self.written.size, bool)
        tm.ctl[TL.CTL_DEADLINE] = deadline
        base = tm.base[:, TL.BASE_EVENT].copy()
        if self.base is not None:
            tm.base[:, TL.BASE_EVENT] = self.base
        try:
            stalled = False
            while int(tm.clock[self.vcpus].min()) < deadline:
                if self.left is None:
                    self.left = next(self.gen)
                elif stalled:   # the vCPUs behind the deadline have no events left here: the next pass's follow
                    self.left = tuple(np.concatenate([a, b]) for a, b in zip(self.left, next(self.gen), strict=True))
                vm, vc, addr, kind = self.left
                self.left = None
                res = self.host.access(vm, vc, addr, kind)
                ran = self.host._last_ran.astype(bool) & (res.outcome != RING_FULL)
                w = ran & ((kind & ACC_WRITE) != 0)
                page = (addr[w] - int(self.shard.test_base[self.lvm])) >> 12
                page = page[(page >= 0) & (page < wrote.size)]
                wrote[page] = True
                self.unsynced[page] = True   # before a reap below takes them from the rings
                if (res.outcome == RING_FULL).any():
                    self._ring_full(vc[res.outcome == RING_FULL])
                if not ran.all():
                    keep = ~ran
                    self.left = (vm[keep], vc[keep], addr[keep], kind[keep])
                self.events += int(ran.sum())
                self.writes += int(w.sum())
                stalled = not ran.any()
        finally:
            tm.ctl[TL.CTL_DEADLINE] = -1
            tm.base[:, TL.BASE_EVENT] = base
        if sleep_to is not None:
            np.maximum(tm.clock[self.vcpus], sleep_to, out=tm.clock[self.vcpus])
        self.written |= wrote
        return wrote

    def _ring_full(self, vcpus):
        """KVM_EXIT_DIRTY_RING_FULL: the stopped vCPU's thread reaps every ring (QEMU's kvm_dirty_ring_reap) and
        resumes when that is done; the reset yields mmu_lock."""
        tm = self.host._tm
        g = np.unique(np.asarray(vcpus, np.int64)) + self.vcpus.start
        t = int(tm.clock[g].max())
        self.reap_rings()
        out, lock, after = self.host._sim_settle(self.lvm, split=True)
        np.maximum(tm.clock[g], self._hold(t + out, lock, yields=True) + after, out=tm.clock[g])

    def _hold(self, at, lock, write=True, yields=False, always=False):
        """The VMM's ioctl takes mmu_lock at ``at`` ps for ``lock`` ps (Timing._sim_hold), counted in its own
        figures (``vmm_wait``, ``vmm_hold``); returns when it releases the lock."""
        end, wait = self.host._sim_hold(self.lvm, at, lock, write, yields, always)
        self.vmm_wait += wait
        self.vmm_hold += lock
        return end

    def advance(self, t):
        """The guest runs until ``t`` (ps), throttled: each vCPU sleeps ``throttle`` % of the stretch."""
        if self.throttle:
            s = int(self.host._tm.clock[self.vcpus].min())
            return self.run_until(s + max(0, t - s) * (100 - self.throttle) // 100, sleep_to=t)
        return self.run_until(t)

    def reap_rings(self):
        """kvm_dirty_ring_reap: kick the vCPUs, collect every ring into ``ring_dirty``, KVM_RESET_DIRTY_RINGS."""
        sh, lvm, host = self.shard, self.lvm, self.host
        n = int(sh.slot_pages[lvm])
        host.kick_vcpus(lvm)
        for c in range(int(sh.vcpus[lvm])):
            e = np.asarray(host.harvest_dirty_ring(lvm, c), np.int64).reshape(-1, 2)
            inside = np.isin(e[:, 0], sh.slot_ids) & (e[:, 1] >= 0) & (e[:, 1] < n)
            flat = (e[inside, 0] - sh.slot) * n + e[inside, 1]
            self.ring_dirty[flat] = True
            self.unsynced[flat] = False
        host.reset_dirty_rings(lvm)

    def ioctl(self, t, fn, write=True, yields=False, always=False):
        """One VMM ioctl at ``t`` ps while the guest runs: the guest first runs up to ``t``, then ``fn()`` does
        the work; the ioctl asks for mmu_lock once its work before the lock is done (the guest runs up to then
        too), holds it for its work under it, and flushes remote TLBs after.  Returns (fn's result, its end)."""
        self.advance(t)
        r = fn()
        out, lock, after = self.host._sim_settle(self.lvm, split=True)
        self.advance(t + out)
        return r, self._hold(t + out, lock, write, yields, always) + after

    def sync(self, chunk_pages=0, at=None):
        """migration_bitmap_sync: the pages dirtied since the last sync (GET, CLEAR in chunks, or the rings).
        Without ``at`` the guest is stopped: returns (pages, the VMM thread's time in ps).  With ``at`` (ps) the
        ioctls run from then on while the guest runs (``ioctl``): returns (pages, when the sync ended)."""
        sh, lvm, host = self.shard, self.lvm, self.host
        n = int(sh.slot_pages[lvm])
        dirty = np.zeros(self.written.size, bool)
        t = 0 if at is None else int(at)
        manual = bool(sh.spec.get("manual_protect"))

        def call(fn, yields=False, always=False):
            nonlocal t
            if at is None:   # the vCPUs are stopped: the ioctl's time, and its lock use in the figures
                r = fn()
                out, lock, after = host._sim_settle(lvm, split=True)
                self._hold(self.now() + t + out, lock, yields=True, always=always)
                t += out + lock + after
                return r
            r, t = self.ioctl(t, fn, yields=yields, always=always)
            return r

        if sh.spec.get("dirty_ring"):
            call(self.reap_rings, yields=True)   # kvm_dirty_ring_reset takes mmu_lock per 64-gfn mask: short holds
            dirty |= self.ring_dirty
            self.ring_dirty[:] = False
        else:
            for si, slot in enumerate(sh.slot_ids):   # GET write-protects under mmu_lock unless manual protect
                words = np.asarray(call(lambda s=slot: host.get_dirty_log(lvm, s), always=not manual), np.uint64)
                bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(bool)
                dirty[si * n:(si + 1) * n] = bits
                if not manual:
                    self.unsynced[si * n:(si + 1) * n] &= ~bits
                    continue
                step = chunk_pages or n
                for p0 in range(0, n, step):
                    cnt = min(step, n - p0)
                    w = words[p0 // 64:(p0 + cnt + 63) // 64]
                    call(lambda s=slot, p=p0, c=cnt, w=w: host.clear_dirty_log(lvm, s, p, c, w), always=True)
                    self.unsynced[si * n + p0:si * n + p0 + cnt] &= ~bits[p0:p0 + cnt]   # sent after its CLEAR
        if at is not None:   # the faults the sync's last hold kept waiting finish inside this iteration
            self.advance(t)
        return dirty, t

    def pause(self, ps):
        """The VM's thread works ``ps`` (an ioctl) with the vCPUs out of the guest: their clocks move past it."""
        tm = self.host._tm
        np.maximum(tm.clock[self.vcpus], self.now() + ps, out=tm.clock[self.vcpus])


def _dirty_rate(shard, g, ph):
    """One window of ``seconds``: the exact rate from the dirty log, and QEMU's page-sampling estimate
    (``sample_pages_per_gib`` random pages, compared before and after: a page written with the value it already
    held does not count, and memstress always writes the same value).  The log also holds pages a read faulted
    in: KVM maps them writable and marks them dirty (make_spte); ``pages_written`` counts the written ones."""
    window = int(round(float(ph.get("seconds", DEFAULTS["seconds"])) * PS))
    lvm = g.lvm
    g.pause(g.sync()[1])   # enabling logging and a first sync: the window starts from a clean log
    t0 = g.now()
    pages = g.written.size
    rng = np.random.default_rng([int(shard.seed), int(shard.gids[lvm]), 0x0D1])
    nsample = max(1, min(pages, int(round(pages * PAGE / (1 << 30) * float(ph.get("sample_pages_per_gib", 512))))))
    sample = rng.choice(pages, nsample, replace=False)
    held = shard.ever_written[lvm][sample].copy()   # the sampled pages already hold memstress's value
    wrote = g.run_until(t0 + window)
    shard.ever_written[lvm] |= wrote
    dirty, ps = g.sync()
    secs = (g.now() - t0) / PS
    g.pause(ps)
    changed = int((wrote[sample] & ~held).sum())
    mib = PAGE / (1 << 20)
    return {"vm": int(shard.gids[lvm]), "window_seconds": secs, "dirty_pages": int(dirty.sum()),
            "pages_per_second": dirty.sum() / secs, "mib_per_second": dirty.sum() * mib / secs,
            "writes_per_second": g.writes / secs, "pages_written": int(wrote.sum()),
            "sampled_pages": nsample, "sampled_changed": changed,
            "sampled_mib_per_second": changed / nsample * pages * mib / secs}


def _migrate(shard, g, ph):
    """Precopy: send every page, then the pages dirtied meanwhile, until the rest fits ``max_downtime`` at
    ``bandwidth`` (or ``max_iterations``); then stop the guest and send the rest.  Auto-converge throttles the
    vCPUs from iteration ``throttle_after``: ``throttle_initial`` %, ``throttle_step`` % more each iteration."""
    bw = parse_size(ph.get("bandwidth", DEFAULTS["bandwidth"]), "phase.bandwidth")
    max_down = float(ph.get("max_downtime", DEFAULTS["max_downtime"]))
    max_it = int(ph.get("max_iterations", DEFAULTS["max_iterations"]))
    auto = bool(ph.get("auto_converge", DEFAULTS["auto_converge"]))
    chunk = parse_size(ph.get("clear_chunk", 0), "phase.clear_chunk") // PAGE
    host, lvm = g.host, g.lvm
    send = lambda npages: int(npages) * PAGE * PS // bw  # noqa: E731
    start = g.now()
    tv = host._tm.vm[lvm]
    # enabling dirty logging (KVM_SET_USER_MEMORY_REGION): write-protection or eager splitting, which yield
    # mmu_lock to waiting vCPUs (read lock under the TDP MMU, write lock otherwise); then a clean log: the first
    # iteration sends everything
    _, t = g.ioctl(start, lambda: None, write=host._sim_writer(lvm), yields=True)
    _, t = g.sync(chunk, at=t)
    pending = g.written.size
    throttle, sent, its = 0, 0, []
    st0 = host.vt.stats[lvm].copy()
    while True:
        s0 = host.vt.stats[lvm].copy()
        w0, vw0, vh0 = int(tv[TL.TV_WAIT]), g.vmm_wait, g.vmm_hold
        end = t + send(pending)
        g.throttle = throttle
        g.advance(end)
        sent += pending * PAGE
        dirty, t = g.sync(chunk, at=end)
        d = host.vt.stats[lvm] - s0
        its.append({"pages_sent": int(pending), "dirty_pages": int(dirty.sum()), "send_seconds": send(pending) / PS,
                    "sync_seconds": (t - end) / PS, "throttle_percent": throttle,
                    "wrprot_faults": int(d[S.ST_PF_TAKEN] - d[S.ST_PF_RETRY]),
                    "sync_mmu_lock_seconds": (g.vmm_hold - vh0) / PS,
                    "vcpu_mmu_lock_wait_seconds": (int(tv[TL.TV_WAIT]) - w0 - (g.vmm_wait - vw0)) / PS})
        pending = int(dirty.sum())
        if send(pending) <= max_down * PS or len(its) >= max_it:
            break
        if auto and len(its) >= int(ph.get("throttle_after", 2)):
            throttle = int(ph.get("throttle_initial", 20)) if not throttle else \
                min(int(ph.get("throttle_max", 99)), throttle + int(ph.get("throttle_step", 10)))
    converged = send(pending) <= max_down * PS
    # migration_completion: stop the vCPUs, a last sync (what they dirtied since the last one), send the rest
    np.maximum(host._tm.clock[g.vcpus], t, out=host._tm.clock[g.vcpus])
    g.throttle = 0
    last, ps = g.sync(chunk)
    rest = int((dirty | last).sum())
    down = ps + send(rest)
    sent += rest * PAGE
    stop = t + down
    np.maximum(host._tm.clock[g.vcpus], stop, out=host._tm.clock[g.vcpus])   # paused, then resumed at the target
    d = host.vt.stats[lvm] - st0
    return {"vm": int(shard.gids[lvm]), "converged": converged, "iterations": len(its),
            "bytes_sent": int(sent), "downtime_seconds": down / PS, "total_seconds": (stop - start) / PS,
            "throttle_percent": throttle, "wrprot_faults": int(d[S.ST_PF_TAKEN] - d[S.ST_PF_RETRY]),
            "final_sync_pages": int(last.sum()), "pages_written": int(g.written.sum()),
            "lost_writes": int(g.unsynced.sum()), "per_iteration": its}


def report_lines(rec):
    out = []
    for m in rec.get("migration", []):
        out.append(f"    VM {m['vm']}: {'converged' if m['converged'] else 'NOT converged'} after {m['iterations']} "
                   f"iterations, {m['bytes_sent'] / (1 << 20):,.1f} MiB sent, downtime "
                   f"{m['downtime_seconds'] * 1e3:.3f} ms, total {m['total_seconds']:.6f} s (simulated), throttle "
                   f"{m['throttle_percent']} %, vCPUs waited "
                   f"{sum(i['vcpu_mmu_lock_wait_seconds'] for i in m['per_iteration']) * 1e6:,.1f} us for mmu_lock")
    for r in rec.get("dirty_rate", []):
        out.append(f"    VM {r['vm']}: dirty rate {r['mib_per_second']:,.1f} MiB/s ({r['pages_per_second']:,.0f} "
                   f"pages/s) from the log; QEMU page sampling ({r['sampled_pages']} pages): "
                   f"{r['sampled_mib_per_second']:,.1f} MiB/s")
    return out
