"""The TDP MMU: table allocation, the one SPTE-change chokepoint, map, split and zap.

Models ``arch/x86/kvm/mmu/tdp_mmu.c`` (and the parts of ``tdp_iter.c`` it needs) for a
single-threaded world: no FROZEN_SPTE races, no RCU; the bookkeeping is KVM's.
"""

import numpy as np
from numba import njit

from .jit import helper, kernel
from .memslot import (
    invalidation_clamp_level,
    kvm_mmu_max_mapping_level,
    mark_page_dirty,
    slot_dirty_logging,
)
from .mmu_internal import (
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
    account_nx_huge_page,
    untrack_possible_nx_huge_page,
)
from .spte import (
    ACC_ALL,
    KVM_MAX_HUGEPAGE_LEVEL,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    ROLE_ACCESS_SHIFT,
    ROLE_AD_DISABLED,
    ROLE_CR0_WP,
    ROLE_DIRECT,
    ROLE_EFER_NX,
    ROLE_GUEST_MODE,
    SHADOW_NONPRESENT_VALUE,
    SPTE_ENT_PER_PAGE,
    SPTE_TDP_AD_WRPROT_ONLY,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    make_leaf_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    make_small_spte,
    modify_spte_protections,
    pages_per_hpage,
    shadow_dirty_mask,
    shadow_mmu_writable_mask,
    shadow_nx_mask,
    shadow_x_mask,
    spte_index,
    spte_to_child_row,
    spte_to_pfn,
)
from .state import (
    CFG_MMIO_CACHING,
    CFG_NX_HUGE_PAGES,
    CFG_TDP_MAX_LEVEL,
    CTL_FREE_TOP,
    CTL_USED,
    OUT_EMULATED,
    OUT_FIXED,
    OUT_SPURIOUS,
    SL_BASE_GFN,
    SL_NPAGES,
    SP_FLAGS,
    SP_GFN,
    SP_LEVEL,
    SP_PARENT,
    SP_PARENT_INDEX,
    SP_ROLE,
    SP_VM,
    SPF_NX_DISALLOWED,
    SPF_TDP_MMU,
    ST_MMU_PAGES,
    ST_PAGES_4K,
    ST_PAGES_WRITE_PROTECTED,
    ST_PF_EMULATE,
    ST_PF_FIXED,
    ST_PF_MMIO_SPTE_CREATED,
    ST_PF_SPURIOUS,
    ST_REMOTE_TLB_FLUSH,
    ST_REMOTE_TLB_FLUSH_REQUESTS,
    VM_AD_DISABLED,
    VM_FMT,
    VM_LEVELS,
    VM_MEMSLOTS_GEN,
    VM_ROOT,
    VM_ROOT_L2,
    VR_EPTP,
    VR_GUEST_MODE,
)
from .tdp_iter import tdp_iter_next, tdp_iter_next_leaf, tdp_iter_run, tdp_iter_start, tdp_iter_start_leaf


@njit(inline="always", _nrt=False)
def account_pf_result(stats, vm, r):
    """kvm_mmu_do_page_fault's statistics for a handled fault (RET_PF_FIXED / SPURIOUS / anything else is
    an emulation): pf_fixed, pf_spurious or pf_emulate.  Returns the access's outcome so far."""
    if r == RET_PF_FIXED:
        stats[vm, ST_PF_FIXED] += 1
        return OUT_FIXED
    if r == RET_PF_SPURIOUS:
        stats[vm, ST_PF_SPURIOUS] += 1
        return OUT_SPURIOUS
    stats[vm, ST_PF_EMULATE] += 1
    return OUT_EMULATED


@njit(inline="always", _nrt=False)
def kvm_update_page_stats(vt, vm, level, count):
    vt.stats[vm, ST_PAGES_4K + level - 1] += count


