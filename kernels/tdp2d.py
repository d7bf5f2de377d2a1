"""Guest paging under TDP: the processor's two-dimensional walk (EPT / NPT with CR0.PG=1).

Per access the guest's own walk runs over guest memory (``guest_walk``); every guest page-table gpa
it reads is first translated through the TDP tables, as the processor does, then the final gpa is
translated with the access's own kind.  A missing or too-weak TDP entry anywhere on the way is an
EPT violation / #NPF: KVM's TDP fault path fixes it (``kvm_handle_exit``) and the access restarts
from the top.  A refused guest translation is a #PF delivered straight to the guest: KVM never sees
it (no exit, no stat, ``pf_guest`` stays).  MOV CR3, INVLPG and guest TLB flushes do not exit.

How a guest page-table access counts for the TDP (our choice, after SDM 29.3.3.2 and KVM):
- EPT with A/D bits: every guest paging-structure access is a write for EPT (the processor sets
  the EPT dirty flag of the table page; PML logs it).  KVM's nested walker says the same
  (``nested_access`` = PFERR_WRITE | PFERR_USER in FNAME(walk_addr_generic)).
- NPT: also a (user) write: KVM's FNAME(update_accessed_dirty_bits) notes that NPT "always wants
  nested page table entries for the guest page tables to be writable".
- EPT without A/D: a read, except for the gptes whose A (or D) bit this walk sets: those are
  writes to the table page (the walk's locked update), so they need EPT write permission and go
  through write-protection for dirty logging.
Guest A/D bits are set only by a successful access (A at every level walked, D on the leaf for a
write), as KVM's software walker does, so both MMUs leave identical guest memory.

``walk_refs`` counts memory references: for each guest level read, the TDP references of its
table gpa plus the gpte read itself, then the TDP references of the data gpa: n*m + n + m for an
n-level guest on an m-level TDP when nothing is huge (no paging-structure cache or TLB modelled).
References of walks cut short by an exit count too (the processor made them).

An exit that KVM answers with emulation (a guest page table outside every memslot, or in a
read-only slot while the access must write it) runs KVM's emulator: its software walk (tables
must be in visible memslots; A/D not written into read-only slots), then the data access through
the memslots.
"""

import numpy as np
from numba import njit

from .dirty import pml_flush, pml_log
from .emulate import emulated_tracked_write
from .fault import WALK_OK, WALK_RSVD, kvm_handle_exit, tdp_hw_walk
from .gmem import gm_room, gm_write32, gm_write64, gm_write_bytes
from .guest_walk import (
    MODE_AMD,
    MODE_NXE,
    MODE_SMEP,
    PFERR_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    WK_AD_NEEDED,
    WK_GPA,
    WK_GPTE,
    WK_GPTE_SIZE,
    WK_LEAF_LEVEL,
    WK_MAX_LEVEL,
    WK_PTE_GPA,
    cpu_mode,
    guest_set_ad,
    guest_walk,
    mode_levels,
    walk_sets_ad,
)
from .jit import helper, kernel
from .memslot import dirty_ring_soft_full, gfn_to_memslot, mark_page_dirty, slot_map, slot_readonly
from .mmu import entry_work_needed, exit_room, free_obsolete_alt_roots, legacy_tdp_exit, vcpu_reenter
from .mmu_internal import (
    EV_ADDR,
    EV_KIND,
    EV_SIZE,
    EV_VALUE,
    EV_VCPU,
    EV_VM,
    MAX_RESTARTS,
    RES_ERROR,
    RES_OUTCOME,
    SC_OOM_GPA,
    SC_RUNNING_VCPU,
    scratch,
)
from .spte import (
    FMT_EPT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    shadow_dirty_mask,
    spte_ad_enabled,
)
from .state import (
    CFG_PML,
    CTL_FREE_TOP,
    DM_PML_ACTIVE,
    DM_RING,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    MAX_GM_PER_EVENT,
    MAX_ROWS_PER_EVENT,
    MMU_LEGACY,
    OUT_EMULATED,
    OUT_FIXED,
    OUT_GUEST_FAULT,
    OUT_HIT,
    OUT_MMIO,
    OUT_RETRY,
    OUT_RING_FULL,
    OUT_SPURIOUS,
    PML_ENTITY_NUM,
    ST_ACCESSES,
    ST_DIRTY_RING_FULL,
    ST_PF_GUEST,
    ST_WALK_REFS,
    STOP_DONE,
    STOP_HOST_OOM,
    STOP_NEED_PAGES,
    VM_AD_DISABLED,
    VM_DIRTY_MODE,
    VM_FMT,
    VM_HASH_OFF,
    VM_INDIRECT,
    VM_LEVELS,
    VM_MAXPHYADDR,
    VM_MMU,
    VM_ROOT,
    VM_VCPU_OFF,
    VR_CR0,
    VR_CR3,
    VR_CR4,
    VR_EFER,
    VR_PDPTR,
    VR_PKRU,
    VR_RFLAGS,
    VR_ROOT,
)
from .tdp import mmu_alloc_root, vcpu_root_field

