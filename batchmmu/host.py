"""The public Host: many VMs sharing one set of arenas and one host memory budget."""

import errno
from typing import NamedTuple

import numpy as np

from . import args as A
from . import memslot as ms
from . import reclaim as _reclaim
from .arena import (
    ROW_BYTES,
    Pool,
    bytes_per_row,
    grow_page_arena,
    grow_slot_records,
    grow_vcpu_table,
    grow_vm_table,
    lpage_entries,
    new_page_arena,
    new_slot_table,
    new_vcpu_table,
    new_vm_table,
    slot_bytes,
    sync_host_pools,
    vm_group_bytes,
)
from .constants import ACC_FETCH, ACC_VALID_MASK, ACC_WRITE, FIXED, HIT, SPURIOUS
from .errors import BatchMMUError, HostMemoryExhausted, InvalidationInProgress, bad, einval
from .kernels import shadow as SK
from .kernels import state as S
from .kernels.dirty import (
    clear_dirty_log_protect,
    count_huge_leaves,
    dirty_ring_reset,
    get_dirty_log_protect,
    pml_flush_vm,
    tdp_clear_dirty_gfn_range,
    tdp_ring_reset_masks,
    tdp_try_split_huge_pages,
)
from .kernels.events import (
    EV_BAD_ADDR,
    EV_BAD_KIND,
    EV_BAD_VCPU,
    EV_BAD_VM,
    EV_OK,
    group_by_vm,
    ungroup_results,
    validate_events,
)
from .kernels.fault import access_batch
from .kernels.gmem import GM_MAX_VMS
from .kernels.guest_walk import EFER_LMA, X86_CR0_PG
from .kernels.notifier import tdp_age_range, tdp_zap_leafs
from .kernels.spte import FMT_EPT, FMT_NPT, MMIO_SPTE_GEN_MASK
from .kernels.tdp import (
    recover_nx_huge_pages,
    tdp_mmu_zap_all,
    tdp_recover_huge_pages,
    tdp_wrprot_gfn_range,
)
from .paging import GuestPaging, addr_bits, check_sregs
from .units import format_size, parse_size

# Sizes KVM allocates, used by footprint() (x86-64, ~v6.10)
SIZEOF_KVM_MMU_PAGE = 184        # struct kvm_mmu_page
SIZEOF_LPAGE_INFO = 4            # struct kvm_lpage_info
SIZEOF_MEMSLOT = 192             # struct kvm_memory_slot incl. arch part
SIZEOF_PTE_LIST_DESC = 128       # struct pte_list_desc: next, counts, 14 pointers
MAX_SECONDS = 2.0 ** 53 / 1000   # simulated time stays an exact number of milliseconds



class AccessResult(NamedTuple):
    """Per-access results: ``outcome`` (bm.HIT ...) and the error code of the exit or #PF."""
    outcome: np.ndarray
    error_code: np.ndarray