@njit(inline="always", _nrt=False)
def kvm_flush_remote_tlbs(vt, vm):
    # kvm_flush_remote_tlbs (kvm_main.c): every request counts; with no Hyper-V range
    # flush the request is always issued, so remote_tlb_flush follows it.
    vt.stats[vm, ST_REMOTE_TLB_FLUSH_REQUESTS] += 1
    vt.stats[vm, ST_REMOTE_TLB_FLUSH] += 1


@njit(inline="always", _nrt=False)
def tdp_mmu_root_role(vt, vm):
    # kvm_calc_tdp_mmu_root_page_role
    role = np.int32(vt.rec[vm, VM_LEVELS]) | ROLE_DIRECT | (ACC_ALL << ROLE_ACCESS_SHIFT) | ROLE_CR0_WP | ROLE_EFER_NX
    if vt.rec[vm, VM_AD_DISABLED]:
        role |= ROLE_AD_DISABLED
    return role


@njit(inline="always", _nrt=False)
def tdp_mmu_alloc_sp(pa, vt, vm, level, gfn, role, parent, parent_index):
    """tdp_mmu_alloc_sp + tdp_mmu_init_sp: pop a row from the topped-up free stack."""
    top = pa.ctl[CTL_FREE_TOP] - 1
    row = pa.free[top]
    pa.ctl[CTL_FREE_TOP] = top
    pa.ctl[CTL_USED] += 1
    spt = pa.spt
    for k in range(512):
        spt[row, k] = SHADOW_NONPRESENT_VALUE
    pa.meta[row, SP_VM] = vm
    pa.meta[row, SP_LEVEL] = level
    pa.meta[row, SP_GFN] = gfn
    pa.meta[row, SP_ROLE] = (role & ~np.int32(0xF)) | level
    pa.meta[row, SP_PARENT] = parent
    pa.meta[row, SP_PARENT_INDEX] = parent_index
    pa.meta[row, SP_FLAGS] = SPF_TDP_MMU
    vt.stats[vm, ST_MMU_PAGES] += 1  # tdp_account_mmu_page
    return row


@njit(inline="always", _nrt=False)
def tdp_mmu_free_sp(pa, vt, vm, row):
    # tdp_unaccount_mmu_page + untrack_possible_nx_huge_page + tdp_mmu_free_sp
    untrack_possible_nx_huge_page(pa, vt, vm, row)
    pa.meta[row, SP_FLAGS] = 0
    pa.meta[row, SP_PARENT] = -1
    pa.meta[row, SP_VM] = -1
    vt.stats[vm, ST_MMU_PAGES] -= 1
    pa.ctl[CTL_USED] -= 1
    top = pa.ctl[CTL_FREE_TOP]
    pa.free[top] = row
    pa.ctl[CTL_FREE_TOP] = top + 1


NR_TDP_ROOTS = 2   # a VM's TDP MMU roots: L1's (VM_ROOT) and, for an L2 without nested paging, role.guest_mode's


@njit(inline="always", _nrt=False)
def tdp_root_field(k):
    return VM_ROOT if k == 0 else VM_ROOT_L2


@njit(inline="always", _nrt=False)
def vcpu_root_field(vr, vg):
    """The root a vCPU runs on: role.guest_mode's while it runs an L2 without nested paging, else L1's."""
    return VM_ROOT_L2 if vr.rec[vg, VR_GUEST_MODE] != 0 and vr.rec[vg, VR_EPTP] < 0 else VM_ROOT


@helper
def mmu_alloc_root(pa, vt, vm, rootf):
    # kvm_tdp_mmu_get_vcpu_root_hpa: roots are shared by all vCPUs of the VM with the same role
    role = tdp_mmu_root_role(vt, vm)
    if rootf == VM_ROOT_L2:
        role |= ROLE_GUEST_MODE
    row = tdp_mmu_alloc_sp(pa, vt, vm, vt.rec[vm, VM_LEVELS], 0, role, -1, 0)
    vt.rec[vm, rootf] = row
    return row


