"""Arena layouts: NamedTuple bundles of flat numpy arrays passed into kernels.

One arena holds every VM of a shard.  Python allocates and grows the arrays
(``batchmmu/arena.py``); kernels only index them.
"""

from typing import NamedTuple

import numpy as np

# --- statistics: KVM's names (per VM, summed over vCPUs) + simulator figures ----------
STAT_NAMES = (
    "pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits",
    "mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_recycled",
    "mmu_cache_miss", "mmu_unsync", "remote_tlb_flush", "remote_tlb_flush_requests",
    "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created",
    "pf_guest", "tlb_flush", "invlpg", "max_mmu_rmap_size",
    "walk_refs", "mmu_pages", "rmap_entries", "accesses",
    "host_pages_faulted_in", "pages_write_protected", "pml_flushes", "pml_full_exits", "dirty_ring_full",
    "pages_split", "pf_retry", "mmu_notifier_zapped", "pages_aged", "nx_lpage_recovered",
    "host_major_faults", "host_pages_reclaimed", "host_pages_swapped", "host_thp_splits",
)
for _i, _n in enumerate(STAT_NAMES):
    globals()["ST_" + _n.upper()] = _i
NSTAT = len(STAT_NAMES)
# Gauges (instant values) as opposed to counters; sums over VMs are still meaningful.
GAUGE_STATS = frozenset({"pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits", "mmu_unsync",
                         "mmu_pages", "rmap_entries", "max_mmu_rmap_size", "host_pages_swapped"})

# --- page arena control words --------------------------------------------------------
CTL_FREE_TOP = 0     # number of rows on the free stack
CTL_USED = 1         # rows in use
CTL_HIGH = 2         # rows ever handed out (bump pointer)
CTL_NX_SEQ = 3       # next possible_nx_huge_pages sequence number
NCTL = 4

# sp_flags bits
SPF_NX_DISALLOWED = 1    # kvm_mmu_page.nx_huge_page_disallowed
SPF_NX_TRACKED = 2       # on possible_nx_huge_pages (counted in nx_lpage_splits)

# --- host control words ------------------------------------------------------------------
HOST_USED_BYTES = 0
HOST_BUDGET_BYTES = 1
HOST_SWAPPED_BYTES = 2   # guest pages reclaimed to swap (batchmmu/reclaim.py)
NHOST = 4

# --- configuration words (module parameters) -------------------------------------------
CFG_MMIO_CACHING = 0
CFG_NX_HUGE_PAGES = 1
CFG_TDP_MAX_LEVEL = 2      # max_huge_page_level for TDP (3 = 1G)
CFG_EAGER_SPLIT = 3        # kvm.eager_page_split
CFG_PML = 4                # VMX page-modification logging (cpu_dirty_log_size = 512)
NCFG = 8

PML_ENTITY_NUM = 512
KVM_DIRTY_RING_RSVD_ENTRIES = 64
# dirty ring entry flags (kvm_dirty_gfn.flags)
KVM_DIRTY_GFN_F_DIRTY = 1
KVM_DIRTY_GFN_F_RESET = 2

# --- backing kinds ----------------------------------------------------------------------
BACKING_4K = 0
BACKING_THP = 1
BACKING_HUGETLB_2M = 2
BACKING_HUGETLB_1G = 3
BACKING_NAMES = ("4k", "thp", "hugetlb-2m", "hugetlb-1g")

# memslot flags (KVM uapi)
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2

# --- outcomes and stop reasons ---------------------------------------------------------
OUT_HIT = 0
OUT_FIXED = 1
OUT_SPURIOUS = 2
OUT_MMIO = 3
OUT_EMULATED = 4
OUT_GUEST_FAULT = 5
OUT_RING_FULL = 6
OUT_RETRY = 7
OUTCOME_NAMES = ("HIT", "FIXED", "SPURIOUS", "MMIO", "EMULATED", "GUEST_FAULT", "RING_FULL", "RETRY")

STOP_DONE = 0
STOP_NEED_PAGES = 1
STOP_HOST_OOM = 2

# Worst case of new table rows one event can take: a root + one per level below it.
MAX_ROWS_PER_EVENT = 6


class PageArena(NamedTuple):
    """TDP page tables (rows of 512 SPTEs) and their ``kvm_mmu_page`` metadata."""
    spt: np.ndarray            # int64[cap, 512]
    sp_vm: np.ndarray          # int32[cap]
    sp_level: np.ndarray       # int8[cap]
    sp_gfn: np.ndarray         # int64[cap]   base gfn the table maps
    sp_role: np.ndarray        # int32[cap]   kvm_mmu_page_role word
    sp_parent: np.ndarray      # int64[cap]   row of the parent table, -1 for roots
    sp_parent_index: np.ndarray  # int16[cap] index of our SPTE in the parent
    sp_flags: np.ndarray       # int8[cap]
    sp_seq: np.ndarray         # int64[cap]: order of arrival on possible_nx_huge_pages
    free: np.ndarray           # int64[cap]   stack of free rows
    ctl: np.ndarray            # int64[NCTL]