# result of a step of the walk that needs KVM
_NEED_ROWS = -2


@helper
def tdp_exit(pa, vt, st, ct, sh, host, rootf, vcpu_g, vm, fmt, gfn, write, fetch, res, spte):
    """One EPT violation / misconfiguration / #NPF of a 2D walk: kvm_handle_exit, not inlined.

    kvm_handle_exit counts the access and the references of its own re-walk of the one gpa (right
    for a 1D access); here the whole 2D walk restarts and is counted by the caller, so those two
    counters are put back.  Returns (outcome, error code); outcome -1: the host budget cannot back
    the page and nothing changed.
    """
    acc = vt.stats[vm, ST_ACCESSES]
    refs = vt.stats[vm, ST_WALK_REFS]
    o, e = kvm_handle_exit(pa, vt, st, ct, sh, host, rootf, vcpu_g, vm, fmt, gfn, write, fetch, res, 0, spte)
    vt.stats[vm, ST_ACCESSES] = acc
    vt.stats[vm, ST_WALK_REFS] = refs
    return o, e


@helper
def emulate_access(vt, st, ct, gm, vm, vcpu_g, wk, gerr, pfec, mode, value, nbytes):
    """x86_emulate_instruction for an access whose 2D walk exited to emulation: the emulator's
    software walk (FNAME(walk_addr_generic) over memslot-backed tables), A/D through
    FNAME(update_accessed_dirty_bits), then the memory operand through the memslots.

    ``wk``/``gerr`` hold guest_walk's result for this access.  Returns (outcome, guest error code).
    """
    top = wk[WK_MAX_LEVEL]
    stop = wk[WK_LEAF_LEVEL]
    # kvm_vcpu_gfn_to_memslot on each table: an invisible one is a not-present fault there
    for level in range(top, stop - 1, -1):
        pte_gpa = wk[WK_PTE_GPA + level]
        if pte_gpa >= 0 and gfn_to_memslot(vt, st, vm, pte_gpa >> 12) < 0:
            code = pfec & (PFERR_WRITE_MASK | PFERR_USER_MASK)
            if (pfec & PFERR_FETCH_MASK) != 0 and (mode & (MODE_NXE | MODE_SMEP)) != 0:
                code |= PFERR_FETCH_MASK
            vt.stats[vm, ST_PF_GUEST] += 1  # kvm_inject_emulated_page_fault
            return OUT_GUEST_FAULT, code
    if gerr != 0:
        vt.stats[vm, ST_PF_GUEST] += 1
        return OUT_GUEST_FAULT, gerr & PFERR_MASK
    # FNAME(update_accessed_dirty_bits): no write into read-only slots
    for level in range(top, stop - 1, -1):
        old = wk[WK_GPTE + level]
        new = old | PT_ACCESSED_MASK
        if level == stop and (pfec & PFERR_WRITE_MASK) != 0:
            new |= PT_DIRTY_MASK
        if new == old:
            continue
        gpa = wk[WK_PTE_GPA + level]
        rec = gfn_to_memslot(vt, st, vm, gpa >> 12)
        if slot_readonly(st, rec):
            continue
        if wk[WK_GPTE_SIZE] == 4:
            gm_write32(gm, slot_map(vt, st), vm, gpa, new)
        else:
            gm_write64(gm, slot_map(vt, st), vm, gpa, new)
        wk[WK_GPTE + level] = new
        mark_page_dirty(st, ct, vcpu_g, rec, gpa >> 12)
    gpa = wk[WK_GPA]
    rec = gfn_to_memslot(vt, st, vm, gpa >> 12)
    if rec < 0:
        return OUT_MMIO, 0  # emulated MMIO: userspace completes it
    if (pfec & PFERR_WRITE_MASK) != 0 and not slot_readonly(st, rec):
        if nbytes > 0:
            gm_write_bytes(gm, slot_map(vt, st), vm, gpa, value, nbytes)
        mark_page_dirty(st, ct, vcpu_g, rec, gpa >> 12)
    return OUT_EMULATED, 0


