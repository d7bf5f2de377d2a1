"""Dirty tracking: marking pages dirty (bitmap or ring), PML, write-protection and clearing of
dirty state, eager huge-page splitting, GET/CLEAR_DIRTY_LOG and dirty-ring reset.

Models ``virt/kvm/kvm_main.c`` (mark_page_dirty_in_slot, kvm_get_dirty_log_protect,
kvm_clear_dirty_log_protect), ``virt/kvm/dirty_ring.c``, ``arch/x86/kvm/mmu/mmu.c``
(kvm_arch_mmu_enable_log_dirty_pt_masked) and ``tdp_mmu.c`` (clear_dirty_pt_masked,
clear_dirty_gfn_range, write_protect_gfn, tdp_mmu_split_huge_pages_root).
"""

import numpy as np
from numba import njit

from .jit import helper, kernel
from .memslot import gfn_to_memslot, mark_page_dirty
from .spte import (
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    is_last_spte,
    is_shadow_present_pte,
    shadow_dirty_mask,
    shadow_mmu_writable_mask,
    spte_ad_need_write_protect,
    spte_index,
)
from .state import (
    CFG_EAGER_SPLIT,
    CFG_NX_HUGE_PAGES,
    CFG_PML,
    CTL_FREE_TOP,
    DM_INITIALLY_SET,
    DM_MANUAL_PROTECT,
    KVM_DIRTY_GFN_F_RESET,
    PML_ENTITY_NUM,
    RG_FLAGS,
    RG_OFFSET,
    RG_SLOT,
    SL_BASE_GFN,
    SL_DIRTY_OFF,
    SL_NPAGES,
    SP_ROLE,
    ST_PAGES_SPLIT,
    ST_PAGES_WRITE_PROTECTED,
    ST_PML_FLUSHES,
    ST_PML_FULL_EXITS,
    VC_PML_COUNT,
    VC_RING_DIRTY,
    VC_RING_OFF,
    VC_RING_RESET,
    VC_RING_SIZE,
    VM_DIRTY_MODE,
    VM_FMT,
    VM_LEVELS,
    VM_VCPU_OFF,
)
from .tdp import (
    NR_TDP_ROOTS,
    tdp_clear_spte_bits,
    tdp_mmu_alloc_sp,
    tdp_mmu_split_huge_page,
    tdp_root_field,
    tdp_set_spte,
)
from .tdp_iter import tdp_iter_next_leaf, tdp_iter_run, tdp_iter_start_leaf, walk_to_leaf


# ----------------------------------------------------------------------------- PML
@helper
def pml_flush(vt, st, ct, vm, vcpu_g):
    """vmx_flush_pml_buffer: every logged gpa becomes a dirty page of its slot."""
    n = ct.rec[vcpu_g, VC_PML_COUNT]
    if n == 0:
        return
    for k in range(n):
        gfn = ct.pml_buf[vcpu_g, k]
        rec = gfn_to_memslot(vt, st, vm, gfn)
        if rec >= 0:
            mark_page_dirty(st, ct, vcpu_g, rec, gfn)
    ct.rec[vcpu_g, VC_PML_COUNT] = 0
    vt.stats[vm, ST_PML_FLUSHES] += 1


@njit(inline="always", _nrt=False)
def pml_log(vt, st, ct, vm, vcpu_g, gfn):
    """The CPU logs a gpa whose EPT dirty flag it set; a full buffer exits first (PML full)."""
    if ct.rec[vcpu_g, VC_PML_COUNT] == PML_ENTITY_NUM:
        vt.stats[vm, ST_PML_FULL_EXITS] += 1
        pml_flush(vt, st, ct, vm, vcpu_g)
    ct.pml_buf[vcpu_g, ct.rec[vcpu_g, VC_PML_COUNT]] = gfn
    ct.rec[vcpu_g, VC_PML_COUNT] += 1


@kernel
def pml_flush_vm(vt, st, ct, vm, nvcpus):
    """kvm_arch_sync_dirty_log: kick every vCPU so its PML buffer reaches the log."""
    for c in range(nvcpus):
        pml_flush(vt, st, ct, vm, vt.rec[vm, VM_VCPU_OFF] + c)


