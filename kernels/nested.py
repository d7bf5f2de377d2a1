"""``vmx/nested.c`` and ``svm/nested.c``'s MMU side: an L2 guest under nested EPT or nested NPT.

L0 shadows L1's EPT12 / NPT12 in ``guest_mmu``: indirect shadow pages keyed by the L1 gfn of each table page,
roles with ``guest_mode``, built by the shadow MMU's fetch over a walk of L1's tables (``paging_ept.ept_walk``
for EPT; for NPT the x86 walker in L1's paging mode, a user access).  The processor runs L2 on those shadow
tables (EPT02 / NPT02): a 2D walk of L2's own page tables, each table gpa and the data gpa translated through
them (``access_l2``, the nested twin of ``tdp2d.access_2d``).  A miss exits to L0 (``nested_page_fault``); what
L1's tables refuse is reflected to L1 (``OUT_L1_EXIT``: an EPT violation with its exit qualification,
nested_ept_inject_page_fault, or a #NPF with exit_info_1, nested_svm_inject_npf_exit) and the modelled L1
resumes L2.

While a vCPU is in guest mode its VcpuRegs row holds L2's registers and guest_mmu's roots (state.py VR_*).
"""

import numpy as np
from numba import njit

from .emulate import emulated_tracked_write
from .fault import WALK_OK, WALK_RSVD, exit_error_code, handle_mmio_page_fault, tdp_hw_walk
from .gmem import gm_write_bytes
from .guest_walk import (
    MODE_AMD,
    MODE_NXE,
    PFERR_MASK,
    WK_AD_NEEDED,
    WK_GPA,
    WK_LEAF_LEVEL,
    WK_MAX_LEVEL,
    WK_PTE_GPA,
    X86_CR0_PG,
    cpu_mode,
    guest_set_ad,
    guest_walk,
    mode_levels,
    walk_sets_ad,
)
from .jit import helper, kernel
from .memslot import gfn_to_memslot, slot_map
from .mmu import (
    entry_work_needed,
    exit_room,
    fast_pgd_switch,
    free_roots,
    kvm_mmu_new_pgd,
    swap_mmu_roots,
    sync_roots,
    vcpu_reenter,
)
from .mmu_internal import (
    EV_ADDR,
    EV_KIND,
    EV_SIZE,
    EV_VALUE,
    EV_VM,
    MAX_RESTARTS,
    RES_FAULT_GPA,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_GUEST,
    RET_PF_MMIO,
    RET_PF_OOM,
    RET_PF_RETRY,
    SC_RUNNING_VCPU,
    scratch,
)
from .paging_ept import (
    EPT_MISCONFIG,
    EPT_PRESENT_FAULT,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    MODE_EPT,
    MODE_EPT_AD,
    MODE_NPT,
    ept_mode,
    ept_walk,
)
from .paging_tmpl import invalidate_addr, page_fault_walked, set_ad_and_log
from .spte import (
    FMT_EPT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    ROLE_DIRECT,
    ROLE_GUEST_MODE,
    get_mmio_spte_gfn,
)
from .state import (
    CFG_MMIO_CACHING,
    CFG_PML,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    KVM_MMU_NUM_PREV_ROOTS,
    OUT_EMULATED,
    OUT_FIXED,
    OUT_GUEST_FAULT,
    OUT_HIT,
    OUT_L1_EXIT,
    OUT_MMIO,
    OUT_RETRY,
    OUT_SPURIOUS,
    PML_ENTITY_NUM,
    SP_ROLE,
    ST_NESTED_RUN,
    ST_PF_RETRY,
    ST_PF_TAKEN,
    ST_TLB_FLUSH,
    STOP_DONE,
    STOP_NEED_PAGES,
    VM_AD_DISABLED,
    VM_FMT,
    VM_LEVELS,
    VM_MAXPHYADDR,
    VR_CR0,
    VR_CR3,
    VR_CR4,
    VR_EFER,
    VR_EPTP,
    VR_L1_CR0,
    VR_L1_PDPTR,
    VR_PDPTR,
    VR_PKRU,
    VR_PREV_PGD,
    VR_PREV_ROOT,
    VR_RFLAGS,
    VR_ROOT,
    VR_ROOT_PGD,
    SlotMap,
)
from .tdp import account_pf_result, tdp_mmu_root_role
from .tdp2d import event_end, event_start

