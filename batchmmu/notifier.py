"""MMU notifiers on the Host (virt/kvm/kvm_main.c): invalidate_range_start/end, clear_flush_young /
clear_young / test_young, release, and MADV_DONTNEED (batchmmu/reclaim.py) through them.
"""

import numpy as np

from . import args as A
from . import memslot as ms
from . import reclaim as _reclaim
from .errors import bad
from .kernels import shadow as SK
from .kernels import state as S
from .kernels.notifier import tdp_age_range, tdp_zap_leafs


class Notifiers:
    """Mixin of ``batchmmu.host.Host``: the MMU-notifier callbacks on hva ranges."""

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
                # kvm_unmap_gfn_range: the rmaps (shadow paging, legacy TDP, guest_mmu), then the TDP MMU
                if self._rmaps(vm):
                    zapped += int(SK.shadow_zap_gfn_range(self._mmu_bundle(), vm, rec, g0, g1))
                if self._tdp_mmu(vm):
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

    def _hva_ranges(self, vm, start, end):
        """(record, first gfn, end gfn) of every memslot of the VM whose hva range meets [start, end)."""
        start, end = self._hva_args(start, end)
        srec = self.st.rec
        out = []
        for _slot, rec in self._slot_rec.of_vm(vm):
            hva, npages, base = int(srec[rec, S.SL_HVA]), int(srec[rec, S.SL_NPAGES]), int(srec[rec, S.SL_BASE_GFN])
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

    def _age(self, vm, start, end, clear):
        vm = self._check_vm(vm)
        start, end = self._hva_args(start, end)
        A.check_alloc(9 * ((end - start) >> 12), "end", end, f"a page map of [{start:#x}, {end:#x})")
        young = np.zeros(-(-(end - start) // 4096), np.int8)
        flush = False
        for rec, g0, g1 in self._hva_ranges(vm, start, end):
            if int(self.st.slot_id[rec]) >> 16:
                continue
            hva0 = int(self.st.hva[rec]) + ((g0 - int(self.st.base_gfn[rec])) << 12)
            part = np.zeros(g1 - g0, np.int64)   # (int64: the young maps of every aging kernel)
            if self._rmaps(vm):
                flush |= bool(SK.shadow_age_gfn_range(self._mmu_bundle(), vm, rec, g0, g1, clear, part))
            if self._tdp_mmu(vm):
                flush |= bool(tdp_age_range(self.pa, self.vt, vm, g0, g1, clear, part))
            off = (hva0 - start) >> 12
            lo = max(0, -off)
            young[off + lo:off + lo + part.size - lo] |= part[lo:].astype(np.int8)
        return young.astype(bool), flush

    def discard_hva_range(self, vm, start, end):
        """madvise(MADV_DONTNEED) of [start, end): SPTEs zapped through the MMU notifier, host pages
        freed (a later access faults in a fresh page: no major fault).  Returns bytes freed."""
        return _reclaim.discard(self, self._check_vm(vm), start, end)

    def mmu_notifier_release(self, vm):
        """mmu_notifier release (the VMM's mm goes away): kvm_flush_shadow_all zaps every SPTE and
        table of the VM."""
        self._zap_all(self._check_vm(vm))