@njit(inline="always", _nrt=False)  # one call site (tdp2d_batch): no bundle pushed for it
def access_2d(m, vm, vcpu_g, gva, kind, value, nbytes, maxphy, wk):
    """One guest access of a TDP VM (2D walk when the vCPU pages): (outcome, error code, refs).

    ``nbytes`` > 0 makes it a store of the low bytes of ``value`` at the translated gpa (one page).
    Outcome -1: the host cannot back a page (nothing changed for the exit that needed it);
    ``_NEED_ROWS``: the page arena needs a top-up before the next exit.  Both restart the access
    from scratch later, which is exact: what was done before (KVM faults, A/D bits) is not redone.
    """
    pa, vt, st, ct, gm, vr = m.pa, m.vt, m.st, m.ct, m.gm, m.vr
    fmt = vt.rec[vm, VM_FMT]
    tdp_levels = vt.rec[vm, VM_LEVELS]
    ad_vm = vt.rec[vm, VM_AD_DISABLED] == 0
    pml = (vt.rec[vm, VM_DIRTY_MODE] & DM_PML_ACTIVE) != 0
    legacy = vt.rec[vm, VM_MMU] == MMU_LEGACY   # kvm.tdp_mmu=N: the vCPU's direct shadow root (tdp2d_batch loads it)
    rootf = vcpu_root_field(vr, vcpu_g)         # the TDP MMU: L1's root, or role.guest_mode's for an L2
    write = (kind & PFERR_WRITE_MASK) != 0
    fetch = (kind & PFERR_FETCH_MASK) != 0
    mode = cpu_mode(vr.rec[vcpu_g, VR_CR0], vr.rec[vcpu_g, VR_CR4], vr.rec[vcpu_g, VR_EFER], vr.rec[vcpu_g, VR_RFLAGS])
    if fmt != FMT_EPT:
        mode |= MODE_AMD   # NPT: an AMD host, and the guest's CPU is AMD
    glevels = mode_levels(mode)
    if glevels == 2:
        # SDM 4.7: the I/D error-code bit needs CR4.SMEP, or EFER.NXE with PAE-format tables; 32-bit
        # paging has no XD bit, so EFER.NXE does nothing there (KVM's software walker differs)
        mode &= ~MODE_NXE
    # guest paging-structure accesses are writes for the TDP (see the module docstring)
    tables_write = fmt != FMT_EPT or ad_vm
    outcome = OUT_HIT
    err = np.int64(0)
    refs = np.int64(0)
    gpa = np.int64(0)
    for _attempt in range(MAX_RESTARTS):
        gerr = np.int64(0)
        top = 0
        stop = 1
        if glevels != 0:
            gerr = guest_walk(gm, slot_map(vt, st), vm, mode, vr.rec[vcpu_g, VR_CR3],
                              vr.rec[vcpu_g, VR_PDPTR:VR_PDPTR + 4], vr.rec[vcpu_g, VR_PKRU],
                              maxphy, gva, kind, wk)
            top = wk[WK_MAX_LEVEL]
            stop = wk[WK_LEAF_LEVEL]
        nsteps = max(top - stop + 1, 0) if glevels != 0 else 0  # 0 when a PAE PDPTE (a register) refused
        restart = False
        # steps 0..nsteps-1: the guest tables, top down; step nsteps: the data gpa
        for step in range(nsteps + 1):
            if step < nsteps:
                level = top - step
                pte_gpa = wk[WK_PTE_GPA + level]
                if pte_gpa < 0:
                    continue  # PAE PDPTE: from the PDPTR registers, not memory
                gfn = pte_gpa >> 12
                w = tables_write or (gerr == 0 and walk_sets_ad(wk, level, stop, write))
                f = False
            else:
                if gerr != 0:
                    # the guest's #PF: straight to the guest, KVM never sees it
                    return OUT_GUEST_FAULT, gerr & PFERR_MASK, refs
                if glevels != 0:
                    if wk[WK_AD_NEEDED]:
                        guest_set_ad(gm, slot_map(vt, st), vm, wk, kind)  # the walk's A/D writes
                    gpa = wk[WK_GPA]
                else:
                    gpa = gva
                gfn = gpa >> 12
                w = write
                f = fetch
            root = vr.rec[vcpu_g, VR_ROOT] if legacy else vt.rec[vm, rootf]
            if root < 0:
                if pa.ctl[CTL_FREE_TOP] < MAX_ROWS_PER_EVENT:
                    return _NEED_ROWS, err, refs
                root = mmu_alloc_root(pa, vt, vm, rootf)  # kvm_mmu_load at vCPU entry
            res, r, row, idx, lvl, spte = tdp_hw_walk(pa.spt, fmt, root, tdp_levels, gfn, w, f, ad_vm)
            refs += r
            if res == WALK_OK:
                if w and pml and rootf == VM_ROOT and spte_ad_enabled(spte) and not (spte & shadow_dirty_mask(fmt)):
                    # (PML is never on in hardware while L2 runs: an L2's root logs through write protection)
                    pml_log(vt, st, ct, vm, vcpu_g, gfn)  # the CPU set the EPT D flag: PML logs the gpa
                if step < nsteps:
                    refs += 1  # the gpte read
                    continue
                if nbytes > 0:
                    gm_write_bytes(gm, slot_map(vt, st), vm, gpa, value, nbytes)
                return outcome, err, refs
            # an exit: KVM's TDP fault path, then the guest re-executes the access
            if not exit_room(m, legacy):
                return _NEED_ROWS, err, refs
            done = np.int64(-1)
            if legacy:
                o, e, done = legacy_tdp_exit(m, vm, vcpu_g, gfn, w, f, res, spte)
            else:
                o, e = tdp_exit(pa, vt, st, ct, m.sh, m.host, rootf, vcpu_g, vm, fmt, gfn, w, f, res, spte)
            if o < 0:
                wk[SC_OOM_GPA] = gfn << 12
                return -1, err, refs
            err = e
            if o == OUT_RETRY:
                return OUT_RETRY, err, refs
            if o == OUT_FIXED or o == OUT_SPURIOUS:
                outcome = o
                if done >= 0 and glevels == 0:
                    # paging off: the access the exit re-executed is the one a restart would make (the same
                    # walk of the same tables): it translated, so it is done
                    refs += done
                    if nbytes > 0:
                        gm_write_bytes(gm, slot_map(vt, st), vm, gva, value, nbytes)
                    return outcome, err, refs
                restart = True
                break
            if step == nsteps:
                if o == OUT_EMULATED and w and vt.rec[vm, VM_INDIRECT] > 0:   # a write to an EPT12 / NPT12 page
                    emulated_tracked_write(m, vm, vcpu_g, gpa, value, nbytes, mode)
                return o, err, refs  # the data gpa: MMIO or a write KVM emulates (read-only slot, tracked gfn)
            if res != WALK_RSVD and (e & (PFERR_PRESENT_MASK | PFERR_WRITE_MASK)) == \
                    (PFERR_PRESENT_MASK | PFERR_WRITE_MASK):
                # kvm_mmu_page_fault: PFERR_NESTED_GUEST_PAGE on a direct MMU unprotects and re-enters
                # the guest without emulating; the same exit follows (a read-only table under writes).
                # (A cached MMIO SPTE's RSVD fault jumps straight to the emulator.)
                outcome = o
                restart = True
                break
            o2, ge = emulate_access(vt, st, ct, gm, vm, vcpu_g, wk, gerr, kind, mode, value, nbytes)
            if o2 == OUT_GUEST_FAULT:
                return o2, ge, refs
            return o2, err, refs
        if not restart:
            break
    return OUT_RETRY, err, refs


