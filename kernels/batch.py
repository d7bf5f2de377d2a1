"""The shadow MMU's event loop: native accesses with their exits and faults, emulated accesses, INVLPG,
MOV CR3 and guest TLB flushes, in order, with the stop/resume protocol of every batch (STOP_*)."""

import numpy as np
from numba import njit

from .emulate import emulated_access
from .gmem import gm_room, gm_write_bytes
from .guest_walk import (
    MODE_PG,
    MODE_PSE36_KVM,
    PFERR_PRESENT,
    cpu_mode,
)
from .hw import shadow_hw_walk
from .jit import kernel
from .memslot import (
    dirty_ring_soft_full,
    slot_map,
)
from .mmu import entry_work_needed, free_roots, kvm_set_cr3, nonpaging_page_fault, sync_roots, vcpu_reenter
from .mmu_internal import (
    EV_ADDR,
    EV_KIND,
    EV_OP,
    EV_SIZE,
    EV_VALUE,
    EV_VCPU,
    EV_VM,
    HW_FAULT,
    MAX_EXITS,
    OP_ACCESS,
    OP_EMULATED,
    OP_INVLPG,
    OP_MOV_CR3,
    RES_ERROR,
    RES_OUTCOME,
    RET_PF_GUEST,
    RET_PF_MMIO,
    RET_PF_OOM,
    RET_PF_RETRY,
    SC_RUNNING_VCPU,
    scratch,
)
from .paging_tmpl import invalidate_addr, shadow_page_fault
from .state import (
    CFG_PML,
    CTL_FREE_TOP,
    DM_RING,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    KVM_MMU_NUM_PREV_ROOTS,
    MAX_GM_PER_EVENT,
    MAX_PL_PER_EVENT,
    MAX_RN_PER_EVENT,
    MAX_ROWS_PER_EVENT,
    OUT_EMULATED,
    OUT_GUEST_FAULT,
    OUT_HIT,
    OUT_MMIO,
    OUT_RETRY,
    OUT_RING_FULL,
    PML_ENTITY_NUM,
    SH_PL_AVAIL,
    SH_RN_AVAIL,
    SP_UNSYNC,
    SP_UNSYNC_CHILDREN,
    ST_ACCESSES,
    ST_DIRTY_RING_FULL,
    ST_INVLPG,
    ST_PF_GUEST,
    ST_PF_RETRY,
    ST_PF_TAKEN,
    ST_TLB_FLUSH,
    ST_WALK_REFS,
    STOP_DONE,
    STOP_HOST_OOM,
    STOP_NEED_PAGES,
    VM_DIRTY_MODE,
    VM_MAXPHYADDR,
    VM_VCPU_OFF,
    VR_CR0,
    VR_CR4,
    VR_EFER,
    VR_PREV_ROOT,
    VR_RFLAGS,
)
from .tdp import account_pf_result


@njit(inline="always", _nrt=False)  # one call site (shadow_event_batch): no bundle pushed for it
def shadow_access(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr):
    """One native guest access (a store of ``value`` when nbytes > 0): (outcome, error code)."""
    stats = m.vt.stats
    stats[vm, ST_ACCESSES] += 1
    outcome = OUT_HIT
    err = np.int64(0)
    for attempt in range(MAX_EXITS):
        if attempt > 0 and entry_work_needed(m, vm, vg):
            vcpu_reenter(m, vm, vg, mode, maxphyaddr)  # vcpu_enter_guest before the access runs again
        e, gpa, refs, row, idx = shadow_hw_walk(m, vm, vg, gva, pfec, mode)
        stats[vm, ST_WALK_REFS] += refs
        if e == 0:
            if nbytes > 0:
                gm_write_bytes(m.gm, slot_map(m.vt, m.st), vm, gpa, value, nbytes)
            return outcome, err
        e &= ~HW_FAULT
        err = e
        stats[vm, ST_PF_TAKEN] += 1
        if mode & MODE_PG:
            r, gerr = shadow_page_fault(m, vm, vg, gva, e, mode, maxphyaddr)
        else:
            r, gerr = nonpaging_page_fault(m, vm, vg, gva, e), np.int64(0)
        if r == RET_PF_OOM:
            stats[vm, ST_PF_TAKEN] -= 1
            stats[vm, ST_WALK_REFS] -= refs
            if attempt == 0:
                stats[vm, ST_ACCESSES] -= 1
                return -1, err
            return OUT_RETRY, err
        if r == RET_PF_GUEST:
            # kvm_inject_emulated_page_fault: a protection fault first drops a stale SPTE (current root)
            if gerr & PFERR_PRESENT:
                invalidate_addr(m, vm, vg, gva, mode, maxphyaddr, np.bool_(False))
            stats[vm, ST_PF_GUEST] += 1
            return OUT_GUEST_FAULT, gerr
        if r == RET_PF_RETRY:
            stats[vm, ST_PF_RETRY] += 1
            return OUT_RETRY, err
        outcome = account_pf_result(stats, vm, r)
        if outcome == OUT_EMULATED:
            o, ge = emulated_access(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr)
            if r == RET_PF_MMIO:
                return OUT_MMIO, err
            return o if o == OUT_GUEST_FAULT else OUT_EMULATED, err
    return outcome, err


