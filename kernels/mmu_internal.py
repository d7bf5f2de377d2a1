"""mmu_internal.h: RET_PF_* and the simulator's own fault results, event ops, the scratch layout."""

import numpy as np
from numba import njit

from .guest_walk import WK_SIZE
from .state import CTL_NX_SEQ, SH_SCRATCH, SP_FLAGS, SP_SEQ, SPF_NX_DISALLOWED, SPF_NX_TRACKED, ST_NX_LPAGE_SPLITS

# RET_PF_* (mmu_internal.h)
RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_INVALID = 3
RET_PF_FIXED = 4
RET_PF_SPURIOUS = 5
RET_PF_MMIO = 6  # simulator: an EMULATE for a gfn without a memslot
RET_PF_OOM = 7   # simulator: the host memory budget cannot back the page (nothing changed)
RET_PF_GUEST = 8  # simulator: the guest walk refused the access (#PF injected; its code may be 0)
HW_FAULT = np.int64(1) << np.int64(40)  # shadow_hw_walk: set with the error code when the walk faults

# event ops
OP_ACCESS = 0        # native access (a store when EV_SIZE > 0: EV_VALUE written on success)
OP_EMULATED = 1      # access by KVM's instruction emulator (write when kind has W)
OP_INVLPG = 2
OP_MOV_CR3 = 3       # guest MOV to CR3 (kvm_set_cr3)
OP_FLUSH = 4         # guest TLB flush (kvm_vcpu_flush_tlb_guest)

# an event batch of the guest-paging loops (shadow_event_batch, tdp2d_batch): one int64 record per event
EV_VM = 0
EV_VCPU = 1          # vCPU index within the VM
EV_OP = 2            # OP_* (tdp2d_batch runs accesses only)
EV_ADDR = 3          # gva (gpa with paging off); OP_MOV_CR3: the new CR3
EV_KIND = 4          # PFERR-style access bits
EV_VALUE = 5         # a store's value (its low EV_SIZE bytes)
EV_SIZE = 6          # bytes stored (0: no store)
NEVF = 7
# their results: one int64 record per event
RES_OUTCOME = 0      # OUT_*
RES_ERROR = 1        # error code of the exit or of the #PF delivered to the guest
RES_FAULT_GPA = 2    # nested: the L2 gpa of an L1_EXIT (Python fills -1; the kernels write only L1 exits)
NRESF = 3

PT32E_ROOT_LEVEL = 3
PAE_ROOT = -2        # vr.root value while the vCPU runs on its 4 PAE roots (32-bit and PAE guests)
GFN_MASK_64 = np.int64(0x000FFFFFFFFFF000)
RMAP_RECYCLE_THRESHOLD = 1000
KVM_PAGE_ARRAY_NR = 16

# scratch layout (``scratch(sh)``, the tail of ShadowState.ctl): walker output at 0, small arrays after it
SC_WK = 0
SC_PVEC_SP = 64      # 16 rows
SC_PVEC_IDX = 80     # index of the entry in its parent
SC_PVEC_PAR = 96     # pvec index of the parent entry (-1 root)
SC_STACK = 112       # DFS stack: 16 (row, next bit) pairs
SC_INVALID_HEAD = 160  # head of invalid_list (rows linked through SP_ANEXT)
SC_PREFETCH = 168    # 8 gptes of the prefetch group
SC_MARK_STACK = 176  # stack of mark_parents_unsync (pages whose unsync_children went 0 -> 1)
SC_MARK_STACK_LEN = 80
SC_SIZE = 256
SC_OOM_GPA = WK_SIZE   # a host-OOM stop leaves the gpa it could not back here (after the walker's words)
# kvm_get_running_vcpu(): the global vCPU index while a shadow event runs, else -1 (the last word of the
# walker's block: the walk uses WK_SIZE words, SC_OOM_GPA one more, its table-row cache WKC_VM..WKC_END)
SC_RUNNING_VCPU = 63


@njit(inline="always", _nrt=False)
def scratch(sh):
    """The scratch block of ShadowState ``sh`` (SC_* offsets): a view of ``sh.ctl`` past the SH_* words."""
    return sh.ctl[SH_SCRATCH:]


MAX_EXITS = 4


@njit(inline="always", _nrt=False)
def account_nx_huge_page(pa, vt, vm, row, nx_huge_page_possible):
    """account_nx_huge_page: a table made for an executable fault under the NX huge page workaround; when
    a huge page could map there (track_possible_nx_huge_page) it joins the VM's recovery list, oldest first."""
    pa.meta[row, SP_FLAGS] |= SPF_NX_DISALLOWED
    if nx_huge_page_possible and not pa.meta[row, SP_FLAGS] & SPF_NX_TRACKED:  # a reused page may be on it
        pa.meta[row, SP_FLAGS] |= SPF_NX_TRACKED
        pa.meta[row, SP_SEQ] = pa.ctl[CTL_NX_SEQ]
        pa.ctl[CTL_NX_SEQ] += 1
        vt.stats[vm, ST_NX_LPAGE_SPLITS] += 1


@njit(inline="always", _nrt=False)
def untrack_possible_nx_huge_page(pa, vt, vm, row):
    # untrack_possible_nx_huge_page: off the recovery list (the page keeps nx_huge_page_disallowed)
    if pa.meta[row, SP_FLAGS] & SPF_NX_TRACKED:
        pa.meta[row, SP_FLAGS] &= ~SPF_NX_TRACKED
        vt.stats[vm, ST_NX_LPAGE_SPLITS] -= 1


@njit(inline="always", _nrt=False)
def unaccount_nx_huge_page(pa, vt, vm, row):
    # unaccount_nx_huge_page: a huge page may map there again
    pa.meta[row, SP_FLAGS] &= ~SPF_NX_DISALLOWED
    untrack_possible_nx_huge_page(pa, vt, vm, row)


# A 2D access (tdp2d.access_2d, nested.access_l2) restarts after every exit KVM fixes; a guest walk of 5 levels
# meets at most 6 distinct gfns, each may exit a few times (fast path, then the slow one).  Past this the access
# gives up as RETRY (only a livelock, e.g. page tables in a read-only slot under EPT A/D, gets there).
MAX_RESTARTS = 32
