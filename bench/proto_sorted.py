"""Prototype for the benchmark: run a batch grouped by VM, then put the results back in order.

Finding behind it: on 1,024 VMs the cost of an event depends mostly on whether the VM changes
from one event to the next (first touch of 1024 VMs x 4 MiB, one bench run: 62 ns/fault
VM-major, 195 ns when the same sequential pages come round-robin over the VMs, 313 ns fully
random; 1 VM: 60-126 ns).  Each VM switch reloads the VM's scattered state: a dozen
struct-of-arrays fields of the VM and of its memslot record, its stats row, its private
upper-level tables.

``Host.access`` only promises order *within* each VM, so a batch may run grouped by VM.
``VMSortedHost`` does a stable counting sort of the events by VM (a numba kernel, O(n)), runs
the real ``Host.access`` on the sorted batch and scatters the results back.  Per-VM event order,
outcomes and per-VM statistics are unchanged; what changes is the host-wide order in which
VMs take memory from the shared budget (which VM sees ``HostMemoryExhausted`` first) and which
arena rows tables get.  ``bench_tdp.py`` checks outcomes and stats against the plain Host before
it reports a timing.
"""

import numpy as np
from numba import njit

from batchmmu.host import AccessResult, Host


@njit(cache=True)
def group_by_vm(vm, nvm):
    """Stable counting sort: the permutation that groups events by VM, keeping their order per VM."""
    counts = np.zeros(nvm + 1, np.int64)
    for i in range(vm.shape[0]):
        counts[vm[i] + 1] += 1
    for v in range(nvm):
        counts[v + 1] += counts[v]
    perm = np.empty(vm.shape[0], np.int64)
    for i in range(vm.shape[0]):
        v = vm[i]
        perm[counts[v]] = i
        counts[v] += 1
    return perm


@njit(cache=True)
def _take3(perm, a, b, c):
    n = perm.shape[0]
    ra, rb, rc = np.empty(n, a.dtype), np.empty(n, b.dtype), np.empty(n, c.dtype)
    for k in range(n):
        i = perm[k]
        ra[k], rb[k], rc[k] = a[i], b[i], c[i]
    return ra, rb, rc


@njit(cache=True)
def _scatter2(perm, x, y):
    rx, ry = np.empty_like(x), np.empty_like(y)
    for k in range(perm.shape[0]):
        rx[perm[k]] = x[k]
        ry[perm[k]] = y[k]
    return rx, ry


class VMSortedHost(Host):
    """A ``batchmmu.Host`` whose ``access`` runs each batch grouped by VM (same per-VM semantics)."""

    def access(self, vm, vcpu, addr, kind=0):
        vm_a, addr_a, kind_a = self._events(vm, vcpu, addr, kind)
        if vm_a.size < 2:
            return self._run_accesses(vm_a, addr_a, kind_a)
        perm = group_by_vm(vm_a, self.nvm)
        res = self._run_accesses(*_take3(perm, vm_a, addr_a, kind_a))
        return AccessResult(*_scatter2(perm, res.outcome, res.error_code))
