"""Event batches: validation in one pass (the API must never hand a kernel bad input), the event record."""

from numba import njit

from .jit import kernel
from .mmu_internal import EV_ADDR, EV_KIND, EV_OP, EV_SIZE, EV_VALUE, EV_VCPU, EV_VM

EV_OK = 0
EV_BAD_VM = 1
EV_BAD_VCPU = 2
EV_BAD_ADDR = 3
EV_BAD_KIND = 4


@kernel
def validate_events(ev_vm, ev_vcpu, ev_addr, ev_kind, nvm, vcpus, maxphyaddr, kind_mask, excl_a, excl_b):
    """Return (index, EV_*) of the first bad event, or (-1, EV_OK)."""
    for i in range(ev_vm.shape[0]):
        vm = ev_vm[i]
        if vm < 0 or vm >= nvm:
            return i, EV_BAD_VM
        c = ev_vcpu[i]
        if c < 0 or c >= vcpus[vm]:
            return i, EV_BAD_VCPU
        a = ev_addr[i]
        if a < 0 or (a >> maxphyaddr[vm]) != 0:
            return i, EV_BAD_ADDR
        k = ev_kind[i]
        if (k & ~kind_mask) != 0 or ((k & excl_a) != 0 and (k & excl_b) != 0):
            return i, EV_BAD_KIND
    return -1, EV_OK


@njit(inline="always", _nrt=False)
def _vm_starts(vms, nvm, counts):
    """The counting sort's first pass: ``counts[v]`` = where VM v's events start in the grouped batch."""
    for v in range(nvm + 1):
        counts[v] = 0
    for i in range(vms.shape[0]):
        counts[vms[i] + 1] += 1
    for v in range(nvm):
        counts[v + 1] += counts[v]


@kernel
def group_by_vm(ev_vm, ev_vcpu, ev_addr, ev_kind, nvm, counts, g_vm, g_vcpu, g_addr, g_kind, orig):
    """Stable counting sort of a batch by VM into the g_* arrays; ``orig[j]`` is the input index of
    grouped event j.  ``counts`` (int64[nvm + 1]) is scratch."""
    _vm_starts(ev_vm, nvm, counts)
    for i in range(ev_vm.shape[0]):
        v = ev_vm[i]
        j = counts[v]
        counts[v] = j + 1
        g_vm[j] = v
        g_vcpu[j] = ev_vcpu[i]
        g_addr[j] = ev_addr[i]
        g_kind[j] = ev_kind[i]
        orig[j] = i


@kernel
def group_records_by_vm(ev, nvm, counts, g_ev, orig):
    """group_by_vm for an event record (int64[n, NEVF]): the rows, stably sorted by VM, into ``g_ev``."""
    _vm_starts(ev[:, EV_VM], nvm, counts)
    for i in range(ev.shape[0]):
        j = counts[ev[i, EV_VM]]
        counts[ev[i, EV_VM]] = j + 1
        for f in range(ev.shape[1]):
            g_ev[j, f] = ev[i, f]
        orig[j] = i


@njit(inline="always", _nrt=False)
def _at(a, i):
    """a[i], or a[0] for a one-element array (a scalar broadcast over the batch)."""
    return a[0] if a.shape[0] == 1 else a[i]


@kernel
def pack_events(vm, vcpu, addr, kind, value, size, op, ev):
    """Fill the event record ``ev`` (int64[n, NEVF]) from its fields (int64 arrays of n or 1 entries) in one
    pass; every event gets the op ``op``."""
    for i in range(ev.shape[0]):
        ev[i, EV_VM] = _at(vm, i)
        ev[i, EV_VCPU] = _at(vcpu, i)
        ev[i, EV_OP] = op
        ev[i, EV_ADDR] = _at(addr, i)
        ev[i, EV_KIND] = _at(kind, i)
        ev[i, EV_VALUE] = _at(value, i)
        ev[i, EV_SIZE] = _at(size, i)


@kernel
def ungroup_results(orig, out, err, out_c, err_c):
    """Put per-event results back in the caller's order."""
    for j in range(orig.shape[0]):
        out_c[orig[j]] = out[j]
        err_c[orig[j]] = err[j]
