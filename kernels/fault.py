"""Guest accesses under TDP: the hardware walk and KVM's fault path (``kvm_mmu_page_fault``).

``access_batch`` is the hot loop: one pass over a struct-of-arrays batch of accesses
for many VMs, in order.  It stops early (and says why) when the page arena needs a
top-up or the host memory budget is spent; Python fixes that and resumes at the
event it stopped at, so nothing is applied twice or lost.
"""

import numpy as np
from numba import njit

from .dirty import pml_flush, pml_log
from .jit import kernel
from .memslot import (
    dirty_ring_soft_full,
    gfn_to_hva,
    gfn_to_memslot,
    host_fault_in,
    host_page_needs_budget,
    invalidation_clamp_level,
    kvm_mmu_max_mapping_level,
    mark_page_dirty,
    slot_dirty_logging,
    slot_readonly,
)
from .mmu_internal import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_INVALID, RET_PF_RETRY, RET_PF_SPURIOUS
from .paging_tmpl import try_to_unsync_pages
from .shadow_mmu import write_tracked
from .spte import (
    FMT_EPT,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    MMIO_SPTE_GEN_MASK,
    NPT_NX,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT_WRITABLE_MASK,
    get_mmio_spte_generation,
    hw_access_allowed,
    hw_present,
    hw_rsvd_fault,
    is_access_track_spte,
    is_large_pte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    restore_acc_track_spte,
    shadow_accessed_mask,
    shadow_dirty_mask,
    shadow_nx_mask,
    shadow_x_mask,
    spte_ad_enabled,
    spte_to_child_row,
)
from .state import (
    CFG_MMIO_CACHING,
    CFG_NX_HUGE_PAGES,
    CFG_PML,
    CFG_SPLIT_ON_FAULT,
    CFG_TDP_MAX_LEVEL,
    CTL_FREE_TOP,
    DM_PML_ACTIVE,
    DM_RING,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    MAX_ROWS_PER_EVENT,
    OUT_EMULATED,
    OUT_FIXED,
    OUT_HIT,
    OUT_MMIO,
    OUT_RETRY,
    OUT_RING_FULL,
    PML_ENTITY_NUM,
    ST_ACCESSES,
    ST_DIRTY_RING_FULL,
    ST_PF_FAST,
    ST_PF_RETRY,
    ST_PF_TAKEN,
    ST_WALK_REFS,
    STOP_DONE,
    STOP_HOST_OOM,
    STOP_NEED_PAGES,
    VM_AD_DISABLED,
    VM_DIRTY_MODE,
    VM_FMT,
    VM_HASH_OFF,
    VM_INVAL_COUNT,
    VM_INVAL_END,
    VM_INVAL_START,
    VM_LEVELS,
    VM_MAX_GFN,
    VM_MEMSLOTS_GEN,
    VM_ROOT,
    VM_ROOT_L2,
    VM_VCPU_OFF,
)
from .tdp import (
    account_pf_result,
    kvm_tdp_mmu_map,
    mmu_alloc_root,
)
from .tdp_iter import walk_to_leaf

# hardware walk results
WALK_OK = 0
WALK_VIOLATION = 1   # EPT violation / #NPF on a not-present or too-weak entry
WALK_RSVD = 2        # EPT misconfiguration / #NPF with RSVD (MMIO SPTEs)


_EPT_DESC_MASK = np.int64(7 | (1 << 7))
_NPT_DESC_MASK = np.int64(0x87 | (1 << 51)) | NPT_NX
_NPT_DESC_WANT = np.int64(0x7)


@njit(inline="always", _nrt=False)
def _descend_test(fmt):
    if fmt == FMT_EPT:
        return _EPT_DESC_MASK, np.int64(7)
    return _NPT_DESC_MASK, _NPT_DESC_WANT


@njit(inline="always", _nrt=False)
def tdp_hw_walk(spt, fmt, root, levels, gfn, write, fetch, ad_enabled_vm):
    """The processor's TDP walk for one gpa.  Returns (result, refs, row, idx, level, spte).

    On success the accessed (and, for writes, dirty) bit of the leaf is set as the
    hardware does when A/D bits are enabled; upper levels already have A set.
    """
    return tdp_hw_walk_from(spt, fmt, root, np.int64(levels), 0, gfn, write, fetch, ad_enabled_vm)


