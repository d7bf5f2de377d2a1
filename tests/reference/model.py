"""A pure-Python reference model of KVM's x86 TDP MMU (EPT and NPT), for many VMs.

Dicts and ints only: a page table is a :class:`Table` whose ``entries`` dict maps an
index to a child ``Table`` (a non-leaf SPTE), or to an int (a leaf or an MMIO SPTE);
an absent index is a non-present SPTE.  Every SPTE value is computed here from KVM's
rules; only the mask constants come from ``batchmmu.kernels.spte``.

Written from upstream KVM (~v6.18): ``arch/x86/kvm/mmu/{mmu.c,tdp_mmu.c,spte.c,spte.h}``,
``arch/x86/kvm/{x86.c,vmx/vmx.c,vmx/common.h}``, ``virt/kvm/kvm_main.c``.  Notably
(versions differ here): make_spte sets the Accessed bit, and the Dirty bit of writable
SPTEs, even on A/D-disabled EPT SPTEs (v6.13+); disabling dirty logging recovers huge
pages in place (``kvm_mmu_recover_huge_pages``, v6.13+).

The simulated host and VMM follow batchmmu's public contract, not KVM:

* a slot's guest RAM is mapped at ``hva`` (default ``HVA_BASE + gpa``); the host pfn of a
  gfn is its hva >> 12; the host page size comes from the slot's backing: ``4k``,
  ``thp`` (2 MiB where the 2 MiB-aligned hva range lies inside the slot's mapping),
  ``hugetlb-2m``, ``hugetlb-1g``; host pages are tracked per slot, charged to the
  budget when first faulted in (``host_pages_faulted_in``) and released on deletion;
* host pages are always writable (no zero page): map_writable = not MEM_READONLY;
* no PML (dirty logging write-protects), no L1TF mitigation, no manual dirty-log protect,
  KVM_X86_QUIRK_SLOT_ZAP_ALL on (deleting/moving a slot zaps everything);
* vCPUs run in address space 0 (no SMM) and share one root, loaded at the first
  access (vCPU entry) and dropped by a fast zap;
* every kvm_flush_remote_tlbs() counts in ``remote_tlb_flush`` (and ``_requests``);
* ``mmu_pages`` counts every TDP page-table page, roots included;
* a batch of accesses runs VM by VM (stable), as ``Host.access`` documents; an access that
  exits more than once (RET_PF_FIXED, then a new exit on the re-executed access) reports
  the outcome and error code of its last exit;
* module parameters as Host's: mmio_caching, nx_huge_pages, tdp_huge_page_level
  (max_huge_page_level), eager_page_split.
"""

import errno

from batchmmu.kernels import spte as _S

M64 = (1 << 64) - 1


def _c(x):
    return int(x) & M64


# ---------------------------------------------------------------------------- constants
PAGE_SHIFT = 12
HVA_BASE = 1 << 40                 # where the simulated VMM maps guest RAM (contract)
TASK_SIZE_MAX = (1 << 47) - 4096   # x86-64 4-level user address space (access_ok)
KVM_USER_MEM_SLOTS = 32764         # SHRT_MAX - KVM_INTERNAL_MEM_SLOTS (3)
KVM_ADDRESS_SPACE_NUM = 2          # x86 with SMM
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
MEM_LOG_DIRTY_PAGES = 1
MEM_READONLY = 2

BACKINGS = ("4k", "thp", "hugetlb-2m", "hugetlb-1g")
HUGETLB_BYTES = {"hugetlb-2m": 1 << 21, "hugetlb-1g": 1 << 30}

ACC_EXEC, ACC_WRITE_M, ACC_USER_M, ACC_ALL = 1, 2, 4, 7       # mmu.h ACC_*
ACC_WRITE, ACC_USER, ACC_FETCH = 0x2, 0x4, 0x10                # access kinds (PFERR-style)
PFERR_P, PFERR_W, PFERR_U, PFERR_RSVD, PFERR_F = 1, 2, 4, 8, 16

RET_PF_RETRY, RET_PF_EMULATE, RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS = 1, 2, 3, 4, 5

SPTE_MMU_PRESENT = _c(_S.SPTE_MMU_PRESENT_MASK)
SPTE_AD_MASK = _c(_S.SPTE_TDP_AD_MASK)
SPTE_AD_DISABLED = _c(_S.SPTE_TDP_AD_DISABLED)
PT_WRITABLE = _c(_S.PT_WRITABLE_MASK)
PT_PAGE_SIZE = _c(_S.PT_PAGE_SIZE_MASK)
PT_PRESENT = 1                     # bit 0: P (NPT) / R (EPT)
SHADOW_NONPRESENT = _c(_S.SHADOW_NONPRESENT_VALUE)
ACC_TRACK_SAVED_SHIFT = _S.EPT_SAVED_BITS_SHIFT
ACC_TRACK_SAVED_MASK = _c(_S.EPT_R) | _c(_S.EPT_X)
MMIO_GEN_MASK = _c(_S.MMIO_SPTE_GEN_MASK)
MMIO_GEN_LOW_MASK = _c(_S.MMIO_SPTE_GEN_LOW_MASK)
MMIO_GEN_HIGH_MASK = _c(_S.MMIO_SPTE_GEN_HIGH_MASK)
MMIO_GEN_LOW_SHIFT = _S.MMIO_SPTE_GEN_LOW_START
MMIO_GEN_HIGH_SHIFT = _S.MMIO_SPTE_GEN_HIGH_SHIFT
GEN_UPDATE_IN_PROGRESS = _c(_S.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)
NPT_RSVD_BIT51 = 1 << 51

PAGES_STAT = {1: "pages_4k", 2: "pages_2m", 3: "pages_1g"}

STAT_NAMES = (
    "pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits",
    "mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_recycled",
    "mmu_cache_miss", "mmu_unsync", "remote_tlb_flush", "remote_tlb_flush_requests",
    "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created",
    "pf_guest", "tlb_flush", "invlpg", "max_mmu_rmap_size",
    "walk_refs", "mmu_pages", "rmap_entries", "accesses", "host_pages_faulted_in",
    "pf_retry", "mmu_notifier_zapped", "pages_aged", "nx_lpage_recovered",
    "host_major_faults", "host_pages_reclaimed", "host_pages_swapped", "host_thp_splits",
)


class Fmt:
    """The shadow_*_mask values KVM installs for one SPTE format (spte.c)."""

    def __init__(self, name, **masks):
        self.name = name
        for k, v in masks.items():
            setattr(self, k, _c(v))


# kvm_mmu_set_ept_masks(has_ad_bits, has_exec_only=true), vmx_get_mt_mask: WB | IPAT
EPT = Fmt("ept", present=_S.EPT_SUPPRESS_VE, user=_S.EPT_R, x=_S.EPT_X, nx=0, accessed=_S.EPT_A,
          dirty=_S.EPT_D, host_writable=_S.EPT_HOST_WRITABLE, mmu_writable=_S.EPT_MMU_WRITABLE,
          memtype=_S.EPT_MEMTYPE_WB, mmio_value=_S.EPT_MMIO_VALUE, mmio_mask=_S.EPT_MMIO_MASK,
          mmio_access=0, acc_track=_S.EPT_RWX)
# kvm_mmu_reset_all_pte_masks (host MAXPHYADDR < 52: MMIO SPTEs = reserved bit 51 | P)
NPT = Fmt("npt", present=_S.NPT_P, user=_S.NPT_U, x=0, nx=_S.NPT_NX, accessed=_S.NPT_A,
          dirty=_S.NPT_D, host_writable=_S.NPT_HOST_WRITABLE, mmu_writable=_S.NPT_MMU_WRITABLE,
          memtype=0, mmio_value=_S.NPT_MMIO_VALUE, mmio_mask=_S.NPT_MMIO_MASK,
          mmio_access=_S.NPT_MMIO_ACCESS_MASK, acc_track=0)