@helper
def handle_removed_pt(pa, vt, vm, top_row, top_level):
    """handle_removed_pt: every SPTE below a disconnected table goes, leaves are unaccounted.

    Walks the subtree iteratively through parent pointers; frees every table.
    """
    row = top_row
    level = top_level
    idx = 0
    while True:
        if idx == 512:
            parent = pa.meta[row, SP_PARENT]
            pidx = pa.meta[row, SP_PARENT_INDEX]
            tdp_mmu_free_sp(pa, vt, vm, row)
            if row == top_row:
                return
            row = parent
            level += 1
            idx = pidx + 1
            continue
        spte = pa.spt[row, idx]
        if is_shadow_present_pte(spte):
            if is_last_spte(spte, level):
                kvm_update_page_stats(vt, vm, level, -1)
            else:
                row = spte_to_child_row(spte)
                level -= 1
                idx = 0
                continue
        idx += 1


@njit(inline="always", _nrt=False)
def tdp_set_spte(pa, vt, vm, row, idx, level, new_spte):
    """The chokepoint: every SPTE change goes here (tdp_mmu_set_spte + handle_changed_spte)."""
    old_spte = pa.spt[row, idx]
    pa.spt[row, idx] = new_spte
    if old_spte == new_spte:
        return old_spte
    was_present = is_shadow_present_pte(old_spte)
    is_present = is_shadow_present_pte(new_spte)
    was_leaf = was_present and is_last_spte(old_spte, level)
    is_leaf = is_present and is_last_spte(new_spte, level)
    if was_leaf != is_leaf:
        kvm_update_page_stats(vt, vm, level, 1 if is_leaf else -1)
    if was_present and not was_leaf and (is_leaf or not is_present or
                                         spte_to_pfn(old_spte) != spte_to_pfn(new_spte)):
        handle_removed_pt(pa, vt, vm, spte_to_child_row(old_spte), level - 1)
    return old_spte


@njit(inline="always", _nrt=False)
def tdp_mmu_link_sp(pa, vt, vm, fmt, row, idx, level, child):
    tdp_set_spte(pa, vt, vm, row, idx, level, make_nonleaf_spte(fmt, child, vt.rec[vm, VM_AD_DISABLED]))


@helper
def tdp_mmu_split_huge_page(pa, vt, vm, fmt, row, idx, level, child, nx_huge_pages):
    """tdp_mmu_split_huge_page: fill the child with the huge SPTE's pieces, then link it."""
    huge = pa.spt[row, idx]
    role_access = (pa.meta[child, SP_ROLE] >> 8) & 7
    for i in range(512):
        pa.spt[child, i] = make_small_spte(fmt, huge, level - 1, i, nx_huge_pages, role_access)
    tdp_mmu_link_sp(pa, vt, vm, fmt, row, idx, level, child)
    kvm_update_page_stats(vt, vm, level - 1, 512)


@njit(inline="always", _nrt=False)
def disallowed_child(pa, spte):
    return (pa.meta[spte_to_child_row(spte), SP_FLAGS] & SPF_NX_DISALLOWED) != 0


