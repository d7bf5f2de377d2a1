"""Guest paging on the Host: guest memory contents, vCPU paging registers and the shadow MMU's arenas.

``GuestPaging`` is a mixin of ``batchmmu.host.Host``: it owns the guest-memory arena (kernels/gmem.py),
the per-vCPU registers and roots (``VcpuRegs``) and the shadow-MMU state (``ShadowState``), tops them
up before a batch and runs the shadow kernels (kernels/shadow.py re-exports them).
"""

import numpy as np

from . import args as A
from .arena import CR0_RESET, _grow, lpage_entries  # noqa: F401 (CR0_RESET: paging's public name)
from .batch import event_record, result_record, results
from .errors import HostMemoryExhausted, bad, einval
from .kernels import gmem as GM
from .kernels import mmu_internal as MI
from .kernels import shadow as K
from .kernels import state as S
from .kernels import timeline as TL
from .kernels.guest_walk import EFER_LMA, X86_CR0_PG, X86_CR4_LA57, X86_CR4_PAE, cpu_mode, mode_levels


def addr_bits(cr0, cr4, efer, maxphyaddr):
    """Address bits a vCPU takes (scalars or per-vCPU arrays): with paging 32 (no long mode), 48 or 57
    (LA57: gvas in their 48/57-bit form); with paging off the VM's MAXPHYADDR."""
    long_bits = np.where(cr4 & int(X86_CR4_LA57), 57, 48)
    return np.where(cr0 & int(X86_CR0_PG), np.where(efer & int(EFER_LMA), long_bits, 32), maxphyaddr)


CR0_PE = 1
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR4_PKE = 1 << 22
EFER_LME = 1 << 8
CANONICAL_BITS = {4: 48, 5: 57}
# CR4 bits KVM lets a guest set (CR4_RESERVED_BITS in arch/x86/kvm/x86.h: VME PVI TSD DE PSE PAE MCE PGE
# PCE OSFXSR OSXMMEXCPT UMIP LA57 VMXE FSGSBASE PCIDE OSXSAVE SMEP SMAP PKE CET LAM_SUP)
CR4_VALID_BITS = 0x1FFF | (1 << 13) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21) | (1 << 22) \
    | (1 << 23) | (1 << 28)


# EFER bits a guest may set (kvm_valid_efer: x86's efer_reserved_bits less the bits KVM enables: SCE, LME, LMA,
# NX, SVME, LMSLE, FFXSR, TCE); the rest are reserved
EFER_VALID_BITS = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)


def check_sregs(cr0, cr3, cr4, efer, maxphyaddr):
    """kvm_is_valid_sregs (with kvm_is_valid_cr0, kvm_is_valid_cr4, kvm_vcpu_is_legal_cr3): the register
    combinations KVM_SET_SREGS refuses with EINVAL."""
    if cr0 >> 32:
        raise einval("cr0", cr0, "bits 63:32 are reserved")
    if cr0 & X86_CR0_NW and not cr0 & X86_CR0_CD:
        raise einval("cr0", cr0, "NW without CD")
    if cr0 & int(X86_CR0_PG) and not cr0 & CR0_PE:
        raise einval("cr0", cr0, "PG without PE")
    if cr4 & ~CR4_VALID_BITS:
        raise einval("cr4", cr4, f"reserved CR4 bits {cr4 & ~CR4_VALID_BITS:#x}")
    if efer & ~EFER_VALID_BITS:
        raise einval("efer", efer, f"reserved bits {efer & ~EFER_VALID_BITS:#x} set (kvm_valid_efer)")
    if efer & EFER_LME and cr0 & int(X86_CR0_PG):
        if not cr4 & int(X86_CR4_PAE):
            raise einval("cr4", cr4, "long mode (EFER.LME with CR0.PG) needs CR4.PAE")
        if not efer & int(EFER_LMA):
            raise einval("efer", efer, "long mode (EFER.LME with CR0.PG) needs EFER.LMA")
        if cr3 >> maxphyaddr:
            raise einval("cr3", cr3, f"beyond the guest's MAXPHYADDR ({maxphyaddr} bits)")
    elif efer & int(EFER_LMA):
        raise einval("efer", efer, "EFER.LMA outside long mode (needs EFER.LME and CR0.PG)")