@njit(inline="always", _nrt=False)
def tdp_hw_walk_from(spt, fmt, row, level, refs, gfn, write, fetch, ad_enabled_vm):
    """The same walk entered at table ``row`` of ``level`` with ``refs`` references already made."""
    desc_mask, desc_want = _descend_test(fmt)
    while True:
        idx = (gfn >> ((level - 1) * 9)) & 511
        spte = spt[row, idx]
        refs += 1
        if level > 1 and (spte & desc_mask) == desc_want:
            # common case: a table entry granting everything (what make_nonleaf_spte builds)
            row = spte_to_child_row(spte)
            level -= 1
            continue
        if hw_rsvd_fault(fmt, spte):
            return WALK_RSVD, refs, row, idx, level, spte
        if not hw_present(fmt, spte):
            return WALK_VIOLATION, refs, row, idx, level, spte
        if level == 1 or is_large_pte(spte):
            if not hw_access_allowed(fmt, spte, write, fetch):
                return WALK_VIOLATION, refs, row, idx, level, spte
            if ad_enabled_vm and spte_ad_enabled(spte):
                want = shadow_accessed_mask(fmt)
                if write:
                    want |= shadow_dirty_mask(fmt)
                if (spte & want) != want:
                    spt[row, idx] = spte | want
            return WALK_OK, refs, row, idx, level, spte
        row = spte_to_child_row(spte)
        level -= 1


@njit(inline="always", _nrt=False)
def is_access_allowed(fmt, spte, write, fetch):
    # is_access_allowed (mmu.c)
    if fetch:
        return (spte & (shadow_x_mask(fmt) | shadow_nx_mask(fmt))) == shadow_x_mask(fmt)
    if write:
        return (spte & PT_WRITABLE_MASK) != 0
    return (spte & 1) != 0  # PT_PRESENT_MASK (EPT: R)


@njit(inline="always", _nrt=False)
def fast_pf_new_spte(fmt, spte, level, write, fetch, ad_enabled_vm, dirty_logging):
    """fast_page_fault once the last SPTE is found (present, a leaf): (RET_PF_SPURIOUS, spte) when the access
    is allowed already, (RET_PF_FIXED, new spte) when restoring access tracking or the MMU-writable bit allows
    it, else (RET_PF_INVALID, spte): the slow path runs.  Shared by the TDP MMU and direct shadow pages."""
    if is_access_allowed(fmt, spte, write, fetch):
        return RET_PF_SPURIOUS, spte
    new = spte
    if not ad_enabled_vm and is_access_track_spte(fmt, spte):
        new = restore_acc_track_spte(new) | shadow_accessed_mask(fmt)  # v6.13+: mark it accessed
    if write and is_mmu_writable_spte(fmt, spte):
        new |= PT_WRITABLE_MASK
        if level > 1 and dirty_logging:
            return RET_PF_INVALID, spte
    if new == spte or not is_access_allowed(fmt, new, write, fetch):
        return RET_PF_INVALID, spte
    return RET_PF_FIXED, new


@njit(inline="always", _nrt=False)
def fast_pf_fix_direct_spte(spt, st, ct, vcpu_g, row, idx, spte, new, rec, gfn):
    # fast_pf_fix_direct_spte: KVM's cmpxchg, outside the MMU's SPTE chokepoint; a newly writable page is dirty
    spt[row, idx] = new
    if (new & PT_WRITABLE_MASK) and not (spte & PT_WRITABLE_MASK) and rec >= 0:
        mark_page_dirty(st, ct, vcpu_g, rec, gfn)


@njit(inline="always", _nrt=False)
def fast_page_fault(pa, st, ct, vcpu_g, fmt, root, root_level, gfn, rec, present, write, fetch, ad_enabled_vm):
    """fast_page_fault (mmu.c) on the table below ``root`` (of ``root_level``): the TDP MMU's root
    (kvm_tdp_mmu_fast_pf_get_last_sptep) or a direct shadow root (fast_pf_get_last_sptep).  Returns RET_PF_*."""
    # page_fault_can_be_fast (the fault is never RSVD here)
    if not present:
        if ad_enabled_vm:
            return RET_PF_INVALID
    elif not write:
        return RET_PF_INVALID
    if root < 0:
        return RET_PF_INVALID
    row, idx, level, spte = walk_to_leaf(pa.spt, root, np.int64(root_level), gfn)
    if not is_shadow_present_pte(spte):
        return RET_PF_INVALID
    r, new = fast_pf_new_spte(fmt, spte, level, write, fetch, ad_enabled_vm, rec >= 0 and slot_dirty_logging(st, rec))
    if r == RET_PF_FIXED:
        fast_pf_fix_direct_spte(pa.spt, st, ct, vcpu_g, row, idx, spte, new, rec, gfn)
    return r


