"""The public Host: many VMs sharing one set of arenas and one host memory budget.

``Host`` is a facade in the order of KVM's ioctls: it creates VMs and keeps the host-wide work (time,
reclaim, reports); each group of ioctls lives in a mixin named after it (the map is at the top of ``Host``).
"""

import numpy as np

from . import args as A
from . import memslot as ms
from . import reclaim as _reclaim
from .arena import ROW_BYTES, Arena, bytes_per_row, vm_group_bytes
from .batch import AccessResult, Batches
from .dirtylog import DirtyLog
from .errors import bad, einval
from .kernels import shadow as SK
from .kernels import state as S
from .kernels.gmem import GM_MAX_VMS
from .kernels.mmu import recover_nx_huge_pages
from .kernels.spte import FMT_EPT, FMT_NPT, ROLE_DIRECT, ROLE_GUEST_MODE, ROLE_INVALID
from .memslot import Memslots
from .nested import Nested
from .notifier import Notifiers
from .paging import GuestPaging
from .timemodel import Timing
from .units import format_size, parse_size
from .vcpu import Vcpus

# Sizes KVM allocates, used by footprint() (x86-64, ~v6.10)
SIZEOF_KVM_MMU_PAGE = 184        # struct kvm_mmu_page
SIZEOF_LPAGE_INFO = 4            # struct kvm_lpage_info
SIZEOF_MEMSLOT = 192             # struct kvm_memory_slot incl. arch part
SIZEOF_PTE_LIST_DESC = 128       # struct pte_list_desc: next, counts, 14 pointers
MAX_SECONDS = 2.0 ** 53 / 1000   # simulated time stays an exact number of milliseconds

__all__ = ["AccessResult", "Host"]