OUTCOMES = ("HIT", "FIXED", "SPURIOUS", "MMIO", "EMULATED", "GUEST_FAULT", "RING_FULL", "RETRY")


class RefError(Exception):
    """What batchmmu raises as BatchMMUError; ``errno`` is KVM's errno or None."""

    def __init__(self, msg, errno=None):
        super().__init__(msg)
        self.errno = errno


class RefOOM(RefError):
    """The host budget cannot back a page; ``applied[i]`` says whether event i took effect."""

    def __init__(self, applied=()):
        super().__init__("host memory exhausted")
        self.applied = list(applied)


def _einval(msg):
    return RefError(msg, errno.EINVAL)


def _pages(level):
    return 1 << (9 * (level - 1))


def _index(gfn, level):
    return (gfn >> (9 * (level - 1))) & 511


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- structures
class Table:
    """One TDP page table (struct kvm_mmu_page): the SPTEs of ``level`` for gfns from ``gfn``."""

    __slots__ = ("level", "gfn", "entries", "nx_disallowed", "nx_tracked", "parent", "pidx")

    def __init__(self, level, gfn, parent=None, pidx=0):
        self.level = level
        self.gfn = gfn
        self.entries = {}
        self.nx_disallowed = False   # sp->nx_huge_page_disallowed
        self.nx_tracked = False      # on possible_nx_huge_pages (counted in nx_lpage_splits)
        self.parent = parent         # sp->ptep: the table (and index) whose SPTE points here
        self.pidx = pidx


class Slot:
    """struct kvm_memory_slot plus the simulated host mapping behind it."""

    __slots__ = ("id", "base_gfn", "npages", "hva", "flags", "backing", "dirty", "resident", "swapped", "split",
                 "age")

    def __init__(self, sid, base_gfn, npages, hva, flags, backing):
        self.id = sid
        self.base_gfn = base_gfn
        self.npages = npages
        self.hva = hva
        self.flags = flags
        self.backing = backing
        self.dirty = set() if flags & MEM_LOG_DIRTY_PAGES else None   # relative gfns
        self.resident = {}        # first hva of a resident host page -> its bytes
        self.swapped = set()      # hvas of 4K pages in swap
        self.split = set()        # first hvas of THPs split by reclaim or MADV_DONTNEED
        self.age = {}             # reclaim age of each 4K page (hva); a THP's pages share one

    def share_host_pages(self, other):
        """An alias (same hva range and backing in the same VM) maps the same host pages."""
        self.resident, self.swapped, self.split, self.age = other.resident, other.swapped, other.split, other.age

    @property
    def as_id(self):
        return self.id >> 16

    def contains(self, gfn):
        return self.base_gfn <= gfn < self.base_gfn + self.npages


class VM:
    def __init__(self, fmt, levels, ept_ad, maxphyaddr, vcpus):
        self.fmt = fmt
        self.levels = levels
        self.hw_ad = fmt is NPT or ept_ad       # kvm_ad_enabled; role.ad_disabled = !hw_ad
        self.maxphyaddr = maxphyaddr
        self.max_gfn = (1 << (maxphyaddr - PAGE_SHIFT)) - 1
        self.vcpus = vcpus
        self.slots = {}
        self.gen = [0, 1]                       # kvm_create_vm: slots->generation = as_id
        self.root = None
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self.nx_pages = []                      # possible_nx_huge_pages, oldest first
        self.inval_count = 0                    # mmu_invalidate_in_progress
        self.inval_range = None                 # mmu_invalidate_range_{start,end}; None = INVALID_GPA


