"""``page_track.c`` and mmu.c's write-tracking side: a write to a shadowed guest page table (kvm_mmu_track_write),
write flooding, misaligned writes."""

import numpy as np

from .gmem import gm_read32, gm_read64
from .guest_walk import (
    MODE_PAE,
)
from .jit import helper
from .memslot import (
    slot_map,
)
from .shadow_mmu import (
    commit_zap_page,
    flush_remote_tlbs,
    hash_bucket,
    mmu_page_zap_pte,
    prepare_zap_page,
    role_level,
    role_quadrant,
    sp_has_gptes,
    sp_valid,
    walk_start,
)
from .spte import (
    ROLE_HAS_4_BYTE_GPTE,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_child_row,
)
from .state import (
    SP_FLOOD,
    SP_GFN,
    SP_HNEXT,
    SP_ROLE,
    ST_MMU_FLOODED,
    ST_MMU_PDE_ZAPPED,
    ST_MMU_PTE_WRITE,
    VM_HASH_OFF,
    VM_INDIRECT,
)


@helper
def clear_flood_on_walk(m, vm, vg, gva):
    """shadow_page_table_clear_flood: reset write_flooding_count of every page on the gva's walk."""
    row, level = walk_start(m, vg, gva)
    if row < 0:
        return
    while True:
        m.pa.meta[row, SP_FLOOD] = 0
        idx = (gva >> (12 + 9 * (level - 1))) & 511
        spte = m.pa.spt[row, idx]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return
        row = spte_to_child_row(spte)
        level -= 1


@helper
def track_write(m, vm, gpa, nbytes, mode):
    """kvm_mmu_track_write: an emulated write hit guest memory; zap what shadows the written gpte."""
    if m.vt.rec[vm, VM_INDIRECT] == 0:
        return
    gfn = gpa >> 12
    # mmu_pte_write_fetch_gpte: with CR4.PAE a 4-byte write is taken as the whole 8-byte gpte
    if (mode & MODE_PAE) and nbytes == 4:
        gpa &= ~np.int64(7)
        nbytes = 8
    gentry = np.int64(0)
    if nbytes == 8:
        gentry = gm_read64(m.gm, slot_map(m.vt, m.st), vm, gpa)
    elif nbytes == 4:
        gentry = gm_read32(m.gm, slot_map(m.vt, m.st), vm, gpa)
    m.vt.stats[vm, ST_MMU_PTE_WRITE] += 1
    sh, pa = m.sh, m.pa
    flush = False
    row = sh.hash[m.vt.rec[vm, VM_HASH_OFF] + hash_bucket(gfn)]
    while row >= 0:
        nxt = m.pa.meta[row, SP_HNEXT]
        role = pa.meta[row, SP_ROLE]
        if sp_valid(m, vm, row) and pa.meta[row, SP_GFN] == gfn and sp_has_gptes(role):
            offset = gpa & 4095
            psz = 4 if role & ROLE_HAS_4_BYTE_GPTE else 8
            # detect_write_misaligned
            misaligned = False
            if not ((offset & (psz - 1)) == 0 and nbytes == 1):
                misaligned = ((offset ^ (offset + nbytes - 1)) & ~(psz - 1)) != 0 or nbytes < 4
            flooded = False
            if not misaligned and role_level(role) > 1:
                # detect_write_flooding
                m.pa.meta[row, SP_FLOOD] += 1
                flooded = m.pa.meta[row, SP_FLOOD] >= 3
            if misaligned or flooded:
                prepare_zap_page(m, vm, row)
                m.vt.stats[vm, ST_MMU_FLOODED] += 1
            else:
                # get_written_sptes: 4-byte gptes cover half an SPTE page (level 2: two SPTEs each)
                page_offset = offset
                nspte = 1
                skip = False
                if role & ROLE_HAS_4_BYTE_GPTE:
                    page_offset <<= 1
                    if role_level(role) == 2:
                        page_offset = (page_offset & ~7) << 1
                        nspte = 2
                    skip = (page_offset >> 12) != role_quadrant(role)
                    page_offset &= 4095
                if not skip:
                    for k in range(nspte):
                        i = (page_offset >> 3) + k
                        entry = pa.spt[row, i]
                        mmu_page_zap_pte(m, vm, row, i)
                        if gentry != 0 and role_level(role) != 1:
                            m.vt.stats[vm, ST_MMU_PDE_ZAPPED] += 1
                        if is_shadow_present_pte(entry):
                            flush = True
        row = nxt
    # kvm_mmu_remote_flush_or_zap
    if not commit_zap_page(m, vm) and flush:
        flush_remote_tlbs(m, vm)