class GuestPaging:
    """Mixin: guest memory, vCPU paging registers and the shadow MMU of a Host."""

    def _paging_init(self):
        self._mmu_kind = np.zeros(16, np.int8)
        self._nr_requested = {}    # vm -> KVM_SET_NR_MMU_PAGES value
        self._vm_order = []        # kvm vm_list order for the shrinker (scanned VMs move to the tail)

    # ------------------------------------------------------------------ arenas
    def _paging_add_vms(self, vms, vcpus, kind):
        """Grow the per-VM and per-vCPU paging arrays for new VMs of MMU ``kind`` (S.MMU_*)."""
        need = int(vms[-1]) + 1
        if self._mmu_kind.shape[0] < need:
            self._mmu_kind = _grow(self._mmu_kind, max(need, 2 * self._mmu_kind.shape[0]))
        self._mmu_kind[vms] = kind
        self.vt.mmu[vms] = kind
        nv_old = self.arena.add_vcpu_regs(vcpus * len(vms))
        if kind != S.MMU_TDP:   # the shadow MMU's code builds this VM's tables: mmu_page_hash
            self.vt.hash_off[vms] = self.arena.alloc_many("hash", S.KVM_MMU_HASH_SIZE, len(vms), fill=-1)
        return nv_old

    def _rmaps(self, vm):
        """kvm_memslots_have_rmaps: the shadow MMU's code builds the VM's tables (shadow paging, legacy TDP), or a
        TDP-MMU VM has made its first shadow root (nested EPT / NPT: shadow_root_allocated)."""
        return (self._mmu_kind[vm] != S.MMU_TDP) | (self._write_tracking[vm] != 0)   # (a VM id or an array)

    def _tdp_mmu(self, vm):
        """The TDP MMU builds the VM's own (L1) tables: host-side operations walk its roots (tdp_mmu_enabled)."""
        return self._mmu_kind[vm] == S.MMU_TDP

    def _paging_new_records(self, first, k):
        """Rmap heads and write-track counts for new memslot records of rmap VMs (kvm_alloc_memslot_metadata)."""
        need = first + k
        st = self.st
        for rec in range(first, need):
            st.rmap_off[rec] = -1
            st.wtrack_off[rec] = -1
            vm = int(st.vm[rec])
            if not self._rmaps(vm):
                continue
            self._alloc_rmaps(rec)
            if self._mmu_kind[vm] == S.MMU_SHADOW or self._write_tracking[vm]:
                # kvm_page_track_write_tracking_enabled: with TDP only once a shadow root exists
                st.wtrack_off[rec] = self.arena.alloc("wtrack", int(st.npages[rec]), fill=0)

    def _rmap_heads(self, rec, level):
        """__kvm_mmu_slot_lpages: a memslot record's rmap heads at ``level`` (1 = 4K, 2 = 2M, 3 = 1G)."""
        return lpage_entries(int(self.st.base_gfn[rec]), int(self.st.npages[rec]), level)

    def _alloc_rmaps(self, rec):
        """memslot_rmap_alloc: rmap heads of a memslot record at 4K, 2M and 1G."""
        for level in (1, 2, 3):
            self.st.rmap_off[rec, level - 1] = self.arena.alloc("rmap", self._rmap_heads(rec, level),
                                                                fill=(-1, 0))  # RM_HEAD, RM_COUNT

    def _first_shadow_root_alloc(self, vm):
        """mmu_first_shadow_root_alloc for a TDP VM whose guest_mmu gets its first root (nested EPT / NPT): the
        gfn_write_track arrays of every memslot and, on the TDP MMU, their rmaps (the legacy TDP MMU has them
        already); from then on kvm_memslots_have_rmaps and host-side operations walk both MMUs."""
        if self._write_tracking[vm]:
            return
        st = self.st
        recs = [rec for _, rec in self._slot_rec.of_vm(vm)]
        tdp = self._tdp_mmu(vm)
        need = 2 * sum(int(st.npages[r]) for r in recs)
        if tdp:
            need += 8 * S.KVM_MMU_HASH_SIZE + 16 * sum(self._rmap_heads(r, lv) for r in recs for lv in (1, 2, 3))
        A.check_alloc(need, "vm", vm, f"write tracking{' and rmaps' if tdp else ''} of VM {vm}'s memslots")
        if tdp:   # mmu_page_hash (in struct kvm_arch: no allocation in KVM, a simulator arena here)
            self.vt.hash_off[vm] = self.arena.alloc("hash", S.KVM_MMU_HASH_SIZE, fill=-1)
        for rec in recs:
            if tdp:
                self._alloc_rmaps(rec)   # memslot_rmap_alloc
            st.wtrack_off[rec] = self.arena.alloc("wtrack", int(st.npages[rec]), fill=0)
        self._write_tracking[vm] = 1
        if tdp:   # n_max_mmu_pages, set at memslot commit or KVM_SET_NR_MMU_PAGES, matters from now on
            if self._nr_requested.get(vm):
                K.kvm_mmu_change_mmu_pages(self._mmu_bundle(), vm, int(self._nr_requested[vm]))
            else:
                self._default_mmu_pages(vm)

    def _paging_topup(self):
        """mmu_topup_memory_caches for a batch: rows, links, rmap nodes, guest-memory pages."""
        if self.pa.ctl[S.CTL_FREE_TOP] < 4 * S.MAX_ROWS_PER_EVENT:
            self.reserve_tables(4 * S.MAX_ROWS_PER_EVENT)
        self.arena.topup_shadow()
        self._gm_reserve(S.MAX_GM_PER_EVENT * 4)

    def _gm_reserve(self, n):
        """Room for ``n`` more guest-memory pages (Arena.reserve_guest_mem)."""
        self.arena.reserve_guest_mem(n)

    def _slot_map(self):
        return S.SlotMap(self.vt.rec, self.st.order, self.st.rec, self.vt.rec, np.int64(-1), np.int64(0))

    def _gm_drop_unmapped(self, vm, rec):
        """Slot ``rec`` goes and the VMM unmaps its memory: its hva pages that no other slot of the VM
        still maps lose their contents (a later mapping there is fresh anonymous memory)."""
        lo = int(self.st.hva[rec])
        hi = lo + (int(self.st.npages[rec]) << 12)
        keep = sorted((int(self.st.hva[r]) + ((g0 - int(self.st.base_gfn[r])) << 12),
                       int(self.st.hva[r]) + ((g1 - int(self.st.base_gfn[r])) << 12))
                      for r, g0, g1 in self._hva_ranges(vm, lo, hi) if r != rec)
        base = vm << GM.GM_VM_SHIFT
        for a, b in [*keep, (hi, hi)]:
            if a > lo:
                GM.gm_drop_range(self.gm, np.int64(base | (lo >> 12)), np.int64(base | (a >> 12)))
            lo = max(lo, b)

    # ------------------------------------------------------------------ page budget and shrinker
    def _default_mmu_pages(self, vm):
        """kvm_arch_commit_memory_region: n_max = max(memslot pages / 50, 64) unless userspace set it."""
        if not self._rmaps(vm) or self._nr_requested.get(vm):
            return
        pages = sum(int(self.st.npages[r]) for _, r in self._slot_rec.of_vm(vm))
        K.kvm_mmu_change_mmu_pages(self._mmu_bundle(), vm, max(pages // 50, 64))

    def set_nr_mmu_pages(self, vm, n):
        """KVM_SET_NR_MMU_PAGES: the VM's shadow-page budget (zaps the oldest pages if above it)."""
        vm = self._check_vm(vm)
        n = A.exact_int(n, "n", 64, A.I64_MAX, why="must be an integer >= 64 (KVM_MIN_ALLOC_MMU_PAGES)")
        self._nr_requested[vm] = n
        if self._rmaps(vm):
            K.kvm_mmu_change_mmu_pages(self._mmu_bundle(), vm, int(n))

    def shrink_count(self):
        """mmu_shrink_count: shadow-MMU pages (shadow paging, legacy TDP, nested EPT/NPT's guest_mmu) in use over
        all VMs (n_used_mmu_pages: TDP MMU pages are not counted)."""
        return int(self.vt.n_used[:self.nvm].sum())

    def shrink(self, nr_to_scan, mode="zap"):
        """The MMU shrinker.  ``mode="zap"`` (KVM up to v6.9, mmu_shrink_scan): the first VM on
        vm_list that has shadow pages loses up to ``nr_to_scan`` of its oldest ones (mmu_recycled) and
        moves to the tail of the list; at most ``nr_to_scan`` VMs are looked at.  ``mode="caches"``
        (v6.10+): only the vCPUs' memory caches are freed; they are not modelled, so nothing changes.
        Returns the number of pages freed."""
        nr_to_scan = A.exact_int(nr_to_scan, "nr_to_scan", 1, A.I64_MAX, why="must be a positive integer")
        mode = A.choice(mode, "mode", ("zap", "caches"))
        if mode == "caches":
            return 0
        order = self._vm_list()
        for k, vm in enumerate(order[:nr_to_scan]):
            if not self._rmaps(vm) or self.vt.n_used[vm] == 0:
                continue
            freed = int(K.zap_oldest_mmu_pages(self._mmu_bundle(), vm, int(nr_to_scan)))
            self._vm_order = [v for v in order if v != vm] + [vm]  # list_move_tail
            del k
            return freed
        return 0

    def _vm_list(self):
        order = [v for v in getattr(self, "_vm_order", []) if v < self.nvm]
        seen = set(order)
        return order + [v for v in range(self.nvm) if v not in seen]

    def _mmu_bundle(self):
        return S.MMU(self.pa, self.vt, self.st, self.ct, self.host_ctl, self.sh, self.gm, self.vr)

    # ------------------------------------------------------------------ guest memory
    def _gm_unmapped(self, vm, gpa, n):
        """The first address of the ``n`` words at ``gpa`` in no memslot (KVM: kvm_write_guest / kvm_read_guest
        fail with EFAULT), or -1."""
        return int(GM.gm_unmapped(self._slot_map(), vm, np.int64(gpa), np.int64(n)))

    def _gm_write_words(self, vm, gpa, words):
        """Userspace writes u64 ``words`` at ``gpa`` (every page in a memslot) through its mapping."""
        w = words.view(np.int64)
        if w.size == 0:
            return
        first, last = gpa >> 12, (gpa + 8 * w.size - 1) >> 12
        # the host pages first: out of host memory, nothing is written
        self.touch_host_memory(vm, first << 12, (last + 1 - first) << 12)
        self._gm_reserve(last - first + 1)
        GM.gm_write_words(self.gm, self._slot_map(), vm, np.int64(gpa), w)

    def touch_host_memory(self, vm, gpa, size):
        """Userspace touches the guest memory [gpa, gpa+size) through its mapping (a memset, as KVM's
        selftests and VMMs do before running a guest): the host pages behind it become resident
        (counted against the host budget); no MMU effect.  Gaps without a memslot are skipped."""
        from .errors import HostMemoryExhausted
        from .kernels.memslot import host_touch_need, host_touch_range
        from .units import format_size
        vm = self._check_vm(vm)
        top = 1 << int(self._maxphyaddr[vm])
        gpa = A.exact_int(gpa, "gpa", 0, top, why="must be a guest-physical address (integer)")
        size = A.exact_int(size, "size", 0, top - gpa, why="must be a size within the guest-physical address space")
        start, end = gpa >> 12, (gpa + size + 4095) >> 12
        ranges = []
        for slot, rec in self._slot_rec.of_vm(vm):
            if slot >> 16:
                continue
            base, n = int(self.st.base_gfn[rec]), int(self.st.npages[rec])
            lo, hi = max(start, base), min(end, base + n)
            if lo < hi:
                ranges.append((rec, lo, hi))
        # all or nothing: the bytes needed are checked before any page is touched (slots aliasing one
        # hva are counted once each, so such a call may be refused with room for it)
        need = sum(int(host_touch_need(self.st, rec, lo, hi)) for rec, lo, hi in ranges)
        used, budget = int(self.host_ctl[S.HOST_USED_BYTES]), int(self.host_ctl[S.HOST_BUDGET_BYTES])
        if used + need > budget:
            raise HostMemoryExhausted(f"memory: the host budget cannot back [{gpa:#x}, +{size:#x}) of VM {vm} "
                                      f"({format_size(need)} more needed, {format_size(budget - used)} free); "
                                      "nothing changed", field="memory", value=self.memory)
        for rec, lo, hi in ranges:
            host_touch_range(self.st, self.vt, self.host_ctl, rec, lo, hi, vm)

    def _gm_read_words(self, vm, gpa, n):
        """``n`` u64 words at ``gpa`` (zeros where nothing was written or no memslot maps the page)."""
        out = np.zeros(n, np.int64)
        GM.gm_read_words(self.gm, self._slot_map(), vm, np.int64(gpa), out)
        return out.view(np.uint64)

    # ------------------------------------------------------------------ vCPU registers
    def _set_paging_regs(self, vm, i, values):
        """KVM_SET_SREGS for the paging registers: an MMU context reset when one of them changed."""
        vr = self.vr
        changed = False
        for name, v in values.items():
            arr = getattr(vr, name)
            new = np.uint64(v).view(np.int64) if v >= 1 << 63 else np.int64(v)
            if arr[i] != new:
                changed |= name in ("cr0", "cr3", "cr4", "efer")
                arr[i] = new
        mode = int(cpu_mode(vr.cr0[i], vr.cr4[i], vr.efer[i], vr.rflags[i]))
        if int(vr.cr0[i]) & int(X86_CR0_PG) and self._mmu_kind[vm] == S.MMU_SHADOW:
            # (under TDP the processor walks the guest tables: kernels/tdp2d.py; protection keys work)
            if int(vr.cr4[i]) & X86_CR4_PKE:
                raise bad("cr4", int(vr.cr4[i]), "KVM does not offer protection keys with shadow paging")
        sregs = any(k in values for k in ("cr0", "cr3", "cr4", "efer"))
        if int(mode_levels(np.int64(mode))) == 3 and (changed or sregs):
            # __set_sregs_common: with PAE paging the PDPTRs are always reloaded (load_pdptrs: the four
            # PDPTEs at CR3, 32-byte aligned) and the MMU context reset, even with the registers unchanged
            vr.pdptr[i] = self._gm_read_words(vm, int(vr.cr3[i]) & 0xFFFFFFE0, 4).view(np.int64)
            changed = True
        if changed and self._mmu_kind[vm] == S.MMU_SHADOW:
            K.kvm_mmu_reset_context(self._mmu_bundle(), vm, i)

    def _guest_paging_on(self, vm_a, vcpu_a):
        vg = self.vt.vcpu_off[vm_a] + vcpu_a
        return (self.vr.cr0[vg] & int(X86_CR0_PG)) != 0

    # ------------------------------------------------------------------ TDP with guest paging (2D walks)
    def _shadow_code_vms(self):
        """Per VM: a legacy-TDP or nested VM, whose faults the shadow MMU's code serves in the 2D kernels."""
        return (self._mmu_kind[:self.nvm] == S.MMU_LEGACY) | (self._nested[:self.nvm] != 0)

    def _any_tdp2d_vm(self):
        """Whether some VM could take the 2D kernel: a legacy-TDP or nested VM, or a TDP VM with a paging vCPU."""
        kind = self._mmu_kind[:self.nvm]
        if self._shadow_code_vms().any():
            return True
        off, cnt = self.vt.vcpu_off[:self.nvm], self._vcpus[:self.nvm]
        pg = np.concatenate(([0], np.cumsum((self.vr.cr0[:int((off + cnt).max(initial=0))] & int(X86_CR0_PG)) != 0)))
        return bool(((pg[off + cnt] - pg[off]) > 0)[kind == S.MMU_TDP].any())

    def _tdp2d_mask(self, vm_a, vcpu_a, shadow, stores=False):
        """Events for kernels/tdp2d.py: every event of a TDP VM that has a paging vCPU in the batch (so a
        VM's events keep their order), and with ``stores`` every TDP event (the kernel writes values)."""
        if stores:
            return ~shadow
        if vm_a.size >= self.nvm and not self._any_tdp2d_vm():   # a check per VM costs less than per event
            return np.zeros(vm_a.size, bool)
        # and every event of a legacy-TDP VM or a nested one (their faults are there, whatever the guest's paging:
        # the shadow MMU's code, an L2, the emulation of writes to write-tracked tables)
        always = self._shadow_code_vms()
        if always.all():
            return ~shadow
        pg = ~shadow & (self._guest_paging_on(vm_a, vcpu_a) | always[vm_a])
        if not pg.any():
            return pg
        vm_2d = np.zeros(self.nvm, bool)   # per VM, so that a VM's events all go one way
        vm_2d[vm_a[pg]] = True
        return vm_2d[vm_a]

    def _run_tdp2d(self, ev):
        """Run TDP events (an EV_* record batch, accesses) through the 2D-walk kernel; EV_SIZE > 0 makes an
        event a store.  Returns (outcome, error code, fault gpa)."""
        return self._vm_by_vm(self._run_tdp2d_ordered, ev)

    def _groups_by_vm(self):
        """Whether a batch may run VM by VM instead of in the caller's order: not under the time model (the vCPUs
        interleave by their clocks) nor with direct reclaim (overcommit=True: a fault that finds the host full
        evicts pages of every VM, so the order of two VMs' events decides what each finds resident)."""
        return self._tm is None and self.overcommit != "direct"

    def _vm_by_vm(self, run, ev):
        """``run(ev)`` (per-event result arrays) for an EV_* record batch.  A batch that interleaves VMs runs
        grouped by VM where no other order could be seen (_groups_by_vm), as _run_tdp_accesses does: each VM's
        events keep their order, the VM's tables stay in cache, the results come back in the caller's order,
        and a host memory budget error's ``applied`` says which events ran."""
        vm_a = ev[:, MI.EV_VM]
        n = ev.shape[0]
        if not self._groups_by_vm() or n < 2 or not np.any(vm_a[1:] < vm_a[:-1]):
            return run(ev)
        from .kernels.events import group_records_by_vm
        grouped, perm = np.empty_like(ev), np.empty(n, np.int64)
        group_records_by_vm(ev, self.nvm, np.empty(self.nvm + 1, np.int64), grouped, perm)
        try:
            got = run(grouped)
        except HostMemoryExhausted as exc:
            back = np.empty(n, bool)
            back[perm] = exc.applied
            out, err = np.zeros(n, np.int8), np.zeros(n, np.int64)
            out[perm], err[perm] = exc.outcome, exc.error_code
            raise self._exhausted_over(exc, back, out, err) from None
        res = []
        for a in got:
            b = np.empty_like(a)
            b[perm] = a
            res.append(b)
        return tuple(res)

    def _run_tdp2d_ordered(self, ev):
        """_run_tdp2d in the batch's order."""
        from .kernels.tdp2d import tdp2d_batch
        n = ev.shape[0]
        vm_a, addr_a = ev[:, MI.EV_VM], ev[:, MI.EV_ADDR]
        vg = self.vt.vcpu_off[vm_a] + ev[:, MI.EV_VCPU]
        # a gpa beyond MAXPHYADDR with paging off (checked per event only if some address is beyond the least)
        if np.any((addr_a >> int(self._maxphyaddr[:self.nvm].min(initial=64))) != 0):
            big = ((self.vr.cr0[vg] & int(X86_CR0_PG)) == 0) & ((addr_a >> self._maxphyaddr[vm_a]) != 0)
            if big.any():
                j = int(np.nonzero(big)[0][0])
                raise bad("addr", int(addr_a[j]), f"outside VM {int(vm_a[j])}'s guest physical address space "
                          "(the vCPU has paging off)")
        res = result_record(n)
        legacy = bool(self._shadow_code_vms()[vm_a].any())
        def topup():
            # table rows (doubling, as _run_tdp_accesses) and guest-memory rows for A/D and stores; the shadow MMU
            # code's links and rmap nodes (the legacy TDP MMU, guest_mmu)
            if self.pa.ctl[S.CTL_FREE_TOP] < 4 * S.MAX_ROWS_PER_EVENT:
                self.arena.grow_pages(max(4 * S.MAX_ROWS_PER_EVENT, self.pa.spt.shape[0]))
            if legacy:
                self.arena.topup_shadow()
            self._gm_reserve(S.MAX_GM_PER_EVENT * 4)
        # vCPUs running an L2 on nested paging go to nested.l2_batch; the batch runs in order, as runs of
        # consecutive events of one kernel
        l2 = (self.vr.guest_mode[vg] != 0) & (self.vr.eptp[vg] >= 0)
        cuts = [0, *(np.nonzero(l2[1:] != l2[:-1])[0] + 1).tolist(), n]
        ran = np.zeros(n, np.int8)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            if b <= a:
                continue
            if self._tm is not None and self._tm.ctl[TL.CTL_DEADLINE] >= 0 and a > 0 and not ran[:a].all():
                break   # the time model's deadline stopped an earlier run: the rest waits, in order
            if l2[a]:
                from .kernels.nested import l2_batch as kernel
            else:
                kernel = tdp2d_batch
            sub_ev, sub_res = ev[a:b], res[a:b]
            run, applied = self._timed_run(kernel, sub_ev, sub_res)
            self._resume(b - a, run,
                         lambda i, a=a, ap=applied: self._budget_exhausted(
                             int(vm_a[a + i]), f"address {int(addr_a[a + i]):#x}",
                             (np.arange(n) < a) | np.isin(np.arange(n) - a, np.nonzero(ap(i))[0]), "",
                             *results(res)[:2]),
                         topup, oom_vm=lambda i, a=a: int(vm_a[a + i]),
                         oom_gpa=lambda i: int(self.sh.scratch[MI.SC_OOM_GPA]))
            if self._tm is not None:
                ran[a:b] = self._last_ran
        if self._tm is not None:
            self._last_ran = ran
        return results(res)

    def _timed_run(self, kernel, ev, res):
        """(run(i) for _resume, applied(i): the events that ran when event i stopped) of an EV_* record batch
        kernel, in simulated-time order under the time model (kernels/timeline.py), else in order."""
        n = ev.shape[0]
        if self._tm is None:
            return (lambda i: kernel(self._mmu_bundle(), ev, i, res)), (lambda i: np.arange(n) < i)
        timed = {K.shadow_event_batch: TL.timed_shadow_batch, TL.tdp2d_batch: TL.timed_tdp2d_batch,
                 TL.l2_batch: TL.timed_l2_batch}[kernel]
        nxt, ran = self._sched(ev[:, MI.EV_VM], ev[:, MI.EV_VCPU])
        self._last_ran = ran   # the migration op's deadline runs take one VM, so one kernel, at a time
        return (lambda i: timed(self._mmu_bundle(), ev, res, self._tm, nxt, ran)), (lambda i: ran.astype(bool))

    # ------------------------------------------------------------------ shadow events
    def _run_shadow(self, ev, checked=False):
        """Run an EV_* record batch of shadow-MMU VMs (``checked``: the caller knows they are), VM by VM
        (_vm_by_vm); returns (outcome, error code, fault gpa)."""
        if not checked:
            other = np.nonzero(self._mmu_kind[ev[:, MI.EV_VM]] != S.MMU_SHADOW)[0]
            if other.size:
                raise bad("vm", int(ev[other[0], MI.EV_VM]), "not a shadow-MMU VM")
        return self._vm_by_vm(self._run_shadow_ordered, ev)

    def _run_shadow_ordered(self, ev):
        """_run_shadow in the batch's order."""
        n = ev.shape[0]
        vm_a = ev[:, MI.EV_VM]
        res = result_record(n)
        run, applied = self._timed_run(K.shadow_event_batch, ev, res)
        # a host out of memory: direct reclaim for the gpa the fault could not back, then the event again
        self._resume(n, run,
                     lambda i: self._budget_exhausted(int(vm_a[i]), f"gva {int(ev[i, MI.EV_ADDR]):#x}",
                                                      applied(i), "", *results(res)[:2]),
                     self._paging_topup, oom_vm=lambda i: int(vm_a[i]),
                     oom_gpa=lambda i: int(self.sh.scratch[MI.SC_OOM_GPA]))
        return results(res)

    def emulated_access(self, vm, vcpu, addr, kind=0, value=0, size=8):
        """Memory operand of an instruction that KVM's emulator executes (CPL0 code under kvm_pvm,
        MMIO, emulated writes to guest page tables): a software walk (A/D set), the access through the
        memslots, and for a write ``kvm_mmu_track_write``.  Returns AccessResult."""
        from .host import AccessResult
        i = self._vcpu_index(vm, vcpu)
        vm, vcpu = int(vm), int(vcpu)
        size = A.exact_int(size, "size", 1, 8, why="must be 1, 2, 4 or 8 bytes")
        if size not in (1, 2, 4, 8):
            raise bad("size", size, "must be 1, 2, 4 or 8 bytes")
        kind = A.flag_word(kind, "kind", 0x16, errno=None)
        value = A.u64_array(value, "value")
        if value.size != 1:
            raise bad("value", value, "must be one integer")
        addr = self._gva_arg(vm, i, addr)
        return AccessResult(*self._run_shadow(event_record(vm, vcpu, addr, kind, MI.OP_EMULATED,
                                                            value.view(np.int64), size)))

    def mov_cr3(self, vm, vcpu, cr3):
        """The guest writes CR3 (MOV to CR3, no PCID): under shadow paging KVM switches roots (cached in
        prev_roots), syncs and flushes; under TDP it does not exit."""
        i = self._vcpu_index(vm, vcpu)
        vm, vcpu = int(vm), int(vcpu)
        # kvm_set_cr3: in long mode a CR3 beyond MAXPHYADDR is a #GP; outside it CR3 is a 32-bit register
        bits = int(self._maxphyaddr[vm]) if self.vr.efer[i] & int(EFER_LMA) else 32
        cr3 = A.exact_int(cr3, "cr3", 0, (1 << bits) - 1, why=f"must be a {bits}-bit guest-physical address")
        if self._mmu_kind[vm] != S.MMU_SHADOW:
            pae = int(mode_levels(cpu_mode(self.vr.cr0[i], self.vr.cr4[i], self.vr.efer[i], self.vr.rflags[i]))) == 3
            if pae and self.vr.guest_mode[i] and self.vr.eptp[i] >= 0:
                raise bad("cr3", cr3, f"VM {vm} vCPU {vcpu} runs a PAE L2 under nested paging: its MOV CR3 loads "
                          "PDPTEs through EPT12 (not modelled); VM-exit and enter again with pdptrs")
            self.vr.cr3[i] = cr3
            if pae:
                # PAE: the processor loads the four PDPTEs at MOV CR3 (no exit under TDP)
                self.vr.pdptr[i] = self._gm_read_words(int(vm), int(cr3) & 0xFFFFFFE0, 4).view(np.int64)
            return
        self._run_shadow(event_record(int(vm), vcpu, cr3, op=MI.OP_MOV_CR3))

    def _vcpu_addr_bits(self, vm, i):
        """Address bits vCPU ``i`` takes (addr_bits for one vCPU)."""
        vr = self.vr
        return int(addr_bits(vr.cr0[i], vr.cr4[i], vr.efer[i], int(self._paging_off_bits(slice(vm, vm + 1))[0])))

    def _gva_arg(self, vm, i, addr, field="addr"):
        """An address vCPU ``i`` can use: a gva in its 48-bit (57 with LA57) form, the upper half with bit
        47 (56) set (a non-canonical one is a #GP, not a page fault) or, with paging off, a gpa."""
        addr = A.exact_int(addr, field, 0, A.I64_MAX, why="must be a non-negative address (integer)")
        bits = self._vcpu_addr_bits(vm, i)
        if addr >> bits:
            raise bad(field, addr, f"not an address of VM {vm} vCPU {i - int(self.vt.vcpu_off[vm])} in its mode "
                      f"(takes [0, 2**{bits})): a non-canonical address is a #GP, not a page fault")
        return addr

    def _guest_op(self, vm, vcpu, op, addr):
        self._vcpu_index(vm, vcpu)
        if self._mmu_kind[int(vm)] != S.MMU_SHADOW:
            return False
        self._run_shadow(event_record(int(vm), int(vcpu), addr, op=op))
        return True