EPTP_PA_MASK = np.int64(((1 << 52) - 1) & ~4095)
PFERR_GUEST_FINAL = np.int64(1 << 32)   # PFERR_GUEST_FINAL_MASK: the #NPF was on the final translation
PFERR_GUEST_PAGE = np.int64(1 << 33)    # PFERR_GUEST_PAGE_MASK: on a guest paging-structure access


@njit(inline="always", _nrt=False)
def nested_mmu_mode(vt, vr, vm, vg):
    """The mode word of guest_mmu: for VMX the vmcs12 EPTP's (execute-only translations are offered to L1); for
    SVM L1's paging mode from vmcb01, CR0 = PG alone (kvm_init_shadow_npt_mmu), MODE_NPT and MODE_AMD set."""
    if vt.rec[vm, VM_FMT] == FMT_EPT:
        return ept_mode(vr.rec[vg, VR_EPTP], True)
    return cpu_mode(X86_CR0_PG, vr.rec[vg, VR_L1_CR0 + 2], vr.rec[vg, VR_L1_CR0 + 3], np.int64(0)) | MODE_NPT | \
        MODE_AMD


@njit(inline="always", _nrt=False)
def l2_slot_map(m, vm, vg, emode):
    """What the processor reads an L2's memory through: guest_mmu's current root (EPT02 / NPT02), as deep as the
    EPTP's walk length or, for nested NPT, the host's TDP level."""
    levels = m.vt.rec[vm, VM_LEVELS] if (emode & MODE_EPT) == 0 else mode_levels(emode)
    return SlotMap(m.vt.rec, m.st.order, m.st.rec, m.pa.spt, m.vr.rec[vg, VR_ROOT], levels)


@njit(inline="always", _nrt=False)  # one call site (l2_batch): no bundle pushed for it
def nested_page_fault(m, vm, vg, gpa, err, mode, maxphyaddr):
    """FNAME(page_fault) for guest_mmu: ept_page_fault (PTTYPE_EPT: the EPT12 walk, EPT A/D) or, for nested NPT,
    paging64's over L1's NPT12 at nCR3 as a user access (NPT walks are user walks: translate_nested_gpa).  A
    refusal goes to L1: RET_PF_GUEST with the EPT violation's qualification bits 0-5 (EPT_MISCONFIG for a
    misconfiguration) or the #NPF's error code; else FNAME(fetch) builds the shadow tables.
    Returns (RET_PF_*, qualification / error code or 0)."""
    r, code = walk_nested(m, vm, vg, gpa, err, mode, maxphyaddr)
    if r != RET_PF_CONTINUE:
        return r, code
    return page_fault_walked(m, vm, vg, gpa, err, mode, maxphyaddr)


@njit(inline="always", _nrt=False)
def walk_nested(m, vm, vg, gpa, err, mode, maxphyaddr):
    """FNAME(walk_addr_generic) over L1's EPT12 (ept_walk) or NPT12 (x86 paging in L1's mode, a user access) for the
    L2 gpa ``gpa`` (the walk in the scratch): (RET_PF_CONTINUE, 0), or (RET_PF_GUEST, the EPT violation's
    qualification bits 0-5 / EPT_MISCONFIG, or the #NPF's error code) after kvm_inject_emulated_page_fault's
    invalidation of the address."""
    wk = scratch(m.sh)
    ept = (mode & MODE_EPT) != 0
    pfec = err & (PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_FETCH_MASK)
    if not ept:
        pfec |= PFERR_USER_MASK
    if ept:
        gerr = ept_walk(m.gm, m.vt, m.st, vm, mode, m.vr.rec[vg, VR_EPTP], maxphyaddr, gpa, pfec, wk)
    else:
        gerr = guest_walk(m.gm, slot_map(m.vt, m.st), vm, mode, m.vr.rec[vg, VR_EPTP],
                          m.vr.rec[vg, VR_L1_PDPTR:VR_L1_PDPTR + 4], np.int64(0), maxphyaddr, gpa, pfec, wk)
    if gerr != 0:
        code = gerr & ~(np.int64(1 << 62) | EPT_PRESENT_FAULT) if ept else gerr & PFERR_MASK
        # kvm_inject_emulated_page_fault: a present (permission), non-reserved fault first invalidates the address
        if (ept and (gerr & EPT_PRESENT_FAULT) != 0) or \
                (not ept and (code & PFERR_PRESENT_MASK) != 0 and (code & PFERR_RSVD_MASK) == 0):
            invalidate_addr(m, vm, vg, gpa, mode, maxphyaddr, False)
        return RET_PF_GUEST, code
    return RET_PF_CONTINUE, np.int64(0)