@kernel
def shadow_event_batch(m, ev, start, res):
    """Run events ev[start:] (EV_* records) of shadow-MMU VMs in order, results in ``res`` (RES_* records).
    Returns (next_event, STOP_*)."""
    n = ev.shape[0]
    sh = m.sh
    sc = scratch(sh)
    ring_rsvd = KVM_DIRTY_RING_RSVD_ENTRIES + (PML_ENTITY_NUM if m.host[CFG_PML] else 0)
    for i in range(start, n):
        sc[SC_RUNNING_VCPU] = -1
        if m.pa.ctl[CTL_FREE_TOP] < MAX_ROWS_PER_EVENT or sh.ctl[SH_PL_AVAIL] < MAX_PL_PER_EVENT or \
                sh.ctl[SH_RN_AVAIL] < MAX_RN_PER_EVENT or \
                not gm_room(m.gm, MAX_GM_PER_EVENT):
            return i, STOP_NEED_PAGES
        vm = ev[i, EV_VM]
        vg = m.vt.rec[vm, VM_VCPU_OFF] + ev[i, EV_VCPU]
        res[i, RES_ERROR] = 0
        if (m.vt.rec[vm, VM_DIRTY_MODE] & DM_RING) and dirty_ring_soft_full(m.ct, vg, ring_rsvd):
            # KVM_EXIT_DIRTY_RING_FULL: the vCPU does not run until the rings are reset
            m.vt.stats[vm, ST_DIRTY_RING_FULL] += 1
            res[i, RES_OUTCOME] = OUT_RING_FULL
            continue
        sc[SC_RUNNING_VCPU] = vg
        op = ev[i, EV_OP]
        addr = ev[i, EV_ADDR]
        kind = ev[i, EV_KIND]
        mp = m.vt.rec[vm, VM_MAXPHYADDR]
        regs = m.vr.rec[vg]
        mode = cpu_mode(regs[VR_CR0], regs[VR_CR4], regs[VR_EFER], regs[VR_RFLAGS]) | MODE_PSE36_KVM
        if entry_work_needed(m, vm, vg):
            vcpu_reenter(m, vm, vg, mode, mp)
        if op == OP_ACCESS:
            if ev[i, EV_SIZE] == 0:
                # the common case, a translation the shadow tables already hold: no call
                e, gpa, refs, row, idx = shadow_hw_walk(m, vm, vg, addr, kind, mode)
                if e == 0:
                    m.vt.stats[vm, ST_ACCESSES] += 1
                    m.vt.stats[vm, ST_WALK_REFS] += refs
                    res[i, RES_OUTCOME] = OUT_HIT
                    continue
            o, e = shadow_access(m, vm, vg, addr, kind, ev[i, EV_VALUE], ev[i, EV_SIZE], mode, mp)
            if o < 0:
                sc[SC_RUNNING_VCPU] = -1
                return i, STOP_HOST_OOM
            res[i, RES_OUTCOME] = o
            res[i, RES_ERROR] = e
        elif op == OP_EMULATED:
            o, e = emulated_access(m, vm, vg, addr, kind, ev[i, EV_VALUE], ev[i, EV_SIZE], mode, mp)
            res[i, RES_OUTCOME] = o
            res[i, RES_ERROR] = e
        elif op == OP_INVLPG:
            invalidate_addr(m, vm, vg, addr, mode, mp, np.bool_(True))  # kvm_mmu_invlpg: every root
            m.vt.stats[vm, ST_INVLPG] += 1
            res[i, RES_OUTCOME] = OUT_EMULATED
        elif op == OP_MOV_CR3:
            kvm_set_cr3(m, vm, vg, addr, mp)
            res[i, RES_OUTCOME] = OUT_EMULATED
        else:
            # kvm_vcpu_flush_tlb_guest: sync the current root, free unsync prev roots
            m.vt.stats[vm, ST_TLB_FLUSH] += 1
            sync_roots(m, vm, vg, mode, mp)
            mask = np.int64(0)
            for k in range(KVM_MMU_NUM_PREV_ROOTS):
                r = m.vr.rec[vg, VR_PREV_ROOT + k]
                if r >= 0 and (m.pa.meta[r, SP_UNSYNC] or m.pa.meta[r, SP_UNSYNC_CHILDREN]):
                    mask |= 2 << k
            if mask:
                free_roots(m, vm, vg, mask)
            res[i, RES_OUTCOME] = OUT_EMULATED
        if entry_work_needed(m, vm, vg):
            vcpu_reenter(m, vm, vg, mode, mp)  # the guest resumes: requests raised by the exit are serviced
    sc[SC_RUNNING_VCPU] = -1
    return n, STOP_DONE