# ----------------------------------------------------------------------------- SPTE walks
@kernel
def count_huge_leaves(pa, vt, vm, start, end):
    """Rows an eager split of [start, end) may need: 1 per 2M leaf, 513 per 1G leaf."""
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    spt, meta = pa.spt, pa.meta
    rows = 0
    for r in range(NR_TDP_ROOTS):
        # a 4K leaf table holds nothing to split: the walk stays at 2M and above
        row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, vt.rec[vm, tdp_root_field(r)], root_level, start,
                                                          PG_LEVEL_2M)
        while valid and gfn < end:
            spte = spt[row, spte_index(gfn, level)]
            if level > PG_LEVEL_4K and is_shadow_present_pte(spte) and is_last_spte(spte, level):
                rows += 1 if level == PG_LEVEL_2M else 513
            row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level,
                                                             PG_LEVEL_2M, end)
    return rows


@kernel
def tdp_try_split_huge_pages(pa, vt, cfg, vm, start, end, target_level):
    """tdp_mmu_split_huge_pages_root: split every huge leaf in [start, end) down to target_level,
    pre-order (1G -> 2M -> 4K: the iterator steps down into each new table).  The caller has topped
    up the free rows (count_huge_leaves)."""
    fmt = vt.rec[vm, VM_FMT]
    nx = cfg[CFG_NX_HUGE_PAGES] != 0
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    spt, meta = pa.spt, pa.meta
    for r in range(NR_TDP_ROOTS):   # the VM's roots (for_each_valid_tdp_mmu_root)
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, start, target_level + 1)
        while valid and gfn < end:
            idx = spte_index(gfn, level)
            spte = spt[row, idx]
            if is_shadow_present_pte(spte) and is_last_spte(spte, level):  # is_large_pte: level > target_level
                child = tdp_mmu_alloc_sp(pa, vt, vm, level - 1, gfn, meta[row, SP_ROLE], row, idx)
                tdp_mmu_split_huge_page(pa, vt, vm, fmt, row, idx, level, child, nx)
                vt.stats[vm, ST_PAGES_SPLIT] += 1
            row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level,
                                                             target_level + 1, end)


@helper
def tdp_write_protect_gfn(pa, vt, vm, gfn, min_level):
    """write_protect_gfn: clear W and MMU-writable on the leaf >= min_level mapping gfn, in every root."""
    done = False
    for r in range(NR_TDP_ROOTS):
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        row, idx, level, spte = walk_to_leaf(pa.spt, root, np.int64(vt.rec[vm, VM_LEVELS]), gfn)
        if not is_shadow_present_pte(spte) or level < min_level:
            continue
        new = spte & ~(PT_WRITABLE_MASK | shadow_mmu_writable_mask(vt.rec[vm, VM_FMT]))
        if new == spte:
            continue
        tdp_set_spte(pa, vt, vm, row, idx, level, new)
        vt.stats[vm, ST_PAGES_WRITE_PROTECTED] += 1
        done = True
    return done


@helper
def tdp_clear_dirty_pt_masked(pa, vt, vm, gfn, mask, wrprot):
    """clear_dirty_pt_masked: for each 4K leaf in the mask clear W (write-protection) or, with PML,
    the dirty bit (W for SPTEs without A/D)."""
    if mask == 0:
        return
    fmt = vt.rec[vm, VM_FMT]
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    spt, meta = pa.spt, pa.meta
    dmask = shadow_dirty_mask(fmt)
    first = 0
    while not (mask >> first) & 1:
        first += 1  # __ffs(mask)
    end = gfn + 64
    count = 0
    # tdp_root_for_each_leaf_pte(gfn + __ffs(mask), gfn + BITS_PER_LONG); huge leaves are left alone
    todo = mask
    for r in range(NR_TDP_ROOTS):   # the VM's roots (for_each_valid_tdp_mmu_root)
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        mask = todo
        row, level, g, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, gfn + first, PG_LEVEL_4K)
        while valid and g < end and mask != 0:
            if level == PG_LEVEL_4K:
                idx = spte_index(g, level)
                b0 = g - gfn
                run = tdp_iter_run(g, level, end)
                for k in range(run):
                    if (mask >> (b0 + k)) & 1:
                        spte = spt[row, idx + k]
                        if is_shadow_present_pte(spte):
                            dbit = PT_WRITABLE_MASK if (wrprot or spte_ad_need_write_protect(spte)) else dmask
                            if spte & dbit:
                                tdp_clear_spte_bits(spt, row, idx + k, dbit)
                                count += 1
                # the bits of this run are done
                mask = np.int64(0) if b0 + run >= 64 else mask & ~((np.int64(1) << (b0 + run)) - 1)
                g += run - 1
            row, level, g, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, g, nlg, root_level, PG_LEVEL_4K, end)
    vt.stats[vm, ST_PAGES_WRITE_PROTECTED] += count