@helper
def emulate_l2_mmio(m, vm, vg, gva, l2gpa, kind, emode, maxphyaddr, mode, mmio_gfn):
    """x86_emulate_instruction for an L2 access whose L1 gfn ``mmio_gfn`` is MMIO: KVM keeps no MMIO gva for a
    nested MMU (vcpu_cache_mmio_info: mmio_gva 0), so the emulator translates the access again: L2's gpa through
    EPT12 / NPT12 with the access (translate_nested_gpa, a user access; EPT12's A/D set), and with L2 paging, L2's
    own walk, whose A/D bits it sets once the final translation is allowed.  Returns (RET_PF_MMIO, 0); or
    (RET_PF_GUEST, the code) when L1's tables refuse the access (reflected to L1); or (RET_PF_EMULATE, L1 gpa)
    when they now map it to another gfn that has a memslot (vcpu_is_mmio_gpa: not the cached gfn), an emulated
    memory access."""
    pfec = (kind & (PFERR_WRITE_MASK | PFERR_FETCH_MASK)) | PFERR_USER_MASK
    r, code = walk_nested(m, vm, vg, l2gpa, pfec, emode, maxphyaddr)
    if r != RET_PF_CONTINUE:
        return r, code
    wk = scratch(m.sh)
    set_ad_and_log(m, vm, wk, pfec, emode)
    l1gpa = wk[WK_GPA]
    out, ret = RET_PF_MMIO, np.int64(0)
    if l1gpa >> 12 != mmio_gfn and gfn_to_memslot(m.vt, m.st, vm, l1gpa >> 12) >= 0:
        out, ret = RET_PF_EMULATE, l1gpa
    if mode_levels(mode) != 0:
        wk = scratch(m.sh)
        vr = m.vr
        sm = l2_slot_map(m, vm, vg, emode)
        if guest_walk(m.gm, sm, vm, mode, vr.rec[vg, VR_CR3], vr.rec[vg, VR_PDPTR:VR_PDPTR + 4],
                      vr.rec[vg, VR_PKRU], maxphyaddr, gva, kind, wk) == 0 and wk[WK_AD_NEEDED]:
            guest_set_ad(m.gm, sm, vm, wk, kind)
    return out, ret


