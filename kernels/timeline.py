"""Simulated time (the optional time model, batchmmu/timemodel.py): per-vCPU clocks, a discrete-event
scheduler over a batch and KVM's per-VM locks.  Not a KVM file: KVM runs vCPUs on real CPUs; here each
vCPU's clock advances by the cost of what its events made KVM do, and vCPUs of a VM interleave by it.

The wrappers run one event at a time through the unchanged batch kernels (fault.access_batch,
batch.shadow_event_batch, tdp2d.tdp2d_batch, nested.l2_batch): the scheduler picks the vCPU with the
earliest clock (ties: lower vCPU), runs its next event in program order, and charges the event from the
change it made to the VM's statistics row: ``cost[kind, part, stat]`` picoseconds per unit, part
PART_VCPU (the vCPU alone: exit, walk, host fault-in), PART_MM (the host's serialized share of a host
fault: the mm's lock and LRU) and PART_LOCK (work under ``mmu_lock``).  ``mmu_lock`` is a fair
(queued) rwlock: TDP-MMU faults take it for read, every other MMU's for write.  All time is int64
picoseconds, so sums over shards are exact and every worker count gives the same figures.
"""

from typing import NamedTuple

import numpy as np
from numba import njit

from .batch import shadow_event_batch
from .fault import access_batch
from .jit import helper, kernel
from .mmu_internal import EV_ADDR, EV_OP, EV_VM, NEVF, NRESF, OP_ACCESS, RES_OUTCOME
from .nested import l2_batch
from .state import (
    MMU_TDP,
    NSTAT,
    OUT_RING_FULL,
    ST_PF_FAST,
    ST_PF_FIXED,
    ST_PF_RETRY,
    ST_PF_SPURIOUS,
    ST_PF_TAKEN,
    ST_REMOTE_TLB_FLUSH,
    STOP_DONE,
    VM_MMU,
)
from .tdp2d import tdp2d_batch

# cost parts
PART_VCPU = 0
PART_MM = 1
PART_LOCK = 2
NPART = 3
# cost kinds (the MMU that handles a VM's faults)
KIND_TDP_MMU = 0     # read_lock(mmu_lock)
KIND_SHADOW = 1      # write_lock(mmu_lock): the shadow MMU, the legacy TDP MMU, nested (guest_mmu)
NKIND = 2
# base costs per event, per kind
BASE_EVENT = 0       # the guest's own work per access (loop body, TLB-hit path)
BASE_READ_WORD = 1   # read_lock + read_unlock of mmu_lock: the lock word's cacheline, one holder at a time
NBASE = 2

# per-VM time record (TimeState.vm columns)
TV_KIND = 0          # KIND_*
TV_FLUSH = 1         # ps of one remote TLB flush of this VM (IPIs to its other vCPUs), under the lock
TV_W_FREE = 2        # mmu_lock: when the last writer releases it
TV_R_FREE = 3        # mmu_lock: when the last reader releases it
TV_MM_FREE = 4       # the mm's serialized host-fault section: when it is free
TV_RD_ACQ = 5        # mmu_lock acquisitions for read
TV_WR_ACQ = 6        # ... for write
TV_HOLD = 7          # ps held (sum over acquisitions)
TV_WAIT = 8          # ps waited
TV_CONTENDED = 9     # acquisitions that waited
TV_MM_ACQ = 10
TV_MM_HOLD = 11
TV_MM_WAIT = 12
TV_MM_CONTENDED = 13
TV_FAULTS = 14       # events that exited (pf_taken rose)
TV_WORD_FREE = 15    # mmu_lock's word (its cacheline): when the last reader's atomic on it is done
NTV = 16

NBINS = 512          # fault-latency histogram: bin b holds latencies in [2^(b/8), 2^((b+1)/8)) ps
CTL_HEAP = 0         # scheduler control: vCPUs on the heap
CTL_DEADLINE = 1     # stop the batch when the earliest vCPU reaches this time (ps; -1: run it all)
NTCTL = 2
STOP_DEADLINE = 3    # a batch stopped at CTL_DEADLINE: the events not marked ``ran`` are still to run

# Faults in flight: a fault that maps a page finishes at its lock release; another vCPU reaching the same page
# (the event's address page) before that faults too and finds the page being mapped.  A direct-mapped table of
# page -> finish time per VM (a VM's figures never depend on the other VMs of its Host).
NRACE = 256


