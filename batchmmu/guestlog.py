"""The guest OS's work as a log of Host calls (batchmmu/guestos.py): each VM's guest kernel appends its
accesses, stores, INVLPGs, TLB flushes and CR3 loads in order; ``execute`` replays many VMs' logs with one
Host call per kind per round, so the kernels see batches of many VMs.
"""

import numpy as np

from .constants import ACC_WRITE, GUEST_FAULT
from .errors import BatchMMUError


class Log:
    """A VM's guest work in order: chunks of one kind (acc, store, invlpg, flush, cr3)."""

    def __init__(self):
        self.chunks = []

    def add(self, kind, vcpu, gva, value=0):
        gva = np.atleast_1d(np.asarray(gva, np.int64))
        if gva.size == 0 and kind not in ("flush",):
            return
        part = (np.full(max(1, gva.size), vcpu, np.int64), gva if gva.size else np.zeros(1, np.int64),
                np.broadcast_to(np.asarray(value, np.int64), (max(1, gva.size),)))
        if self.chunks and self.chunks[-1][0] == kind and kind in ("acc", "store"):
            self.chunks[-1][1].append(part)
        else:
            self.chunks.append((kind, [part]))


def execute(host, logs, counts=None):
    """Run the logs of many VMs ({vm: Log}): round r runs chunk r of every VM, one Host call per kind
    for stores and accesses.  Returns the number of accesses and stores run."""
    rounds = max((len(lg.chunks) for lg in logs.values()), default=0)
    events = 0
    for r in range(rounds):
        by_kind = {}
        for vm, lg in logs.items():
            if r < len(lg.chunks):
                kind, parts = lg.chunks[r]
                by_kind.setdefault(kind, []).append((vm, parts))
        for kind, items in by_kind.items():
            vm = np.concatenate([np.full(p[1].size, v, np.int64) for v, parts in items for p in parts])
            vc, gva, val = (np.concatenate([p[i] for _, parts in items for p in parts]) for i in range(3))
            if kind in ("acc", "store"):
                res = host.access(vm, vc, gva, val) if kind == "acc" else host.store(vm, vc, gva, val, ACC_WRITE)
                if (res.outcome == GUEST_FAULT).any():
                    j = int(np.flatnonzero(res.outcome == GUEST_FAULT)[0])
                    raise BatchMMUError(f"guest_os: kernel {kind} at {int(gva[j]):#x} of VM {int(vm[j])} faulted "
                                        f"(error code {int(res.error_code[j]):#x})", field="guest_os", value=kind)
                events += vm.size
            else:
                for j in range(vm.size):   # per guest instruction: these are scalar Host calls
                    if kind == "invlpg":
                        host.invlpg(int(vm[j]), int(vc[j]), int(gva[j]))
                    elif kind == "flush":
                        host.flush_tlb(int(vm[j]), int(vc[j]))
                    else:
                        host.mov_cr3(int(vm[j]), int(vc[j]), int(val[j]))
            if counts is not None:
                counts[kind] = counts.get(kind, 0) + vm.size
    return events