class Host(GuestPaging):
    """One host: a memory budget, module parameters and any number of VMs.

    ``memory``: host RAM that guest pages may take (bytes or "64GiB").
    ``backing``: default backing of guest RAM: "4k", "thp", "hugetlb-2m", "hugetlb-1g".
    Module parameters as in KVM: ``mmio_caching`` (kvm.mmio_caching), ``nx_huge_pages``
    (kvm.nx_huge_pages, off as on CPUs without the iTLB multihit bug),
    ``tdp_huge_page_level`` (3 = 1G pages allowed in TDP, 2 = 2M only).
    ``overcommit``: False (a fault that finds ``memory`` full raises HostMemoryExhausted), True
    (it reclaims instead: see ``reclaim`` and docs/host_memory.md) or "epoch" (faults never fail;
    the owner reclaims between epochs, as the scenario runner does across shards);
    ``watermarks``: (low, high) fractions of ``memory`` for reclaim.
    """

    def __init__(self, memory="64GiB", backing="thp", *, mmio_caching=True, nx_huge_pages=False,
                 nx_huge_pages_recovery_ratio=60, nx_huge_pages_recovery_period_ms=0,
                 tdp_huge_page_level=3, eager_page_split=True, pml=False, overcommit=False,
                 watermarks=(0.90, 0.95)):
        self.memory = parse_size(memory, "memory")
        if not 0 < self.memory <= A.I64_MAX:
            raise bad("memory", memory, "must be positive and below 2**63 bytes")
        self.backing = ms.backing_code(backing)
        tdp_huge_page_level = A.exact_int(tdp_huge_page_level, "tdp_huge_page_level", 1, 3,
                                          why="must be 1 (4K), 2 (2M) or 3 (1G)")
        flags = {name: A.bool_arg(v, name) for name, v in (
            ("mmio_caching", mmio_caching), ("nx_huge_pages", nx_huge_pages),
            ("eager_page_split", eager_page_split), ("pml", pml))}
        self.nx_recovery_ratio = A.exact_int(nx_huge_pages_recovery_ratio, "nx_huge_pages_recovery_ratio", 0,
                                             1 << 32)
        self.nx_recovery_period_ms = A.exact_int(nx_huge_pages_recovery_period_ms,
                                                 "nx_huge_pages_recovery_period_ms", 0, 1 << 40)
        pml = flags["pml"]
        self.cfg = np.zeros(S.NCFG, np.int64)
        self.cfg[S.CFG_MMIO_CACHING] = int(flags["mmio_caching"])
        self.cfg[S.CFG_NX_HUGE_PAGES] = int(flags["nx_huge_pages"])
        self.cfg[S.CFG_TDP_MAX_LEVEL] = tdp_huge_page_level
        self.time_ms = 0.0
        self._nx_next_ms = None
        self.cfg[S.CFG_EAGER_SPLIT] = int(flags["eager_page_split"])
        self.cfg[S.CFG_PML] = int(pml)
        self.host_ctl = np.zeros(S.NHOST, np.int64)
        self.host_ctl[S.HOST_BUDGET_BYTES] = self.memory
        self.pa = new_page_arena()
        self.vt = new_vm_table()
        self.st = new_slot_table()
        self.ct = new_vcpu_table(pml=bool(pml))
        self._ring = Pool(np.int64, 0)
        self.nvm = 0
        self.nrec = 0
        self._lpage = Pool(np.int32)
        self._dirty = Pool(np.int64)
        self._hostbits = Pool(np.int64)
        self._order = Pool(np.int64)
        self._order_cap = np.zeros(16, np.int64)
        self._vcpus = np.zeros(16, np.int64)
        self._maxphyaddr = np.zeros(16, np.int64)
        self._gen_as1 = np.zeros(16, np.int64)
        self._slot_rec = ms.SlotIndex()  # (vm, slot) -> record, and each VM's own slots
        self._paging_init()
        _reclaim.configure(self, overcommit, watermarks)
        self._sync_pools()

    # ------------------------------------------------------------------ internals
    def _sync_pools(self):
        self.st = self.st._replace(lpage=self._lpage.arr, dirty=self._dirty.arr, host=self._hostbits.arr,
                                   order=self._order.arr)
        self.st = sync_host_pools(self.st, self.overcommit is not None)

    def _check_vm(self, vm, field="vm"):
        if not A.is_int(vm):
            raise bad(field, vm, "must be a VM id (integer)")
        if not 0 <= int(vm) < self.nvm:
            raise bad(field, vm, f"no such VM (this host has {self.nvm})")
        return int(vm)

    def _bump_generation(self, vm, as_id=0):
        # kvm_swap_active_memslots + kvm_arch_memslots_updated / kvm_mmu_invalidate_mmio_sptes.
        # Each address space has its own generation (AS0 even, AS1 odd); vCPUs here run in AS0.
        gen = (int(self.vt.memslots_gen[vm]) if as_id == 0 else int(self._gen_as1[vm])) + ms.GEN_STEP
        if (gen & int(MMIO_SPTE_GEN_MASK)) & ~(ms.KVM_ADDRESS_SPACE_NUM - 1) == 0:
            tdp_mmu_zap_all(self.pa, self.vt, vm)
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
            self.vt.slot_off[vm] = self._order.alloc(cap)
            self._order_cap[vm] = cap
            self._sync_pools()
        off = int(self.vt.slot_off[vm])
        self.st.order[off:off + recs.size] = recs
        self.vt.slot_cnt[vm] = recs.size
        self.vt.slot_last[vm] = -1

    def _order_list(self, vm):
        off, cnt = int(self.vt.slot_off[vm]), int(self.vt.slot_cnt[vm])
        return self.st.order[off:off + cnt].copy()

    def _new_records(self, vms, slot, base_gfn, npages, hva, flags, backing):
        """Create one memslot record per VM in ``vms`` (all alike but for the VM)."""
        k = len(vms)
        first = self.nrec
        self.st = grow_slot_records(self.st, first + k)
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
            offs = self._lpage.alloc_many(n, k)
            st.lpage_off[r, li] = offs
            self._sync_pools()
            tmpl = np.zeros(n, np.int32)
            ms.seed_lpage_info(tmpl, 0, base_gfn, npages, hva, level)
            if tmpl.any():
                self.st.lpage[offs[0]:offs[0] + n * k] = np.tile(tmpl, k)
        words = (npages + 63) // 64
        st.host_off[r] = self._hostbits.alloc_many(words, k)
        st.dirty_off[r] = -1
        self._sync_pools()
        if flags & S.KVM_MEM_LOG_DIRTY_PAGES:
            for rec in range(first, first + k):
                self._set_dirty_bitmap(rec, True)
        self.nrec += k
        for i, vm in enumerate(vms):
            self._slot_rec[(int(vm), slot)] = first + i
        self._paging_new_records(first, k)
        _reclaim.note_aliases(self, first, k)
        return first

    # ------------------------------------------------------------------ VMs
    def create_vms(self, count, memory="1GiB", vcpus=1, mmu="tdp", *, tdp_format="ept", tdp_levels=4,
                   maxphyaddr=46, backing=None, ept_ad=True):
        """Create ``count`` VMs, each with ``vcpus`` vCPUs and slot 0 of ``memory`` at gpa 0.

        Returns the new VM ids.  ``tdp_format`` "ept" (Intel) or "npt" (AMD); ``tdp_levels`` 4 or 5;
        ``ept_ad=False`` runs EPT without accessed/dirty bits (access tracking).
        """
        count = A.exact_int(count, "count", 1, A.I64_MAX, why="must be a positive integer")
        size = parse_size(memory, "memory")
        if size <= 0 or size % ms.PAGE_SIZE:
            raise bad("memory", memory, "must be a positive multiple of 4096")
        vcpus = A.exact_int(vcpus, "vcpus", 1, 4096)
        mmu = A.choice(mmu, "mmu", ("tdp", "shadow"))
        tdp_format = A.choice(tdp_format, "tdp_format", ("ept", "npt"))
        tdp_levels = A.exact_int(tdp_levels, "tdp_levels", 4, 5)
        maxphyaddr = A.exact_int(maxphyaddr, "maxphyaddr", 36, 52)
        ept_ad = A.bool_arg(ept_ad, "ept_ad")
        if tdp_levels == 4 and maxphyaddr > 48:
            raise bad("maxphyaddr", maxphyaddr, "4-level TDP maps at most 48 physical address bits")
        if size > (1 << maxphyaddr):
            raise bad("memory", memory, f"larger than the {maxphyaddr}-bit guest physical address space")
        if size >> 12 > ms.KVM_MEM_MAX_NR_PAGES or ms.HVA_BASE + size > ms.TASK_SIZE_MAX:
            raise einval("memory", memory, "slot 0 would be larger than one memslot can be (KVM_MEM_MAX_NR_PAGES)")
        bcode = self.backing if backing is None else ms.backing_code(backing)
        ms.check_backing_alignment(bcode, ms.HVA_BASE, size)
        # kvm_create_vm + vCPUs + slot 0: refuse before allocating what cannot fit (O(1), not per VM)
        A.check_alloc(vm_group_bytes(count, vcpus, size >> 12, mmu == "shadow", bool(self.cfg[S.CFG_PML]),
                                     self.overcommit is not None), "count", count,
                      f"{count} VMs of {format_size(size)} with {vcpus} vCPUs")
        if self.nvm + count > GM_MAX_VMS:  # guest-memory keys hold the VM id above 35 hva-page bits
            raise bad("count", count, f"a Host holds at most {GM_MAX_VMS} VMs")
        if not ept_ad and tdp_format == "npt":
            raise bad("ept_ad", ept_ad, "NPT always has accessed/dirty bits")
        if self.cfg[S.CFG_PML] and (tdp_format != "ept" or not ept_ad):
            raise bad("tdp_format", tdp_format, "a Host(pml=True) is an Intel host: its VMs use EPT with A/D bits")

        first, k = self.nvm, count
        need = first + k
        self.vt = grow_vm_table(self.vt, need)
        for name in ("_order_cap", "_vcpus", "_maxphyaddr", "_gen_as1"):
            arr = getattr(self, name)
            if arr.shape[0] < need:
                setattr(self, name, np.concatenate([arr, np.zeros(max(need, 2 * arr.shape[0]) - arr.shape[0],
                                                                  np.int64)]))
        vms = np.arange(first, need, dtype=np.int64)
        vt = self.vt
        vt.root[vms] = -1
        vt.fmt[vms] = FMT_EPT if tdp_format == "ept" else FMT_NPT
        vt.levels[vms] = tdp_levels
        vt.ad_disabled[vms] = 0 if ept_ad else 1
        vt.max_gfn[vms] = (1 << (maxphyaddr - 12)) - 1
        vt.memslots_gen[vms] = 0
        self._gen_as1[vms] = 1  # kvm_create_vm: slots->generation = as_id
        vt.stats[vms] = 0
        vt.host_bytes[vms] = 0
        self._vcpus[vms] = vcpus
        nv = self._paging_add_vms(vms, int(vcpus), mmu == "shadow")
        self.ct = grow_vcpu_table(self.ct, need, nv + vcpus * k, bool(self.cfg[S.CFG_PML]))
        self.ct.vcpu_off[vms] = nv + vcpus * np.arange(k)  # global index of each VM's vCPU 0
        vt.dirty_mode[vms] = 0
        self._maxphyaddr[vms] = maxphyaddr
        self.nvm = need
        # slot 0 at gpa 0: one KVM_SET_USER_MEMORY_REGION per VM
        recs = self._new_records(vms, 0, 0, size >> 12, ms.HVA_BASE, 0, bcode)
        offs = self._order.alloc_many(4, k)
        self._sync_pools()
        self._order_cap[vms] = 4
        vt.slot_off[vms] = offs
        self.st.order[offs] = recs + np.arange(k)
        vt.slot_cnt[vms] = 1
        vt.slot_last[vms] = -1
        vt.memslots_gen[vms] += ms.GEN_STEP
        if mmu == "shadow":
            for v in vms:
                self._default_mmu_pages(int(v))
        return vms

    def set_memslot(self, vm, slot, gpa, size, flags=0, hva=None, backing=None):
        """KVM_SET_USER_MEMORY_REGION: create, delete (size 0), move, or change flags of a slot.

        Errors are raised where KVM fails the ioctl, with KVM's errno in ``err.errno``;
        nothing changes then.  A call that changes nothing succeeds.
        """
        vm = self._check_vm(vm)
        size = parse_size(size, "size") if isinstance(size, str) else size
        slot, gpa, size, flags, hva = ms.region_args(slot, gpa, size, flags, hva)
        bcode = None if backing is None else ms.backing_code(backing)
        change, rec = ms.validate_region(self, vm, slot, gpa, size, flags, hva)
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
                hva = ms.HVA_BASE + gpa
                if hva + size > ms.TASK_SIZE_MAX:
                    raise einval("gpa", gpa, "no user address space left for a congruent hva")
            ms.check_backing_alignment(bcode, hva, size)
            A.check_alloc(slot_bytes(size >> 12, self._mmu_kind[vm] == S.MMU_SHADOW, self.overcommit is not None),
                          "size", size, f"a memslot of {format_size(size)}")
        self._sync_pml(vm)  # the vCPUs are out of the guest: their PML buffers were flushed
        if change == "none":
            return
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
                off = self._lpage.alloc(n)
                self._sync_pools()
                st = self.st
                st.lpage_off[rec, li] = off
                ms.seed_lpage_info(st.lpage, off, gpa >> 12, int(st.npages[rec]), int(st.hva[rec]), level)
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
        if self._mmu_kind[vm] == S.MMU_SHADOW:
            m = self._mmu_bundle()
            if not logging_on:
                if SK.shadow_zap_collapsible(m, vm, rec):
                    self._flush_remote_tlbs(vm)
            elif not self._initially_set(vm):
                SK.shadow_slot_wrprot(m, vm, rec, 1)  # kvm_mmu_slot_remove_write_access
                self._flush_remote_tlbs(vm)
            return
        if not logging_on:
            if tdp_recover_huge_pages(self.pa, self.vt, self.st, self.cfg, vm, rec):
                self._flush_remote_tlbs(vm)  # kvm_flush_remote_tlbs_memslot
            return
        if self._initially_set(vm):
            return  # everything counts as dirty; pages are protected at CLEAR time
        if self.cfg[S.CFG_EAGER_SPLIT]:
            self._split_huge(vm, base, base + n)  # kvm_mmu_slot_try_split_huge_pages
        if self.cfg[S.CFG_PML]:
            tdp_clear_dirty_gfn_range(self.pa, self.vt, vm, base, base + n)  # kvm_mmu_slot_leaf_clear_dirty
            tdp_wrprot_gfn_range(self.pa, self.vt, vm, base, base + n, 2)
        else:
            tdp_wrprot_gfn_range(self.pa, self.vt, vm, base, base + n, 1)
        self._flush_remote_tlbs(vm)  # "unconditionally flush the TLBs after enabling"

    def _initially_set(self, vm):
        want = S.DM_MANUAL_PROTECT | S.DM_INITIALLY_SET
        return (int(self.vt.dirty_mode[vm]) & want) == want

    def _set_dirty_bitmap(self, rec, on):
        """kvm_alloc_dirty_bitmap / kvm_destroy_dirty_bitmap (all ones with INITIALLY_SET)."""
        st = self.st
        if not on:
            st.dirty_off[rec] = -1
            return
        npages = int(st.npages[rec])
        words = (npages + 63) // 64
        st.dirty_off[rec] = off = self._dirty.alloc(2 * words)
        self._sync_pools()
        self.st.dirty[off:off + 2 * words] = 0
        if self._initially_set(int(st.vm[rec])) and not int(self.vt.dirty_mode[int(st.vm[rec])]) & S.DM_RING:
            self.st.dirty[off:off + words] = -1
            if npages % 64:
                self.st.dirty[off + words - 1] = (1 << (npages % 64)) - 1

    def _update_cpu_dirty_logging(self, vm):
        """kvm_mmu_update_cpu_dirty_logging: PML is on while any slot of the VM logs."""
        if not self.cfg[S.CFG_PML]:
            return
        logging = any(int(self.st.flags[r]) & S.KVM_MEM_LOG_DIRTY_PAGES for _, r in self._slot_rec.of_vm(vm))
        mode = int(self.vt.dirty_mode[vm])
        self.vt.dirty_mode[vm] = (mode | S.DM_PML_ACTIVE) if logging else (mode & ~S.DM_PML_ACTIVE)

    def _split_huge(self, vm, start, end):
        rows = count_huge_leaves(self.pa, self.vt, vm, start, end)
        if rows:
            self.reserve_tables(rows)
            tdp_try_split_huge_pages(self.pa, self.vt, self.cfg, vm, start, end, 1)

    def _sync_pml(self, vm):
        if self.cfg[S.CFG_PML]:
            pml_flush_vm(self.vt, self.st, self.ct, vm, int(self._vcpus[vm]))

    def _flush_remote_tlbs(self, vm):
        self.vt.stats[vm, S.ST_REMOTE_TLB_FLUSH_REQUESTS] += 1
        self.vt.stats[vm, S.ST_REMOTE_TLB_FLUSH] += 1

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

    # ------------------------------------------------------------------ vCPUs
    def _vcpu_index(self, vm, vcpu):
        vm = self._check_vm(vm)
        if isinstance(vcpu, bool) or not isinstance(vcpu, (int, np.integer)) or not 0 <= vcpu < self._vcpus[vm]:
            raise bad("vcpu", vcpu, f"VM {vm} has {int(self._vcpus[vm])} vCPUs")
        return int(self.ct.vcpu_off[vm] + vcpu)

    def set_vcpu_regs(self, vm, vcpu, cr0=None, cr3=None, cr4=None, efer=None, rflags=None, pkru=None):
        """KVM_SET_SREGS/KVM_SET_REGS for one vCPU (None leaves a register as it is).  Under the shadow MMU
        a change of CR0, CR3, CR4 or EFER resets the MMU context (every root of the vCPU is put)."""
        i = self._vcpu_index(vm, vcpu)
        values = {}
        for name, v in (("cr0", cr0), ("cr3", cr3), ("cr4", cr4), ("efer", efer), ("rflags", rflags),
                        ("pkru", pkru)):
            if v is not None:
                hi = (1 << 32) - 1 if name == "pkru" else A.U64_MAX
                values[name] = A.exact_int(v, name, 0, hi, why=f"must be an unsigned {hi.bit_length()}-bit integer")
        now = self.vcpu_regs(vm, vcpu)
        now.update(values)
        check_sregs(now["cr0"], now["cr3"], now["cr4"], now["efer"], int(self._maxphyaddr[int(vm)]))
        old = {k: int(getattr(self.vr, k)[i]) for k in values}
        try:
            self._set_paging_regs(int(vm), i, values)
        except BatchMMUError:
            for k, v in old.items():  # nothing changes on error
                getattr(self.vr, k)[i] = v
            raise

    def vcpu_regs(self, vm, vcpu):
        i = self._vcpu_index(vm, vcpu)
        return {k: int(np.int64(getattr(self.vr, k)[i]).view(np.uint64))
                for k in ("cr0", "cr3", "cr4", "efer", "rflags", "pkru")}

    # ------------------------------------------------------------------ guest memory
    def write_guest_memory(self, vm, gpa, words):
        """Host-side write of u64 ``words`` at 8-byte aligned ``gpa`` (no MMU effects, as userspace
        writing through its mapping: the contents belong to the hva behind the gpa).  Every word must lie
        below MAXPHYADDR and in a memslot (KVM's kvm_write_guest fails with EFAULT otherwise)."""
        vm = self._check_vm(vm)
        w = A.u64_array(words, "words")
        gpa = self._gpa_arg(vm, gpa, 8 * w.size)
        self._check_mapped(vm, gpa, w.size)
        self._gm_write_words(vm, gpa, w)

    def read_guest_memory(self, vm, gpa, n):
        """``n`` u64 words at 8-byte aligned ``gpa``, read through the memslots like ``write_guest_memory``
        (pages never written read as zeros)."""
        vm = self._check_vm(vm)
        top = 1 << int(self._maxphyaddr[vm])
        n = A.exact_int(n, "n", 0, top >> 3, why="must be a non-negative word count within the VM's guest physical "
                        f"address space (MAXPHYADDR {int(self._maxphyaddr[vm])}: gpas below {top:#x})")
        A.check_alloc(8 * n, "n", n, f"{n} words")
        gpa = self._gpa_arg(vm, gpa, 8 * n)
        self._check_mapped(vm, gpa, n)
        return self._gm_read_words(vm, gpa, n)

    def _gpa_arg(self, vm, gpa, nbytes):
        """An 8-byte aligned gpa whose ``nbytes`` lie below the VM's MAXPHYADDR."""
        top = 1 << int(self._maxphyaddr[vm])
        gpa = A.exact_int(gpa, "gpa", 0, A.I64_MAX, why="must be a non-negative guest-physical address")
        if gpa % 8:
            raise bad("gpa", gpa, "must be a multiple of 8")
        if gpa + nbytes > top:
            raise bad("gpa", gpa, f"[gpa, +{nbytes}) goes beyond the VM's {top.bit_length() - 1}-bit "
                      f"physical address space (MAXPHYADDR {int(self._maxphyaddr[vm])}: gpas below {top:#x})")
        return gpa

    def _check_mapped(self, vm, gpa, n):
        """Every page of ``n`` words at ``gpa`` lies in a memslot (kvm_read_guest / kvm_write_guest: EFAULT)."""
        hole = self._gm_unmapped(vm, int(gpa), int(n))
        if hole >= 0:
            raise BatchMMUError(f"gpa={hole:#x}: VM {vm} has no memslot there (KVM: EFAULT)", field="gpa",
                                value=hole, errno=errno.EFAULT)

    # ------------------------------------------------------------------ accesses
    def _events(self, vm, vcpu, addr, kind):
        args = (("vm", vm), ("vcpu", vcpu), ("addr", addr), ("kind", kind))
        given = [A.int_array(x, name) for name, x in args]
        lengths = [a.size for a, (_, x) in zip(given, args, strict=True) if not A.is_int(x)]
        n = max(lengths) if lengths else 1
        arrs = []
        for (name, _), a in zip(args, given, strict=True):
            if a.size == 1 and n != 1:
                a = np.full(n, a[0], np.int64)  # a scalar applies to every event
            elif a.size != n:
                raise bad(name, f"length {a.size}", f"arrays must have equal lengths (or be scalars); expected {n}")
            arrs.append(a)
        vm_a, vcpu_a, addr_a, kind_a = arrs
        # per VM the widest address any of its vCPUs takes (a gva under paging, else a gpa)
        bits, lo, hi = self._addr_bits()
        j, code = validate_events(vm_a, vcpu_a, addr_a, kind_a, self.nvm, self._vcpus, hi,
                                  ACC_VALID_MASK, ACC_WRITE, ACC_FETCH)
        if code == EV_OK and (lo != hi).any():  # vCPUs of one VM in different modes: check each event
            sel = np.nonzero((lo != hi)[vm_a])[0]
            over = np.nonzero(addr_a[sel] >> bits[self.ct.vcpu_off[vm_a[sel]] + vcpu_a[sel]])[0]
            if over.size:
                j, code = int(sel[over[0]]), EV_BAD_ADDR
        if code == EV_BAD_ADDR:
            g = int(self.ct.vcpu_off[vm_a[j]] + vcpu_a[j])
            if self.vr.cr0[g] & int(X86_CR0_PG):
                raise bad("addr", int(addr_a[j]), f"not a gva of VM {int(vm_a[j])} vCPU {int(vcpu_a[j])} in its "
                          f"paging mode (takes [0, 2**{int(bits[g])})): a non-canonical address is a #GP, not a "
                          "page fault")
            raise bad("addr", int(addr_a[j]), f"outside VM {int(vm_a[j])}'s guest physical address space")
        if code == EV_BAD_VM:
            raise bad("vm", int(vm_a[j]), f"no such VM (this host has {self.nvm})")
        if code == EV_BAD_VCPU:
            raise bad("vcpu", int(vcpu_a[j]), f"VM {int(vm_a[j])} has {int(self._vcpus[vm_a[j]])} vCPUs")
        if code == EV_BAD_KIND:
            raise bad("kind", int(kind_a[j]),
                      "use ACC_WRITE, ACC_USER, ACC_FETCH bits (write and fetch exclude each other)")
        return vm_a, vcpu_a, addr_a, kind_a

    def _addr_bits(self):
        """(per vCPU, per VM min, per VM max) address bits an access may use: with paging 32 (no long
        mode), 48 or 57 (LA57: gvas in their 48/57-bit form, upper half with bit 47/56 set); with paging
        off the VM's MAXPHYADDR."""
        vr, nvm = self.vr, self.nvm
        mpa = self._maxphyaddr[:max(nvm, 1)]
        if nvm == 0 or vr.cr0.size == 0:
            return np.zeros(0, np.int64), mpa, mpa
        owner = np.repeat(np.arange(nvm), self._vcpus[:nvm])
        pg = (vr.cr0 & int(X86_CR0_PG)) != 0
        if not pg.any():
            return self._maxphyaddr[owner], mpa, mpa
        bits = addr_bits(vr.cr0, vr.cr4, vr.efer, self._maxphyaddr[owner])
        first = self.ct.vcpu_off[:nvm]
        return bits, np.minimum.reduceat(bits, first), np.maximum.reduceat(bits, first)

    def access(self, vm, vcpu, addr, kind=0):
        """Guest memory accesses, in order within each VM.  Scalars broadcast; returns AccessResult."""
        vm_a, vcpu_a, addr_a, kind_a = self._events(vm, vcpu, addr, kind)
        return self._run_accesses(vm_a, vcpu_a, addr_a, kind_a)

    def _run_accesses(self, vm_a, vcpu_a, addr_a, kind_a, value_a=None, size_a=None):
        """Route a validated batch: shadow-MMU VMs to the shadow kernels, the rest to the TDP kernels."""
        shadow = self._mmu_kind[vm_a] == S.MMU_SHADOW
        twod = self._tdp2d_mask(vm_a, vcpu_a, shadow, stores=value_a is not None)  # TDP with guest paging
        if not shadow.any() and not twod.any():
            return self._run_tdp_accesses(vm_a, vcpu_a, addr_a, kind_a)
        n = vm_a.size
        if value_a is None:
            value_a = np.zeros(n, np.int64)
            size_a = np.zeros(n, np.int64)
        out = np.zeros(n, np.int8)
        err = np.zeros(n, np.int32)
        done = np.zeros(n, bool)  # events of the sub-batches that completed (VMs are independent)
        for idx, run in ((np.nonzero(shadow)[0], "shadow"), (np.nonzero(twod)[0], "2d"),
                         (np.nonzero(~shadow & ~twod)[0], "tdp")):
            if not idx.size:
                continue
            try:
                if run == "shadow":
                    o, e = self._run_shadow(vm_a[idx], vcpu_a[idx], np.zeros(idx.size, np.int64), addr_a[idx],
                                            kind_a[idx], value_a[idx], size_a[idx])
                elif run == "2d":
                    o, e = self._run_tdp2d(vm_a[idx], vcpu_a[idx], addr_a[idx], kind_a[idx], value_a[idx],
                                           size_a[idx])
                else:
                    o, e = self._run_tdp_accesses(vm_a[idx], vcpu_a[idx], addr_a[idx], kind_a[idx])
            except HostMemoryExhausted as exc:
                raise self._partial(exc, idx, n, out, err, done) from None
            out[idx], err[idx] = o, e
            done[idx] = True
        return AccessResult(out, err)

    def _run_tdp_accesses(self, vm_a, vcpu_a, addr_a, kind_a):
        """Run a validated batch.  VMs are independent, so a batch that interleaves VMs runs
        grouped by VM (a stable sort: each VM's events keep their order) and the results go
        back to the caller's order; grouped batches keep each VM's tables in cache."""
        n = vm_a.size
        perm = None
        if n > 1 and np.any(vm_a[1:] < vm_a[:-1]):
            grouped = [np.empty(n, np.int64) for _ in range(5)]
            group_by_vm(vm_a, vcpu_a, addr_a, kind_a, self.nvm, np.empty(self.nvm + 1, np.int64), *grouped)
            vm_a, vcpu_a, addr_a, kind_a, perm = grouped
        out = np.zeros(n, np.int8)
        err = np.zeros(n, np.int32)
        i = 0
        oom_at = -1
        while i < n:
            i, stop = access_batch(self.pa, self.vt, self.st, self.ct, self.host_ctl, self.cfg, vm_a, vcpu_a,
                                   addr_a, kind_a, i, out, err)
            if stop == S.STOP_NEED_PAGES:
                self.pa = grow_page_arena(self.pa, max(S.MAX_ROWS_PER_EVENT, self.pa.spt.shape[0]))
            elif stop == S.STOP_HOST_OOM and i != oom_at and _reclaim.direct_reclaim(self, int(vm_a[i]),
                                                                                     int(addr_a[i])):
                oom_at = i  # overcommit: reclaimed; the event runs again
            elif stop == S.STOP_HOST_OOM:
                applied = np.zeros(n, bool)
                applied[perm[:i] if perm is not None else slice(0, i)] = True
                if perm is not None:
                    out_c, err_c = np.zeros_like(out), np.zeros_like(err)
                    out_c[perm[:i]], err_c[perm[:i]] = out[:i], err[:i]
                    out, err = out_c, err_c
                raise self._budget_exhausted(int(vm_a[i]), f"gpa {int(addr_a[i]):#x}", applied,
                                             " (err.applied says which: each VM's events run in order, VM by VM)",
                                             out, err)
        if perm is not None:
            out_c, err_c = np.empty_like(out), np.empty_like(err)
            ungroup_results(perm, out, err, out_c, err_c)
            out, err = out_c, err_c
        return AccessResult(out, err)

    def _budget_exhausted(self, vm, where, applied, how="", out=None, err=None):
        """The HostMemoryExhausted a batch raises when the host budget cannot back an event's page;
        ``applied`` marks the events that ran, ``out``/``err`` their results."""
        e = HostMemoryExhausted(
            f"memory={format_size(self.memory)}: host memory budget exhausted at VM {vm}, {where}; "
            f"{int(applied.sum())} of {applied.size} events were applied{how}. Give the Host more memory.",
            field="memory", value=self.memory)
        e.applied = applied
        e.outcome = np.where(applied, out, 0).astype(np.int8) if out is not None else np.zeros(applied.size, np.int8)
        e.error_code = np.where(applied, err, 0).astype(np.int32) if err is not None \
            else np.zeros(applied.size, np.int32)
        return e

    def _partial(self, e, idx, n, out, err, before):
        """Re-raise a sub-batch's HostMemoryExhausted over the whole batch of ``n`` events: the events
        ``before`` (done by earlier sub-batches) and those the sub-batch applied took effect."""
        applied = before.copy()
        applied[idx] = e.applied
        out, err = out.copy(), err.copy()
        out[idx], err[idx] = e.outcome, e.error_code
        return self._exhausted_over(e, applied, out, err)

    def _exhausted_over(self, e, applied, out, err):
        n = applied.size
        e2 = HostMemoryExhausted(str(e).split("; ")[0] + f"; {int(applied.sum())} of {n} events were applied "
                                 "(err.applied says which). Give the Host more memory.", field=e.field, value=e.value)
        e2.applied = applied
        e2.outcome = np.where(applied, out, 0).astype(np.int8)
        e2.error_code = np.where(applied, err, 0).astype(np.int32)
        return e2

    def store(self, vm, vcpu, addr, value, kind=ACC_WRITE):
        """Guest 8-byte stores of ``value`` at ``addr`` (may be unaligned; a store that crosses a
        page is two accesses).  Stores KVM emulates as MMIO or to read-only memory leave memory as it was."""
        k = A.int_array(kind, "kind", 0, ACC_VALID_MASK)
        kind = int(k[0] | ACC_WRITE) if A.is_int(kind) else k | ACC_WRITE
        val = A.u64_array(value, "value")
        vm_a, vcpu_a, addr_a, kind_a = self._events(vm, vcpu, addr, kind)
        if val.size == 1 and vm_a.size > 1:
            val = np.full(vm_a.size, val[0], np.uint64)
        if val.size != vm_a.size:
            raise bad("value", f"length {val.size}", "must match the addresses")
        if np.any(self._mmu_kind[vm_a] == S.MMU_SHADOW) or self._guest_paging_on(vm_a, vcpu_a).any():
            return self._shadow_store(vm_a, vcpu_a, addr_a, kind_a, val.view(np.int64))
        # A host out-of-memory stop keeps what ran: the stores that completed get their values written and
        # err.applied names them; a page-crossing store whose second page was not backed wrote nothing.
        exc = None
        ran = np.ones(vm_a.size, bool)
        try:
            res = self._run_accesses(vm_a, vcpu_a, addr_a, kind_a)
            out, err = res.outcome, res.error_code
        except HostMemoryExhausted as e:
            exc, out, err, ran = e, e.outcome, e.error_code, e.applied
        cross = ((addr_a & 4095) > 4088) & ran
        done = (HIT, FIXED, SPURIOUS)
        ok = np.isin(out, done) & ran  # the store reached guest memory (not emulated/MMIO/stopped)
        if cross.any():
            # a page-crossing store completes only if both halves translate; else report the second's
            idx = np.nonzero(cross)[0]
            try:
                res2 = self._run_accesses(vm_a[idx], vcpu_a[idx], (addr_a[idx] | 4095) + 1, kind_a[idx])
                out2, err2, ran2 = res2.outcome, res2.error_code, np.ones(idx.size, bool)
            except HostMemoryExhausted as e:
                exc, out2, err2, ran2 = exc or e, e.outcome, e.error_code, e.applied
            ran[idx] &= ran2
            ok2 = np.isin(out2, done)
            first_ok = np.isin(out[idx], done)
            ok[idx] &= ok2 & ran2
            sel = first_ok & ~ok2 & ran2
            out, err = out.copy(), err.copy()
            out[idx[sel]] = out2[sel]
            err[idx[sel]] = err2[sel]
        for j in np.nonzero(ok)[0]:
            self._write_bytes(int(vm_a[j]), int(addr_a[j]), int(val[j]))
        if exc is not None:
            raise self._exhausted_over(exc, ran, out, err) from None
        return AccessResult(out, err)

    def _shadow_store(self, vm_a, vcpu_a, addr_a, kind_a, val):
        """Stores under guest paging: the kernel writes guest memory once the store translates (or the
        emulator writes it).  A page-crossing store is two stores; the second runs if the first landed."""
        off = addr_a & 4095
        first = np.minimum(8, 4096 - off)
        exc = None
        ran = np.ones(vm_a.size, bool)
        try:
            res = self._run_accesses(vm_a, vcpu_a, addr_a, kind_a, val, first)
        except HostMemoryExhausted as e:  # what ran is kept: its second halves run below
            exc, ran = e, e.applied
            res = AccessResult(e.outcome.copy(), e.error_code.copy())
        cross = np.nonzero((first < 8) & ran & np.isin(res.outcome, (HIT, FIXED, SPURIOUS, S.OUT_EMULATED)))[0]
        if cross.size:
            rest = (val[cross].view(np.uint64) >> (8 * first[cross]).astype(np.uint64)).view(np.int64)
            try:
                r2 = self._run_accesses(vm_a[cross], vcpu_a[cross], addr_a[cross] + first[cross], kind_a[cross],
                                        rest, 8 - first[cross])
            except HostMemoryExhausted as e:
                exc = exc or e
                ran[cross] &= e.applied
                r2 = AccessResult(e.outcome, e.error_code)
            bad2 = ~np.isin(r2.outcome, (HIT, FIXED, SPURIOUS, S.OUT_EMULATED)) & ran[cross]
            res.outcome[cross[bad2]] = r2.outcome[bad2]
            res.error_code[cross[bad2]] = r2.error_code[bad2]
        if exc is not None:
            raise self._exhausted_over(exc, ran, res.outcome, res.error_code) from None
        return res

    def _write_bytes(self, vm, addr, value):
        from .kernels.gmem import gm_write_bytes
        self._gm_reserve(2)
        gm_write_bytes(self.gm, self._slot_map(), vm, addr, np.uint64(value).view(np.int64), 8)

    def invlpg(self, vm, vcpu, gva):
        """INVLPG by the guest: under shadow paging kvm_mmu_invlpg (sync of unsync SPTEs for the gva in
        every cached root); under TDP it does not exit (no KVM work, no stat).  In long mode INVLPG of a
        non-canonical gva is a NOP (kvm_mmu_invalidate_addr)."""
        i = self._vcpu_index(vm, vcpu)
        vm = int(vm)
        gva = A.exact_int(gva, "gva", 0, A.I64_MAX, why="must be a non-negative gva (integer)")
        if gva >> self._vcpu_addr_bits(vm, i) and self.vr.efer[i] & int(EFER_LMA) \
                and self.vr.cr0[i] & int(X86_CR0_PG):
            if self._mmu_kind[vm] == S.MMU_SHADOW:
                self.vt.stats[vm, S.ST_INVLPG] += 1  # kvm_mmu_invlpg counts it all the same
            return
        self._guest_op(vm, vcpu, SK.OP_INVLPG, self._gva_arg(vm, i, gva, "gva"))

    def flush_tlb(self, vm, vcpu):
        """A guest TLB flush: under shadow paging the current root is synced and unsync previous roots
        are freed (kvm_vcpu_flush_tlb_guest); under TDP it does not exit."""
        self._guest_op(vm, vcpu, SK.OP_FLUSH, 0)

    def _zap_all(self, vm):
        """kvm_arch_flush_shadow_memslot: the fast zap of every MMU page of the VM."""
        if self._mmu_kind[vm] == S.MMU_SHADOW:
            SK.shadow_zap_all_fast(self._mmu_bundle(), vm)
        else:
            tdp_mmu_zap_all(self.pa, self.vt, vm)

    # ------------------------------------------------------------------ dirty log
    def _dirty_slot(self, vm, slot):
        """The record of a slot with a dirty bitmap, with KVM's errors (kvm_get_dirty_log)."""
        slot = A.exact_int(slot, "slot", 0, (1 << 32) - 1, why="not a memslot id", errno=errno.EINVAL)  # __u32
        if int(self.vt.dirty_mode[vm]) & S.DM_RING:
            raise BatchMMUError(f"vm={vm}: the VM uses the dirty ring, not bitmaps (ENXIO)", field="vm",
                                value=vm, errno=errno.ENXIO)
        if slot >> 16 >= ms.KVM_ADDRESS_SPACE_NUM or slot & 0xFFFF >= ms.KVM_USER_MEM_SLOTS:
            raise einval("slot", slot, "not a memslot id")
        rec = self._slot_rec.get((vm, slot), -1)
        if rec < 0 or int(self.st.dirty_off[rec]) < 0:
            raise BatchMMUError(f"slot={slot}: no such memslot, or dirty logging is off for it (ENOENT)",
                                field="slot", value=slot, errno=errno.ENOENT)
        return rec

    def get_dirty_log(self, vm, slot):
        """KVM_GET_DIRTY_LOG: the slot's bitmap (uint64 words).  Without manual protect it also
        clears the bitmap and re-protects the pages it reports; with manual protect it only reads."""
        vm = self._check_vm(vm)
        rec = self._dirty_slot(vm, slot)
        self._sync_pml(vm)  # kvm_arch_sync_dirty_log
        st = self.st
        words = (int(st.npages[rec]) + 63) // 64
        off = int(st.dirty_off[rec])
        if int(self.vt.dirty_mode[vm]) & S.DM_MANUAL_PROTECT:
            return st.dirty[off:off + words].copy().view(np.uint64)
        if int(st.slot_id[rec]) >> 16:  # SMM slot: no roots of its address space to re-protect
            out = st.dirty[off:off + words].copy()
            st.dirty[off:off + words] = 0
            if out.any():
                self._flush_remote_tlbs(vm)
            return out.view(np.uint64)
        out = np.zeros(words, np.int64)
        if self._mmu_kind[vm] == S.MMU_SHADOW:
            if SK.shadow_get_dirty_log(self._mmu_bundle(), vm, rec, out):
                self._flush_remote_tlbs(vm)
            return out.view(np.uint64)
        if get_dirty_log_protect(self.pa, self.vt, self.st, self.cfg, vm, rec, out):
            self._flush_remote_tlbs(vm)  # kvm_flush_remote_tlbs_memslot
        return out.view(np.uint64)

    # ------------------------------------------------------------------ MMU notifiers
    def _hva_ranges(self, vm, start, end):
        """(record, first gfn, end gfn) of every memslot of the VM whose hva range meets [start, end)."""
        start, end = self._hva_args(start, end)
        st = self.st
        out = []
        for _slot, rec in self._slot_rec.of_vm(vm):
            hva, npages, base = int(st.hva[rec]), int(st.npages[rec]), int(st.base_gfn[rec])
            lo, hi = max(start, hva), min(end, hva + (npages << 12))
            if lo < hi:
                out.append((rec, base + ((lo - hva) >> 12), base + ((hi - hva + 4095) >> 12)))
        return out

    @staticmethod
    def _hva_args(start, end):
        """[start, end) of user (host-virtual) addresses as exact ints."""
        start = A.exact_int(start, "start", 0, ms.TASK_SIZE_MAX, why="must be a user-space hva (integer)")
        end = A.exact_int(end, "end", 0, ms.TASK_SIZE_MAX + ms.PAGE_SIZE, why="must be a user-space hva (integer)")
        if end <= start:
            raise bad("end", end, f"must be above start={start:#x}")
        return start, end

    def invalidate_range_start(self, vm, start, end):
        """mmu_notifier invalidate_range_start: zap every SPTE mapping [start, end) (hva) at every
        level; until the matching end, faults on those gfns retry (outcome RETRY)."""
        vm = self._check_vm(vm)
        ranges = self._hva_ranges(vm, start, end)
        vt = self.vt
        # kvm_mmu_invalidate_begin: the first invalidation in progress starts an empty range
        vt.inval_count[vm] += 1
        if vt.inval_count[vm] == 1:
            vt.inval_start[vm] = vt.inval_end[vm] = -1
        zapped = 0
        for rec, g0, g1 in ranges:
            # kvm_mmu_invalidate_range_add: one merged gfn range per VM
            if vt.inval_start[vm] < 0:
                vt.inval_start[vm], vt.inval_end[vm] = g0, g1
            else:
                vt.inval_start[vm] = min(int(vt.inval_start[vm]), g0)
                vt.inval_end[vm] = max(int(vt.inval_end[vm]), g1)
            if int(self.st.slot_id[rec]) >> 16 == 0:
                if self._mmu_kind[vm] == S.MMU_SHADOW:
                    before = int(self.vt.stats[vm, S.ST_RMAP_ENTRIES])
                    SK.shadow_zap_gfn_range(self._mmu_bundle(), vm, rec, g0, g1)  # kvm_unmap_gfn_range
                    zapped += before - int(self.vt.stats[vm, S.ST_RMAP_ENTRIES])
                else:
                    zapped += int(tdp_zap_leafs(self.pa, self.vt, vm, g0, g1))
        if zapped:
            self._flush_remote_tlbs(vm)
        return zapped

    def invalidate_range_end(self, vm):
        """mmu_notifier invalidate_range_end: faults on the range proceed again."""
        vm = self._check_vm(vm)
        if self.vt.inval_count[vm] <= 0:
            raise bad("vm", vm, "no invalidation in progress")
        self.vt.inval_count[vm] -= 1
        if self.vt.inval_count[vm] == 0:
            self.vt.inval_start[vm] = self.vt.inval_end[vm] = 0

    def invalidate_hva_range(self, vm, start, end):
        """invalidate_range_start + end: the host changed the mapping of [start, end); returns the
        number of SPTEs zapped."""
        n = self.invalidate_range_start(vm, start, end)
        self.invalidate_range_end(vm)
        return n

    def _age(self, vm, start, end, clear):
        vm = self._check_vm(vm)
        start, end = self._hva_args(start, end)
        A.check_alloc(2 * ((end - start) >> 12), "end", end, f"a page map of [{start:#x}, {end:#x})")
        young = np.zeros(-(-(end - start) // 4096), np.int8)
        flush = False
        for rec, g0, g1 in self._hva_ranges(vm, start, end):
            if int(self.st.slot_id[rec]) >> 16:
                continue
            hva0 = int(self.st.hva[rec]) + ((g0 - int(self.st.base_gfn[rec])) << 12)
            part = np.zeros(g1 - g0, np.int8)
            if self._mmu_kind[vm] == S.MMU_SHADOW:
                flush |= bool(SK.shadow_age_gfn_range(self._mmu_bundle(), vm, rec, g0, g1, clear, part))
            else:
                flush |= bool(tdp_age_range(self.pa, self.vt, vm, g0, g1, clear, part))
            off = (hva0 - start) >> 12
            lo = max(0, -off)
            young[off + lo:off + lo + part.size - lo] |= part[lo:]
        return young.astype(bool), flush

    def age_hva_range(self, vm, start, end, flush=True):
        """clear_flush_young: which 4K pages of [start, end) were accessed since the last aging; makes
        them old (clears A, or access-tracks SPTEs without A/D) and flushes if any was young.
        ``flush=False`` is clear_young (page_idle, MGLRU aging)."""
        flush = A.bool_arg(flush, "flush")
        young, any_young = self._age(vm, start, end, True)
        if flush and any_young:
            self._flush_remote_tlbs(vm)
        return young

    def test_young(self, vm, start, end):
        """test_young: like age_hva_range but changes nothing."""
        return self._age(vm, start, end, False)[0]

    # ------------------------------------------------------------------ periodic host work
    def nx_recovery_period(self):
        """get_nx_huge_page_recovery_timeout: the period of the NX recovery worker, or None (off)."""
        if not self.cfg[S.CFG_NX_HUGE_PAGES] or not self.nx_recovery_ratio:
            return None
        return self.nx_recovery_period_ms or 3600000 / min(self.nx_recovery_ratio, 3600)

    def advance_time(self, seconds):
        """Let simulated time pass and run the host's periodic work that falls in it: the NX huge
        page recovery worker (each VM's worker wakes every period and zaps
        ceil(nx_lpage_splits / ratio) of its oldest split pages).  Returns recovery passes run."""
        seconds = A.number(seconds, "seconds", 0.0, MAX_SECONDS)
        end = self.time_ms + 1000.0 * seconds
        if end > 1000.0 * MAX_SECONDS:
            raise bad("seconds", seconds, f"simulated time would pass {MAX_SECONDS:.0f} s")
        period = self.nx_recovery_period()
        passes = 0
        if period is not None:
            if self._nx_next_ms is None:
                self._nx_next_ms = self.time_ms + period
            while self._nx_next_ms <= end:
                before = int(np.count_nonzero(self.pa.sp_flags & S.SPF_NX_TRACKED))
                self._recover_nx_huge_pages()
                self._nx_next_ms += period
                passes += 1
                if before == int(np.count_nonzero(self.pa.sp_flags & S.SPF_NX_TRACKED)) \
                        and self._nx_next_ms <= end:
                    # nothing was recovered, so no later pass in this interval recovers anything
                    skip = int((end - self._nx_next_ms) // period) + 1
                    passes += skip
                    self._nx_next_ms += skip * period
        self.time_ms = end
        return passes

    def _recover_nx_huge_pages(self):
        """kvm_recover_nx_huge_pages for every VM: the oldest DIV_ROUND_UP(splits, ratio) pages."""
        pa = self.pa
        tracked = np.nonzero(pa.sp_flags & S.SPF_NX_TRACKED)[0]
        if tracked.size == 0:
            return
        owners = pa.sp_vm[tracked]
        for vm in np.unique(owners):
            rows = tracked[owners == vm]
            rows = rows[np.argsort(pa.sp_seq[rows], kind="stable")]
            splits = int(self.vt.stats[vm, S.ST_NX_LPAGE_SPLITS])
            to_zap = -(-splits // self.nx_recovery_ratio)
            if recover_nx_huge_pages(pa, self.vt, self.st, int(vm), rows, to_zap):
                self._flush_remote_tlbs(int(vm))

    def kick_vcpus(self, vm):
        """Every vCPU of the VM exits once (as at a userspace request): PML buffers reach the log."""
        self._sync_pml(self._check_vm(vm))

    def enable_manual_dirty_log_protect(self, vm, initially_set=True):
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET only reads, CLEAR re-protects; with
        ``initially_set`` a slot's bitmap starts all ones and enabling logging protects nothing."""
        vm = self._check_vm(vm)
        initially_set = A.bool_arg(initially_set, "initially_set")
        mode = int(self.vt.dirty_mode[vm]) | S.DM_MANUAL_PROTECT
        mode = (mode | S.DM_INITIALLY_SET) if initially_set else (mode & ~S.DM_INITIALLY_SET)
        self.vt.dirty_mode[vm] = mode

    def clear_dirty_log(self, vm, slot, first_page, num_pages, bitmap):
        """KVM_CLEAR_DIRTY_LOG: clear the given bits and re-protect those pages.  Returns the number
        of pages whose bit was set (and so was cleared)."""
        vm = self._check_vm(vm)
        first_page = A.exact_int(first_page, "first_page", 0, A.U64_MAX, errno=errno.EINVAL)  # __u64
        num_pages = A.exact_int(num_pages, "num_pages", 0, (1 << 32) - 1, errno=errno.EINVAL)  # __u32
        bm = A.u64_array(bitmap, "bitmap")
        rec = self._dirty_slot(vm, slot)
        npages = int(self.st.npages[rec])
        if first_page % 64:
            raise einval("first_page", first_page, "must be a multiple of 64")
        if first_page > npages or num_pages > npages - first_page or \
                (num_pages < npages - first_page and num_pages % 64):
            raise einval("num_pages", num_pages, f"range [{first_page}, +{num_pages}) does not fit the slot's "
                         f"{npages} pages in whole 64-page words")
        words = (num_pages + 63) // 64
        if bm.size < words:
            raise bad("bitmap", f"{bm.size} words", f"needs at least {words} words")
        bm = bm[:words].view(np.int64)
        self._sync_pml(vm)
        if int(self.st.slot_id[rec]) >> 16:  # SMM slot: clear the bits, nothing to re-protect
            off = int(self.st.dirty_off[rec]) + first_page // 64
            live = self.st.dirty[off:off + words]
            mask = bm & live
            live &= ~mask
            cleared = int(np.unpackbits(mask.view(np.uint8)).sum())
            if cleared:
                self._flush_remote_tlbs(vm)
            return cleared
        if self._initially_set(vm) and self.cfg[S.CFG_EAGER_SPLIT]:
            base = int(self.st.base_gfn[rec])
            rows = count_huge_leaves(self.pa, self.vt, vm, base + first_page, base + first_page + num_pages)
            if rows:
                self.reserve_tables(rows)
        if self._mmu_kind[vm] == S.MMU_SHADOW:
            cleared = int(SK.shadow_clear_dirty_log(self._mmu_bundle(), vm, rec, first_page, num_pages, bm))
        else:
            cleared = int(clear_dirty_log_protect(self.pa, self.vt, self.st, self.cfg, vm, rec, first_page,
                                                  num_pages, bm))
        if cleared:
            self._flush_remote_tlbs(vm)  # kvm_flush_remote_tlbs_memslot
        return cleared

    # ------------------------------------------------------------------ dirty ring
    def enable_dirty_ring(self, vm, entries):
        """KVM_CAP_DIRTY_LOG_RING: a ring of ``entries`` (a power of two) per vCPU replaces the bitmaps.

        KVM requires this before the vCPUs exist; here it must come before the VM's first access.
        """
        vm = self._check_vm(vm)
        rsvd = S.KVM_DIRTY_RING_RSVD_ENTRIES + (S.PML_ENTITY_NUM if self.cfg[S.CFG_PML] else 0)
        why = f"must be a power of two in ({rsvd}, 65536]"
        entries = A.exact_int(entries, "entries", rsvd + 1, 65536, why=why, errno=errno.EINVAL)
        if entries & (entries - 1):
            raise einval("entries", entries, why)
        g = int(self.ct.vcpu_off[vm])
        ran = int(self.vt.root[vm]) >= 0 or int(self.vt.stats[vm, S.ST_ACCESSES]) > 0 \
            or bool((self.vr.root[g:g + int(self._vcpus[vm])] != -1).any())
        if ran or int(self.vt.dirty_mode[vm]) & S.DM_RING:
            # kvm_vm_ioctl_enable_dirty_log_ring: -EINVAL once kvm->created_vcpus (here: once a vCPU ran)
            raise einval("vm", vm, "enable the dirty ring once, before the VM's first access")
        nv = int(self._vcpus[vm])
        off = self._ring.alloc(entries * nv)
        total = self._ring.arr.shape[0]
        ct = self.ct
        if ct.ring_gfn.shape[0] < total:
            from .arena import _grow
            self.ct = ct = ct._replace(ring_gfn=_grow(ct.ring_gfn, total), ring_slot=_grow(ct.ring_slot, total),
                                       ring_flags=_grow(ct.ring_flags, total))
        g = int(ct.vcpu_off[vm])
        ct.ring_size[g:g + nv] = entries
        ct.ring_off[g:g + nv] = off + entries * np.arange(nv)
        ct.ring_dirty[g:g + nv] = ct.ring_reset[g:g + nv] = ct.ring_fetch[g:g + nv] = 0
        self.vt.dirty_mode[vm] = int(self.vt.dirty_mode[vm]) | S.DM_RING

    def harvest_dirty_ring(self, vm, vcpu):
        """Collect the vCPU's dirty entries as userspace does (and mark them for reset).
        Returns an int64 array of shape (n, 2): [slot, offset]."""
        g = self._vcpu_index(vm, vcpu)
        ct = self.ct
        size = int(ct.ring_size[g])
        if not size:
            raise einval("vm", vm, "this VM has no dirty ring")
        self._sync_pml(int(vm))
        out = []
        while True:
            idx = int(ct.ring_off[g]) + (int(ct.ring_fetch[g]) & (size - 1))
            if not ct.ring_flags[idx] & S.KVM_DIRTY_GFN_F_DIRTY or ct.ring_fetch[g] >= ct.ring_dirty[g]:
                break
            out.append((int(ct.ring_slot[idx]), int(ct.ring_gfn[idx])))
            ct.ring_flags[idx] = S.KVM_DIRTY_GFN_F_RESET
            ct.ring_fetch[g] += 1
        return np.array(out, np.int64).reshape(-1, 2)

    def reset_dirty_rings(self, vm):
        """KVM_RESET_DIRTY_RINGS: recycle harvested entries, re-protect their pages; returns the count."""
        vm = self._check_vm(vm)
        if not int(self.vt.dirty_mode[vm]) & S.DM_RING:
            raise einval("vm", vm, "this VM has no dirty ring")
        slot_recs = np.full(1 << 16, -1, np.int64)
        for sl, r in self._slot_rec.of_vm(vm):
            slot_recs[((sl >> 16) << 15) | (sl & 0x7FFF)] = r
        total = 0
        g0 = int(self.ct.vcpu_off[vm])
        masks = np.zeros((max(int(self.ct.ring_size[g0]), 1), 3), np.int64)
        for c in range(int(self._vcpus[vm])):
            cnt, nm = dirty_ring_reset(self.ct, g0 + c, masks)
            total += int(cnt)
            if self._mmu_kind[vm] == S.MMU_SHADOW:
                SK.shadow_ring_reset_masks(self._mmu_bundle(), vm, masks, nm, slot_recs)
            else:
                tdp_ring_reset_masks(self.pa, self.vt, self.st, self.cfg, vm, masks, nm, slot_recs)
        if total:
            self._flush_remote_tlbs(vm)
        return total

    # ------------------------------------------------------------------ reports
    def stats(self, vm=None):
        """Statistics with KVM's names: ``dict[str, int]`` for one VM, else arrays indexed by VM id."""
        if vm is None:
            s = self.vt.stats[:self.nvm]
            return {name: s[:, k].copy() for k, name in enumerate(S.STAT_NAMES)}
        vm = self._check_vm(vm)
        return {name: int(self.vt.stats[vm, k]) for k, name in enumerate(S.STAT_NAMES)}

    def footprint(self, vm=None):
        """Bytes by category, as KVM would allocate them, plus the simulator's own arrays.

        Categories: ``tdp_page_tables`` and ``shadow_page_tables`` (4 KiB table pages, SecPageTables),
        ``mmu_page_headers`` (struct kvm_mmu_page), ``shadowed_translation`` (a 4 KiB array per shadow
        page with gptes), ``rmaps`` (8-byte heads per slot page at 4K/2M/1G; the TDP MMU keeps none),
        ``pte_list_descs`` (rmap and parent-pte chains of 2+ entries, 14 per descriptor), ``write_track``
        (2 bytes per slot page), ``lpage_info``, ``dirty_bitmaps`` (two bitmaps per logged slot),
        ``memslots``, ``pml_buffers`` (a page per vCPU with
        PML), ``dirty_rings`` (16 bytes per entry), ``guest_memory`` (host RAM backing guest pages);
        ``kvm_total`` sums the KVM categories; ``simulator_bytes`` is this process's arenas.
        """
        vms = np.arange(self.nvm) if vm is None else np.array([self._check_vm(vm)])
        st = self.st
        if vm is None:
            live = np.nonzero(st.vm[:self.nrec] >= 0)[0]
        else:
            live = np.array(sorted(r for _, r in self._slot_rec.of_vm(int(vms[0]))), np.int64)
        shadow_vms = vms[self._mmu_kind[vms] == S.MMU_SHADOW]
        pages = int(self.vt.stats[vms, S.ST_MMU_PAGES].sum())
        spages = int(self.vt.stats[shadow_vms, S.ST_MMU_PAGES].sum())
        counts = np.zeros(5, np.int64)
        if shadow_vms.size:
            self._paging_topup()
            m = self._mmu_bundle()
            one = np.zeros(5, np.int64)
            for v in shadow_vms:
                SK.shadow_footprint_counts(m, int(v), one)
                counts += one
        npg = st.npages[live]
        base = st.base_gfn[live]
        lp = sum(int(((base + npg - 1) >> s).sum() - (base >> s).sum()) + live.size for s in (9, 18))
        logged = live[st.dirty_off[live] >= 0]
        dirty = int((2 * ((st.npages[logged] + 63) // 64) * 8).sum())
        out = {
            "tdp_page_tables": (pages - spages) * ROW_BYTES,
            "shadow_page_tables": spages * ROW_BYTES,
            "mmu_page_headers": pages * SIZEOF_KVM_MMU_PAGE,
            "shadowed_translation": int(counts[0]) * ROW_BYTES,
            "pte_list_descs": int(counts[1] + counts[2]) * SIZEOF_PTE_LIST_DESC,
            "write_track": int(counts[4]) * 2,
            "lpage_info": lp * SIZEOF_LPAGE_INFO,
            "dirty_bitmaps": dirty,
            "memslots": live.size * SIZEOF_MEMSLOT,
            "rmaps": int(counts[3]) * 8,
            "pml_buffers": 0,
            "dirty_rings": 0,
            "guest_memory": int(self.vt.host_bytes[vms].sum()),
            "guest_swapped": 4096 * int(self.vt.stats[vms, S.ST_HOST_PAGES_SWAPPED].sum()),
        }
        vcpus = self._vcpus[vms]
        if self.cfg[S.CFG_PML]:
            out["pml_buffers"] = int(vcpus.sum()) * 4096  # one PML page per vCPU
        g = self.ct.vcpu_off[vms]
        out["dirty_rings"] = int(sum(int(self.ct.ring_size[o:o + c].sum()) for o, c in zip(g, vcpus, strict=True))) * 16
        out["kvm_total"] = sum(v for k, v in out.items() if k not in ("guest_memory", "guest_swapped"))
        arrays = [*self.pa, *self.vt, *self.st, *self.ct, *self.sh, *self.gm, *self.vr]
        sim = sum(a.nbytes for a in arrays)
        out["simulator_bytes"] = int(sim if vm is None else sim * (len(vms) / max(1, self.nvm)))
        return out

    def reserve_tables(self, rows):
        """Make room for ``rows`` more page-table pages now (one allocation instead of doublings)."""
        rows = A.exact_int(rows, "rows", 0, A.I64_MAX, why="must be a non-negative integer")
        A.check_alloc((rows + S.MAX_ROWS_PER_EVENT) * bytes_per_row(), "rows", rows, f"{rows} page-table pages")
        free = int(self.pa.ctl[S.CTL_FREE_TOP])
        if rows + S.MAX_ROWS_PER_EVENT > free:
            self.pa = grow_page_arena(self.pa, rows + S.MAX_ROWS_PER_EVENT, exact=True)

    def host_memory(self):
        """(used, budget) bytes of host memory."""
        return int(self.host_ctl[S.HOST_USED_BYTES]), self.memory

    # ------------------------------------------------------------------ overcommit (batchmmu/reclaim.py)
    def reclaim(self, force=False):
        """kswapd: above the low watermark age every folio (clear_young through the MMU notifier);
        above the high one (or ``force``) swap out the oldest pages of all VMs down to the low
        watermark.  Returns {"scanned": pages aged, "reclaimed": pages swapped out}."""
        return _reclaim.reclaim(self, A.bool_arg(force, "force"))

    def reclaim_scan(self):
        """The aging half of ``reclaim``: int64 (nvm, 256) evictable pages by age, per VM."""
        return _reclaim.scan(self)

    def reclaim_evict(self, threshold, at_threshold):
        """The evicting half: every page older than ``threshold`` and ``at_threshold[vm]`` pages of
        that age (see batchmmu.reclaim.plan_reclaim); returns pages swapped out per VM."""
        threshold = A.exact_int(threshold, "threshold", 0, A.I64_MAX)
        at = A.int_array(at_threshold, "at_threshold", 0, A.I64_MAX)
        if at.shape != (self.nvm,):
            raise bad("at_threshold", f"length {at.size}", f"needs one entry per VM ({self.nvm})")
        return _reclaim.evict(self, threshold, at)

    def discard_hva_range(self, vm, start, end):
        """madvise(MADV_DONTNEED) of [start, end): SPTEs zapped through the MMU notifier, host pages
        freed (a later access faults in a fresh page: no major fault).  Returns bytes freed."""
        return _reclaim.discard(self, self._check_vm(vm), start, end)

    def host_pages(self, vm, slot):
        """The host side of a memslot's pages: bool arrays ``resident``, ``swapped``, ``split``."""
        vm = self._check_vm(vm)
        return _reclaim.page_state(self, vm, A.exact_int(slot, "slot", 0, (1 << 32) - 1))

    def mmu_notifier_release(self, vm):
        """mmu_notifier release (the VMM's mm goes away): kvm_flush_shadow_all zaps every SPTE and
        table of the VM."""
        self._zap_all(self._check_vm(vm))

    def swapped_bytes(self):
        """Bytes of guest memory in swap."""
        return int(self.host_ctl[S.HOST_SWAPPED_BYTES])

    def spte_dump(self, vm):
        """Every leaf and MMIO SPTE reachable from the VM's root: dict gfn -> (level, spte as uint64)."""
        from .kernels.spte import is_last_spte, is_mmio_spte, is_shadow_present_pte, spte_to_child_row
        vm = self._check_vm(vm)
        out = {}
        root = int(self.vt.root[vm])
        if root < 0:
            return out
        fmt = int(self.vt.fmt[vm])
        mmio_caching = bool(self.cfg[S.CFG_MMIO_CACHING])
        stack = [(root, int(self.vt.levels[vm]), 0)]
        spt = self.pa.spt
        while stack:
            row, level, gfn0 = stack.pop()
            for i in range(512):
                spte = int(spt[row, i])
                gfn = gfn0 + (i << (9 * (level - 1)))
                if is_shadow_present_pte(spte):
                    if is_last_spte(spte, level):
                        out[gfn] = (level, spte & 0xFFFFFFFFFFFFFFFF)
                    else:
                        stack.append((int(spte_to_child_row(spte)), level - 1, gfn))
                elif is_mmio_spte(fmt, np.int64(spte), mmio_caching):
                    out[gfn] = (level, spte & 0xFFFFFFFFFFFFFFFF)
        return out