@kernel
def tdp_clear_dirty_gfn_range(pa, vt, vm, start, end):
    """clear_dirty_gfn_range (PML enable, kvm_mmu_slot_leaf_clear_dirty): D (W without A/D) off on every leaf."""
    fmt = vt.rec[vm, VM_FMT]
    root_level = np.int64(vt.rec[vm, VM_LEVELS])
    spt, meta = pa.spt, pa.meta
    dmask = shadow_dirty_mask(fmt)
    count = 0
    # tdp_root_for_each_leaf_pte: leaves at every level (huge ones too)
    for r in range(NR_TDP_ROOTS):   # the VM's roots (for_each_valid_tdp_mmu_root)
        root = vt.rec[vm, tdp_root_field(r)]
        if root < 0:
            continue
        row, level, gfn, nlg, valid = tdp_iter_start_leaf(spt, root, root_level, start, PG_LEVEL_4K)
        while valid and gfn < end:
            idx = spte_index(gfn, level)
            run = tdp_iter_run(gfn, level, end)
            for k in range(idx, idx + run):
                spte = spt[row, k]
                if is_shadow_present_pte(spte) and is_last_spte(spte, level):
                    dbit = PT_WRITABLE_MASK if spte_ad_need_write_protect(spte) else dmask
                    if spte & dbit:
                        tdp_clear_spte_bits(spt, row, k, dbit)
                        count += 1
            gfn += run - 1
            row, level, gfn, nlg, valid = tdp_iter_next_leaf(spt, meta, row, level, gfn, nlg, root_level, PG_LEVEL_4K,
                                                             end)
    vt.stats[vm, ST_PAGES_WRITE_PROTECTED] += count


@helper
def enable_log_dirty_pt_masked(pa, vt, st, cfg, vm, rec, gfn_offset, mask):
    """kvm_arch_mmu_enable_log_dirty_pt_masked: re-arm dirty tracking for 64 pages at gfn_offset."""
    base = st.rec[rec, SL_BASE_GFN] + gfn_offset
    if (vt.rec[vm, VM_DIRTY_MODE] & (DM_MANUAL_PROTECT | DM_INITIALLY_SET)) == DM_MANUAL_PROTECT | DM_INITIALLY_SET:
        lo = 0
        while not (mask >> lo) & 1:
            lo += 1
        hi = 63
        while not (mask >> hi) & 1:
            hi -= 1
        start = base + lo
        end = base + hi
        if cfg[CFG_EAGER_SPLIT]:
            tdp_try_split_huge_pages(pa, vt, cfg, vm, start, end + 1, 1)
        tdp_write_protect_gfn(pa, vt, vm, start, 2)
        if (start + 511) >> 9 != (end + 511) >> 9:  # "Cross two large pages?": ALIGN(start) != ALIGN(end)
            tdp_write_protect_gfn(pa, vt, vm, end, 2)
    tdp_clear_dirty_pt_masked(pa, vt, vm, base, mask, cfg[CFG_PML] == 0)


# ----------------------------------------------------------------------------- the ioctls
@kernel
def get_dirty_log_protect(pa, vt, st, cfg, vm, rec, out):
    """kvm_get_dirty_log_protect without manual protect: snapshot-and-clear each word, re-protect
    the pages it names.  ``out`` receives the snapshot; returns True if any bit was set (flush)."""
    off = st.rec[rec, SL_DIRTY_OFF]
    words = (st.rec[rec, SL_NPAGES] + 63) >> 6
    flush = False
    for w in range(words):
        m = st.dirty[off + w]
        out[w] = m
        if m == 0:
            continue
        flush = True
        st.dirty[off + w] = 0
        enable_log_dirty_pt_masked(pa, vt, st, cfg, vm, rec, w * 64, m)
    return flush


