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
    "nested_run", "guest_mode", "max_mmu_page_hash_collisions",
)
for _i, _n in enumerate(STAT_NAMES):
    globals()["ST_" + _n.upper()] = _i
NSTAT = len(STAT_NAMES)
# Gauges (instant values) as opposed to counters; sums over VMs are still meaningful.
GAUGE_STATS = frozenset({"pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits", "mmu_unsync",
                         "mmu_pages", "rmap_entries", "max_mmu_rmap_size", "host_pages_swapped",
                         "guest_mode", "max_mmu_page_hash_collisions"})

# --- page arena control words --------------------------------------------------------
CTL_FREE_TOP = 0     # number of rows on the free stack
CTL_USED = 1         # rows in use
CTL_HIGH = 2         # rows ever handed out (bump pointer)
CTL_NX_SEQ = 3       # next possible_nx_huge_pages sequence number
NCTL = 4

# sp_flags bits
SPF_NX_DISALLOWED = 1    # kvm_mmu_page.nx_huge_page_disallowed
SPF_NX_TRACKED = 2       # on possible_nx_huge_pages (counted in nx_lpage_splits)
SPF_TDP_MMU = 4          # a TDP MMU page (is_tdp_mmu_page), not one of the shadow MMU code's

# --- host words (one int64 array, MMU.host): control words, then the configuration ------------
HOST_USED_BYTES = 0
HOST_BUDGET_BYTES = 1
HOST_SWAPPED_BYTES = 2   # guest pages reclaimed to swap (batchmmu/reclaim.py)
# configuration words (module parameters); a kernel that reads only these calls the array ``cfg``
CFG_MMIO_CACHING = 3
CFG_NX_HUGE_PAGES = 4
CFG_TDP_MAX_LEVEL = 5      # max_huge_page_level for TDP (3 = 1G)
CFG_EAGER_SPLIT = 6        # kvm.eager_page_split
CFG_PML = 7                # VMX page-modification logging (cpu_dirty_log_size = 512)
CFG_SPLIT_ON_FAULT = 8     # the TDP MMU splits a huge SPTE a fault must break (v6.2+); 0: zaps it (before)
NHOST = 9

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
OUT_L1_EXIT = 8        # nested: an EPT violation / #NPF that L1's tables refuse, reflected to L1
OUTCOME_NAMES = ("HIT", "FIXED", "SPURIOUS", "MMIO", "EMULATED", "GUEST_FAULT", "RING_FULL", "RETRY", "L1_EXIT")

STOP_DONE = 0
STOP_NEED_PAGES = 1
STOP_HOST_OOM = 2

# Worst case of new table rows one event can take: a root + one per level below it.
MAX_ROWS_PER_EVENT = 6


def _cols(rec, col, width=1):
    """A Python-side view of one field of a record array (``rec``): column ``col`` (``width`` columns)."""
    if width == 1:
        return property(lambda self: getattr(self, rec)[:, col], doc=f"{rec}[:, {col}]")
    return property(lambda self: getattr(self, rec)[:, col:col + width], doc=f"{rec}[:, {col}:{col + width}]")


# --- kvm_mmu_page: one int64 metadata record per page-table row (PageArena.meta) --------------
SP_VM = 0              # owning VM (-1: free row)
SP_LEVEL = 1
SP_GFN = 2             # base gfn the table maps
SP_ROLE = 3            # kvm_mmu_page_role word
SP_PARENT = 4          # row of the parent table, -1 for roots
SP_PARENT_INDEX = 5    # index of our SPTE in the parent
SP_FLAGS = 6           # SPF_* bits
SP_SEQ = 7             # order of arrival on possible_nx_huge_pages
# shadow MMU only (mmu.c)
SP_UNSYNC = 8
SP_UNSYNC_CHILDREN = 9
SP_ROOT_COUNT = 10
SP_FLOOD = 11          # write_flooding_count
SP_GEN = 12            # mmu_valid_gen
SP_HNEXT = 13          # next SP in the hash bucket
SP_ANEXT = 14          # next (older) SP on active_mmu_pages
SP_APREV = 15          # previous (newer) SP
SP_PARENT_HEAD = 16    # first parent-pte link (ShadowState.pl), -1 none
SP_UBITMAP = 17        # 8 columns: unsync_child_bitmap
NSP = 25