class Host(Memslots, Vcpus, Batches, DirtyLog, Notifiers, GuestPaging, Nested, Timing):
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
    ``time``: the time model (docs/time.md): True (the default cost table), a ``bm.CostModel`` or the path of a
    cost-model TOML file; vCPUs of a VM then interleave by simulated clocks (``sim_begin`` / ``sim_end``).
    ``huge_page_split_on_fault``: True (KVM v6.2+): a TDP-MMU fault that must break a huge SPTE (dirty logging,
    NX) splits it into a table of smaller SPTEs; False models KVM before v6.2, which zapped it and mapped only
    the faulting page, so the rest of its range faulted again.
    """

    # KVM's ioctls in order, and where they are: KVM_CREATE_VM + KVM_CREATE_VCPU (create_vms, here);
    # KVM_SET_USER_MEMORY_REGION (memslot.Memslots); KVM_SET_SREGS / KVM_SET_REGS, guest memory, INVLPG and
    # TLB flush (vcpu.Vcpus); KVM_RUN (batch.Batches; emulated_access, mov_cr3: paging.GuestPaging);
    # KVM_SET_NR_MMU_PAGES, the shrinker (paging.GuestPaging); KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, the
    # dirty ring, PML (dirtylog.DirtyLog); MMU notifiers (notifier.Notifiers); host work: time, reclaim,
    # reports (here; reclaim.py).

    def __init__(self, memory="64GiB", backing="thp", *, mmio_caching=True, nx_huge_pages=False,
                 nx_huge_pages_recovery_ratio=60, nx_huge_pages_recovery_period_ms=0,
                 tdp_huge_page_level=3, eager_page_split=True, pml=False, overcommit=False,
                 watermarks=(0.90, 0.95), tdp_mmu=True, time=None, huge_page_split_on_fault=True):
        self.memory = parse_size(memory, "memory")
        if not 0 < self.memory <= A.I64_MAX:
            raise bad("memory", memory, "must be positive and below 2**63 bytes")
        self.backing = ms.backing_code(backing)
        tdp_huge_page_level = A.exact_int(tdp_huge_page_level, "tdp_huge_page_level", 1, 3,
                                          why="must be 1 (4K), 2 (2M) or 3 (1G)")
        flags = {name: A.bool_arg(v, name) for name, v in (
            ("mmio_caching", mmio_caching), ("nx_huge_pages", nx_huge_pages),
            ("eager_page_split", eager_page_split), ("pml", pml), ("tdp_mmu", tdp_mmu),
            ("huge_page_split_on_fault", huge_page_split_on_fault))}
        self.tdp_mmu = flags["tdp_mmu"]   # kvm.tdp_mmu: False builds TDP VMs' tables with the shadow MMU's code
        self.nx_recovery_ratio = A.exact_int(nx_huge_pages_recovery_ratio, "nx_huge_pages_recovery_ratio", 0,
                                             1 << 32)
        self.nx_recovery_period_ms = A.exact_int(nx_huge_pages_recovery_period_ms,
                                                 "nx_huge_pages_recovery_period_ms", 0, 1 << 40)
        pml = flags["pml"]
        self.host_ctl = np.zeros(S.NHOST, np.int64)   # HOST_* words and the CFG_* configuration
        self.host_ctl[S.HOST_BUDGET_BYTES] = self.memory
        self.cfg[S.CFG_MMIO_CACHING] = int(flags["mmio_caching"])
        self.cfg[S.CFG_NX_HUGE_PAGES] = int(flags["nx_huge_pages"])
        self.cfg[S.CFG_TDP_MAX_LEVEL] = tdp_huge_page_level
        self.time_ms = 0.0
        self._nx_next_ms = None
        self.cfg[S.CFG_EAGER_SPLIT] = int(flags["eager_page_split"])
        self.cfg[S.CFG_PML] = int(pml)
        # KVM v6.2+ (c4b33d28ea51): the TDP MMU splits a huge SPTE a fault must break; before, it zapped it
        self.cfg[S.CFG_SPLIT_ON_FAULT] = int(flags["huge_page_split_on_fault"])
        self.arena = Arena(pml=bool(pml))
        self.nvm = 0
        self.nrec = 0
        self._order_cap = np.zeros(16, np.int64)
        self._vcpus = np.zeros(16, np.int64)
        self._gen_as1 = np.zeros(16, np.int64)
        self._nested = np.zeros(16, np.int64)   # the VM's guest has VMX (nested virtualization)
        self._write_tracking = np.zeros(16, np.int64)   # a TDP VM made a shadow root: gfn_write_track arrays
        self._slot_rec = ms.SlotIndex()  # (vm, slot) -> record, and each VM's own slots
        self._aliases = {}               # reclaim: (vm, hva, npages, backing) -> host_off of shared host pages
        self._alias_users = {}           # reclaim: host_off -> live records using it
        self._paging_init()
        self._time_init(time)
        _reclaim.configure(self, overcommit, watermarks)
        self.arena.ages = self.overcommit is not None   # reclaim keeps an age per host page

    # the Arena's structs, read-only here: they grow only through the Arena
    pa = property(lambda self: self.arena.pa, doc="Page arena (kvm_mmu_page rows).")
    vt = property(lambda self: self.arena.vt, doc="VM records and statistics.")
    st = property(lambda self: self.arena.st, doc="Memslot records and their pools.")
    ct = property(lambda self: self.arena.ct, doc="vCPU PML buffers and dirty rings.")
    vr = property(lambda self: self.arena.vr, doc="vCPU registers and roots.")
    sh = property(lambda self: self.arena.sh, doc="Shadow-MMU extras.")
    gm = property(lambda self: self.arena.gm, doc="Guest memory contents.")

    @property
    def cfg(self):
        """The host words array, read for its CFG_* configuration words (module parameters)."""
        return self.host_ctl

    @property
    def _maxphyaddr(self):
        """Per VM (VMTable capacity): the guest MAXPHYADDR (a column view of the VM records)."""
        return self.vt.maxphyaddr

    def _check_vm(self, vm, field="vm"):
        if not A.is_int(vm):
            raise bad(field, vm, "must be a VM id (integer)")
        if not 0 <= int(vm) < self.nvm:
            raise bad(field, vm, f"no such VM (this host has {self.nvm})")
        return int(vm)

    def _flush_remote_tlbs(self, vm):
        self.vt.stats[vm, S.ST_REMOTE_TLB_FLUSH_REQUESTS] += 1
        self.vt.stats[vm, S.ST_REMOTE_TLB_FLUSH] += 1

    # ------------------------------------------------------------------ VMs
    def create_vms(self, count, memory="1GiB", vcpus=1, mmu="tdp", *, tdp_format="ept", tdp_levels=4,
                   maxphyaddr=46, backing=None, ept_ad=True, tdp_mmu=None, nested=False):
        """Create ``count`` VMs, each with ``vcpus`` vCPUs and slot 0 of ``memory`` at gpa 0.

        Returns the new VM ids.  ``tdp_format`` "ept" (Intel) or "npt" (AMD); ``tdp_levels`` 4 or 5;
        ``ept_ad=False`` runs EPT without accessed/dirty bits (access tracking).  ``tdp_mmu`` (None: the Host's)
        picks the TDP MMU (True) or the legacy one (False: the shadow MMU's code with direct pages) for these
        VMs; it means nothing for ``mmu="shadow"`` (KVM ignores kvm.tdp_mmu without TDP).  ``nested=True`` offers
        VMX (an EPT VM) or SVM (an NPT VM) to the guest, which may then run L2 guests (``nested_enter``;
        docs/nested.md), on either TDP MMU.
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
        tdp_mmu = self.tdp_mmu if tdp_mmu is None else A.bool_arg(tdp_mmu, "tdp_mmu")
        kind = S.MMU_SHADOW if mmu == "shadow" else S.MMU_TDP if tdp_mmu else S.MMU_LEGACY
        nested = A.bool_arg(nested, "nested")
        if nested:
            if kind == S.MMU_SHADOW:
                raise bad("nested", nested, "KVM offers nested EPT/NPT only on a TDP host (mmu=\"tdp\")")
            if tdp_format == "npt" and tdp_levels != 4:
                raise bad("tdp_levels", tdp_levels, "nested NPT under a 4-level L1 on 5-level NPT (passthrough "
                          "roots) is not modelled: use tdp_levels=4")
        if tdp_levels == 4 and maxphyaddr > 48:
            raise bad("maxphyaddr", maxphyaddr, "4-level TDP maps at most 48 physical address bits")
        if size > (1 << maxphyaddr):
            raise bad("memory", memory, f"larger than the {maxphyaddr}-bit guest physical address space")
        if size >> 12 > ms.KVM_MEM_MAX_NR_PAGES or ms.HVA_BASE + size > ms.TASK_SIZE_MAX:
            raise einval("memory", memory, "slot 0 would be larger than one memslot can be (KVM_MEM_MAX_NR_PAGES)")
        bcode = self.backing if backing is None else ms.backing_code(backing)
        ms.check_backing_alignment(bcode, ms.HVA_BASE, size)
        # kvm_create_vm + vCPUs + slot 0: refuse before allocating what cannot fit (O(1), not per VM)
        A.check_alloc(vm_group_bytes(count, vcpus, size >> 12, kind != S.MMU_TDP, bool(self.cfg[S.CFG_PML]),
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
        self.arena.grow_vms(need)
        for name in ("_order_cap", "_vcpus", "_gen_as1", "_nested", "_write_tracking"):
            arr = getattr(self, name)
            if arr.shape[0] < need:
                setattr(self, name, np.concatenate([arr, np.zeros(max(need, 2 * arr.shape[0]) - arr.shape[0],
                                                                  np.int64)]))
        vms = np.arange(first, need, dtype=np.int64)
        vt = self.vt
        vt.root[vms] = -1
        vt.root_l2[vms] = -1
        # shadow paging builds x86-format SPTEs with A/D bits (the NPT layout)
        vt.fmt[vms] = FMT_EPT if tdp_format == "ept" and kind != S.MMU_SHADOW else FMT_NPT
        vt.levels[vms] = tdp_levels
        vt.ad_disabled[vms] = 0 if ept_ad or kind == S.MMU_SHADOW else 1
        vt.max_gfn[vms] = (1 << (maxphyaddr - 12)) - 1
        vt.memslots_gen[vms] = 0
        self._gen_as1[vms] = 1  # kvm_create_vm: slots->generation = as_id
        vt.stats[vms] = 0
        vt.host_bytes[vms] = 0
        self._vcpus[vms] = vcpus
        self._nested[vms] = int(nested)
        self._write_tracking[vms] = 0
        nv = self._paging_add_vms(vms, int(vcpus), kind)
        self.arena.grow_vcpus(nv + vcpus * k)
        vt.vcpu_off[vms] = nv + vcpus * np.arange(k)  # global index of each VM's vCPU 0
        vt.dirty_mode[vms] = 0
        vt.maxphyaddr[vms] = maxphyaddr
        self.nvm = need
        self._add_slot0(vms, size, bcode)  # slot 0 at gpa 0: one KVM_SET_USER_MEMORY_REGION per VM
        if kind != S.MMU_TDP:
            for v in vms:
                self._default_mmu_pages(int(v))
        self._time_add_vms(vms, vcpus, kind)
        return vms

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
            recover_nx_huge_pages(self._mmu_bundle(), int(vm), rows, to_zap)   # flushes if it zapped

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

        Categories: ``tdp_page_tables`` (the TDP MMU's) and ``shadow_page_tables`` (the shadow MMU code's:
        shadow paging and the legacy TDP MMU) (4 KiB table pages, SecPageTables),
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
        # the shadow MMU code's pages and rmaps: shadow paging, legacy TDP, a TDP-MMU VM's guest_mmu
        shadow_vms = vms[self._rmaps(vms)]
        pages = int(self.vt.stats[vms, S.ST_MMU_PAGES].sum())
        spages = int(self.vt.n_used[vms].sum())
        counts = np.zeros(5, np.int64)
        if shadow_vms.size:
            self._paging_topup()
            m = self._mmu_bundle()
            one = np.zeros(5, np.int64)
            for v in shadow_vms:
                SK.shadow_footprint_counts(m, int(v), one)
                if self._mmu_kind[v] == S.MMU_LEGACY and not self._write_tracking[v]:
                    one[4] = 0   # no gfn_write_track arrays under TDP (kvm_page_track_write_tracking_enabled)
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
        g = self.vt.vcpu_off[vms]
        out["dirty_rings"] = int(sum(int(self.ct.ring_size[o:o + c].sum()) for o, c in zip(g, vcpus, strict=True))) * 16
        out["kvm_total"] = sum(v for k, v in out.items() if k not in ("guest_memory", "guest_swapped"))
        arrays = [a for t in self.arena.tuples() for a in t]
        sim = sum(a.nbytes for a in arrays)
        out["simulator_bytes"] = int(sim if vm is None else sim * (len(vms) / max(1, self.nvm)))
        return out

    def reserve_tables(self, rows):
        """Make room for ``rows`` more page-table pages now (one allocation instead of doublings)."""
        rows = A.exact_int(rows, "rows", 0, A.I64_MAX, why="must be a non-negative integer")
        A.check_alloc((rows + S.MAX_ROWS_PER_EVENT) * bytes_per_row(), "rows", rows, f"{rows} page-table pages")
        free = int(self.pa.ctl[S.CTL_FREE_TOP])
        if rows + S.MAX_ROWS_PER_EVENT > free:
            self.arena.grow_pages(rows + S.MAX_ROWS_PER_EVENT, exact=True)

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

    def host_pages(self, vm, slot):
        """The host side of a memslot's pages: bool arrays ``resident``, ``swapped``, ``split``."""
        vm = self._check_vm(vm)
        return _reclaim.page_state(self, vm, A.exact_int(slot, "slot", 0, (1 << 32) - 1))

    def swapped_bytes(self):
        """Bytes of guest memory in swap."""
        return int(self.host_ctl[S.HOST_SWAPPED_BYTES])

    def spte_dump(self, vm):
        """Every leaf and MMIO SPTE reachable from the VM's TDP root (with the legacy TDP MMU: the direct root its
        vCPUs share; a shadow-paging VM has none: {}): dict gfn -> (level, spte as uint64)."""
        from .kernels.tdp import tdp_mmu_spte_dump
        vm = self._check_vm(vm)
        root = int(self.vt.root[vm])   # -1 for a shadow-MMU VM: no TDP root, {}
        if self._mmu_kind[vm] == S.MMU_LEGACY:
            # the vCPUs' root_mmu roots: the current set in L1, the other set while a vCPU runs L2 on nested paging;
            # the VM's direct TDP root is the one of role level VM_LEVELS without guest_mode
            g0 = int(self.vt.vcpu_off[vm])
            rec = self.vr.rec[g0:g0 + int(self._vcpus[vm])]
            nested = (rec[:, S.VR_GUEST_MODE] != 0) & (rec[:, S.VR_EPTP] >= 0)
            roots = np.where(nested, rec[:, S.VR_ALT_ROOT], rec[:, S.VR_ROOT])
            want = int(self.vt.levels[vm])
            valid = [int(r) for r in roots if r >= 0 and not int(self.pa.sp_role[r]) & (ROLE_INVALID | ROLE_GUEST_MODE)
                     and int(self.pa.sp_role[r]) & 0xF == want and int(self.pa.sp_role[r]) & ROLE_DIRECT]
            root = valid[0] if valid else -1
        out = np.zeros((0, 3), np.int64)
        n = tdp_mmu_spte_dump(self.pa, self.vt, self.cfg, np.int64(vm), np.int64(root), out)
        if n:
            out = np.zeros((n, 3), np.int64)
            tdp_mmu_spte_dump(self.pa, self.vt, self.cfg, np.int64(vm), np.int64(root), out)
        return {g: (lv, s & 0xFFFFFFFFFFFFFFFF) for g, lv, s in out.tolist()}