@kernel
def clear_dirty_log_protect(pa, vt, st, cfg, vm, rec, first_page, num_pages, bitmap):
    """kvm_clear_dirty_log_protect after validation: clear the bits that were really set and
    re-protect their pages.  Returns the number of pages cleared."""
    off = st.rec[rec, SL_DIRTY_OFF]
    cleared = 0
    nwords = (num_pages + 63) >> 6
    npages = st.rec[rec, SL_NPAGES]
    for k in range(nwords):
        i = (first_page >> 6) + k
        mask = bitmap[k]
        if mask == 0:
            continue
        # bits beyond the slot are never set in the live bitmap, so & keeps them out
        live = st.dirty[off + i]
        mask &= live
        if i * 64 + 64 > npages:
            mask &= (np.int64(1) << (npages - i * 64)) - 1
        if mask == 0:
            continue
        st.dirty[off + i] = live & ~mask
        for b in range(64):
            cleared += (mask >> b) & 1
        enable_log_dirty_pt_masked(pa, vt, st, cfg, vm, rec, i * 64, mask)
    return cleared


@kernel
def dirty_ring_reset(ct, vcpu_g, masks):
    """kvm_dirty_ring_reset: recycle harvested entries and coalesce them into 64-page masks, one row
    of ``masks`` (slot id, first offset, mask) each, for the caller's MMU to re-protect
    (kvm_reset_dirty_gfn).  Returns (entries reset, rows used)."""
    size = ct.rec[vcpu_g, VC_RING_SIZE]
    if size == 0:
        return 0, 0
    count = 0
    nm = 0
    mask = np.int64(0)
    cur_slot = -1
    cur_off = np.int64(0)
    while ct.rec[vcpu_g, VC_RING_RESET] < ct.rec[vcpu_g, VC_RING_DIRTY]:
        idx = ct.rec[vcpu_g, VC_RING_OFF] + (ct.rec[vcpu_g, VC_RING_RESET] & (size - 1))
        if not ct.ring[idx, RG_FLAGS] & KVM_DIRTY_GFN_F_RESET:
            break
        nslot = ct.ring[idx, RG_SLOT]
        noff = ct.ring[idx, RG_OFFSET]
        ct.ring[idx, RG_FLAGS] = 0
        ct.rec[vcpu_g, VC_RING_RESET] += 1
        count += 1
        if mask != 0:
            if nslot == cur_slot:
                delta = noff - cur_off
                if 0 <= delta < 64:
                    mask |= np.int64(1) << delta
                    continue
                if -64 < delta < 0:
                    shifted = mask << (-delta)
                    if (shifted >> (-delta)) & ~(np.int64(-1) << np.int64(64 + delta)) == mask:
                        cur_off = noff
                        mask = shifted | 1
                        continue
            masks[nm, 0], masks[nm, 1], masks[nm, 2] = cur_slot, cur_off, mask
            nm += 1
        cur_slot = nslot
        cur_off = noff
        mask = np.int64(1)
    if mask != 0:
        masks[nm, 0], masks[nm, 1], masks[nm, 2] = cur_slot, cur_off, mask
        nm += 1
    return count, nm


@njit(inline="always", _nrt=False)
def ring_mask_target(st, masks, k, slot_recs):
    """kvm_reset_dirty_gfn's checks on mask row k: (record, offset, mask); record -1 when the slot is
    gone or the offset out of range.  ``slot_recs[(as_id << 15) | id]`` maps a slot id to its record."""
    slot, offset, mask = masks[k, 0], masks[k, 1], masks[k, 2]
    key = ((slot >> 16) << 15) | (slot & 0x7FFF)
    if key >= slot_recs.shape[0]:
        return -1, offset, mask
    rec = slot_recs[key]
    if rec < 0 or offset >= st.rec[rec, SL_NPAGES]:
        return -1, offset, mask
    if offset + 64 > st.rec[rec, SL_NPAGES]:
        mask &= (np.int64(1) << (st.rec[rec, SL_NPAGES] - offset)) - 1
    if mask == 0:
        return -1, offset, mask
    return rec, offset, mask


@kernel
def tdp_ring_reset_masks(pa, vt, st, cfg, vm, masks, n, slot_recs):
    """kvm_reset_dirty_gfn for the coalesced masks of a dirty-ring reset (TDP MMU)."""
    for k in range(n):
        rec, offset, mask = ring_mask_target(st, masks, k, slot_recs)
        if rec >= 0:
            enable_log_dirty_pt_masked(pa, vt, st, cfg, vm, rec, offset, mask)


def free_rows(pa):
    return int(pa.ctl[CTL_FREE_TOP])
