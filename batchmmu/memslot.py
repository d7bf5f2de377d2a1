"""KVM_SET_USER_MEMORY_REGION: validation with KVM's errnos and the memslot update.

Models ``__kvm_set_memory_region`` / ``kvm_set_memslot`` (``virt/kvm/kvm_main.c``),
``kvm_arch_prepare_memory_region`` / ``kvm_alloc_memslot_metadata`` /
``kvm_arch_commit_memory_region`` (``arch/x86/kvm/x86.c``).
"""

import errno

import numpy as np

from . import args as A
from .errors import BatchMMUError, einval
from .kernels import state as S

PAGE_SIZE = 4096
KVM_USER_MEM_SLOTS = 32764          # x86: KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS
KVM_ADDRESS_SPACE_NUM = 2           # x86 with SMM
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
VALID_FLAGS = S.KVM_MEM_LOG_DIRTY_PAGES | S.KVM_MEM_READONLY
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE  # x86-64, 4-level user address space
HVA_BASE = 1 << 40                    # where the simulated VMM maps guest RAM (1 TiB, 1G-aligned)
GEN_STEP = KVM_ADDRESS_SPACE_NUM      # kvm_arch_nr_memslot_as_ids

_HUGE_BYTES = {S.BACKING_HUGETLB_2M: 1 << 21, S.BACKING_HUGETLB_1G: 1 << 30}


def backing_code(name, field="backing"):
    try:
        return S.BACKING_NAMES.index(name)
    except ValueError:
        raise BatchMMUError(f"{field}={name!r}: unknown backing; use one of {', '.join(S.BACKING_NAMES)}",
                            field=field, value=name) from None


def check_backing_alignment(code, hva, size, field="backing"):
    """hugetlbfs mappings need aligned addresses and sizes (mmap fails otherwise)."""
    huge = _HUGE_BYTES.get(code)
    if huge and (hva % huge or size % huge):
        raise BatchMMUError(
            f"{field}={S.BACKING_NAMES[code]!r}: hva {hva:#x} and size {size:#x} must be multiples of "
            f"{huge >> 20} MiB", field=field, value=S.BACKING_NAMES[code], errno=errno.EINVAL)


def seed_lpage_info(lpage, off, base_gfn, npages, hva, level):
    """kvm_alloc_memslot_metadata: disallow huge pages at unaligned edges and everywhere
    if gpa and hva are not congruent modulo the huge page size."""
    from .arena import lpage_entries
    n = lpage_entries(base_gfn, npages, level)
    pages = 1 << (9 * (level - 1))
    lp = lpage[off:off + n]
    lp[:] = 0
    if base_gfn & (pages - 1):
        lp[0] = 1
    if (base_gfn + npages) & (pages - 1):
        lp[n - 1] = 1
    if (base_gfn ^ (hva >> 12)) & (pages - 1):
        lp[:] = 1


def region_args(slot, gpa, size, flags, hva):
    """The ioctl's fields as exact Python ints (any 64-bit value; KVM's checks follow)."""
    out = [A.exact_int(v, name, A.I64_MIN, A.U64_MAX, why="must be a 64-bit integer")
           for name, v in (("slot", slot), ("gpa", gpa), ("size", size), ("flags", flags))]
    out.append(A.opt_int(hva, "hva", A.I64_MIN, A.U64_MAX, why="must be a 64-bit integer or None"))
    return out