class PageArena(NamedTuple):
    """Page-table pages (rows of 512 SPTEs) and their ``kvm_mmu_page`` metadata records."""
    spt: np.ndarray            # int64[cap, 512]
    meta: np.ndarray           # int64[cap, NSP]
    free: np.ndarray           # int64[cap]   stack of free rows
    ctl: np.ndarray            # int64[NCTL]
    sp_vm = _cols("meta", SP_VM)
    sp_level = _cols("meta", SP_LEVEL)
    sp_gfn = _cols("meta", SP_GFN)
    sp_role = _cols("meta", SP_ROLE)
    sp_parent = _cols("meta", SP_PARENT)
    sp_parent_index = _cols("meta", SP_PARENT_INDEX)
    sp_flags = _cols("meta", SP_FLAGS)
    sp_seq = _cols("meta", SP_SEQ)
    unsync = _cols("meta", SP_UNSYNC)
    unsync_children = _cols("meta", SP_UNSYNC_CHILDREN)
    root_count = _cols("meta", SP_ROOT_COUNT)
    flood = _cols("meta", SP_FLOOD)
    gen = _cols("meta", SP_GEN)
    hnext = _cols("meta", SP_HNEXT)
    anext = _cols("meta", SP_ANEXT)
    aprev = _cols("meta", SP_APREV)
    parent_head = _cols("meta", SP_PARENT_HEAD)
    ubitmap = _cols("meta", SP_UBITMAP, 8)


# --- struct kvm / kvm_arch: one int64 record per VM (VMTable.rec) -----------------------------
VM_ROOT = 0            # TDP root row, -1 until the first vCPU entry
VM_FMT = 1             # FMT_EPT / FMT_NPT
VM_LEVELS = 2          # 4 or 5
VM_AD_DISABLED = 3     # EPT without A/D bits
VM_MAX_GFN = 4         # last gfn below MAXPHYADDR
VM_MEMSLOTS_GEN = 5    # memslots generation (address space 0)
VM_SLOT_OFF = 6        # start of this VM's sorted slot list in SlotTable.order
VM_SLOT_CNT = 7        # number of live AS0 slots
VM_SLOT_LAST = 8       # last_used_slot (record index) or -1
VM_HOST_BYTES = 9      # host memory resident for this VM
VM_DIRTY_MODE = 10     # DM_* bits
VM_INVAL_COUNT = 11    # mmu_invalidate_in_progress
VM_INVAL_START = 12    # mmu_invalidate_range_start (gfn)
VM_INVAL_END = 13      # mmu_invalidate_range_end (gfn, exclusive)
# shadow MMU only
VM_HASH_OFF = 14       # offset of the VM's 4096 mmu_page_hash buckets (-1: not a shadow VM)
VM_ACT_HEAD = 15       # newest SP on active_mmu_pages
VM_ACT_TAIL = 16       # oldest SP
VM_INDIRECT = 17       # indirect_shadow_pages
VM_VALID_GEN = 18      # kvm->arch.mmu_valid_gen
VM_N_MAX = 19          # n_max_mmu_pages
VM_MAXPHYADDR = 20     # guest MAXPHYADDR (bits; kvm_vcpu_arch.maxphyaddr, the same for every vCPU here)
VM_VCPU_OFF = 21       # global index of the VM's vCPU 0 (VcpuTable / VcpuRegs rows)
VM_MMU = 22            # MMU_TDP, MMU_SHADOW or MMU_LEGACY (which MMU builds the VM's SPTEs)
VM_N_USED = 23         # n_used_mmu_pages: the shadow MMU code's pages (the mmu_pages stat adds the TDP MMU's)
VM_ROOT_L2 = 24        # TDP MMU root of role guest_mode (an L2 without nested paging), -1 until one runs
NVMF = 25