@njit(inline="always", _nrt=False)  # one call site (l2_batch)
def access_l2(m, vm, vg, gva, kind, value, nbytes, maxphy, wk):
    """One access of an L2 guest under nested EPT: (outcome, error code, refs, fault gpa).

    The processor's 2D walk of L2's page tables through EPT02 (guest_mmu's root); every EPT02 miss is an exit
    to L0 (pf_taken; nested_page_fault), after which the access restarts.  ``OUT_L1_EXIT``: EPT12 refused, the
    error code is the exit qualification L1 receives and the fault gpa the L2 gpa that faulted (a table page of
    L2 or the data page); the modelled L1 resumes L2 at once (nested_run).  Outcome -1: the host cannot back a
    page; -2: the arenas need a top-up first (both restart the access later).
    """
    pa, vt, st, gm, vr = m.pa, m.vt, m.st, m.gm, m.vr
    emode = nested_mmu_mode(vt, vr, vm, vg)
    fmt = vt.rec[vm, VM_FMT]
    svm = fmt != FMT_EPT
    ad_hw = svm or ((emode & MODE_EPT_AD) != 0 and vt.rec[vm, VM_AD_DISABLED] == 0)
    write = (kind & PFERR_WRITE_MASK) != 0
    fetch_ = (kind & PFERR_FETCH_MASK) != 0
    mode = cpu_mode(vr.rec[vg, VR_CR0], vr.rec[vg, VR_CR4], vr.rec[vg, VR_EFER], vr.rec[vg, VR_RFLAGS])
    if svm:
        mode |= MODE_AMD   # an SVM guest's CPU is AMD
    glevels = mode_levels(mode)
    if glevels == 2:
        mode &= ~MODE_NXE   # as tdp2d.access_2d
    outcome = OUT_HIT
    err = np.int64(0)
    refs = np.int64(0)
    for _attempt in range(MAX_RESTARTS):
        if not exit_room(m, True):
            return -2, err, refs, np.int64(-1)
        if entry_work_needed(m, vm, vg):
            vcpu_reenter(m, vm, vg, emode, maxphy)   # vcpu_enter_guest after the exit: kvm_mmu_reload
        sm = l2_slot_map(m, vm, vg, emode)   # what the processor reads
        root, tdp_levels = sm.root, sm.levels
        gerr = np.int64(0)
        top = 0
        stop = 1
        if glevels != 0:
            gerr = guest_walk(gm, sm, vm, mode, vr.rec[vg, VR_CR3], vr.rec[vg, VR_PDPTR:VR_PDPTR + 4],
                              vr.rec[vg, VR_PKRU], maxphy, gva, kind, wk)
            top = wk[WK_MAX_LEVEL]
            stop = wk[WK_LEAF_LEVEL]
        nsteps = max(top - stop + 1, 0) if glevels != 0 else 0
        restart = False
        for step in range(nsteps + 1):
            table = step < nsteps
            if table:
                level = top - step
                l2gpa = wk[WK_PTE_GPA + level]
                if l2gpa < 0:
                    continue   # PAE PDPTE: a register
                w = ad_hw or (gerr == 0 and walk_sets_ad(wk, level, stop, write))
                f = False
            else:
                if gerr != 0:
                    return OUT_GUEST_FAULT, gerr & PFERR_MASK, refs, np.int64(-1)   # L2's own #PF
                if glevels != 0:
                    l2gpa = wk[WK_GPA]
                else:
                    l2gpa = gva
                w = write
                f = fetch_
            gfn = l2gpa >> 12
            res, r, row, idx, lvl, spte = tdp_hw_walk(pa.spt, fmt, root, tdp_levels, gfn, w, f, ad_hw)
            refs += r
            if res == WALK_OK:
                if table:
                    refs += 1
                    continue
                if glevels != 0 and wk[WK_AD_NEEDED]:
                    # L2's A/D bits once the final translation is allowed (FNAME(walk_addr_generic) translates
                    # the final gfn before update_accessed_dirty_bits: an L1 exit leaves them as they were)
                    guest_set_ad(gm, sm, vm, wk, kind)
                if nbytes > 0:
                    gm_write_bytes(gm, sm, vm, l2gpa, value, nbytes)
                return outcome, err, refs, np.int64(-1)
            # EPT violation / #NPF: handle_ept_violation's error code (a paging-structure access that writes is a
            # read and a write; #NPF: always a user access), then kvm_mmu_page_fault on guest_mmu
            e = exit_error_code(fmt, res, spte, w, f)
            if svm:
                hw_qual = PFERR_GUEST_PAGE if table else PFERR_GUEST_FINAL
            else:
                hw_qual = EPT_VIOLATION_GVA_IS_VALID | (0 if table else EPT_VIOLATION_GVA_TRANSLATED)
            mmio_fast = res == WALK_RSVD and handle_mmio_page_fault(vt, vm, fmt, spte, m.host[CFG_MMIO_CACHING] != 0)
            if mmio_fast:
                # an EPT02 / NPT02 MMIO SPTE: emulated without a page fault; the emulator's own walk may refuse it
                # (VMX: the EPT violation it injects takes the GVA bits of this exit, an EPT misconfiguration's: 0)
                if not svm:
                    hw_qual = np.int64(0)
                rpf, qual = emulate_l2_mmio(m, vm, vg, gva, l2gpa, kind, emode, maxphy, mode,
                                            get_mmio_spte_gfn(spte))
            else:
                if table and w:
                    e |= PFERR_USER_MASK
                vt.stats[vm, ST_PF_TAKEN] += 1
                rpf, qual = nested_page_fault(m, vm, vg, l2gpa, e & ~PFERR_RSVD_MASK, emode, maxphy)
            if rpf == RET_PF_OOM:
                vt.stats[vm, ST_PF_TAKEN] -= 1
                return -1, err, refs, np.int64(-1)
            err = e
            if rpf == RET_PF_GUEST:
                # nested_ept_inject_page_fault: an EPT violation (or misconfiguration: qualification 0) for L1;
                # nested_svm_inject_npf_exit: a #NPF, exit_info_1 = the walker's error code | hardware's
                # GUEST_FINAL / GUEST_PAGE bit.  L1 resumes L2 at once (VMRESUME / VMRUN: nested_run)
                vt.stats[vm, ST_NESTED_RUN] += 1
                if svm:
                    # nested_svm_transition_tlb_flush at the #VMEXIT and at the VMRUN: a flush of the current
                    # context and KVM_REQ_MMU_SYNC each (guest_mmu is synced when L2 runs again)
                    vt.stats[vm, ST_TLB_FLUSH] += 2
                    sync_roots(m, vm, vg, emode, maxphy)
                    return OUT_L1_EXIT, qual | hw_qual, refs, l2gpa
                q = np.int64(0) if qual & EPT_MISCONFIG else qual | hw_qual
                return OUT_L1_EXIT, q, refs, l2gpa
            if rpf == RET_PF_RETRY:
                vt.stats[vm, ST_PF_RETRY] += 1
                return OUT_RETRY, err, refs, np.int64(-1)
            if mmio_fast:
                if rpf == RET_PF_EMULATE:   # L1's tables now map the page to memory: an emulated access
                    if w and not table:
                        emulated_tracked_write(m, vm, vg, qual, value, nbytes, mode)
                    return OUT_EMULATED, err, refs, np.int64(-1)
                return OUT_MMIO, err, refs, np.int64(-1)
            o = account_pf_result(vt.stats, vm, rpf)
            if o == OUT_FIXED or o == OUT_SPURIOUS:
                outcome = o
                restart = True
                break
            if rpf == RET_PF_MMIO or (rpf == RET_PF_EMULATE and gfn_to_memslot(vt, st, vm, wk[WK_GPA] >> 12) < 0):
                # EPT12 maps the page outside L1's memslots: the emulator's walk (it allows what the fault's did)
                emulate_l2_mmio(m, vm, vg, gva, l2gpa, kind, emode, maxphy, mode, wk[WK_GPA] >> 12)
                return OUT_MMIO, err, refs, np.int64(-1)
            if rpf == RET_PF_EMULATE and not table and w:
                # the emulator writes L1's page (a write-tracked gfn: an EPT12 table) and tracks the write
                emulated_tracked_write(m, vm, vg, wk[WK_GPA], value, nbytes, mode)
            return OUT_EMULATED, err, refs, np.int64(-1)
        if not restart:
            break
    return OUT_RETRY, err, refs, np.int64(-1)


