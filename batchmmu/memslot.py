"""KVM_SET_USER_MEMORY_REGION: validation with KVM's errnos and the memslot update.

Models ``__kvm_set_memory_region`` / ``kvm_set_memslot`` (``virt/kvm/kvm_main.c``),
``kvm_arch_prepare_memory_region`` / ``kvm_alloc_memslot_metadata`` /
``kvm_arch_commit_memory_region`` (``arch/x86/kvm/x86.c``).
"""

import errno

import numpy as np

from . import args as A
from . import reclaim as _reclaim
from .arena import lpage_entries, slot_bytes
from .errors import BatchMMUError, InvalidationInProgress, bad, einval
from .kernels import shadow as SK
from .kernels import state as S
from .kernels.dirty import tdp_clear_dirty_gfn_range
from .kernels.spte import MMIO_SPTE_GEN_MASK
from .kernels.tdp import (
    tdp_mmu_zap_all,
    tdp_recover_huge_pages,
    tdp_wrprot_gfn_range,
)
from .units import format_size, parse_size

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


class Memslots:
    """Mixin of ``batchmmu.host.Host``: KVM_SET_USER_MEMORY_REGION and the slot records, per-VM slot
    lists (sorted by gfn) and memslot generations behind it."""

    def set_memslot(self, vm, slot, gpa, size, flags=0, hva=None, backing=None):
        """KVM_SET_USER_MEMORY_REGION: create, delete (size 0), move, or change flags of a slot.

        Errors are raised where KVM fails the ioctl, with KVM's errno in ``err.errno``;
        nothing changes then.  A call that changes nothing succeeds.
        """
        vm = self._check_vm(vm)
        size = parse_size(size, "size") if isinstance(size, str) else size
        slot, gpa, size, flags, hva = region_args(slot, gpa, size, flags, hva)
        bcode = None if backing is None else backing_code(backing)
        change, rec = validate_region(self, vm, slot, gpa, size, flags, hva)
        if change != "none" and int(self.vt.inval_count[vm]) > 0:
            # kvm_swap_active_memslots waits for mn_active_invalidate_count == 0 (docs/guarantees.md)
            raise InvalidationInProgress(
                f"vm={vm}: memslot change ({change}) while {int(self.vt.inval_count[vm])} MMU-notifier "
                "invalidation(s) are in progress; call invalidate_range_end first", field="vm", value=vm)
        if bcode is not None and change not in ("create", "none"):
            raise bad("backing", backing, "the backing of an existing slot cannot change")
        if change == "create":
            bcode = self.backing if bcode is None else bcode
            if hva is None:
                hva = HVA_BASE + gpa
                if hva + size > TASK_SIZE_MAX:
                    raise einval("gpa", gpa, "no user address space left for a congruent hva")
            check_backing_alignment(bcode, hva, size)
            A.check_alloc(slot_bytes(size >> 12, self._rmaps(vm), self.overcommit is not None),
                          "size", size, f"a memslot of {format_size(size)}")
        self._sync_pml(vm)  # the vCPUs are out of the guest: their PML buffers were flushed
        if change == "none":
            return
        self._sim_charge(vm, "memslot.update", 2 if change in ("delete", "move") else 1)  # invalid copy first
        st = self.st
        as0 = (slot >> 16) == 0
        if change == "create":
            rec = self._new_records(np.array([vm]), slot, gpa >> 12, size >> 12, hva, flags, bcode)
            self._bump_generation(vm, slot >> 16)
            if as0:
                self._set_order(vm, np.append(self._order_list(vm), rec))
            self._update_cpu_dirty_logging(vm)
            self._default_mmu_pages(vm)
            return
        if change in ("delete", "move"):
            # kvm_invalidate_memslot: swap in an invalid copy, then kvm_arch_flush_shadow_memslot
            self._bump_generation(vm, slot >> 16)
            self._zap_all(vm)
            if change == "delete":
                self._release_host_memory(vm, rec)
                del self._slot_rec[(vm, slot)]
                st.vm[rec] = -1
                if as0:
                    lst = self._order_list(vm)
                    self._set_order(vm, lst[lst != rec])
                self._update_cpu_dirty_logging(vm)
                self._bump_generation(vm, slot >> 16)
                self._default_mmu_pages(vm)
                return
            old_flags = int(st.flags[rec])
            st.base_gfn[rec] = gpa >> 12
            for li, level in enumerate((2, 3)):  # kvm_alloc_memslot_metadata for the moved slot
                n = lpage_entries(gpa >> 12, int(st.npages[rec]), level)
                off = self.arena.alloc("lpage", n)
                st = self.st
                st.lpage_off[rec, li] = off
                seed_lpage_info(st.lpage, off, gpa >> 12, int(st.npages[rec]), int(st.hva[rec]), level)
            self._paging_new_records(rec, 1)
            self._apply_flags(vm, rec, old_flags, flags, zap_done=True)
            if as0:
                self._set_order(vm, self._order_list(vm))
            self._bump_generation(vm, slot >> 16)
            return
        old_flags = int(st.flags[rec])
        self._bump_generation(vm, slot >> 16)
        self._apply_flags(vm, rec, old_flags, flags, zap_done=False)

    def _apply_flags(self, vm, rec, old_flags, new_flags, zap_done):
        """kvm_prepare_memory_region (dirty bitmap) + kvm_mmu_slot_apply_flags."""
        st = self.st
        st.flags[rec] = new_flags
        toggled = (old_flags ^ new_flags) & S.KVM_MEM_LOG_DIRTY_PAGES
        if not toggled:
            return
        logging_on = bool(new_flags & S.KVM_MEM_LOG_DIRTY_PAGES)
        if not logging_on:
            self._sync_pml(vm)  # the CPU stops logging: what it logged reaches the bitmap first
        self._set_dirty_bitmap(rec, logging_on)
        self._update_cpu_dirty_logging(vm)
        # kvm_mmu_slot_apply_flags: nothing more for moves or read-only slots
        if zap_done or new_flags & S.KVM_MEM_READONLY:
            return
        if int(st.slot_id[rec]) >> 16:
            # SMM address space: its roots (none here: vCPUs run in address space 0) are the
            # only ones the split/protect/recover walks touch; the enable flush stays
            if logging_on and not self._initially_set(vm):
                self._flush_remote_tlbs(vm)
            return
        base, n = int(st.base_gfn[rec]), int(st.npages[rec])
        # the shadow MMU code's pages (rmaps) first, then the TDP MMU's, as KVM orders them; a TDP-MMU VM running
        # nested EPT / NPT has both
        rmaps, tdp = self._rmaps(vm), self._tdp_mmu(vm)
        m = self._mmu_bundle() if rmaps else None
        if not logging_on:   # kvm_mmu_recover_huge_pages (kvm_mmu_zap_collapsible_sptes before v6.13)
            if rmaps and SK.shadow_zap_collapsible(m, vm, rec):
                self._flush_remote_tlbs(vm)
            if tdp and tdp_recover_huge_pages(self.pa, self.vt, self.st, self.cfg, vm, rec):
                self._flush_remote_tlbs(vm)  # kvm_flush_remote_tlbs_memslot
            return
        if self._initially_set(vm):
            return  # everything counts as dirty; pages are protected at CLEAR time
        if tdp and self.cfg[S.CFG_EAGER_SPLIT]:
            self._split_huge(vm, base, base + n)  # kvm_mmu_slot_try_split_huge_pages (the TDP MMU only)
        if self.cfg[S.CFG_PML] and self._mmu_kind[vm] != S.MMU_SHADOW:
            if rmaps:
                SK.shadow_slot_leaf_clear_dirty(m, vm, rec)   # kvm_mmu_slot_leaf_clear_dirty
            if tdp:
                tdp_clear_dirty_gfn_range(self.pa, self.vt, vm, base, base + n)
            level = 2
        else:
            level = 1
        if rmaps:
            SK.shadow_slot_wrprot(m, vm, rec, level)  # kvm_mmu_slot_remove_write_access
        if tdp:
            tdp_wrprot_gfn_range(self.pa, self.vt, vm, base, base + n, level)
        self._flush_remote_tlbs(vm)  # "unconditionally flush the TLBs after enabling"

    def memslots(self, vm):
        """The VM's memslots as a list of dicts (slot, gpa, size, hva, flags, backing)."""
        vm = self._check_vm(vm)
        st = self.st
        out = []
        for slot, rec in self._slot_rec.of_vm(vm):
            out.append({"slot": slot, "gpa": int(st.base_gfn[rec]) << 12, "size": int(st.npages[rec]) << 12,
                        "hva": int(st.hva[rec]), "flags": int(st.flags[rec]),
                        "backing": S.BACKING_NAMES[st.backing[rec]]})
        return out

    def memslots_generation(self, vm, as_id=0):
        """The memslots generation of address space ``as_id`` (bit 63 = update in progress)."""
        vm = self._check_vm(vm)
        as_id = A.exact_int(as_id, "as_id", 0, 1, why="x86 has address spaces 0 and 1 (SMM)")
        return int(self.vt.memslots_gen[vm] if as_id == 0 else self._gen_as1[vm])

    # ------------------------------------------------------------------ records and bookkeeping
    def _new_records(self, vms, slot, base_gfn, npages, hva, flags, backing):
        """Create one memslot record per VM in ``vms`` (all alike but for the VM)."""
        k = len(vms)
        first = self.nrec
        self.arena.grow_slots(first + k)
        r = slice(first, first + k)
        st = self.st
        st.vm[r] = vms
        st.slot_id[r] = slot
        st.base_gfn[r] = base_gfn
        st.npages[r] = npages
        st.hva[r] = hva
        st.flags[r] = flags
        st.backing[r] = backing
        for li, level in enumerate((2, 3)):
            n = lpage_entries(base_gfn, npages, level)
            offs = self.arena.alloc_many("lpage", n, k)
            st.lpage_off[r, li] = offs
            tmpl = np.zeros(n, np.int32)
            seed_lpage_info(tmpl, 0, base_gfn, npages, hva, level)
            if tmpl.any():
                self.st.lpage[offs[0]:offs[0] + n * k] = np.tile(tmpl, k)
        words = (npages + 63) // 64
        st.host_off[r] = self.arena.alloc_many("host", words, k)
        st.dirty_off[r] = -1
        if flags & S.KVM_MEM_LOG_DIRTY_PAGES:
            for rec in range(first, first + k):
                self._set_dirty_bitmap(rec, True)
        self.nrec += k
        for i, vm in enumerate(vms):
            self._slot_rec[(int(vm), slot)] = first + i
        self._paging_new_records(first, k)
        _reclaim.note_aliases(self, first, k)
        return first

    def _add_slot0(self, vms, size, bcode):
        """Slot 0 of ``size`` bytes at gpa 0 in each new VM of ``vms`` (create_vms), one record each."""
        k = len(vms)
        vt = self.vt
        recs = self._new_records(vms, 0, 0, size >> 12, HVA_BASE, 0, bcode)
        offs = self.arena.alloc_many("order", 4, k)
        self._order_cap[vms] = 4
        vt.slot_off[vms] = offs
        self.st.order[offs] = recs + np.arange(k)
        vt.slot_cnt[vms] = 1
        vt.slot_last[vms] = -1
        vt.memslots_gen[vms] += GEN_STEP

    def _bump_generation(self, vm, as_id=0):
        # kvm_swap_active_memslots + kvm_arch_memslots_updated / kvm_mmu_invalidate_mmio_sptes.
        # Each address space has its own generation (AS0 even, AS1 odd); vCPUs here run in AS0.
        gen = (int(self.vt.memslots_gen[vm]) if as_id == 0 else int(self._gen_as1[vm])) + GEN_STEP
        if (gen & int(MMIO_SPTE_GEN_MASK)) & ~(KVM_ADDRESS_SPACE_NUM - 1) == 0:
            self._zap_all(vm)   # kvm_mmu_invalidate_mmio_sptes: kvm_mmu_zap_all_fast at the wrap
        if as_id == 0:
            self.vt.memslots_gen[vm] = gen
        else:
            self._gen_as1[vm] = gen

    def _set_order(self, vm, recs):
        """Store the VM's AS0 slot list sorted by base_gfn."""
        recs = np.asarray(recs, np.int64)
        recs = recs[np.argsort(self.st.base_gfn[recs], kind="stable")]
        if recs.size > self._order_cap[vm]:
            cap = max(int(recs.size), 2 * int(self._order_cap[vm]), 4)
            self.vt.slot_off[vm] = self.arena.alloc("order", cap)
            self._order_cap[vm] = cap
        off = int(self.vt.slot_off[vm])
        self.st.order[off:off + recs.size] = recs
        self.vt.slot_cnt[vm] = recs.size
        self.vt.slot_last[vm] = -1

    def _order_list(self, vm):
        off, cnt = int(self.vt.slot_off[vm]), int(self.vt.slot_cnt[vm])
        return self.st.order[off:off + cnt].copy()

    def _release_host_memory(self, vm, rec):
        if _reclaim.drop_alias(self, rec):
            return  # another slot still maps these host pages
        self._gm_drop_unmapped(vm, rec)
        st = self.st
        words = (int(st.npages[rec]) + 63) // 64
        off = int(st.host_off[rec])
        bits = st.host[off:off + words]
        resident = int(np.unpackbits(bits.view(np.uint8)).sum()) * 4096
        bits[:] = 0
        self.host_ctl[S.HOST_USED_BYTES] -= resident
        self.vt.host_bytes[vm] -= resident
        _reclaim.release_slot(self, vm, rec)

    def _zap_all(self, vm):
        """kvm_arch_flush_shadow_memslot: the fast zap of every MMU page of the VM."""
        if self._rmaps(vm):
            SK.shadow_zap_all_fast(self._mmu_bundle(), vm)
        if self._tdp_mmu(vm):
            tdp_mmu_zap_all(self.pa, self.vt, vm)
