"""KVM's emulator for guest accesses it has to perform itself (emulator_read_write): page by page,
translated by the software walk, written through the memslots and tracked."""

import numpy as np

from .gmem import gm_read64, gm_write_bytes
from .guest_walk import (
    PFERR_MASK,
    PFERR_WRITE,
    WK_GPA,
    guest_walk,
    mode_levels,
)
from .jit import helper
from .memslot import (
    gfn_to_memslot,
    mark_page_dirty,
    slot_map,
    slot_readonly,
)
from .mmu_internal import SC_RUNNING_VCPU, scratch
from .page_track import track_write
from .paging_tmpl import set_ad_and_log
from .state import (
    OUT_EMULATED,
    OUT_GUEST_FAULT,
    OUT_MMIO,
    ST_PF_GUEST,
    VR_CR3,
    VR_PDPTR,
    VR_PKRU,
)


@helper
def emulated_access(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr):
    """An access by KVM's emulator (emulator_read_write): an access that crosses a page is done one
    page at a time, each part translated and (for a write) tracked on its own.  (outcome, error code)."""
    first = nbytes
    if (gva & 4095) + nbytes > 4096:
        first = 4096 - (gva & 4095)
    o, e = emulated_onepage(m, vm, vg, gva, pfec, value, first, mode, maxphyaddr)
    if first == nbytes or o != OUT_EMULATED:
        return o, e
    return emulated_onepage(m, vm, vg, gva + first, pfec, value >> np.int64(8 * first), nbytes - first, mode,
                            maxphyaddr)


@helper
def emulated_onepage(m, vm, vg, gva, pfec, value, nbytes, mode, maxphyaddr):
    """emulator_read_write_onepage: software walk (A/D set), memory through the memslots, and for a
    write kvm_mmu_track_write."""
    gm = m.gm
    wk = scratch(m.sh)
    if mode_levels(mode) == 0:
        gpa = gva
    else:
        gerr = guest_walk(gm, slot_map(m.vt, m.st), vm, mode, m.vr.rec[vg, VR_CR3],
                          m.vr.rec[vg, VR_PDPTR:VR_PDPTR + 4], m.vr.rec[vg, VR_PKRU],
                          maxphyaddr, gva, pfec, wk)
        if gerr != 0:
            m.vt.stats[vm, ST_PF_GUEST] += 1
            return OUT_GUEST_FAULT, gerr & PFERR_MASK
        set_ad_and_log(m, vm, wk, pfec, mode)
        gpa = wk[WK_GPA]
    rec = gfn_to_memslot(m.vt, m.st, vm, gpa >> 12)
    if rec < 0:
        return OUT_MMIO, 0
    if pfec & PFERR_WRITE:
        if slot_readonly(m.st, rec):
            return OUT_EMULATED, 0
        if nbytes == 0:
            # an access given without a value: the operand is the 8 bytes already there
            gpa &= ~np.int64(7)
            nbytes = 8
            value = gm_read64(gm, slot_map(m.vt, m.st), vm, gpa)
        gm_write_bytes(gm, slot_map(m.vt, m.st), vm, gpa, value, nbytes)
        mark_page_dirty(m.st, m.ct, scratch(m.sh)[SC_RUNNING_VCPU], rec, gpa >> 12)
        track_write(m, vm, gpa, nbytes, mode)
    return OUT_EMULATED, 0


@helper
def emulated_tracked_write(m, vm, vcpu_g, gpa, value, nbytes, mode):
    """The emulator's write of a legacy-TDP VM to a write-tracked gfn (a table page of an L2 guest's EPT12 that
    guest_mmu shadows): the bytes through the memslots, the dirty log, kvm_mmu_track_write."""
    rec = gfn_to_memslot(m.vt, m.st, vm, gpa >> 12)
    if rec < 0 or slot_readonly(m.st, rec):
        return
    if nbytes > 0:
        gm_write_bytes(m.gm, slot_map(m.vt, m.st), vm, gpa, value, nbytes)
    else:
        gpa &= ~np.int64(7)   # an access given without a value: the operand is the 8 bytes already there
        nbytes = 8
    mark_page_dirty(m.st, m.ct, vcpu_g, rec, gpa >> 12)
    track_write(m, vm, gpa, nbytes, mode)