@njit(inline="always", _nrt=False)
def event_start(m, ev, i, res, ring_rsvd):
    """What a 2D-walk batch does for event i before the access: room in the arenas (-1: stop for a top-up), the
    vCPU's dirty ring (-2: KVM_EXIT_DIRTY_RING_FULL, result written, the vCPU does not run) and, for the shadow
    MMU's code (legacy TDP MMU), the running vCPU whose faults mark pages dirty.  Returns the global vCPU index."""
    vt = m.vt
    wk = scratch(m.sh)
    wk[SC_RUNNING_VCPU] = -1
    vm = ev[i, EV_VM]
    legacy = vt.rec[vm, VM_MMU] == MMU_LEGACY or vt.rec[vm, VM_HASH_OFF] >= 0   # the shadow MMU's code may run
    if not exit_room(m, legacy) or not gm_room(m.gm, MAX_GM_PER_EVENT):
        return np.int64(-1)
    vcpu_g = vt.rec[vm, VM_VCPU_OFF] + ev[i, EV_VCPU]
    dmode = vt.rec[vm, VM_DIRTY_MODE]
    if dmode & DM_RING:
        if dirty_ring_soft_full(m.ct, vcpu_g, ring_rsvd):
            # KVM_EXIT_DIRTY_RING_FULL: the vCPU does not run until the rings are reset
            vt.stats[vm, ST_DIRTY_RING_FULL] += 1
            if dmode & DM_PML_ACTIVE:
                pml_flush(vt, m.st, m.ct, vm, vcpu_g)
            res[i, RES_OUTCOME] = OUT_RING_FULL
            res[i, RES_ERROR] = 0
            return np.int64(-2)
    if legacy:
        wk[SC_RUNNING_VCPU] = vcpu_g
    return vcpu_g