@njit(inline="always", _nrt=False)
def kvm_tdp_mmu_map(pa, vt, st, ct, rootf, vcpu_g, vm, fmt, gfn, rec, pfn4k, map_writable, wrprot, goal_level,
                    req_level, huge_page_disallowed, nx_huge_pages, mmio_caching, write, split_on_fault, ad_wrprot):
    """kvm_tdp_mmu_map + tdp_mmu_map_handle_target_level.  Returns a RET_PF_* code.  ``wrprot``: the new SPTE
    stays write-protected (a gfn guest_mmu write-tracks), and a write fault is emulated.  ``ad_wrprot``: the root
    is an L2's (role.guest_mode) on a PML host, so its SPTEs log dirty pages through write protection.

    ``rootf`` is the VM record field of the root the vCPU runs on (vcpu_root_field).  ``pfn4k`` is the host pfn
    of the faulting 4K gfn; the goal level aligns it.  A present huge SPTE above the
    goal level is split (``split_on_fault``, v6.2+) or, as before v6.2, zapped (tdp_mmu_zap_spte_atomic, with
    its remote flush) and replaced by an empty table, so the rest of its range faults again.
    """
    row = vt.rec[vm, rootf]
    level = np.int64(vt.rec[vm, VM_LEVELS])
    role = pa.meta[row, SP_ROLE]
    while True:
        shift = (level - 1) * 9
        idx = (gfn >> shift) & 511
        old = pa.spt[row, idx]
        if nx_huge_pages and level > 1 and level == goal_level and is_shadow_present_pte(old) \
                and not is_last_spte(old, level) and disallowed_child(pa, old):
            goal_level -= 1  # disallowed_hugepage_adjust
        if level == goal_level:
            break
        if is_shadow_present_pte(old) and not is_last_spte(old, level):
            row = spte_to_child_row(old)
            level -= 1
            continue
        child_gfn = (gfn >> shift) << shift
        child = tdp_mmu_alloc_sp(pa, vt, vm, level - 1, child_gfn, role, row, idx)
        if huge_page_disallowed:
            pa.meta[child, SP_FLAGS] |= SPF_NX_DISALLOWED
        if is_shadow_present_pte(old) and split_on_fault:
            tdp_mmu_split_huge_page(pa, vt, vm, fmt, row, idx, level, child, nx_huge_pages)
        else:
            if is_shadow_present_pte(old):   # before v6.2: tdp_mmu_zap_spte_atomic
                tdp_set_spte(pa, vt, vm, row, idx, level, SHADOW_NONPRESENT_VALUE)
                kvm_flush_remote_tlbs(vt, vm)   # kvm_flush_remote_tlbs_gfn
            tdp_mmu_link_sp(pa, vt, vm, fmt, row, idx, level, child)
        if huge_page_disallowed and req_level >= level:
            account_nx_huge_page(pa, vt, vm, child, True)
        row = child
        level -= 1

    # tdp_mmu_map_handle_target_level
    shift = (level - 1) * 9
    idx = (gfn >> shift) & 511
    old = pa.spt[row, idx]
    iter_gfn = (gfn >> shift) << shift
    if rec < 0:
        new = make_mmio_spte(fmt, gfn, ACC_ALL, vt.rec[vm, VM_MEMSLOTS_GEN])
    else:
        pfn = (pfn4k >> shift) << shift
        new = make_leaf_spte(fmt, level, ACC_ALL, pfn, map_writable, vt.rec[vm, VM_AD_DISABLED], nx_huge_pages)
        if ad_wrprot and not vt.rec[vm, VM_AD_DISABLED]:
            new |= SPTE_TDP_AD_WRPROT_ONLY   # kvm_mmu_page_ad_need_write_protect: an L2's root under PML
        if wrprot:   # make_spte: mmu_try_to_unsync_pages refused (the caller asked it: kernels/fault.py)
            new &= ~(PT_WRITABLE_MASK | shadow_mmu_writable_mask(fmt) | shadow_dirty_mask(fmt))
        if (new & PT_WRITABLE_MASK) and slot_dirty_logging(st, rec):
            mark_page_dirty(st, ct, vcpu_g, rec, iter_gfn)  # make_spte: writable SPTE in a logged slot
    ret = RET_PF_FIXED
    if new == old:
        ret = RET_PF_SPURIOUS
    else:
        tdp_set_spte(pa, vt, vm, row, idx, level, new)
        if is_shadow_present_pte(old) and not is_last_spte(old, level):
            kvm_flush_remote_tlbs(vt, vm)  # kvm_flush_remote_tlbs_gfn
    if wrprot and write:
        ret = RET_PF_EMULATE   # a write to a write-protected gfn is emulated (RET_PF_WRITE_PROTECTED since v6.12)
    if is_mmio_spte(fmt, new, mmio_caching):
        vt.stats[vm, ST_PF_MMIO_SPTE_CREATED] += 1
        ret = RET_PF_EMULATE
    return ret