class VMTable(NamedTuple):
    """Per-VM state, indexed by VM id: one record row and the statistics row."""
    rec: np.ndarray            # int64[nvm, NVMF]
    stats: np.ndarray          # int64[nvm, NSTAT]
    root = _cols("rec", VM_ROOT)
    fmt = _cols("rec", VM_FMT)
    levels = _cols("rec", VM_LEVELS)
    ad_disabled = _cols("rec", VM_AD_DISABLED)
    max_gfn = _cols("rec", VM_MAX_GFN)
    memslots_gen = _cols("rec", VM_MEMSLOTS_GEN)
    slot_off = _cols("rec", VM_SLOT_OFF)
    slot_cnt = _cols("rec", VM_SLOT_CNT)
    slot_last = _cols("rec", VM_SLOT_LAST)
    host_bytes = _cols("rec", VM_HOST_BYTES)
    dirty_mode = _cols("rec", VM_DIRTY_MODE)
    inval_count = _cols("rec", VM_INVAL_COUNT)
    inval_start = _cols("rec", VM_INVAL_START)
    inval_end = _cols("rec", VM_INVAL_END)
    hash_off = _cols("rec", VM_HASH_OFF)
    act_head = _cols("rec", VM_ACT_HEAD)
    act_tail = _cols("rec", VM_ACT_TAIL)
    indirect = _cols("rec", VM_INDIRECT)
    valid_gen = _cols("rec", VM_VALID_GEN)
    n_max = _cols("rec", VM_N_MAX)
    maxphyaddr = _cols("rec", VM_MAXPHYADDR)
    vcpu_off = _cols("rec", VM_VCPU_OFF)
    mmu = _cols("rec", VM_MMU)
    n_used = _cols("rec", VM_N_USED)
    root_l2 = _cols("rec", VM_ROOT_L2)


DM_MANUAL_PROTECT = 1
DM_INITIALLY_SET = 2
DM_RING = 4
DM_PML_ACTIVE = 8          # some slot of the VM logs dirty pages and the CPU has PML

# --- struct kvm_vcpu (dirty logging part): one int64 record per vCPU (VcpuTable.rec) -----------
VC_PML_COUNT = 0       # entries in the PML buffer
VC_RING_SIZE = 1       # dirty ring entries (0 = no ring)
VC_RING_OFF = 2        # first entry in the ring pool
VC_RING_DIRTY = 3      # dirty_index (entries pushed)
VC_RING_RESET = 4      # reset_index
VC_RING_FETCH = 5      # userspace's fetch index (harvest)
NVCF = 6

# --- struct kvm_dirty_gfn: one int64 record per dirty-ring entry (VcpuTable.ring) ---------------
RG_FLAGS = 0           # KVM_DIRTY_GFN_F_*
RG_SLOT = 1            # (as_id << 16) | slot id
RG_OFFSET = 2          # gfn offset in the slot
NRGF = 3


class VcpuTable(NamedTuple):
    """Per-vCPU state (global vCPU index = VMTable.rec[vm, VM_VCPU_OFF] + vcpu): PML buffer, dirty ring."""
    rec: np.ndarray            # int64[nvcpu, NVCF]
    pml_buf: np.ndarray        # int64[nvcpu or 0, 512]: logged gfns (4K)
    ring: np.ndarray           # int64[pool, NRGF]: the dirty rings' entries (ring_off per vCPU)
    pml_count = _cols("rec", VC_PML_COUNT)
    ring_size = _cols("rec", VC_RING_SIZE)
    ring_off = _cols("rec", VC_RING_OFF)
    ring_dirty = _cols("rec", VC_RING_DIRTY)
    ring_reset = _cols("rec", VC_RING_RESET)
    ring_fetch = _cols("rec", VC_RING_FETCH)


# --- struct kvm_memory_slot: one int64 record per memslot (SlotTable.rec) ----------------------
SL_VM = 0              # owning VM (-1: free record)
SL_SLOT_ID = 1         # (as_id << 16) | id
SL_BASE_GFN = 2
SL_NPAGES = 3
SL_HVA = 4             # userspace_addr
SL_FLAGS = 5           # KVM_MEM_* flags
SL_BACKING = 6         # BACKING_*
SL_LPAGE_OFF = 7       # 2 columns: offsets of lpage_info (2M, 1G) in ``lpage``
SL_DIRTY_OFF = 9       # offset of the dirty bitmap in ``dirty`` (-1: none)
SL_HOST_OFF = 10       # offset of the host-resident bitmap in ``host``
SL_RMAP_OFF = 11       # 3 columns (4K, 2M, 1G): offsets of the rmap heads (-1: none, not a shadow VM's slot)
SL_WTRACK_OFF = 14     # offset of the gfn_write_track counts (-1: none)
NSLF = 15


