"""Validation of event batches in one pass (the API must never hand a kernel bad input)."""

from .jit import kernel

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


@kernel
def group_by_vm(ev_vm, ev_vcpu, ev_addr, ev_kind, nvm, counts, g_vm, g_vcpu, g_addr, g_kind, orig):
    """Stable counting sort of a batch by VM into the g_* arrays; ``orig[j]`` is the input index of
    grouped event j.  ``counts`` (int64[nvm + 1]) is scratch."""
    n = ev_vm.shape[0]
    for v in range(nvm + 1):
        counts[v] = 0
    for i in range(n):
        counts[ev_vm[i] + 1] += 1
    for v in range(nvm):
        counts[v + 1] += counts[v]
    for i in range(n):
        v = ev_vm[i]
        j = counts[v]
        counts[v] = j + 1
        g_vm[j] = v
        g_vcpu[j] = ev_vcpu[i]
        g_addr[j] = ev_addr[i]
        g_kind[j] = ev_kind[i]
        orig[j] = i


@kernel
def ungroup_results(orig, out, err, out_c, err_c):
    """Put per-event results back in the caller's order."""
    for j in range(orig.shape[0]):
        out_c[orig[j]] = out[j]
        err_c[orig[j]] = err[j]