@kernel
def l2_batch(m, ev, start, res):
    """tdp2d_batch for vCPUs running an L2 on nested paging (a kernel of its own: the 2D-walk kernel of every other
    access does not carry guest_mmu's fault path).  Returns (next_event, STOP_*)."""
    n = ev.shape[0]
    wk = scratch(m.sh)
    ring_rsvd = KVM_DIRTY_RING_RSVD_ENTRIES + (PML_ENTITY_NUM if m.host[CFG_PML] else 0)
    for i in range(start, n):
        vg = event_start(m, ev, i, res, ring_rsvd)
        if vg == -1:
            return i, STOP_NEED_PAGES
        if vg == -2:
            continue
        vm = ev[i, EV_VM]
        o, e, refs, fgpa = access_l2(m, vm, vg, ev[i, EV_ADDR], ev[i, EV_KIND], ev[i, EV_VALUE], ev[i, EV_SIZE],
                                     m.vt.rec[vm, VM_MAXPHYADDR], wk)
        stop = event_end(m, ev, i, res, o, e, refs)
        if stop != STOP_DONE:
            return i, stop
        if o == OUT_L1_EXIT:
            res[i, RES_FAULT_GPA] = fgpa
    wk[SC_RUNNING_VCPU] = -1
    return n, STOP_DONE


