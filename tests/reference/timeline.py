"""Reference model of the time model's scheduler (kernels/timeline.py), one event at a time in Python.

A discrete-event loop over an untimed Host: the vCPU with the earliest clock (ties: the lower global vCPU id)
runs its next event (program order); the event's cost is its change to the VM's statistics row times the cost
table, split into the vCPU's own work, the host fault's serialized share and work under mmu_lock, a fair rwlock
(read for TDP-MMU VMs, write otherwise).
"""

import numpy as np
from batchmmu.kernels import state as S
from batchmmu.kernels import timeline as T


def ref_timed_run(host, cm, vm, vcpu, addr, kind, kinds):
    """Run the batch on ``host`` (time model off) in simulated-time order under cost model ``cm``; ``kinds[v]``
    is VM v's T.KIND_*.  Returns (outcomes, clocks {global vCPU: ps}, per-VM lock counters {column: value})."""
    cost, base, flush, per = cm.tables()
    n = len(vm)
    queues = {}
    for i in range(n):
        g = int(host.vt.vcpu_off[vm[i]]) + int(vcpu[i])
        queues.setdefault(g, []).append(i)
    clock = {g: 0 for g in queues}
    lock = {}   # vm -> dict
    race = {}   # (vm, slot of its direct-mapped table) -> (page, finish time)
    out = np.zeros(n, np.int8)
    while any(queues.values()):
        g = min((g for g in queues if queues[g]), key=lambda g: (clock[g], g))
        i = queues[g][0]
        v = int(vm[i])
        kd = kinds[v]
        key = int(addr[i]) >> 12
        slot = (v, (key ^ (key >> 8) ^ (key >> 16)) & (T.NRACE - 1))   # a direct-mapped table per VM
        before = host.vt.stats[v].copy()
        raced = slot in race and race[slot][0] == key and race[slot][1] > clock[g]
        if raced:   # another vCPU's fault is still mapping this page: exit, wait for it, retry / spurious
            host.vt.stats[v, S.ST_PF_TAKEN] += 1
            host.vt.stats[v, S.ST_PF_RETRY if kd == T.KIND_TDP_MMU else S.ST_PF_SPURIOUS] += 1
        else:
            queues[g].pop(0)
            out[i] = host.access(v, int(vcpu[i]), int(addr[i]), int(kind[i])).outcome[0]
        d = host.vt.stats[v] - before
        a = np.abs(d)
        own = int(base[kd, T.BASE_EVENT]) + int((a * cost[kd, T.PART_VCPU]).sum())
        mm = int((a * cost[kd, T.PART_MM]).sum())
        lk = int((a * cost[kd, T.PART_LOCK]).sum())
        if d[S.ST_REMOTE_TLB_FLUSH] > 0:
            lk += int(d[S.ST_REMOTE_TLB_FLUSH]) * (flush + per * (int(host._vcpus[v]) - 1))
        L = lock.setdefault(v, {"w_free": 0, "r_free": 0, "mm_free": 0, "rd": 0, "wr": 0, "hold": 0, "wait": 0,
                                "mm_acq": 0, "mm_wait": 0, "word_free": 0})
        t = clock[g] + own
        if mm > 0:
            at = max(t, L["mm_free"])
            L["mm_acq"] += 1
            L["mm_wait"] += at - t
            t = at + mm
            L["mm_free"] = t
        if lk > 0:
            if kd == T.KIND_TDP_MMU:   # first the lock word's cacheline, one reader at a time
                word = int(base[kd, T.BASE_READ_WORD])
                w = max(t, L["word_free"]) if word > 0 else t
                L["word_free"] = w + word
                at = max(w + word, L["w_free"])
                L["r_free"] = max(L["r_free"], at + lk)
                L["rd"] += 1
                L["wait"] += w - t   # and then for the writers, below
                t = w + word
            else:
                at = max(t, L["w_free"], L["r_free"])
                L["w_free"] = at + lk
                L["wr"] += 1
            L["hold"] += lk
            L["wait"] += at - t
            t = at + lk
        if raced:   # it waited for the fault in flight
            t = max(t, race[slot][1])
        elif d[S.ST_PF_FIXED] - d[S.ST_PF_FAST] > 0:
            race[slot] = (key, t)
        clock[g] = t
    return out, clock, lock