@njit(inline="always", _nrt=False)
def kvm_tdp_mmu_page_fault(pa, vt, st, ct, sh, host, rootf, vcpu_g, vm, fmt, gfn, rec, present, rsvd, write, fetch):
    """kvm_tdp_mmu_page_fault: page tracking, fast path, faultin, hugepage adjust, map.  ``sh`` is the shadow
    MMU's state: a VM running nested EPT / NPT write-tracks L1's EPT12 / NPT12 tables and unsyncs their pages."""
    ad_enabled_vm = vt.rec[vm, VM_AD_DISABLED] == 0
    if present and write and not rsvd and write_tracked(st, sh, rec, gfn):
        return RET_PF_EMULATE   # page_fault_handle_page_track (RET_PF_WRITE_PROTECTED since v6.12)
    if not rsvd:  # page_fault_can_be_fast: faults on MMIO SPTEs never are
        r = fast_page_fault(pa, st, ct, vcpu_g, fmt, vt.rec[vm, rootf], vt.rec[vm, VM_LEVELS], gfn, rec, present,
                            write, fetch, ad_enabled_vm)
        if r != RET_PF_INVALID:
            vt.stats[vm, ST_PF_FAST] += 1
            return r
    mmio_caching = host[CFG_MMIO_CACHING] != 0
    nx_huge_pages = host[CFG_NX_HUGE_PAGES] != 0
    huge_page_disallowed = fetch and nx_huge_pages
    pfn4k = 0
    map_writable = False
    goal_level = 1
    req_level = 1
    # kvm_mmu_faultin_pfn
    if rec < 0:
        # kvm_handle_noslot_fault
        if not mmio_caching or gfn > vt.rec[vm, VM_MAX_GFN]:
            return RET_PF_EMULATE
        # kvm_mmu_hugepage_adjust set huge_page_disallowed before its no-slot early return
    else:
        if vt.rec[vm, VM_INVAL_COUNT] > 0 and vt.rec[vm, VM_INVAL_START] <= gfn < vt.rec[vm, VM_INVAL_END]:
            return RET_PF_RETRY  # mmu_invalidate_retry_gfn_unsafe: an invalidation covers the gfn
        if write and slot_readonly(st, rec):
            return RET_PF_EMULATE  # KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn
        map_writable = not slot_readonly(st, rec)
        host_fault_in(st, vt, host, rec, gfn, vm)
        pfn4k = gfn_to_hva(st, rec, gfn) >> 12
        # kvm_mmu_hugepage_adjust
        if not slot_dirty_logging(st, rec):
            max_level = min(KVM_MAX_HUGEPAGE_LEVEL, host[CFG_TDP_MAX_LEVEL])
            req_level = invalidation_clamp_level(vt, vm, gfn, kvm_mmu_max_mapping_level(st, rec, gfn, max_level))
            if req_level > 1 and not huge_page_disallowed:
                goal_level = req_level
    # make_spte's mmu_try_to_unsync_pages, asked before the walk down: a writable SPTE for a gfn guest_mmu (nested
    # EPT / NPT) shadows unsyncs its last-level pages, or stays write-protected if it is write-tracked.  Exact
    # before the walk: such a gfn never has a writable SPTE, or a huge one over it (disallow_lpage), to skip it
    wrprot = map_writable and vt.rec[vm, VM_HASH_OFF] >= 0 and \
        try_to_unsync_pages(pa, vt, st, sh, vm, rec, gfn, False, False) != 0
    # one call site: the map tree is inlined once
    return kvm_tdp_mmu_map(pa, vt, st, ct, rootf, vcpu_g, vm, fmt, gfn, rec, pfn4k, map_writable, wrprot, goal_level,
                           req_level, huge_page_disallowed, nx_huge_pages, mmio_caching, write,
                           host[CFG_SPLIT_ON_FAULT] != 0, rootf == VM_ROOT_L2 and host[CFG_PML] != 0)


@njit(inline="always", _nrt=False)
def handle_mmio_page_fault(vt, vm, fmt, spte, mmio_caching):
    """handle_mmio_page_fault: True = emulate now, False = stale generation (slow path)."""
    if not is_mmio_spte(fmt, spte, mmio_caching):
        return False
    gen = vt.rec[vm, VM_MEMSLOTS_GEN]
    if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return False
    return (gen & MMIO_SPTE_GEN_MASK) == get_mmio_spte_generation(spte)