@njit(inline="always", _nrt=False)
def _invept_mask(m, vg, eptp_pa, single):
    """kvm_mmu_free_roots mask of handle_invept over the vCPU's current root set: every indirect root or, when
    ``single``, those whose EPTP has table address ``eptp_pa`` (nested_ept_root_matches)."""
    mask = np.int64(0)
    for k in range(1 + KVM_MMU_NUM_PREV_ROOTS):
        row = m.vr.rec[vg, VR_ROOT if k == 0 else VR_PREV_ROOT + k - 1]
        pgd = m.vr.rec[vg, VR_ROOT_PGD if k == 0 else VR_PREV_PGD + k - 1]
        if row >= 0 and (m.pa.meta[row, SP_ROLE] & ROLE_DIRECT) == 0 and \
                (not single or (pgd & EPTP_PA_MASK) == eptp_pa):
            mask |= np.int64(1) << np.int64(k)
    return mask


@kernel
def nested_enter_mmu(m, vm, vg):
    """The MMU side of VM-entry to L2 (Python has switched the registers and, with nested paging, the root set):
    with nested EPT / NPT kvm_init_shadow_*_mmu -> kvm_mmu_new_pgd(EPTP / nCR3) on guest_mmu (a usable cached
    root is kept; SVM's VMRUN also syncs it); without, L2 runs on root_mmu with a root of role guest_mode
    (kvm_init_mmu: fast_pgd_switch; L1's root waits in prev_roots).  The first access loads what is missing."""
    if m.vr.rec[vg, VR_EPTP] >= 0:
        mode = nested_mmu_mode(m.vt, m.vr, vm, vg)
        kvm_mmu_new_pgd(m, vm, vg, m.vr.rec[vg, VR_EPTP], mode)
        if mode & MODE_NPT and m.vr.rec[vg, VR_ROOT] >= 0:
            sc = scratch(m.sh)
            sc[SC_RUNNING_VCPU] = vg   # the vCPU whose writes the sync logs
            sync_roots(m, vm, vg, mode, m.vt.rec[vm, VM_MAXPHYADDR])   # SVM's VMRUN: KVM_REQ_MMU_SYNC
            sc[SC_RUNNING_VCPU] = -1
        return
    fast_pgd_switch(m, vm, vg, np.int64(0), np.int64(tdp_mmu_root_role(m.vt, vm) | ROLE_GUEST_MODE))


@kernel
def nested_exit_mmu(m, vm, vg):
    """VM-exit from an L2 without nested paging: root_mmu back to L1's role (fast_pgd_switch)."""
    fast_pgd_switch(m, vm, vg, np.int64(0), np.int64(tdp_mmu_root_role(m.vt, vm)))


@kernel
def handle_invept(m, vm, vg, eptp_pa, single):
    """handle_invept on guest_mmu (its roots wait in the VR_ALT_* columns while L1 runs): single-context frees
    the current and previous roots whose EPTP has table address ``eptp_pa``, global every one
    (KVM_MMU_ROOTS_ALL); the pages stay hashed for the next root unless a zap made them invalid."""
    swap_mmu_roots(m.vr, vg)
    mask = _invept_mask(m, vg, eptp_pa, single)
    if mask:
        free_roots(m, vm, vg, mask)
    swap_mmu_roots(m.vr, vg)