@kernel
def tdp_mmu_zap_all(pa, vt, vm):
    """kvm_mmu_zap_all_fast for the TDP MMU: invalidate the roots and zap them (no flush).

    The vCPUs load a fresh root at their next entry.
    """
    for k in range(NR_TDP_ROOTS):
        root = vt.rec[vm, tdp_root_field(k)]
        if root >= 0:
            handle_removed_pt(pa, vt, vm, root, np.int64(vt.rec[vm, VM_LEVELS]))
            vt.rec[vm, tdp_root_field(k)] = -1


@kernel
def tdp_mmu_spte_dump(pa, vt, cfg, vm, root, out):
    """Every present leaf and MMIO SPTE below ``root`` (the VM's TDP root, or a legacy-TDP vCPU's direct root),
    in gfn order: out[k] = (gfn, level, spte) for the first ``out.shape[0]``.  Returns how many there are (a
    caller sizes ``out`` from a first call)."""
    fmt = vt.rec[vm, VM_FMT]
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    mmio_caching = cfg[CFG_MMIO_CACHING] != 0
    spt, meta = pa.spt, pa.meta
    n = 0
    end = np.int64(1) << (root_level * 9)
    row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, 0, PG_LEVEL_4K)
    while valid:
        idx = spte_index(gfn, level)
        run = tdp_iter_run(gfn, level, end)
        for k in range(idx, idx + run):
            spte = spt[row, k]
            if is_shadow_present_pte(spte):
                hit = is_last_spte(spte, level)
            else:
                hit = is_mmio_spte(fmt, spte, mmio_caching)
            if hit:
                if n < out.shape[0]:
                    out[n, 0] = gfn + (k - idx)
                    out[n, 1] = level
                    out[n, 2] = spte
                n += 1
        gfn += run - 1
        row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level, PG_LEVEL_4K,
                                                         end)
    return n


@njit(inline="always", _nrt=False)
def tdp_clear_spte_bits(spt, row, idx, bits):
    """tdp_mmu_clear_spte_bits: clear W or D of a leaf in place.  KVM does this without
    handle_changed_spte: the SPTE stays a leaf with the same pfn, so no bookkeeping changes."""
    spt[row, idx] &= ~bits


@njit(inline="always", _nrt=False)
def _wrprot_leaf_run(spt, row, idx, run):
    """Clear W on the present writable 4K leaves spt[row, idx:idx + run], branch-free; returns how many."""
    n = np.int64(0)
    for k in range(idx, idx + run):
        e = spt[row, k]
        hit = (e >> 11) & (e >> 1) & 1  # MMU-present and writable
        n += hit
        spt[row, k] = e & ~(hit << 1)
    return n


@kernel
def tdp_wrprot_gfn_range(pa, vt, vm, start, end, min_level):
    """wrprot_gfn_range: clear W on leaf SPTEs at >= min_level in [start, end).  Returns the count."""
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    spt, meta = pa.spt, pa.meta
    count = 0
    for r in range(NR_TDP_ROOTS):   # the VM's roots (for_each_valid_tdp_mmu_root)
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, start, min_level)
        while valid and gfn < end:
            idx = spte_index(gfn, level)
            if level == PG_LEVEL_4K:
                # a run of 4K leaves: branch-free, 64 entries a word-pass (vectorised)
                run = tdp_iter_run(gfn, level, end)
                if run == SPTE_ENT_PER_PAGE:
                    count += _wrprot_leaf_run(spt, row, 0, SPTE_ENT_PER_PAGE)  # a constant trip count vectorises
                else:
                    count += _wrprot_leaf_run(spt, row, idx, run)
                gfn += run - 1
            else:
                spte = spt[row, idx]
                if is_shadow_present_pte(spte) and is_last_spte(spte, level) and (spte & PT_WRITABLE_MASK):
                    tdp_clear_spte_bits(spt, row, idx, PT_WRITABLE_MASK)
                    count += 1
            row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level, min_level,
                                                             end)
    vt.stats[vm, ST_PAGES_WRITE_PROTECTED] += count
    return count