@njit(inline="always", _nrt=False)
def exit_error_code(fmt, res, spte, write, fetch):
    """The error code KVM's fault handler receives for this exit."""
    if res == WALK_RSVD and fmt == FMT_EPT:
        return PFERR_RSVD_MASK  # handle_ept_misconfig passes PFERR_RSVD_MASK alone
    err = 0
    if res == WALK_RSVD:
        err = PFERR_RSVD_MASK | PFERR_PRESENT_MASK
    elif hw_present(fmt, spte):
        err = PFERR_PRESENT_MASK
    if write:
        err |= PFERR_WRITE_MASK
    elif fetch:
        err |= PFERR_FETCH_MASK
    if fmt == FMT_EPT:
        if not write and not fetch:
            err |= PFERR_USER_MASK  # __vmx_handle_ept_violation: ACC_READ is reported as PFERR_USER
    else:
        err |= PFERR_USER_MASK  # #NPF: the nested walk is a user access
    return err


MAX_EXITS_PER_ACCESS = 4


@njit(inline="always", _nrt=False)
def kvm_handle_exit(pa, vt, st, ct, sh, host, rootf, vcpu_g, vm, fmt, gfn, write, fetch, res, refs, spte):
    """TDP exits of one access (EPT violation / misconfiguration, #NPF): kvm_mmu_page_fault, then
    the guest re-executes the access, which may exit again (a fault fixed for the access KVM saw
    is not always enough for the access the guest made).

    Returns (outcome, error code of the last exit); outcome -1 means the host budget cannot back
    the page and nothing was changed.
    """
    mmio_caching = host[CFG_MMIO_CACHING] != 0
    stats = vt.stats
    if vt.rec[vm, VM_DIRTY_MODE] & DM_PML_ACTIVE:
        pml_flush(vt, st, ct, vm, vcpu_g)  # vmx_handle_exit flushes the PML buffer on every exit
    outcome = OUT_FIXED
    err = 0
    for attempt in range(MAX_EXITS_PER_ACCESS):
        err = exit_error_code(fmt, res, spte, write, fetch)
        if res == WALK_RSVD and handle_mmio_page_fault(vt, vm, fmt, spte, mmio_caching):
            if attempt == 0:
                stats[vm, ST_ACCESSES] += 1
            stats[vm, ST_WALK_REFS] += refs
            return OUT_MMIO, err
        rec = gfn_to_memslot(vt, st, vm, gfn)
        if attempt == 0:
            if host_page_needs_budget(st, host, rec, gfn, write):
                return -1, 0
            stats[vm, ST_ACCESSES] += 1
        stats[vm, ST_WALK_REFS] += refs
        stats[vm, ST_PF_TAKEN] += 1
        present = (err & PFERR_PRESENT_MASK) != 0
        r = kvm_tdp_mmu_page_fault(pa, vt, st, ct, sh, host, rootf, vcpu_g, vm, fmt, gfn, rec, present,
                                   (err & PFERR_RSVD_MASK) != 0, (err & PFERR_WRITE_MASK) != 0,
                                   (err & PFERR_FETCH_MASK) != 0)
        if r == RET_PF_RETRY:
            stats[vm, ST_PF_RETRY] += 1  # the guest re-executes later; the access has not happened
            return OUT_RETRY, err
        outcome = account_pf_result(stats, vm, r)
        if outcome == OUT_EMULATED:
            return (OUT_MMIO if rec < 0 else OUT_EMULATED), err
        # The guest re-executes the access.
        res, refs, row, idx, level, spte = tdp_hw_walk(pa.spt, fmt, vt.rec[vm, rootf], vt.rec[vm, VM_LEVELS],
                                                       gfn, write, fetch, vt.rec[vm, VM_AD_DISABLED] == 0)
        if res == WALK_OK:
            stats[vm, ST_WALK_REFS] += refs
            return outcome, err
    stats[vm, ST_WALK_REFS] += refs
    return outcome, err


@njit(inline="always", _nrt=False)
def _flush_pending(stats, vm, n_acc, n_refs):
    if vm >= 0:
        stats[vm, ST_ACCESSES] += n_acc
        stats[vm, ST_WALK_REFS] += n_refs