# ---------------------------------------------------------------------------- the host
class RefHost:
    """Mirror of ``batchmmu.Host`` for the TDP MMU; same method names and arguments."""

    def __init__(self, memory=64 << 30, backing="thp", *, mmio_caching=True, nx_huge_pages=False,
                 nx_huge_pages_recovery_ratio=60, nx_huge_pages_recovery_period_ms=0,
                 tdp_huge_page_level=3, eager_page_split=True, pml=False, overcommit=False,
                 watermarks=(0.90, 0.95), huge_page_split_on_fault=True):
        if not _is_int(memory) or memory <= 0:
            raise RefError(f"memory={memory!r}")
        for x in (nx_huge_pages_recovery_ratio, nx_huge_pages_recovery_period_ms):
            if not _is_int(x) or x < 0:
                raise RefError("nx_huge_pages_recovery_ratio / _period_ms")
        self.nx_recovery_ratio = nx_huge_pages_recovery_ratio
        self.nx_recovery_period_ms = nx_huge_pages_recovery_period_ms
        self.time_ms = 0.0
        self._nx_next_ms = None
        if tdp_huge_page_level not in (1, 2, 3):
            raise RefError(f"tdp_huge_page_level={tdp_huge_page_level!r}")
        self.budget = memory
        self.used = 0
        self.swapped = 0
        self.overcommit = {True: "direct", False: None, None: None}.get(overcommit, overcommit)
        if self.overcommit not in (None, "direct", "epoch"):
            raise RefError(f"overcommit={overcommit!r}")
        self.watermarks = tuple(float(w) for w in watermarks)
        self.backing = _backing(backing)
        self.mmio_caching = bool(mmio_caching)
        self.nx_huge_pages = bool(nx_huge_pages)
        self.max_huge_page_level = tdp_huge_page_level
        self.eager_page_split = bool(eager_page_split)
        self.split_on_fault = bool(huge_page_split_on_fault)
        if pml:
            raise NotImplementedError("the reference model write-protects for dirty logging (no PML)")
        self.vms = []

    # ------------------------------------------------------------------ VMs and queries
    def create_vms(self, count, memory=1 << 30, vcpus=1, mmu="tdp", *, tdp_format="ept", tdp_levels=4,
                   maxphyaddr=46, backing=None, ept_ad=True):
        if not _is_int(count) or count < 1:
            raise RefError("count")
        if not _is_int(memory) or memory <= 0 or memory % 4096:
            raise RefError("memory")
        if not _is_int(vcpus) or not 1 <= vcpus <= 4096:
            raise RefError("vcpus")
        if mmu != "tdp" or tdp_format not in ("ept", "npt") or tdp_levels not in (4, 5):
            raise RefError("mmu / tdp_format / tdp_levels")
        if not _is_int(maxphyaddr) or not 36 <= maxphyaddr <= 52 or (tdp_levels == 4 and maxphyaddr > 48):
            raise RefError("maxphyaddr")
        if memory > 1 << maxphyaddr:
            raise RefError("memory")
        b = self.backing if backing is None else _backing(backing)
        _check_backing_alignment(b, HVA_BASE, memory)
        if not ept_ad and tdp_format == "npt":
            raise RefError("ept_ad")
        ids = []
        for _ in range(count):
            v = VM(EPT if tdp_format == "ept" else NPT, tdp_levels, ept_ad, maxphyaddr, vcpus)
            v.slots[0] = Slot(0, 0, memory >> PAGE_SHIFT, HVA_BASE, 0, b)   # KVM_SET_USER_MEMORY_REGION
            v.gen[0] += KVM_ADDRESS_SPACE_NUM
            ids.append(len(self.vms))
            self.vms.append(v)
        return ids

    def _vm(self, vm):
        if not _is_int(vm) or not 0 <= vm < len(self.vms):
            raise RefError(f"vm={vm!r}")
        return self.vms[vm]

    def stats(self, vm):
        return dict(self._vm(vm).stats)

    def host_memory(self):
        return self.used, self.budget

    def memslots_generation(self, vm, as_id=0):
        if as_id not in (0, 1):
            raise RefError("as_id")
        return self._vm(vm).gen[as_id]

    def set_generation(self, vm, gen):
        """Test hook: what a test does to ``host.vt.memslots_gen[vm]``."""
        self._vm(vm).gen[0] = gen

    def spte_dump(self, vm):
        """{gfn: (level, spte)} of every present leaf and MMIO SPTE (like Host.spte_dump)."""
        v = self._vm(vm)
        out = {}

        def walk(t):
            for idx, e in t.entries.items():
                if isinstance(e, Table):
                    walk(e)
                elif self._present(e) or self._is_mmio(v, e):
                    out[t.gfn + idx * _pages(t.level)] = (t.level, e)

        if v.root is not None:
            walk(v.root)
        return out

    # ------------------------------------------------------------------ SPTE helpers
    @staticmethod
    def _present(e):
        # is_shadow_present_pte: a child table, or an int with the MMU-present bit
        return isinstance(e, Table) or (e is not None and bool(e & SPTE_MMU_PRESENT))

    def _is_mmio(self, v, e):
        return self.mmio_caching and _is_int(e) and (e & v.fmt.mmio_mask) == v.fmt.mmio_value

    def _make_spte(self, v, level, pfn, host_writable):
        """make_spte (spte.c) for a TDP fault: pte_access = ACC_ALL, not prefetch."""
        f = v.fmt
        access = ACC_ALL
        spte = SPTE_MMU_PRESENT
        if not v.hw_ad:
            spte |= SPTE_AD_DISABLED
        spte |= f.present | f.accessed
        if level > 1 and self.nx_huge_pages:
            access &= ~ACC_EXEC              # iTLB multihit: huge pages are never executable
        spte |= f.x if access & ACC_EXEC else f.nx
        if access & ACC_USER_M:
            spte |= f.user
        if level > 1:
            spte |= PT_PAGE_SIZE
        spte |= f.memtype
        if host_writable:
            spte |= f.host_writable
        else:
            access &= ~ACC_WRITE_M
        spte |= pfn << PAGE_SHIFT
        if access & ACC_WRITE_M:             # no shadow pages to unsync under TDP
            spte |= PT_WRITABLE | f.mmu_writable | f.dirty
        return spte

    def _make_mmio_spte(self, v, gfn):
        """make_mmio_spte (spte.c); shadow_nonpresent_or_rsvd_mask = 0."""
        gen = v.gen[0] & MMIO_GEN_MASK
        spte = ((gen << MMIO_GEN_LOW_SHIFT) & MMIO_GEN_LOW_MASK) | ((gen << MMIO_GEN_HIGH_SHIFT)
                                                                   & MMIO_GEN_HIGH_MASK)
        return spte | v.fmt.mmio_value | (ACC_ALL & v.fmt.mmio_access) | (gfn << PAGE_SHIFT)

    @staticmethod
    def _mmio_spte_gen(spte):
        return ((spte & MMIO_GEN_LOW_MASK) >> MMIO_GEN_LOW_SHIFT) | \
            ((spte & MMIO_GEN_HIGH_MASK) >> MMIO_GEN_HIGH_SHIFT)

    @staticmethod
    def _is_access_track(v, spte):
        return (spte & SPTE_AD_MASK) == SPTE_AD_DISABLED and (spte & v.fmt.acc_track) == 0 \
            and v.fmt is EPT

    def _mark_for_access_track(self, v, spte):
        """mark_spte_for_access_track (spte.c, v6.13+)."""
        if (spte & SPTE_AD_MASK) != SPTE_AD_DISABLED:
            return spte & ~v.fmt.accessed
        if self._is_access_track(v, spte):
            return spte
        spte |= (spte & ACC_TRACK_SAVED_MASK) << ACC_TRACK_SAVED_SHIFT
        return spte & ~(v.fmt.acc_track | v.fmt.accessed)

    @staticmethod
    def _restore_acc_track(spte):
        saved = (spte >> ACC_TRACK_SAVED_SHIFT) & ACC_TRACK_SAVED_MASK
        return (spte & ~(ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT)) | saved

    def _modify_protections(self, v, spte, set_, clear):
        """modify_spte_protections (spte.c): keeps access tracking state."""
        tracked = self._is_access_track(v, spte)
        if tracked:
            spte = self._restore_acc_track(spte)
        spte = (spte | set_) & ~clear
        return self._mark_for_access_track(v, spte) if tracked else spte

    def _make_small_spte(self, v, huge, child_level, index):
        """make_small_spte (spte.c): one piece of a split huge SPTE; role.access = ACC_ALL."""
        child = huge | ((index * _pages(child_level)) << PAGE_SHIFT)
        if child_level == 1:
            child &= ~PT_PAGE_SIZE
            if self.nx_huge_pages:            # make_spte_executable
                child = self._modify_protections(v, child, v.fmt.x, v.fmt.nx)
        return child

    def _make_huge_spte(self, v, small, level):
        """make_huge_spte (spte.c): a huge SPTE built from one of its small SPTEs."""
        huge = (small | PT_PAGE_SIZE) & ~((_pages(level) - 1) << PAGE_SHIFT)
        if self.nx_huge_pages:                # make_spte_nonexecutable
            huge = self._modify_protections(v, huge, v.fmt.nx, v.fmt.x)
        return huge

    # ------------------------------------------------------------------ the chokepoint
    def _set_spte(self, v, t, idx, new):
        """tdp_mmu_set_spte + handle_changed_spte: page stats and removed page tables."""
        old = t.entries.get(idx)
        if new is None:
            t.entries.pop(idx, None)
        else:
            t.entries[idx] = new
        if old is new or (_is_int(old) and _is_int(new) and old == new):
            return
        was_present, is_present = self._present(old), self._present(new)
        was_leaf = was_present and not isinstance(old, Table)
        is_leaf = is_present and not isinstance(new, Table)
        if was_leaf != is_leaf:
            v.stats[PAGES_STAT[t.level]] += 1 if is_leaf else -1
        if isinstance(old, Table):
            self._free_table(v, old)

    def _free_table(self, v, t):
        """handle_removed_pt: unaccount the table (and its NX tracking) and everything below."""
        for e in t.entries.values():
            if isinstance(e, Table):
                self._free_table(v, e)
            elif self._present(e):
                v.stats[PAGES_STAT[t.level]] -= 1
        v.stats["mmu_pages"] -= 1
        if t.nx_tracked:
            self._untrack_nx(v, t)
        t.entries = {}

    @staticmethod
    def _untrack_nx(v, t):
        """untrack_possible_nx_huge_page / unaccount_nx_huge_page."""
        t.nx_tracked = False
        v.nx_pages.remove(t)
        v.stats["nx_lpage_splits"] -= 1

    def _flush_remote_tlbs(self, v):
        v.stats["remote_tlb_flush_requests"] += 1
        v.stats["remote_tlb_flush"] += 1

    def _zap_all(self, v):
        """kvm_mmu_zap_all_fast: invalidate and zap the root; vCPUs load a new one on entry."""
        if v.root is not None:
            self._free_table(v, v.root)
            v.root = None

    # ------------------------------------------------------------------ memslots, host
    def _gfn_to_slot(self, v, gfn):
        for s in v.slots.values():
            if s.as_id == 0 and s.contains(gfn):
                return s
        return None

    @staticmethod
    def _gfn_to_hva(s, gfn):
        return s.hva + ((gfn - s.base_gfn) << PAGE_SHIFT)

    def _host_level(self, s, gfn):
        """host_pfn_mapping_level for the simulated host mapping of the slot."""
        if s.backing == "hugetlb-1g":
            return 3
        if s.backing == "hugetlb-2m":
            return 2
        if s.backing == "4k":
            return 1
        h2 = self._gfn_to_hva(s, gfn) & ~((1 << 21) - 1)
        if h2 in s.split:
            return 1                         # split by reclaim / MADV_DONTNEED: 4K host pages
        return 2 if s.hva <= h2 and h2 + (1 << 21) <= s.hva + (s.npages << PAGE_SHIFT) else 1

    def _host_page(self, s, gfn):
        size = 1 << (PAGE_SHIFT + 9 * (self._host_level(s, gfn) - 1))
        return self._gfn_to_hva(s, gfn) & ~(size - 1), size

    def _host_needs_budget(self, s, gfn):
        first, size = self._host_page(s, gfn)
        return first not in s.resident and self.used + size > self.budget and self.overcommit != "epoch"

    def _host_fault_in(self, v, s, gfn):
        first, size = self._host_page(s, gfn)
        if first in s.resident:
            return
        assert self.used + size <= self.budget or self.overcommit == "epoch", "model: host OOM not caught"
        s.resident[first] = size
        if first in s.swapped:               # reclaimed to swap: a major fault reads it back
            s.swapped.remove(first)
            self.swapped -= 4096
            v.stats["host_major_faults"] += 1
            v.stats["host_pages_swapped"] -= 1
        self.used += size
        v.stats["host_pages_faulted_in"] += 1

    @staticmethod
    def _lpage_disallowed(s, gfn, level):
        """lpage_info_slot(gfn, slot, level)->disallow_lpage as kvm_alloc_memslot_metadata seeds it."""
        shift = 9 * (level - 1)
        mask = (1 << shift) - 1
        if (s.base_gfn ^ (s.hva >> PAGE_SHIFT)) & mask:
            return True
        idx = (gfn >> shift) - (s.base_gfn >> shift)
        last = ((s.base_gfn + s.npages - 1) >> shift) - (s.base_gfn >> shift)
        return (idx == 0 and s.base_gfn & mask != 0) or (idx == last and (s.base_gfn + s.npages) & mask != 0)

    def _max_mapping_level(self, s, gfn):
        """kvm_mmu_max_mapping_level: lpage_info walk, then the host mapping level."""
        level = min(3, self.max_huge_page_level)
        while level > 1 and self._lpage_disallowed(s, gfn, level):
            level -= 1
        if level == 1:
            return 1
        return min(level, self._host_level(s, gfn))

    @staticmethod
    def _mark_page_dirty(s, gfn):
        if s is not None and s.dirty is not None:
            s.dirty.add(gfn - s.base_gfn)

    # ------------------------------------------------------------------ hardware
    def _hw_walk(self, v, gfn, write, fetch):
        """The CPU's TDP walk: (ok, rsvd, refs, table, idx, spte)."""
        t, refs = v.root, 0
        while True:
            idx = _index(gfn, t.level)
            e = t.entries.get(idx)
            refs += 1
            if isinstance(e, Table):         # non-leaf SPTEs grant everything
                t = e
                continue
            spte = SHADOW_NONPRESENT if e is None else e
            if v.fmt is EPT:
                if spte & 1 == 0 and spte & 2:   # W without R: EPT misconfiguration
                    return False, True, refs, t, idx, spte
                ok = bool(spte & 4) if fetch else bool(spte & 2) if write else bool(spte & 1)
            else:
                if spte & 1 and spte & NPT_RSVD_BIT51:
                    return False, True, refs, t, idx, spte
                ok = bool(spte & 1) and bool(spte & 4) and not (write and not spte & 2) \
                    and not (fetch and spte & v.fmt.nx)
            return ok, False, refs, t, idx, spte

    def _exit_error_code(self, v, rsvd, spte, write, fetch):
        if v.fmt is EPT:
            if rsvd:
                return PFERR_RSVD                       # handle_ept_misconfig
            err = PFERR_P if spte & 7 else 0            # any EPT_VIOLATION_PROT bit
            return err | (PFERR_W if write else PFERR_F if fetch else PFERR_U)   # ACC_READ -> USER
        # #NPF: hardware error code; nested page table walks are user accesses
        err = PFERR_U | (PFERR_W if write else 0) | (PFERR_F if fetch else 0)
        if rsvd:
            return err | PFERR_P | PFERR_RSVD
        return err | (PFERR_P if spte & 1 else 0)

    # ------------------------------------------------------------------ accesses
    def access(self, vm, vcpu, addr, kind=0):
        """Like Host.access (lists of equal length, or scalars); returns (outcomes, error_codes)."""
        cols = [list(x) if isinstance(x, (list, tuple)) else None for x in (vm, vcpu, addr, kind)]
        n = max((len(c) for c in cols if c is not None), default=1)
        vms, vcpus, addrs, kinds = (c if c is not None and len(c) != 1 else [x if c is None else c[0]] * n
                                    for c, x in zip(cols, (vm, vcpu, addr, kind), strict=True))
        if any(len(x) != n for x in (vms, vcpus, addrs, kinds)):
            raise RefError("lengths")
        for i in range(n):   # Host._events validates the whole batch first
            v = self._vm(vms[i])
            if not _is_int(vcpus[i]) or not 0 <= vcpus[i] < v.vcpus:
                raise RefError("vcpu")
            if not _is_int(addrs[i]) or not 0 <= addrs[i] < 1 << v.maxphyaddr:
                raise RefError("addr")
            k = kinds[i]
            if not _is_int(k) or k & ~(ACC_WRITE | ACC_USER | ACC_FETCH) or (k & ACC_WRITE and k & ACC_FETCH):
                raise RefError("kind")
        # Host._run_accesses: VMs are independent, so a batch runs VM by VM (stable), results in
        # the caller's order; only the shared host budget can tell, by what ran before an OOM.
        order = sorted(range(n), key=lambda i: vms[i])
        outcomes, errs = [None] * n, [None] * n
        for j, i in enumerate(order):
            try:
                try:
                    outcomes[i], errs[i] = self._access_one(self.vms[vms[i]], addrs[i] >> PAGE_SHIFT,
                                                            bool(kinds[i] & ACC_WRITE), bool(kinds[i] & ACC_FETCH))
                except RefOOM:
                    if self.overcommit != "direct" or not self._direct_reclaim(self.vms[vms[i]], addrs[i]):
                        raise
                    outcomes[i], errs[i] = self._access_one(self.vms[vms[i]], addrs[i] >> PAGE_SHIFT,
                                                            bool(kinds[i] & ACC_WRITE), bool(kinds[i] & ACC_FETCH))
            except RefOOM:
                done = set(order[:j])
                raise RefOOM([k in done for k in range(n)]) from None
        return outcomes, errs

    def _access_one(self, v, gfn, write, fetch):
        """One guest access: the hardware walk, and for each exit kvm_mmu_page_fault; the guest
        re-executes the access after RET_PF_FIXED / RET_PF_SPURIOUS."""
        if v.root is None:
            v.root = Table(v.levels, 0)     # kvm_mmu_load at vCPU entry
            v.stats["mmu_pages"] += 1
        outcome, err = "HIT", 0
        for attempt in range(4):
            ok, rsvd, refs, t, idx, spte = self._hw_walk(v, gfn, write, fetch)
            if ok:
                if v.hw_ad and (spte & SPTE_AD_MASK) != SPTE_AD_DISABLED:   # CPU sets A (and D)
                    t.entries[idx] = spte | v.fmt.accessed | (v.fmt.dirty if write else 0)
                if attempt == 0:
                    v.stats["accesses"] += 1
                v.stats["walk_refs"] += refs
                return outcome, err
            err = self._exit_error_code(v, rsvd, spte, write, fetch)
            if rsvd and self._is_mmio(v, spte):
                # handle_mmio_page_fault / check_mmio_spte
                gen = v.gen[0]
                if not gen & GEN_UPDATE_IN_PROGRESS and (gen & MMIO_GEN_MASK) == self._mmio_spte_gen(spte):
                    if attempt == 0:
                        v.stats["accesses"] += 1
                    v.stats["walk_refs"] += refs
                    return "MMIO", err
            f_write = bool(err & PFERR_W)   # an EPT misconfiguration reports no access type
            slot = self._gfn_to_slot(v, gfn)
            if attempt == 0:
                if slot is not None and not (f_write and slot.flags & MEM_READONLY) \
                        and self._host_needs_budget(slot, gfn):
                    raise RefOOM()           # nothing of this event is applied
                v.stats["accesses"] += 1
            v.stats["walk_refs"] += refs
            v.stats["pf_taken"] += 1
            r = self._page_fault(v, gfn, slot, err)
            if r == RET_PF_RETRY:            # the guest re-executes later; the access has not happened
                v.stats["pf_retry"] += 1
                return "RETRY", err
            if r == RET_PF_EMULATE:
                v.stats["pf_emulate"] += 1
                return ("MMIO" if slot is None else "EMULATED"), err
            v.stats["pf_fixed" if r == RET_PF_FIXED else "pf_spurious"] += 1
            outcome = "FIXED" if r == RET_PF_FIXED else "SPURIOUS"
        raise AssertionError("model: the access kept faulting")

    def _page_fault(self, v, gfn, slot, err):
        """kvm_mmu_do_page_fault -> kvm_tdp_mmu_page_fault."""
        write, exec_, present, rsvd = (bool(err & b) for b in (PFERR_W, PFERR_F, PFERR_P, PFERR_RSVD))
        if not rsvd:                          # page_fault_can_be_fast refuses RSVD faults
            r = self._fast_page_fault(v, gfn, slot, write, exec_, present)
            if r != RET_PF_INVALID:
                v.stats["pf_fast"] += 1
                return r
        # kvm_mmu_faultin_pfn
        if slot is None:                      # kvm_handle_noslot_fault
            if not self.mmio_caching or gfn > v.max_gfn:
                return RET_PF_EMULATE
            return self._tdp_mmu_map(v, gfn, None, 0, False, exec_)
        if v.inval_count and v.inval_range is not None and v.inval_range[0] <= gfn < v.inval_range[1]:
            return RET_PF_RETRY               # mmu_invalidate_retry_gfn_unsafe (kvm_mmu_faultin_pfn)
        if write and slot.flags & MEM_READONLY:
            return RET_PF_EMULATE             # KVM_PFN_ERR_RO_FAULT
        self._host_fault_in(v, slot, gfn)
        pfn = self._gfn_to_hva(slot, gfn) >> PAGE_SHIFT
        return self._tdp_mmu_map(v, gfn, slot, pfn, not slot.flags & MEM_READONLY, exec_)

    def _access_allowed(self, v, spte, write, exec_):
        """is_access_allowed (mmu.c)."""
        if exec_:
            return (spte & (v.fmt.x | v.fmt.nx)) == v.fmt.x
        if write:
            return bool(spte & PT_WRITABLE)
        return bool(spte & PT_PRESENT)

    def _fast_page_fault(self, v, gfn, slot, write, exec_, present):
        """fast_page_fault (mmu.c) with kvm_tdp_mmu_fast_pf_get_last_sptep."""
        if (not present and v.hw_ad) or (present and not write):   # page_fault_can_be_fast
            return RET_PF_INVALID
        t = v.root
        while isinstance(t.entries.get(_index(gfn, t.level)), Table):
            t = t.entries[_index(gfn, t.level)]
        idx = _index(gfn, t.level)
        spte = t.entries.get(idx)
        if not self._present(spte):
            return RET_PF_INVALID
        if self._access_allowed(v, spte, write, exec_):
            return RET_PF_SPURIOUS
        new = spte
        if not v.hw_ad and self._is_access_track(v, spte):
            new = self._restore_acc_track(new) | v.fmt.accessed
        if write and spte & v.fmt.mmu_writable:
            new |= PT_WRITABLE
            if t.level > 1 and slot is not None and slot.flags & MEM_LOG_DIRTY_PAGES:
                return RET_PF_INVALID          # the slow path maps 4K in logged slots
        if new == spte or not self._access_allowed(v, new, write, exec_):
            return RET_PF_INVALID
        t.entries[idx] = new                   # fast_pf_fix_direct_spte: cmpxchg, no bookkeeping
        if new & PT_WRITABLE and not spte & PT_WRITABLE:
            self._mark_page_dirty(slot, gfn)
        return RET_PF_FIXED

    def _tdp_mmu_map(self, v, gfn, slot, pfn, map_writable, exec_):
        """kvm_mmu_hugepage_adjust + kvm_tdp_mmu_map + tdp_mmu_map_handle_target_level."""
        nx = self.nx_huge_pages
        huge_page_disallowed = exec_ and nx
        req_level = goal_level = 1
        if slot is not None and not slot.flags & MEM_LOG_DIRTY_PAGES:
            req_level = self._max_mapping_level(slot, gfn)
            # a huge page with gfns under invalidation: the host split it first (host_pfn_mapping_level)
            while req_level > 1 and v.inval_count and v.inval_range is not None and \
                    (gfn & ~(_pages(req_level) - 1)) < v.inval_range[1] and \
                    (gfn & ~(_pages(req_level) - 1)) + _pages(req_level) > v.inval_range[0]:
                req_level -= 1
            if req_level > 1 and not huge_page_disallowed:
                goal_level = req_level
        t = v.root
        while True:
            level = t.level
            idx = _index(gfn, level)
            old = t.entries.get(idx)
            if nx and level > 1 and level == goal_level and isinstance(old, Table) and old.nx_disallowed:
                goal_level -= 1                  # disallowed_hugepage_adjust
            if level == goal_level:
                break
            if isinstance(old, Table):
                t = old
                continue
            child = Table(level - 1, gfn & ~(_pages(level) - 1), t, idx)
            child.nx_disallowed = huge_page_disallowed
            if self._present(old) and not self.split_on_fault:   # before v6.2: tdp_mmu_zap_spte_atomic
                self._set_spte(v, t, idx, None)
                self._flush_remote_tlbs(v)
                old = None
            if self._present(old):               # tdp_mmu_split_huge_page: no flush
                for i in range(512):
                    child.entries[i] = self._make_small_spte(v, old, level - 1, i)
                self._set_spte(v, t, idx, child)
                v.stats[PAGES_STAT[level - 1]] += 512
            else:                                # tdp_mmu_link_sp (over nothing or an MMIO SPTE)
                self._set_spte(v, t, idx, child)
            v.stats["mmu_pages"] += 1
            if huge_page_disallowed and req_level >= level:   # track_possible_nx_huge_page
                child.nx_tracked = True
                v.nx_pages.append(child)
                v.stats["nx_lpage_splits"] += 1
            t = child
        base = gfn & ~(_pages(level) - 1)
        if slot is None:
            new = self._make_mmio_spte(v, base)
        else:
            new = self._make_spte(v, level, pfn & ~(_pages(level) - 1), map_writable)
            if new & PT_WRITABLE and slot.flags & MEM_LOG_DIRTY_PAGES:
                self._mark_page_dirty(slot, base)
        if _is_int(old) and new == old:
            ret = RET_PF_SPURIOUS
        else:
            self._set_spte(v, t, idx, new)
            ret = RET_PF_FIXED
            if isinstance(old, Table):
                self._flush_remote_tlbs(v)       # kvm_flush_remote_tlbs_gfn
        if self._is_mmio(v, new):
            v.stats["pf_mmio_spte_created"] += 1
            ret = RET_PF_EMULATE
        return ret

    # ------------------------------------------------------------------ gfn-range walks
    def _leaves(self, t, start, end):
        """(table, idx, spte) of every present leaf overlapping [start, end), in gfn order."""
        span = _pages(t.level)
        for idx in sorted(t.entries):
            g = t.gfn + idx * span
            if g + span <= start or g >= end:
                continue
            e = t.entries[idx]
            if isinstance(e, Table):
                yield from self._leaves(e, start, end)
            elif self._present(e):
                yield t, idx, e

    def _wrprot_range(self, v, start, end):
        """kvm_tdp_mmu_wrprot_slot(slot, PG_LEVEL_4K): clear W on every leaf in the range."""
        if v.root is None:
            return
        for t, idx, e in list(self._leaves(v.root, start, end)):
            if e & PT_WRITABLE:
                self._set_spte(v, t, idx, e & ~PT_WRITABLE)

    def _split_huge_pages(self, v, start, end):
        """kvm_tdp_mmu_try_split_huge_pages(target 4K): pre-order, so 1G -> 2M -> 4K; no flush."""

        def visit(t):                            # for_each_tdp_pte_min_level(.., target + 1, ..)
            level, span = t.level, _pages(t.level)
            for idx in sorted(t.entries):
                e = t.entries[idx]
                g = t.gfn + idx * span
                if g + span <= start or g >= end or level < 2:
                    continue
                if self._present(e) and not isinstance(e, Table):   # a huge leaf
                    child = Table(level - 1, g, t, idx)
                    for i in range(512):
                        child.entries[i] = self._make_small_spte(v, e, level - 1, i)
                    self._set_spte(v, t, idx, child)
                    v.stats[PAGES_STAT[level - 1]] += 512
                    v.stats["mmu_pages"] += 1
                    e = child
                if isinstance(e, Table) and level > 2:
                    visit(e)

        if v.root is not None:
            visit(v.root)

    def _recover_huge_pages(self, v, s):
        """recover_huge_pages_range: replace tables by huge SPTEs where the slot allows.
        Returns True when something changed (the caller flushes the memslot)."""
        start, end = s.base_gfn, s.base_gfn + s.npages
        changed = False

        def visit(t):                            # for_each_tdp_pte_min_level(.., PG_LEVEL_2M, ..)
            nonlocal changed
            level, span = t.level, _pages(t.level)
            for idx in sorted(t.entries):
                g = t.gfn + idx * span
                e = t.entries[idx]
                if g + span <= start or g >= end or not isinstance(e, Table):
                    continue
                if level <= 3 and start <= g < end and self._max_mapping_level(s, g) >= level:
                    first = next(self._leaves(e, g, g + span), None)   # tdp_mmu_make_huge_spte
                    if first is not None:
                        self._set_spte(v, t, idx, self._make_huge_spte(v, first[2], level))
                        changed = True
                        continue
                if level > 2:
                    visit(e)

        if v.root is not None:
            visit(v.root)
        return changed

    # ------------------------------------------------------------------ memslots
    def _bump_generation(self, v, as_id):
        """kvm_swap_active_memslots + kvm_mmu_invalidate_mmio_sptes (zap on a 19-bit wrap)."""
        gen = (v.gen[as_id] & ~GEN_UPDATE_IN_PROGRESS) + KVM_ADDRESS_SPACE_NUM
        if (gen & MMIO_GEN_MASK) & ~(KVM_ADDRESS_SPACE_NUM - 1) == 0:
            self._zap_all(v)
        v.gen[as_id] = gen

    def _check_region(self, v, slot, gpa, size, flags, hva):
        """__kvm_set_memory_region's checks with KVM's errnos.  Returns (change, old slot)."""
        if not all(_is_int(x) for x in (slot, gpa, size, flags)) or not (hva is None or _is_int(hva)):
            raise RefError("slot, gpa, size, flags and hva must be integers")
        if flags < 0 or flags & ~(MEM_LOG_DIRTY_PAGES | MEM_READONLY):
            raise _einval("flags")                               # check_memory_region_flags
        if size < 0 or size % 4096:
            raise _einval("size")
        if gpa < 0 or gpa % 4096:
            raise _einval("gpa")
        if hva is not None and (hva < 0 or hva % 4096 or hva + size > TASK_SIZE_MAX):
            raise _einval("hva")                                 # access_ok
        if slot < 0 or slot >> 16 >= KVM_ADDRESS_SPACE_NUM or slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
            raise _einval("slot")
        if size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
            raise _einval("size")
        old = v.slots.get(slot)
        if size == 0:
            if old is None:
                raise _einval("delete of a missing slot")
            return "delete", old
        base, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
        if old is None:
            change = "create"
        else:
            if (hva is not None and hva != old.hva) or npages != old.npages \
                    or (flags ^ old.flags) & MEM_READONLY:
                raise _einval("hva, size and MEM_READONLY of a slot cannot change")
            if base != old.base_gfn:
                change = "move"
            elif flags != old.flags:
                change = "flags"
            else:
                return "none", old
        for s in v.slots.values():                               # kvm_check_memslot_overlap
            if s.as_id == slot >> 16 and s.id != slot and s.base_gfn < base + npages \
                    and base < s.base_gfn + s.npages:
                raise RefError("overlap", errno.EEXIST)
        if base + npages - 1 > v.max_gfn:                        # kvm_arch_prepare_memory_region
            raise _einval("beyond MAXPHYADDR")
        return change, old

    @staticmethod
    def _prepare_dirty_bitmap(s, flags):
        """kvm_prepare_memory_region: drop, keep, or allocate (zeroed) the dirty bitmap."""
        if not flags & MEM_LOG_DIRTY_PAGES:
            s.dirty = None
        elif s.dirty is None:
            s.dirty = set()
        s.flags = flags

    def set_memslot(self, vm, slot, gpa, size, flags=0, hva=None, backing=None):
        """KVM_SET_USER_MEMORY_REGION: kvm_set_memslot for CREATE / DELETE / MOVE / FLAGS_ONLY."""
        v = self._vm(vm)
        change, s = self._check_region(v, slot, gpa, size, flags, hva)
        if change == "none":
            return
        if v.inval_count:
            # kvm_swap_active_memslots waits for mn_active_invalidate_count == 0: refused (docs/guarantees.md)
            raise RefError("memslot change during an invalidation")
        if backing is not None and change != "create":
            raise RefError("backing of an existing slot")
        as_id = slot >> 16
        if change == "create":
            b = self.backing if backing is None else _backing(backing)
            if hva is None:
                hva = HVA_BASE + gpa
                if hva + size > TASK_SIZE_MAX:
                    raise _einval("no congruent hva")
            _check_backing_alignment(b, hva, size)
            self._bump_generation(v, as_id)
            new = Slot(slot, gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, hva, flags, b)
            alias = next((t for t in v.slots.values() if (t.hva, t.npages, t.backing) == (hva, new.npages, b)), None)
            if alias is not None:
                new.share_host_pages(alias)
            v.slots[slot] = new
            return
        if change in ("delete", "move"):
            self._bump_generation(v, as_id)      # swap in the KVM_MEMSLOT_INVALID copy
            self._zap_all(v)                     # kvm_arch_flush_shadow_memslot (quirk: zap all)
            if change == "delete":
                del v.slots[slot]
                if not any(t.resident is s.resident for t in v.slots.values()):
                    self.used -= sum(s.resident.values())   # the VMM unmaps the slot's memory
                    self.swapped -= 4096 * len(s.swapped)
                    v.stats["host_pages_swapped"] -= len(s.swapped)
                    s.resident, s.swapped, s.split, s.age = {}, set(), set(), {}
            else:
                s.base_gfn = gpa >> PAGE_SHIFT
                self._prepare_dirty_bitmap(s, flags)
            self._bump_generation(v, as_id)
            return
        old_flags = s.flags
        self._prepare_dirty_bitmap(s, flags)
        self._bump_generation(v, as_id)
        self._slot_apply_flags(v, s, old_flags)

    def _slot_apply_flags(self, v, s, old_flags):
        """kvm_mmu_slot_apply_flags for KVM_MR_FLAGS_ONLY (no PML)."""
        if s.flags & MEM_READONLY or not (old_flags ^ s.flags) & MEM_LOG_DIRTY_PAGES:
            return                               # RO slots can't be dirtied nor made writable
        if s.flags & MEM_LOG_DIRTY_PAGES:
            if s.as_id == 0:                     # roots of the slot's address space only
                if self.eager_page_split:        # kvm_mmu_slot_try_split_huge_pages
                    self._split_huge_pages(v, s.base_gfn, s.base_gfn + s.npages)
                self._wrprot_range(v, s.base_gfn, s.base_gfn + s.npages)
            self._flush_remote_tlbs(v)           # unconditional kvm_flush_remote_tlbs_memslot
        elif s.as_id == 0 and self._recover_huge_pages(v, s):
            self._flush_remote_tlbs(v)

    # ------------------------------------------------------------------ MMU notifiers
    def _hva_ranges(self, v, start, end):
        """kvm_handle_hva_range: (slot, first gfn, end gfn) of every memslot (both address spaces,
        by slot id) whose hva range meets [start, end); hva_to_gfn_memslot rounding."""
        if not _is_int(start) or not _is_int(end) or start < 0 or end < 0 or end <= start:
            raise RefError("start / end")
        out = []
        for sid in sorted(v.slots):
            s = v.slots[sid]
            lo, hi = max(start, s.hva), min(end, s.hva + (s.npages << PAGE_SHIFT))
            if lo < hi:
                out.append((s, s.base_gfn + ((lo - s.hva) >> PAGE_SHIFT),
                            s.base_gfn + ((hi - s.hva + 4095) >> PAGE_SHIFT)))
        return out

    def invalidate_range_start(self, vm, start, end):
        """kvm_mmu_notifier_invalidate_range_start: kvm_mmu_invalidate_begin, then for each memslot
        kvm_mmu_unmap_gfn_range (kvm_mmu_invalidate_range_add + tdp_mmu_zap_leafs); one flush."""
        v = self._vm(vm)
        ranges = self._hva_ranges(v, start, end)
        v.inval_count += 1
        if v.inval_count == 1:
            v.inval_range = None                 # mmu_invalidate_range_start = INVALID_GPA
        zapped = 0
        for s, g0, g1 in ranges:
            if v.inval_range is None:
                v.inval_range = (g0, g1)
            else:
                v.inval_range = (min(v.inval_range[0], g0), max(v.inval_range[1], g1))
            if s.as_id == 0 and v.root is not None:   # only address space 0 has a root
                for t, idx, _e in list(self._leaves(v.root, g0, g1)):
                    self._set_spte(v, t, idx, None)
                    zapped += 1
        v.stats["mmu_notifier_zapped"] += zapped
        if zapped:
            self._flush_remote_tlbs(v)
        return zapped

    def invalidate_range_end(self, vm):
        v = self._vm(vm)
        if v.inval_count <= 0:
            raise RefError("no invalidation in progress")
        v.inval_count -= 1

    def invalidate_hva_range(self, vm, start, end):
        n = self.invalidate_range_start(vm, start, end)
        self.invalidate_range_end(vm)
        return n

    def _is_accessed(self, v, spte):
        """is_accessed_spte (spte.h)."""
        if (spte & SPTE_AD_MASK) != SPTE_AD_DISABLED:
            return bool(spte & v.fmt.accessed)
        return not self._is_access_track(v, spte)

    def _age(self, vm, start, end, clear):
        """kvm_age_gfn / kvm_test_age_gfn per memslot; young[i] is the 4K page at start + i * 4K."""
        v = self._vm(vm)
        young = [False] * (-(-(end - start) // 4096) if _is_int(end) and _is_int(start) and end > start else 0)
        any_young = False
        for s, g0, g1 in self._hva_ranges(v, start, end):
            if s.as_id or v.root is None:
                continue
            for t, idx, e in list(self._leaves(v.root, g0, g1)):
                if not self._is_accessed(v, e):
                    continue
                any_young = True
                base = t.gfn + idx * _pages(t.level)
                for g in range(max(base, g0), min(base + _pages(t.level), g1)):
                    i = (self._gfn_to_hva(s, g) - start) >> PAGE_SHIFT
                    if 0 <= i < len(young):
                        young[i] = True
                if clear:                        # kvm_tdp_mmu_age_spte
                    t.entries[idx] = self._mark_for_access_track(v, e)
                    v.stats["pages_aged"] += 1
        return young, any_young

    def age_hva_range(self, vm, start, end, flush=True):
        """clear_flush_young (flush=True) / clear_young (flush=False)."""
        young, any_young = self._age(vm, start, end, True)
        if flush and any_young:
            self._flush_remote_tlbs(self.vms[vm])
        return young

    def test_young(self, vm, start, end):
        return self._age(vm, start, end, False)[0]

    # ------------------------------------------------------------------ NX huge page recovery
    def nx_recovery_period(self):
        """get_nx_huge_page_recovery_timeout in ms, or None (the worker is off)."""
        if not self.nx_huge_pages or not self.nx_recovery_ratio:
            return None
        return self.nx_recovery_period_ms or 3600000 / min(self.nx_recovery_ratio, 3600)

    def advance_time(self, seconds):
        """Simulated time passes; each VM's NX recovery worker runs once per period that ends in it."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise RefError("seconds")
        end = self.time_ms + 1000.0 * seconds
        period = self.nx_recovery_period()
        passes = 0
        if period is not None:
            if self._nx_next_ms is None:
                self._nx_next_ms = self.time_ms + period
            while self._nx_next_ms <= end:
                for v in self.vms:
                    self._recover_nx_huge_pages(v)
                self._nx_next_ms += period
                passes += 1
        self.time_ms = end
        return passes

    def _recover_nx_huge_pages(self, v):
        """kvm_recover_nx_huge_pages: DIV_ROUND_UP(splits, ratio) times, take the head (oldest) of
        possible_nx_huge_pages; untrack it if its gfn's slot logs dirty pages, else zap it."""
        to_zap = -(-v.stats["nx_lpage_splits"] // self.nx_recovery_ratio)
        flush = False
        while to_zap and v.nx_pages:
            to_zap -= 1
            sp = v.nx_pages[0]
            s = self._gfn_to_slot(v, sp.gfn)
            if s is not None and s.flags & MEM_LOG_DIRTY_PAGES:
                self._untrack_nx(v, sp)
                continue
            self._set_spte(v, sp.parent, sp.pidx, None)   # kvm_tdp_mmu_zap_sp
            v.stats["nx_lpage_recovered"] += 1
            flush = True
        if flush:
            self._flush_remote_tlbs(v)

    # ------------------------------------------------------------------ host memory overcommit
    # The host's LRU, as docs/host_memory.md states it: a folio (a 4K page or a whole THP) is aged
    # through clear_young (age 0 if any SPTE mapping it was accessed, else one older, at most 255);
    # reclaim takes every page older than a global threshold age and a share of the pages at it;
    # each victim folio is unmapped through the MMU notifier, a THP is split, pages go to swap.
    def _lru_groups(self, v):
        """The VM's slots one set of aliases at a time (by lowest slot id); hugetlbfs is unevictable."""
        groups = {}
        for sid in sorted(v.slots):
            groups.setdefault(id(v.slots[sid].resident), []).append(v.slots[sid])
        return [g for g in groups.values() if g[0].backing not in HUGETLB_BYTES]

    def _age_gfns(self, v, g0, g1):
        """kvm_tdp_mmu_age_gfn_range over [g0, g1): True if a leaf was accessed; all made old."""
        young = False
        for t, idx, e in list(self._leaves(v.root, g0, g1)) if v.root is not None else ():
            if self._is_accessed(v, e):
                young = True
                t.entries[idx] = self._mark_for_access_track(v, e)
                v.stats["pages_aged"] += 1
        return young

    def _require_overcommit(self):
        if self.overcommit is None:
            raise RefError("reclaim needs overcommit")

    def reclaim_scan(self):
        """Age every resident evictable folio; [vm][age] -> pages."""
        self._require_overcommit()
        hist = [[0] * 256 for _ in self.vms]
        for vi, v in enumerate(self.vms):
            for group in self._lru_groups(v):
                s = group[0]
                for first, size in sorted(s.resident.items()):
                    young = False
                    for a in group:
                        if a.as_id == 0:
                            g = a.base_gfn + ((first - a.hva) >> PAGE_SHIFT)
                            young |= self._age_gfns(v, g, g + (size >> PAGE_SHIFT))
                    age = 0 if young else min(255, s.age.get(first, 0) + 1)
                    for q in range(0, size, 4096):
                        s.age[first + q] = age
                    hist[vi][age] += size >> PAGE_SHIFT
        return hist

    def _swap_out(self, v, group, first, size, take):
        """try_to_unmap (the notifier in every alias, one flush), THP split, ``take`` pages to swap."""
        zapped = 0
        for a in group:
            if a.as_id == 0 and v.root is not None:
                g = a.base_gfn + ((first - a.hva) >> PAGE_SHIFT)
                for t, idx, _e in list(self._leaves(v.root, g, g + (size >> PAGE_SHIFT))):
                    self._set_spte(v, t, idx, None)
                    zapped += 1
        v.stats["mmu_notifier_zapped"] += zapped
        if zapped:
            self._flush_remote_tlbs(v)
        s = group[0]
        if size > 4096:
            del s.resident[first]
            for q in range(0, size, 4096):
                s.resident[first + q] = 4096
            s.split.add(first)
            v.stats["host_thp_splits"] += 1
        for q in range(take):
            del s.resident[first + 4096 * q]
            s.swapped.add(first + 4096 * q)
        self.used -= 4096 * take
        self.swapped += 4096 * take
        v.stats["host_pages_reclaimed"] += take
        v.stats["host_pages_swapped"] += take

    def reclaim_evict(self, threshold, at_threshold):
        """Pages older than ``threshold`` and at_threshold[vm] pages of that age, per VM in slot and
        hva order; a THP straddling the count is split and only the pages needed go."""
        self._require_overcommit()
        out = []
        for vi, v in enumerate(self.vms):
            total = taken = 0
            for group in self._lru_groups(v) if threshold < 256 else ():
                s = group[0]
                for first, size in sorted(s.resident.items()):
                    age, take = s.age.get(first, 0), 0
                    if age > threshold:
                        take = size >> PAGE_SHIFT
                    elif age == threshold and taken < at_threshold[vi]:
                        take = min(size >> PAGE_SHIFT, at_threshold[vi] - taken)
                        taken += take
                    if take:
                        self._swap_out(v, group, first, size, take)
                        total += take
            out.append(total)
        return out

    def reclaim(self, force=False, min_pages=0):
        """kswapd: age above the low watermark; above the high one reclaim down to the low one."""
        self._require_overcommit()
        low, high = (int(w * self.budget) for w in self.watermarks)
        out = {"scanned": 0, "reclaimed": 0}
        if self.used <= low and not force and not min_pages:
            return out
        hist = self.reclaim_scan()
        out["scanned"] = sum(map(sum, hist))
        if self.used > high or force or min_pages:
            t, at = plan_reclaim(hist, max(-(-(self.used - low) // 4096), min_pages))
            out["reclaimed"] = sum(self.reclaim_evict(t, at))
        return out

    def _direct_reclaim(self, v, gpa):
        """try_to_free_pages for a fault on gpa: down to the low watermark, and room for its page."""
        s = self._gfn_to_slot(v, gpa >> PAGE_SHIFT)
        need = self._host_page(s, gpa >> PAGE_SHIFT)[1] >> PAGE_SHIFT if s is not None else 1
        free = (self.budget - self.used) >> PAGE_SHIFT
        return self.reclaim(force=True, min_pages=max(0, need - free))["reclaimed"] > 0

    def discard_hva_range(self, vm, start, end):
        """MADV_DONTNEED: the notifier, then the host pages in [start, end) are freed (a THP partly
        inside is split first; hugetlbfs pages only when wholly inside); swap entries dropped."""
        v = self._vm(vm)
        self.invalidate_hva_range(vm, start, end)
        freed = 0
        for s, g0, g1 in self._hva_ranges(v, start, end):
            lo, hi = self._gfn_to_hva(s, g0), self._gfn_to_hva(s, g1)
            for first, size in sorted(s.resident.items()):
                if first + size <= lo or first >= hi:
                    continue
                if lo <= first and first + size <= hi:
                    del s.resident[first]
                    freed += size
                elif s.backing == "thp":
                    del s.resident[first]
                    s.split.add(first)
                    v.stats["host_thp_splits"] += 1
                    for h in range(first, first + size, 4096):
                        if lo <= h < hi:
                            freed += 4096
                        else:
                            s.resident[h] = 4096
            for h in [h for h in s.swapped if lo <= h < hi]:
                s.swapped.remove(h)
                self.swapped -= 4096
                v.stats["host_pages_swapped"] -= 1
        self.used -= freed
        return freed

    def mmu_notifier_release(self, vm):
        self._zap_all(self._vm(vm))

    def swapped_bytes(self):
        return self.swapped

    def host_pages(self, vm, slot):
        """Per page of the slot: resident, swapped, split."""
        s = self._vm(vm).slots[slot]
        hvas = [s.hva + 4096 * i for i in range(s.npages)]
        res = set()
        for first, size in s.resident.items():
            res.update(range(first, first + size, 4096))
        return {"resident": [h in res for h in hvas], "swapped": [h in s.swapped for h in hvas],
                "split": [(h & ~((1 << 21) - 1)) in s.split for h in hvas]}

    # ------------------------------------------------------------------ dirty log
    def get_dirty_log(self, vm, slot):
        """KVM_GET_DIRTY_LOG without manual protect: snapshot, clear, write-protect, flush."""
        v = self._vm(vm)
        if not _is_int(slot) or slot < 0 or slot >> 16 >= KVM_ADDRESS_SPACE_NUM \
                or slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
            raise _einval("slot")
        s = v.slots.get(slot)
        if s is None or s.dirty is None:
            raise RefError("no slot or no dirty bitmap", errno.ENOENT)
        words = [0] * ((s.npages + 63) // 64)
        for rel in s.dirty:
            words[rel >> 6] |= 1 << (rel & 63)
        s.dirty = set()
        for w, mask in enumerate(words):
            if mask and s.as_id == 0 and v.root is not None:
                # kvm_arch_mmu_enable_log_dirty_pt_masked -> clear_dirty_pt_masked(wrprot=true)
                base = s.base_gfn + 64 * w
                for t, idx, e in list(self._leaves(v.root, base, base + 64)):
                    g = t.gfn + idx
                    if t.level == 1 and mask >> (g - base) & 1 and e & PT_WRITABLE:
                        t.entries[idx] = e & ~PT_WRITABLE
        if any(words):
            self._flush_remote_tlbs(v)
        return words


def plan_reclaim(hist, need):
    """Which pages go (the rule of docs/host_memory.md): all pages older than the youngest age T
    whose pages and older ones cover ``need``; of age T, each VM gives its proportional share,
    rounded down, the leftover pages one each to the largest remainders (lower VM id first)."""
    n = len(hist)
    if need <= 0:
        return 256, [0] * n
    older = 0
    for t in range(255, -1, -1):
        here = sum(h[t] for h in hist)
        if here and older + here >= need:
            rest = need - older
            share = [rest * h[t] // here for h in hist]
            order = sorted(range(n), key=lambda v: (-(rest * hist[v][t] % here), v))
            for v in order[:rest - sum(share)]:
                share[v] += 1
            return t, share
        older += here
    return 0, [h[0] for h in hist]


def _backing(name):
    if name not in BACKINGS:
        raise RefError(f"backing={name!r}")
    return name


def _check_backing_alignment(backing, hva, size):
    huge = HUGETLB_BYTES.get(backing)
    if huge and (hva % huge or size % huge):
        raise _einval("hugetlbfs mappings need aligned addresses and sizes")