@njit(inline="always", _nrt=False)
def make_huge_spte(fmt, small_spte, level, nx_huge_pages):
    # make_huge_spte (spte.c): set PS, align the PFN, keep every other bit
    huge = small_spte | PT_PAGE_SIZE_MASK
    huge &= ~(np.int64((1 << (12 + 9 * (level - 1))) - 1) & ~np.int64(0xFFF))
    if nx_huge_pages:
        huge = modify_spte_protections(fmt, huge, shadow_nx_mask(fmt), shadow_x_mask(fmt))  # nonexecutable
    return huge


@njit(inline="always", _nrt=False)
def tdp_mmu_make_huge_spte(pa, fmt, row, level, gfn, nx_huge_pages):
    """tdp_mmu_make_huge_spte: the huge SPTE at ``level`` (whose table is ``row``, one level down) made
    from the first present leaf below it.  Returns (spte, found)."""
    spt, meta = pa.spt, pa.meta
    # tdp_root_for_each_leaf_pte over the child table
    end = gfn + pages_per_hpage(level)
    r, lv, g, nlg, valid = tdp_iter_start_leaf(spt, row, level - 1, gfn, PG_LEVEL_4K)
    while valid and g < end:
        spte = spt[r, spte_index(g, lv)]
        if is_shadow_present_pte(spte) and is_last_spte(spte, lv):
            return make_huge_spte(fmt, spte, level, nx_huge_pages), True
        r, lv, g, nlg, valid = tdp_iter_next_leaf(spt, meta, r, lv, g, nlg, level - 1, PG_LEVEL_4K, end)
    return np.int64(0), False


@kernel
def tdp_recover_huge_pages(pa, vt, st, cfg, vm, rec):
    """kvm_tdp_mmu_recover_huge_pages (v6.13+): after dirty logging is disabled, replace tables
    by huge SPTEs wherever the slot allows a huge mapping.  Returns True if it changed any (flush)."""
    fmt = vt.rec[vm, VM_FMT]
    nx = cfg[CFG_NX_HUGE_PAGES] != 0
    max_level = min(KVM_MAX_HUGEPAGE_LEVEL, cfg[CFG_TDP_MAX_LEVEL])
    start = st.rec[rec, SL_BASE_GFN]
    end = start + st.rec[rec, SL_NPAGES]
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    spt, meta = pa.spt, pa.meta
    flush = False
    # recover_huge_pages_range: for_each_tdp_pte_min_level(PG_LEVEL_2M)
    for r in range(NR_TDP_ROOTS):   # the VM's roots (for_each_valid_tdp_mmu_root)
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        row, level, gfn, nlg, valid = tdp_iter_start(root, root_level, start)
        while valid and gfn < end:
            idx = spte_index(gfn, level)
            spte = spt[row, idx]
            if level <= KVM_MAX_HUGEPAGE_LEVEL and is_shadow_present_pte(spte) and not is_last_spte(spte, level) \
                    and start <= gfn < end \
                    and invalidation_clamp_level(vt, vm, gfn,
                                                 kvm_mmu_max_mapping_level(st, rec, gfn, max_level)) >= level:
                huge, found = tdp_mmu_make_huge_spte(pa, fmt, spte_to_child_row(spte), level, gfn, nx)
                if found:
                    tdp_set_spte(pa, vt, vm, row, idx, level, huge)
                    flush = True
            row, level, gfn, nlg, valid = tdp_iter_next(spt, meta, row, level, gfn, nlg, root_level, PG_LEVEL_2M)
    return flush