class VMTable(NamedTuple):
    """Per-VM state, indexed by VM id."""
    root: np.ndarray           # int64: root row, -1 until the first vCPU entry
    fmt: np.ndarray            # int8:  FMT_EPT / FMT_NPT
    levels: np.ndarray         # int8:  4 or 5
    ad_disabled: np.ndarray    # int8:  EPT without A/D bits
    max_gfn: np.ndarray        # int64: last gfn below MAXPHYADDR
    memslots_gen: np.ndarray   # int64: memslots generation (address space 0)
    slot_off: np.ndarray       # int64: start of this VM's sorted slot list in SlotTable.order
    slot_cnt: np.ndarray       # int64: number of live AS0 slots
    slot_last: np.ndarray      # int64: last_used_slot (record index) or -1
    host_bytes: np.ndarray     # int64: host memory resident for this VM
    dirty_mode: np.ndarray     # int8: bit0 manual protect, bit1 initially set, bit2 dirty ring, bit3 PML on
    inval_count: np.ndarray    # int64: mmu_invalidate_in_progress
    inval_start: np.ndarray    # int64: mmu_invalidate_range_start (gfn)
    inval_end: np.ndarray      # int64: mmu_invalidate_range_end (gfn, exclusive)
    stats: np.ndarray          # int64[nvm, NSTAT]


DM_MANUAL_PROTECT = 1
DM_INITIALLY_SET = 2
DM_RING = 4
DM_PML_ACTIVE = 8          # some slot of the VM logs dirty pages and the CPU has PML


class VcpuTable(NamedTuple):
    """Per-vCPU state (global vCPU index = VMTable.vcpu_off[vm] + vcpu): PML buffer, dirty ring."""
    vcpu_off: np.ndarray       # int64[nvm]: first global vCPU index of each VM
    pml_count: np.ndarray      # int64[nvcpu]: entries in the PML buffer
    pml_buf: np.ndarray        # int64[nvcpu or 0, 512]: logged gfns (4K)
    ring_size: np.ndarray      # int64[nvcpu]: dirty ring entries (0 = no ring)
    ring_off: np.ndarray       # int64[nvcpu]: first entry in the ring pool
    ring_dirty: np.ndarray     # int64[nvcpu]: dirty_index (entries pushed)
    ring_reset: np.ndarray     # int64[nvcpu]: reset_index
    ring_fetch: np.ndarray     # int64[nvcpu]: userspace's fetch index (harvest)
    ring_slot: np.ndarray      # int32[pool]: (as_id << 16) | slot id
    ring_gfn: np.ndarray       # int64[pool]: offset in the slot
    ring_flags: np.ndarray     # int8[pool]


class SlotTable(NamedTuple):
    """Memslot records (one per KVM memslot) and their pooled per-page arrays."""
    vm: np.ndarray             # int32[rcap]
    slot_id: np.ndarray        # int32: (as_id << 16) | id
    base_gfn: np.ndarray       # int64
    npages: np.ndarray         # int64
    hva: np.ndarray            # int64: userspace_addr
    flags: np.ndarray          # int32: KVM_MEM_* flags
    backing: np.ndarray        # int8:  BACKING_*
    lpage_off: np.ndarray      # int64[rcap, 2]: offsets of lpage_info (2M, 1G) in ``lpage``
    dirty_off: np.ndarray      # int64: offset of the dirty bitmap in ``dirty`` (-1: none)
    host_off: np.ndarray       # int64: offset of the host-resident bitmap in ``host``
    order: np.ndarray          # int64: per-VM lists of live AS0 records sorted by base_gfn
    lpage: np.ndarray          # int32: lpage_info.disallow_lpage pool
    dirty: np.ndarray          # int64: dirty bitmap pool (64 pages a word)
    host: np.ndarray           # int64: host-resident bitmap pool (4K pages, 64 a word)
    swap: np.ndarray           # int64: swapped-out bitmap pool, same offsets as ``host``
    split: np.ndarray          # int64: THP split bitmap pool (4K pages of split THPs), same offsets
    age: np.ndarray            # uint8: reclaim age per 4K page at 64 * host_off (empty without overcommit)


# --- shadow MMU (kernels/shadow.py) -----------------------------------------------------
KVM_MMU_HASH_SIZE = 4096       # 1 << KVM_MMU_HASH_SHIFT
KVM_MMU_NUM_PREV_ROOTS = 3
PTE_PREFETCH_NUM = 8
SH_PL_FREE = 0                 # head of the free list of parent-pte links
SH_PL_AVAIL = 1
SH_RN_FREE = 2                 # head of the free list of rmap nodes
SH_RN_AVAIL = 3
NSHCTL = 8
# worst case of links / rmap nodes one event can take (a fault: a parent link per level, 8 SPTEs)
MAX_PL_PER_EVENT = 8
MAX_RN_PER_EVENT = 16
MAX_GM_PER_EVENT = 8           # guest-memory rows: a page-crossing store + walker A/D writes