@kernel
def access_batch(pa, vt, st, ct, sh, host, ev_vm, ev_vcpu, ev_addr, ev_kind, start, out_outcome, out_err):
    """Run accesses ev[start:] for paging-off vCPUs under TDP.  Returns (next_event, STOP_*).  (A VM running
    nested EPT / NPT takes kernels/tdp2d.py, whose exits emulate the writes to write-tracked tables.)"""
    n = ev_vm.shape[0]
    # Hot arrays as locals: helpers that take whole bundles pay reference counting per call.
    spt, ctl, stats = pa.spt, pa.ctl, vt.stats
    vrec = vt.rec
    ring_rsvd = KVM_DIRTY_RING_RSVD_ENTRIES + (PML_ENTITY_NUM if host[CFG_PML] else 0)
    # HIT statistics of a run of events for one VM are summed locally and flushed on change.
    pend_vm, pend_acc, pend_refs = -1, 0, 0
    # The last walk's leaf table: a later walk of the same VM under the same upper entries
    # starts there with the same reference count (exact while no SPTE changed: only HITs).
    memo_vm, memo_key, memo_row, memo_level, memo_refs = -1, 0, 0, 1, 0
    for i in range(start, n):
        if ctl[CTL_FREE_TOP] < MAX_ROWS_PER_EVENT:
            _flush_pending(stats, pend_vm, pend_acc, pend_refs)
            return i, STOP_NEED_PAGES
        vm = ev_vm[i]
        gpa = ev_addr[i]
        kind = ev_kind[i]
        write = (kind & PFERR_WRITE_MASK) != 0
        fetch = (kind & PFERR_FETCH_MASK) != 0
        fmt = vrec[vm, VM_FMT]
        gfn = gpa >> 12
        mode = vrec[vm, VM_DIRTY_MODE]
        vcpu_g = vrec[vm, VM_VCPU_OFF] + ev_vcpu[i]
        if mode & DM_RING:
            if dirty_ring_soft_full(ct, vcpu_g, ring_rsvd):
                # KVM_EXIT_DIRTY_RING_FULL: the vCPU does not run until the rings are reset
                _flush_pending(stats, pend_vm, pend_acc, pend_refs)
                pend_vm, pend_acc, pend_refs = -1, 0, 0
                stats[vm, ST_DIRTY_RING_FULL] += 1
                if mode & DM_PML_ACTIVE:
                    pml_flush(vt, st, ct, vm, vcpu_g)  # an exit: the PML buffer is flushed
                out_outcome[i] = OUT_RING_FULL
                continue
        ad_enabled_vm = vrec[vm, VM_AD_DISABLED] == 0
        if vm == memo_vm and (gfn >> (9 * memo_level)) == memo_key:
            res, refs, row, idx, level, spte = tdp_hw_walk_from(spt, fmt, memo_row, memo_level, memo_refs - 1,
                                                                gfn, write, fetch, ad_enabled_vm)
        else:
            root = vrec[vm, VM_ROOT]
            if root < 0:
                root = mmu_alloc_root(pa, vt, vm, VM_ROOT)  # kvm_mmu_load at vCPU entry
            res, refs, row, idx, level, spte = tdp_hw_walk(spt, fmt, root, vrec[vm, VM_LEVELS], gfn, write,
                                                           fetch, ad_enabled_vm)
        if res == WALK_OK:
            memo_vm, memo_key, memo_row, memo_level, memo_refs = vm, gfn >> (9 * level), row, level, refs
            if vm != pend_vm:
                _flush_pending(stats, pend_vm, pend_acc, pend_refs)
                pend_vm, pend_acc, pend_refs = vm, 0, 0
            pend_acc += 1
            pend_refs += refs
            out_outcome[i] = OUT_HIT
            out_err[i] = 0
            if write and (mode & DM_PML_ACTIVE) and spte_ad_enabled(spte) and not (spte & shadow_dirty_mask(fmt)):
                pml_log(vt, st, ct, vm, vcpu_g, gfn)  # the CPU set D: PML records the gpa
            continue
        _flush_pending(stats, pend_vm, pend_acc, pend_refs)
        pend_vm, pend_acc, pend_refs = -1, 0, 0
        memo_vm = -1
        # An exit: EPT violation / misconfig, or #NPF.
        outcome, err = kvm_handle_exit(pa, vt, st, ct, sh, host, VM_ROOT, vcpu_g, vm, fmt, gfn, write, fetch, res, refs,
                                       spte)
        if outcome < 0:
            return i, STOP_HOST_OOM  # nothing applied for this event; pending stats flushed above
        out_outcome[i] = outcome
        out_err[i] = err
    _flush_pending(stats, pend_vm, pend_acc, pend_refs)
    return n, STOP_DONE
