"""Validation of event batches in one pass (the API must never hand a kernel bad input)."""

from numba import njit

EV_OK = 0
EV_BAD_VM = 1
EV_BAD_VCPU = 2
EV_BAD_ADDR = 3
EV_BAD_KIND = 4


@njit(cache=True, _nrt=False)
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