class SlotTable(NamedTuple):
    """Memslot records (one per KVM memslot) and their pooled per-page arrays."""
    rec: np.ndarray            # int64[rcap, NSLF]
    order: np.ndarray          # int64: per-VM lists of live AS0 records sorted by base_gfn
    lpage: np.ndarray          # int32: lpage_info.disallow_lpage pool
    dirty: np.ndarray          # int64: dirty bitmap pool (64 pages a word)
    host: np.ndarray           # int64: host-resident bitmap pool (4K pages, 64 a word)
    swap: np.ndarray           # int64: swapped-out bitmap pool, same offsets as ``host``
    split: np.ndarray          # int64: THP split bitmap pool (4K pages of split THPs), same offsets
    age: np.ndarray            # uint8: reclaim age per 4K page at 64 * host_off (empty without overcommit)
    vm = _cols("rec", SL_VM)
    slot_id = _cols("rec", SL_SLOT_ID)
    base_gfn = _cols("rec", SL_BASE_GFN)
    npages = _cols("rec", SL_NPAGES)
    hva = _cols("rec", SL_HVA)
    flags = _cols("rec", SL_FLAGS)
    backing = _cols("rec", SL_BACKING)
    lpage_off = _cols("rec", SL_LPAGE_OFF, 2)
    dirty_off = _cols("rec", SL_DIRTY_OFF)
    host_off = _cols("rec", SL_HOST_OFF)
    rmap_off = _cols("rec", SL_RMAP_OFF, 3)
    wtrack_off = _cols("rec", SL_WTRACK_OFF)


# --- shadow MMU (kernels/shadow_mmu.py, paging_tmpl.py, ...) ------------------------------
KVM_MMU_HASH_SIZE = 4096       # 1 << KVM_MMU_HASH_SHIFT
KVM_MMU_NUM_PREV_ROOTS = 3
PTE_PREFETCH_NUM = 8
SH_PL_FREE = 0                 # head of the free list of parent-pte links
SH_PL_AVAIL = 1
SH_RN_FREE = 2                 # head of the free list of rmap nodes
SH_RN_AVAIL = 3
SH_SCRATCH = 8                 # ShadowState.ctl[SH_SCRATCH:]: scratch (SC_* offsets, mmu_internal.py)
# worst case of links / rmap nodes one event can take (a fault: a parent link per level, 8 SPTEs)
MAX_PL_PER_EVENT = 8
MAX_RN_PER_EVENT = 16
MAX_GM_PER_EVENT = 8           # guest-memory rows: a page-crossing store + walker A/D writes


# parent-pte links and rmap nodes (ShadowState.pl / .rn): one (value, next) pair per node
NODE_VAL = 0           # the SPTE pointer: row * 512 + index
NODE_NEXT = 1          # next node, -1 at the end
# rmap heads (ShadowState.rmap, struct kvm_rmap_head): one (first node, length) pair per slot, level and gfn
RM_HEAD = 0            # first rmap node, -1 empty
RM_COUNT = 1           # SPTEs on the list (KVM keeps it in the pte_list_desc blocks)
NRMF = 2


class ShadowState(NamedTuple):
    """Shadow-MMU state (``mmu.c``) beyond the page, VM and memslot records: rmaps, parent-pte lists,
    the per-VM hash buckets, write tracking."""
    trans: np.ndarray           # int64[cap, 512]: shadowed_translation (gfn << 12 | access)
    pl: np.ndarray              # int64[P, 2]: parent-pte links (NODE_VAL, NODE_NEXT)
    rn: np.ndarray              # int64[R, 2]: rmap nodes
    rmap: np.ndarray            # int64[H, NRMF]: per slot, level, gfn index: RM_HEAD, RM_COUNT
    wtrack: np.ndarray          # int32[W]: gfn_write_track per 4K gfn of each slot
    hash: np.ndarray            # int64[nshadow * 4096]
    ctl: np.ndarray             # int64[SH_SCRATCH + SC_SIZE]: SH_* words, then the scratch block
    scratch = property(lambda self: self.ctl[SH_SCRATCH:], doc="ctl[SH_SCRATCH:]: walker output, small stacks")