class TimeState(NamedTuple):
    """The time model's arrays (batchmmu/timemodel.py owns and grows them)."""
    cost: np.ndarray     # int64[NKIND, NPART, NSTAT] ps per unit of a statistic's change
    base: np.ndarray     # int64[NKIND, NBASE]
    clock: np.ndarray    # int64[vCPUs] ps
    vm: np.ndarray       # int64[VMs, NTV]
    charged: np.ndarray  # int64[VMs, NSTAT]: statistics' change the events were charged for
    hist: np.ndarray     # int64[NBINS + 1]: fault latencies; [NBINS] = the largest
    heap: np.ndarray     # int64[vCPUs]: scheduler heap of global vCPU ids, by (clock, id)
    head: np.ndarray     # int64[vCPUs]: each vCPU's next event in the batch (-1: none)
    ctl: np.ndarray      # int64[NTCTL]
    before: np.ndarray   # int64[NSTAT]: the running VM's statistics before the event
    race_key: np.ndarray  # int64[VMs, NRACE]: the page of a fault in flight (-1: none)
    race_end: np.ndarray  # int64[VMs, NRACE]: when it finishes (ps)
    ev1: np.ndarray      # int64[1, NEVF]: one event for the batch kernels
    res1: np.ndarray     # int64[1, NRESF]
    vm1: np.ndarray      # int64[1]: one TDP access: its VM, vCPU, gpa, kind
    vcpu1: np.ndarray
    addr1: np.ndarray
    kind1: np.ndarray
    out1: np.ndarray     # int8[1]
    err1: np.ndarray     # int64[1]


@njit(inline="always", _nrt=False)
def _earlier(clock, a, b):
    return clock[a] < clock[b] or (clock[a] == clock[b] and a < b)


@helper
def _sift_down(heap, n, clock, j):
    while True:
        c = 2 * j + 1
        if c >= n:
            return
        if c + 1 < n and _earlier(clock, heap[c + 1], heap[c]):
            c += 1
        if not _earlier(clock, heap[c], heap[j]):
            return
        heap[j], heap[c] = heap[c], heap[j]
        j = c