@njit(inline="always", _nrt=False)
def event_end(m, ev, i, res, o, e, refs):
    """After event i's access: STOP_NEED_PAGES / STOP_HOST_OOM to stop before it (nothing of it stays), else the
    access counted and its result written (STOP_DONE: go on)."""
    if o == _NEED_ROWS or o < 0:
        scratch(m.sh)[SC_RUNNING_VCPU] = -1
        return STOP_NEED_PAGES if o == _NEED_ROWS else STOP_HOST_OOM
    vm = ev[i, EV_VM]
    m.vt.stats[vm, ST_ACCESSES] += 1
    m.vt.stats[vm, ST_WALK_REFS] += refs
    res[i, RES_OUTCOME] = o
    res[i, RES_ERROR] = e
    return STOP_DONE


@kernel
def tdp2d_batch(m, ev, start, res):
    """Run events ev[start:] (EV_* records, accesses) of TDP VMs whose vCPUs may page (EV_ADDR = gva when
    CR0.PG=1, else gpa), results in ``res`` (RES_* records).  (vCPUs running an L2 on nested paging:
    nested.l2_batch.)

    ``ev[i, EV_SIZE]`` > 0 makes event i a store of EV_VALUE's low bytes.  Returns (next_event, STOP_*).
    """
    n = ev.shape[0]
    vt = m.vt
    wk = scratch(m.sh)
    ring_rsvd = KVM_DIRTY_RING_RSVD_ENTRIES + (PML_ENTITY_NUM if m.host[CFG_PML] else 0)
    for i in range(start, n):
        vcpu_g = event_start(m, ev, i, res, ring_rsvd)
        if vcpu_g == -1:
            return i, STOP_NEED_PAGES
        if vcpu_g == -2:
            continue
        vm = ev[i, EV_VM]
        if vt.rec[vm, VM_MMU] == MMU_LEGACY:
            if entry_work_needed(m, vm, vcpu_g):
                vcpu_reenter(m, vm, vcpu_g, np.int64(0), np.int64(0))  # kvm_mmu_reload: the direct root
        elif vt.rec[vm, VM_HASH_OFF] >= 0:
            free_obsolete_alt_roots(m, vm, vcpu_g)   # guest_mmu's, on a TDP-MMU VM that runs nested EPT / NPT
        o, e, refs = access_2d(m, vm, vcpu_g, ev[i, EV_ADDR], ev[i, EV_KIND], ev[i, EV_VALUE], ev[i, EV_SIZE],
                               vt.rec[vm, VM_MAXPHYADDR], wk)
        stop = event_end(m, ev, i, res, o, e, refs)
        if stop != STOP_DONE:
            return i, stop
    wk[SC_RUNNING_VCPU] = -1
    return n, STOP_DONE