class ShadowState(NamedTuple):
    """Shadow-MMU state (``mmu.c``): per page-table row metadata beyond PageArena, rmaps,
    parent-pte lists, the per-VM hash and active list, write tracking."""
    unsync: np.ndarray          # int8[cap]
    unsync_children: np.ndarray  # int32[cap]
    ubitmap: np.ndarray         # int64[cap, 8]: unsync_child_bitmap
    root_count: np.ndarray      # int32[cap]
    flood: np.ndarray           # int32[cap]: write_flooding_count
    gen: np.ndarray             # int8[cap]: mmu_valid_gen
    hnext: np.ndarray           # int64[cap]: next SP in the hash bucket
    anext: np.ndarray           # int64[cap]: next (older) SP on active_mmu_pages
    aprev: np.ndarray           # int64[cap]: previous (newer) SP
    parent_head: np.ndarray     # int64[cap]: first parent-pte link (-1 none)
    trans: np.ndarray           # int64[cap, 512]: shadowed_translation (gfn << 12 | access)
    pl_sptep: np.ndarray        # int64[P]: parent-pte links (row * 512 + index)
    pl_next: np.ndarray         # int64[P]
    rn_sptep: np.ndarray        # int64[R]: rmap nodes
    rn_next: np.ndarray         # int64[R]
    rmap_head: np.ndarray       # int64[H]: per slot, level, gfn index: first rmap node (-1 empty)
    rmap_cnt: np.ndarray        # int32[H]
    wtrack: np.ndarray          # int32[W]: gfn_write_track per 4K gfn of each slot
    rmap_off: np.ndarray        # int64[rcap, 3]: offset of a slot's rmap heads per level (-1 none)
    wtrack_off: np.ndarray      # int64[rcap]
    hash_off: np.ndarray        # int64[nvm]: offset of the VM's 4096 buckets (-1: not a shadow VM)
    hash: np.ndarray            # int64[nshadow * 4096]
    act_head: np.ndarray        # int64[nvm]: newest SP
    act_tail: np.ndarray        # int64[nvm]: oldest SP
    indirect: np.ndarray        # int64[nvm]: indirect_shadow_pages
    valid_gen: np.ndarray       # int8[nvm]: kvm->arch.mmu_valid_gen
    n_max: np.ndarray           # int64[nvm]: n_max_mmu_pages
    ctl: np.ndarray             # int64[NSHCTL]
    scratch: np.ndarray         # int64[256]: walker output and small stacks


class VcpuRegs(NamedTuple):
    """Per-vCPU paging registers and MMU roots (global vCPU index)."""
    cr0: np.ndarray
    cr3: np.ndarray
    cr4: np.ndarray
    efer: np.ndarray
    rflags: np.ndarray
    pkru: np.ndarray
    pdptr: np.ndarray           # int64[nv, 4]: PDPTRs loaded at CR3 load (PAE)
    root: np.ndarray            # int64[nv]: current root row (-1 invalid)
    root_pgd: np.ndarray        # int64[nv]
    prev_root: np.ndarray       # int64[nv, 3]
    prev_pgd: np.ndarray        # int64[nv, 3]
    pae_root: np.ndarray        # int64[nv, 4]: PAE roots (rows, -1 invalid)


class GuestMem(NamedTuple):
    """Guest memory contents, keyed by host page (kernels/gmem.py)."""
    key: np.ndarray             # int64[hcap]: (vm << GM_VM_SHIFT) | hva page, -1 empty
    row: np.ndarray             # int64[hcap]
    page: np.ndarray            # int64[cap, 512]
    free: np.ndarray            # int64[cap]: stack of released rows
    ctl: np.ndarray             # int64[3]: GM_USED, GM_KEYS, GM_NFREE


class SlotMap(NamedTuple):
    """What gpa -> memslot -> hva needs (search_memslots, __gfn_to_hva_memslot): VMTable and SlotTable
    members, for kernels that only translate (built by kernels/memslot.py ``slot_map``)."""
    slot_last: np.ndarray       # VMTable.slot_last
    slot_off: np.ndarray        # VMTable.slot_off
    slot_cnt: np.ndarray        # VMTable.slot_cnt
    order: np.ndarray           # SlotTable.order
    base_gfn: np.ndarray        # SlotTable.base_gfn
    npages: np.ndarray          # SlotTable.npages
    hva: np.ndarray             # SlotTable.hva


class MMU(NamedTuple):
    """Everything the guest-paging kernels touch, in one argument."""
    pa: PageArena
    vt: VMTable
    st: SlotTable
    ct: VcpuTable
    host: np.ndarray
    cfg: np.ndarray
    sh: ShadowState
    gm: GuestMem
    vr: VcpuRegs
    mmu_kind: np.ndarray        # int8[nvm]: MMU_TDP / MMU_SHADOW


MMU_TDP = 0
MMU_SHADOW = 1
