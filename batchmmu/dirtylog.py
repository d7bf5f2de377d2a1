"""Dirty logging on the Host: KVM_GET_DIRTY_LOG, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CLEAR_DIRTY_LOG,
the dirty ring (KVM_CAP_DIRTY_LOG_RING, harvest, KVM_RESET_DIRTY_RINGS), PML and the dirty bitmaps.
"""

import errno

import numpy as np

from . import args as A
from . import memslot as ms
from .errors import BatchMMUError, bad, einval
from .kernels import shadow as SK
from .kernels import state as S
from .kernels.dirty import (
    clear_dirty_log_protect,
    count_huge_leaves,
    dirty_ring_reset,
    get_dirty_log_protect,
    pml_flush_vm,
    tdp_ring_reset_masks,
    tdp_try_split_huge_pages,
)


class DirtyLog:
    """Mixin of ``batchmmu.host.Host``: the dirty-log ioctls and their bitmaps, rings and PML buffers."""

    def get_dirty_log(self, vm, slot):
        """KVM_GET_DIRTY_LOG: the slot's bitmap (uint64 words).  Without manual protect it also
        clears the bitmap and re-protects the pages it reports; with manual protect it only reads."""
        vm = self._check_vm(vm)
        rec = self._dirty_slot(vm, slot)
        self._sync_pml(vm)  # kvm_arch_sync_dirty_log
        st = self.st
        words = (int(st.npages[rec]) + 63) // 64
        off = int(st.dirty_off[rec])
        self._sim_charge(vm, "dirty_log.ioctl")
        self._sim_charge(vm, "dirty_log.bitmap_word", words)
        if int(self.vt.dirty_mode[vm]) & S.DM_MANUAL_PROTECT:
            return st.dirty[off:off + words].copy().view(np.uint64)
        if int(st.slot_id[rec]) >> 16:  # SMM slot: no roots of its address space to re-protect
            out = st.dirty[off:off + words].copy()
            st.dirty[off:off + words] = 0
            if out.any():
                self._flush_remote_tlbs(vm)
            return out.view(np.uint64)
        out = np.zeros(words, np.int64)
        if self._rmaps(vm):
            if SK.shadow_get_dirty_log(self._mmu_bundle(), vm, rec, out):
                self._flush_remote_tlbs(vm)
            return out.view(np.uint64)
        if get_dirty_log_protect(self.pa, self.vt, self.st, self.cfg, vm, rec, out):
            self._flush_remote_tlbs(vm)  # kvm_flush_remote_tlbs_memslot
        return out.view(np.uint64)

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
        self._sim_charge(vm, "dirty_log.ioctl")
        self._sync_pml(vm)
        off = int(self.st.dirty_off[rec]) + first_page // 64
        live = self.st.dirty[off:off + words]
        if self.timed:   # kvm_clear_dirty_log_protect walks SPTEs only for words with bits to clear
            self._sim_charge(vm, "dirty_log.clear_word", int(np.count_nonzero(bm & live)))
        if int(self.st.slot_id[rec]) >> 16:  # SMM slot: clear the bits, nothing to re-protect
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
        if self._rmaps(vm):
            cleared = int(SK.shadow_clear_dirty_log(self._mmu_bundle(), vm, rec, first_page, num_pages, bm))
        else:
            cleared = int(clear_dirty_log_protect(self.pa, self.vt, self.st, self.cfg, vm, rec, first_page,
                                                  num_pages, bm))
        if cleared:
            self._flush_remote_tlbs(vm)  # kvm_flush_remote_tlbs_memslot
        return cleared

    def kick_vcpus(self, vm):
        """Every vCPU of the VM exits once (as at a userspace request): PML buffers reach the log."""
        self._sync_pml(self._check_vm(vm))

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
        st.dirty_off[rec] = off = self.arena.alloc("dirty", 2 * words, fill=0)
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
        g = int(self.vt.vcpu_off[vm])
        ran = int(self.vt.root[vm]) >= 0 or int(self.vt.stats[vm, S.ST_ACCESSES]) > 0 \
            or bool((self.vr.root[g:g + int(self._vcpus[vm])] != -1).any())
        if ran or int(self.vt.dirty_mode[vm]) & S.DM_RING:
            # kvm_vm_ioctl_enable_dirty_log_ring: -EINVAL once kvm->created_vcpus (here: once a vCPU ran)
            raise einval("vm", vm, "enable the dirty ring once, before the VM's first access")
        nv = int(self._vcpus[vm])
        off = self.arena.alloc("ring", entries * nv)
        ct = self.ct
        g = int(self.vt.vcpu_off[vm])
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
        # the entries from fetch up to the first one not (yet) marked dirty, at most up to dirty_index
        fetch = int(ct.ring_fetch[g])
        idx = int(ct.ring_off[g]) + (np.arange(fetch, max(fetch, int(ct.ring_dirty[g])), dtype=np.int64) & (size - 1))
        clean = np.nonzero((ct.ring[idx, S.RG_FLAGS] & S.KVM_DIRTY_GFN_F_DIRTY) == 0)[0]
        idx = idx[:clean[0]] if clean.size else idx
        out = ct.ring[idx][:, [S.RG_SLOT, S.RG_OFFSET]].astype(np.int64)
        ct.ring[idx, S.RG_FLAGS] = S.KVM_DIRTY_GFN_F_RESET
        ct.ring_fetch[g] += idx.size
        return out.reshape(-1, 2)

    def reset_dirty_rings(self, vm):
        """KVM_RESET_DIRTY_RINGS: recycle harvested entries, re-protect their pages; returns the count."""
        vm = self._check_vm(vm)
        if not int(self.vt.dirty_mode[vm]) & S.DM_RING:
            raise einval("vm", vm, "this VM has no dirty ring")
        slot_recs = np.full(1 << 16, -1, np.int64)
        for sl, r in self._slot_rec.of_vm(vm):
            slot_recs[((sl >> 16) << 15) | (sl & 0x7FFF)] = r
        total = 0
        g0 = int(self.vt.vcpu_off[vm])
        masks = np.zeros((max(int(self.ct.ring_size[g0]), 1), 3), np.int64)
        for c in range(int(self._vcpus[vm])):
            cnt, nm = dirty_ring_reset(self.ct, g0 + c, masks)
            total += int(cnt)
            if self._rmaps(vm):
                SK.shadow_ring_reset_masks(self._mmu_bundle(), vm, masks, nm, slot_recs)
            else:
                tdp_ring_reset_masks(self.pa, self.vt, self.st, self.cfg, vm, masks, nm, slot_recs)
        self._sim_charge(vm, "dirty_log.ioctl")
        self._sim_charge(vm, "dirty_log.ring_entry", total)
        if total:
            self._flush_remote_tlbs(vm)
        return total