def validate_region(host, vm, slot, gpa, size, flags, hva):
    """The checks of __kvm_set_memory_region, in KVM's order, on exact ints (``region_args``).
    Returns (change, rec)."""
    if flags & ~VALID_FLAGS or flags < 0:
        raise einval("flags", flags, "unknown memslot flags (valid: MEM_LOG_DIRTY_PAGES|MEM_READONLY)")
    as_id, sid = slot >> 16, slot & 0xFFFF
    if size % PAGE_SIZE or size < 0:
        raise einval("size", size, "not a multiple of 4096")
    if gpa % PAGE_SIZE or gpa < 0:
        raise einval("gpa", gpa, "not 4 KiB aligned")
    if hva is not None and (hva % PAGE_SIZE or hva < 0 or hva + size > TASK_SIZE_MAX):
        raise einval("hva", hva, "not 4 KiB aligned or outside the user address space")
    if slot < 0 or as_id >= KVM_ADDRESS_SPACE_NUM or sid >= KVM_USER_MEM_SLOTS:
        raise einval("slot", slot, f"slot id must be < {KVM_USER_MEM_SLOTS} in address space 0 or 1")
    if (size >> 12) > KVM_MEM_MAX_NR_PAGES:
        raise einval("size", size, "more than KVM_MEM_MAX_NR_PAGES pages")
    rec = host._slot_rec.get((vm, slot), -1)
    if size == 0:
        if rec < 0:
            raise einval("slot", slot, "deleting a slot that does not exist")
        return "delete", rec
    st = host.st
    base_gfn, npages = gpa >> 12, size >> 12
    if rec < 0:
        change = "create"
    else:
        if hva is not None and hva != st.hva[rec]:
            raise einval("hva", hva, "the hva of an existing slot cannot change")
        if npages != st.npages[rec]:
            raise einval("size", size, "the size of an existing slot cannot change")
        if (flags ^ int(st.flags[rec])) & S.KVM_MEM_READONLY:
            raise einval("flags", flags, "MEM_READONLY of an existing slot cannot change")
        if base_gfn != st.base_gfn[rec]:
            change = "move"
        elif flags != st.flags[rec]:
            change = "flags"
        else:
            return "none", rec
    if change in ("create", "move"):
        if as_id == 0 and _overlaps(host, vm, base_gfn, npages, rec):
            raise BatchMMUError(f"gpa={gpa:#x} size={size:#x}: overlaps another memslot (EEXIST)",
                                field="gpa", value=gpa, errno=errno.EEXIST)
        if as_id == 1 and _overlaps_as(host, vm, as_id, base_gfn, npages, rec):
            raise BatchMMUError(f"gpa={gpa:#x} size={size:#x}: overlaps another memslot (EEXIST)",
                                field="gpa", value=gpa, errno=errno.EEXIST)
        if base_gfn + npages - 1 > host.vt.max_gfn[vm]:
            raise einval("gpa", gpa, "slot ends beyond the VM's MAXPHYADDR")  # kvm_arch_prepare_memory_region
    return change, rec


def _overlaps(host, vm, base_gfn, npages, skip_rec):
    st, vt = host.st, host.vt
    off, cnt = int(vt.slot_off[vm]), int(vt.slot_cnt[vm])
    recs = st.order[off:off + cnt]
    recs = recs[recs != skip_rec]
    if recs.size == 0:
        return False
    b, n = st.base_gfn[recs], st.npages[recs]
    return bool(np.any((b < base_gfn + npages) & (base_gfn < b + n)))


def _overlaps_as(host, vm, as_id, base_gfn, npages, skip_rec):
    for sl, rec in host._slot_rec.of_vm(vm):
        if sl >> 16 == as_id and rec != skip_rec:
            b, n = int(host.st.base_gfn[rec]), int(host.st.npages[rec])
            if b < base_gfn + npages and base_gfn < b + n:
                return True
    return False


class SlotIndex(dict):
    """(vm, slot) -> memslot record, with each VM's slots also kept apart so that a per-VM call
    looks at that VM's slots only (not every slot of every VM)."""

    def __init__(self):
        super().__init__()
        self._by_vm = {}

    def __setitem__(self, key, rec):
        super().__setitem__(key, rec)
        self._by_vm.setdefault(key[0], {})[key[1]] = rec

    def __delitem__(self, key):
        super().__delitem__(key)
        del self._by_vm[key[0]][key[1]]

    def of_vm(self, vm):
        """[(slot, rec)] of one VM, by slot id."""
        d = self._by_vm.get(vm)
        return sorted(d.items()) if d else []