@kernel
def sched_build(ev_vm, ev_vcpu, vcpu_off, clock, head, nxt, heap, ctl):
    """Program order per vCPU (``nxt[i]``: the vCPU's event after i; ``head[g]``: its first) and the heap of
    vCPUs with events, by clock.  ``head`` must be -1 for every vCPU on entry; the run leaves it so."""
    n = ev_vm.shape[0]
    for i in range(n - 1, -1, -1):
        g = vcpu_off[ev_vm[i]] + ev_vcpu[i]
        nxt[i] = head[g]
        head[g] = i
    k = 0
    for i in range(n):
        g = vcpu_off[ev_vm[i]] + ev_vcpu[i]
        if head[g] == i:
            heap[k] = g
            k += 1
    ctl[CTL_HEAP] = k
    for j in range(k // 2 - 1, -1, -1):
        _sift_down(heap, k, clock, j)


@njit(inline="always", _nrt=False)
def _held(rec, t, granted, hold, acq, held, waited, contended):
    """A lock asked for at ``t`` and granted at ``granted``, held ``hold``: its counters in the VM's time record
    ``rec``; returns when it is released."""
    rec[acq] += 1
    rec[held] += hold
    if granted > t:
        rec[waited] += granted - t
        rec[contended] += 1
    return granted + hold


@helper
def _charge(tm, stats, vm, g, floor):
    """Advance vCPU ``g``'s clock by the event just run (its change to ``stats[vm]``) through KVM's locks, to
    ``floor`` at least."""
    tv = tm.vm
    kd = tv[vm, TV_KIND]
    cost = tm.cost
    own = tm.base[kd, BASE_EVENT]
    mm = np.int64(0)
    lk = np.int64(0)
    for k in range(NSTAT):
        d = stats[vm, k] - tm.before[k]
        if d != 0:
            tm.charged[vm, k] += d
            if d < 0:
                d = -d   # a gauge that fell (pages zapped): the work is the change
            own += d * cost[kd, PART_VCPU, k]
            mm += d * cost[kd, PART_MM, k]
            lk += d * cost[kd, PART_LOCK, k]
    flushes = stats[vm, ST_REMOTE_TLB_FLUSH] - tm.before[ST_REMOTE_TLB_FLUSH]
    if flushes > 0:
        lk += flushes * tv[vm, TV_FLUSH]   # kvm_flush_remote_tlbs: IPIs to the VM's running vCPUs
    t0 = tm.clock[g]
    t = t0 + own
    if mm > 0:   # the host fault's serialized share (mmap_lock cacheline, LRU and zone locks)
        t = _held(tv[vm], t, max(t, tv[vm, TV_MM_FREE]), mm, TV_MM_ACQ, TV_MM_HOLD, TV_MM_WAIT, TV_MM_CONTENDED)
        tv[vm, TV_MM_FREE] = t
    if lk > 0:
        if kd == KIND_TDP_MMU:   # read_lock: waits for writers queued before it only
            # the atomics of read_lock / read_unlock on the lock word: its cacheline serves one reader at a time,
            # so with many readers they queue for it (counted as waiting for the lock)
            word = tm.base[kd, BASE_READ_WORD]
            w = max(t, tv[vm, TV_WORD_FREE]) if word > 0 else t
            tv[vm, TV_WORD_FREE] = w + word
            granted = max(w + word, tv[vm, TV_W_FREE])
            # waited: for the word (w - t) and then for the writers (granted - w - word)
            t = _held(tv[vm], t, granted - word, lk, TV_RD_ACQ, TV_HOLD, TV_WAIT, TV_CONTENDED) + word
            tv[vm, TV_R_FREE] = max(tv[vm, TV_R_FREE], t)
        else:                    # write_lock: waits for every holder queued before it
            t = _held(tv[vm], t, max(t, tv[vm, TV_W_FREE], tv[vm, TV_R_FREE]), lk, TV_WR_ACQ, TV_HOLD, TV_WAIT,
                      TV_CONTENDED)
            tv[vm, TV_W_FREE] = t
    t = max(t, floor)
    tm.clock[g] = t
    if stats[vm, ST_PF_TAKEN] > tm.before[ST_PF_TAKEN]:
        tv[vm, TV_FAULTS] += 1
        lat = t - t0
        b = int(8.0 * np.log2(float(lat))) if lat > 1 else 0
        tm.hist[min(b, NBINS - 1)] += 1
        tm.hist[NBINS] = max(tm.hist[NBINS], lat)


@njit(inline="always", _nrt=False)
def _race_slot(addr):
    page = addr >> 12
    return page, (page ^ (page >> 8) ^ (page >> 16)) & (NRACE - 1)


@helper
def _raced(tm, stats, vm, g, addr):
    """Whether vCPU ``g``'s access to ``addr`` meets a fault of another vCPU still mapping that page.  Then it
    exits too, waits for that fault (on the page being faulted in, or on mmu_lock) and then, under the TDP MMU,
    loses the cmpxchg (RET_PF_RETRY, ``pf_retry``) or, under write_lock(mmu_lock), finds the SPTE present
    (RET_PF_SPURIOUS, ``pf_spurious``).  The vCPU is charged and runs the access again when the fault is done."""
    key, h = _race_slot(addr)
    end = tm.race_end[vm, h]
    if tm.race_key[vm, h] != key or end <= tm.clock[g]:
        return False
    for k in range(NSTAT):
        tm.before[k] = stats[vm, k]
    stats[vm, ST_PF_TAKEN] += 1
    if tm.vm[vm, TV_KIND] == KIND_TDP_MMU:
        stats[vm, ST_PF_RETRY] += 1
    else:
        stats[vm, ST_PF_SPURIOUS] += 1
    # it met the other fault (the page being faulted in, or mmu_lock held): it resumes when that one is done
    _charge(tm, stats, vm, g, end)
    _sift_down(tm.heap, tm.ctl[CTL_HEAP], tm.clock, 0)
    return True


@helper
def _next(tm, nxt, stats, vm, g, i, addr):
    """After event ``i`` of vCPU ``g``: its next event, and the heap reordered by its new clock."""
    fixed = stats[vm, ST_PF_FIXED] - tm.before[ST_PF_FIXED] - (stats[vm, ST_PF_FAST] - tm.before[ST_PF_FAST])
    _charge(tm, stats, vm, g, 0)
    if fixed > 0 and addr >= 0:   # it mapped the page: in flight until now
        key, h = _race_slot(addr)
        tm.race_key[vm, h] = key
        tm.race_end[vm, h] = tm.clock[g]
    _advance(tm, nxt, g, i)


@helper
def _ring_full(tm, stats, nxt, vm, g, i):
    """KVM_EXIT_DIRTY_RING_FULL at event ``i``: the vCPU exits once and stops; its events from ``i`` on (the
    caller marks them OUT_RING_FULL first) wait for the VMM, not run."""
    _charge(tm, stats, vm, g, 0)
    nxt[i] = -1
    _advance(tm, nxt, g, i)


@helper
def _advance(tm, nxt, g, i):
    """vCPU ``g`` is past event ``i``: its next event, the heap reordered by its clock (or without it)."""
    tm.head[g] = nxt[i]
    n = tm.ctl[CTL_HEAP]
    if nxt[i] < 0:
        n -= 1
        tm.heap[0] = tm.heap[n]
        tm.ctl[CTL_HEAP] = n
    _sift_down(tm.heap, n, tm.clock, 0)


@njit(inline="always", _nrt=False)
def _before(tm, stats, vm):
    for k in range(NSTAT):
        tm.before[k] = stats[vm, k]


@kernel
def timed_access_batch(pa, vt, st, ct, sh, host, ev_vm, ev_vcpu, ev_addr, ev_kind, out, err, tm, nxt, ran):
    """fault.access_batch in simulated-time order (sched_build first).  Returns (pending event, STOP_*):
    on a stop the pending event has not run and is run again on the next call."""
    while tm.ctl[CTL_HEAP] > 0:
        g = tm.heap[0]
        i = tm.head[g]
        if tm.ctl[CTL_DEADLINE] >= 0 and tm.clock[g] >= tm.ctl[CTL_DEADLINE]:
            return i, STOP_DEADLINE
        vm = ev_vm[i]
        if _raced(tm, vt.stats, vm, g, ev_addr[i]):
            continue
        _before(tm, vt.stats, vm)
        tm.vm1[0], tm.vcpu1[0], tm.addr1[0], tm.kind1[0] = vm, ev_vcpu[i], ev_addr[i], ev_kind[i]
        _, stop = access_batch(pa, vt, st, ct, sh, host, tm.vm1, tm.vcpu1, tm.addr1, tm.kind1, 0, tm.out1, tm.err1)
        if stop != STOP_DONE:
            return i, stop
        if tm.out1[0] == OUT_RING_FULL:
            j = i
            while j >= 0:
                out[j] = OUT_RING_FULL
                j = nxt[j]
            _ring_full(tm, vt.stats, nxt, vm, g, i)
            continue
        out[i] = tm.out1[0]
        err[i] = tm.err1[0]
        ran[i] = 1
        _next(tm, nxt, vt.stats, vm, g, i, ev_addr[i])
    return ev_vm.shape[0], STOP_DONE


@njit(inline="always", _nrt=False)
def _timed_records(batch, m, ev, res, tm, nxt, ran):
    stats = m.vt.stats
    while tm.ctl[CTL_HEAP] > 0:
        g = tm.heap[0]
        i = tm.head[g]
        if tm.ctl[CTL_DEADLINE] >= 0 and tm.clock[g] >= tm.ctl[CTL_DEADLINE]:
            return i, STOP_DEADLINE
        vm = ev[i, EV_VM]
        if ev[i, EV_OP] == OP_ACCESS and _raced(tm, stats, vm, g, ev[i, EV_ADDR]):
            continue
        _before(tm, stats, vm)
        for c in range(NEVF):
            tm.ev1[0, c] = ev[i, c]
        for c in range(NRESF):
            tm.res1[0, c] = res[i, c]
        _, stop = batch(m, tm.ev1, 0, tm.res1)
        if stop != STOP_DONE:
            return i, stop
        if tm.res1[0, RES_OUTCOME] == OUT_RING_FULL:
            j = i
            while j >= 0:
                res[j, RES_OUTCOME] = OUT_RING_FULL
                j = nxt[j]
            _ring_full(tm, stats, nxt, vm, g, i)
            continue
        for c in range(NRESF):
            res[i, c] = tm.res1[0, c]
        ran[i] = 1
        _next(tm, nxt, stats, vm, g, i, ev[i, EV_ADDR] if ev[i, EV_OP] == OP_ACCESS else -1)
    return ev.shape[0], STOP_DONE


@kernel
def timed_shadow_batch(m, ev, res, tm, nxt, ran):
    """batch.shadow_event_batch in simulated-time order (see timed_access_batch)."""
    return _timed_records(shadow_event_batch, m, ev, res, tm, nxt, ran)


@kernel
def timed_tdp2d_batch(m, ev, res, tm, nxt, ran):
    """tdp2d.tdp2d_batch in simulated-time order (see timed_access_batch)."""
    return _timed_records(tdp2d_batch, m, ev, res, tm, nxt, ran)


@kernel
def timed_l2_batch(m, ev, res, tm, nxt, ran):
    """nested.l2_batch in simulated-time order (see timed_access_batch).  An L2's faults are guest_mmu's, the
    shadow MMU's code under write_lock(mmu_lock), also on a VM whose L1 runs on the TDP MMU: their VMs are
    charged as KIND_SHADOW for the batch."""
    for i in range(ev.shape[0]):
        tm.vm[ev[i, EV_VM], TV_KIND] = KIND_SHADOW
    out = _timed_records(l2_batch, m, ev, res, tm, nxt, ran)
    for i in range(ev.shape[0]):
        vm = ev[i, EV_VM]
        tm.vm[vm, TV_KIND] = KIND_TDP_MMU if m.vt.rec[vm, VM_MMU] == MMU_TDP else KIND_SHADOW
    return out