# --- vCPU paging registers and MMU roots: one int64 record per vCPU (VcpuRegs.rec) -------------
VR_CR0 = 0
VR_CR3 = 1
VR_CR4 = 2
VR_EFER = 3
VR_RFLAGS = 4
VR_PKRU = 5
VR_PDPTR = 6           # 4 columns: PDPTRs loaded at CR3 load (PAE)
VR_ROOT = 10           # current root row (-1 invalid)
VR_ROOT_PGD = 11
VR_PREV_ROOT = 12      # 3 columns
VR_PREV_PGD = 15       # 3 columns
VR_PAE_ROOT = 18       # 4 columns: PAE roots (rows, -1 invalid)
# nested (vmx/nested.c, svm/nested.c): the vCPU runs L2 while VR_GUEST_MODE is 1; VR_CR0..VR_PDPTR then hold
# L2's registers and VR_ROOT..VR_PREV_PGD the MMU L2 runs on (guest_mmu with nested EPT/NPT), while L1's
# registers and root_mmu's roots wait in the VR_L1_* and VR_ALT_* columns (swapped at VM-entry and VM-exit)
VR_GUEST_MODE = 22
VR_EPTP = 23           # vmcs12 EPTP (VMX) or nCR3 (SVM) of nested paging, -1: L1 does not use it
VR_L1_CR0 = 24         # 4 columns: L1's CR0, CR3, CR4, EFER
VR_L1_PDPTR = 28       # 4 columns
VR_ALT_ROOT = 32       # 8 columns, laid out as VR_ROOT..VR_PREV_PGD: the other MMU's roots
NVRF = 40


class VcpuRegs(NamedTuple):
    """Per-vCPU paging registers and MMU roots (global vCPU index)."""
    rec: np.ndarray             # int64[nv, NVRF]
    cr0 = _cols("rec", VR_CR0)
    cr3 = _cols("rec", VR_CR3)
    cr4 = _cols("rec", VR_CR4)
    efer = _cols("rec", VR_EFER)
    rflags = _cols("rec", VR_RFLAGS)
    pkru = _cols("rec", VR_PKRU)
    pdptr = _cols("rec", VR_PDPTR, 4)
    root = _cols("rec", VR_ROOT)
    root_pgd = _cols("rec", VR_ROOT_PGD)
    prev_root = _cols("rec", VR_PREV_ROOT, 3)
    prev_pgd = _cols("rec", VR_PREV_PGD, 3)
    pae_root = _cols("rec", VR_PAE_ROOT, 4)
    guest_mode = _cols("rec", VR_GUEST_MODE)
    eptp = _cols("rec", VR_EPTP)


# guest-memory key table (GuestMem.hash): one (key, row) pair per slot of the open-addressing table
GMH_KEY = 0            # (vm << GM_VM_SHIFT) | hva page, -1 empty
GMH_ROW = 1            # row of ``page`` holding the contents
NGMH = 2


class GuestMem(NamedTuple):
    """Guest memory contents, keyed by host page (kernels/gmem.py)."""
    hash: np.ndarray            # int64[hcap, NGMH]: key table (GMH_KEY, GMH_ROW)
    page: np.ndarray            # int64[cap, 512]
    free: np.ndarray            # int64[cap]: stack of released rows
    ctl: np.ndarray             # int64[3]: GM_USED, GM_KEYS, GM_NFREE
    key = _cols("hash", GMH_KEY)
    row = _cols("hash", GMH_ROW)


class SlotMap(NamedTuple):
    """What gpa -> memslot -> hva needs (search_memslots, __gfn_to_hva_memslot): the VM and memslot
    records, for kernels that only translate (built by kernels/memslot.py ``slot_map``).

    For an L2 guest under nested EPT/NPT the processor reaches memory through the shadow tables instead:
    ``root`` >= 0 makes the map translate an L2 gpa through the tables at row ``root`` of ``spt`` (``levels``
    deep) to the host page (kernels/gmem.py gm_page_key); otherwise ``spt`` is a placeholder (``vrec``)."""
    vrec: np.ndarray            # VMTable.rec
    order: np.ndarray           # SlotTable.order
    srec: np.ndarray            # SlotTable.rec
    spt: np.ndarray             # PageArena.spt (L2) or vrec
    root: np.int64              # row of the shadow root, -1: translate through the memslots
    levels: np.int64


class MMU(NamedTuple):
    """Everything the guest-paging kernels touch, in one argument."""
    pa: PageArena
    vt: VMTable
    st: SlotTable
    ct: VcpuTable
    host: np.ndarray            # HOST_* and CFG_* words
    sh: ShadowState
    gm: GuestMem
    vr: VcpuRegs


MMU_TDP = 0       # the TDP MMU (tdp_mmu.c): gpa -> hpa, kvm.tdp_mmu=Y
MMU_SHADOW = 1    # shadow paging (no EPT/NPT): gva -> hpa through shadow pages
MMU_LEGACY = 2    # TDP built by the shadow MMU's code (kvm.tdp_mmu=N): direct shadow pages, hash, rmaps
