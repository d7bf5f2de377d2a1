"""The shadow MMU's kernel entry points (the ones Python calls), re-exported from the files that model
KVM's: ``shadow_mmu`` (mmu.c's shadow half: hash, alloc/free, rmaps and the ``mmu_spte_*`` chokepoint, unsync,
zap, page budget), ``paging_tmpl`` (FNAME(): fetch, page_fault, sync_spte, prefetch, invlpg), ``page_track``
(write tracking, flooding), ``mmu`` (roots, CR3 loads, vCPU entry), ``hw`` (the processor's walk), ``emulate``
(emulator_read_write), ``batch`` (the event loop) and ``slot_rmap`` (rmap-driven memslot and range operations);
constants in ``mmu_internal``.

Guest page tables live in guest memory (kernels/gmem.py) and are walked by kernels/guest_walk.py.
"""

from .batch import shadow_event_batch
from .mmu import kvm_mmu_reset_context
from .mmu_internal import OP_ACCESS, OP_EMULATED, OP_FLUSH, OP_INVLPG, OP_MOV_CR3, SC_SIZE
from .shadow_mmu import kvm_mmu_change_mmu_pages, zap_oldest_mmu_pages
from .slot_rmap import (
    shadow_age_gfn_range,
    shadow_clear_dirty_log,
    shadow_footprint_counts,
    shadow_get_dirty_log,
    shadow_ring_reset_masks,
    shadow_slot_leaf_clear_dirty,
    shadow_slot_wrprot,
    shadow_zap_all_fast,
    shadow_zap_collapsible,
    shadow_zap_gfn_range,
)

__all__ = [
    "OP_ACCESS", "OP_EMULATED", "OP_FLUSH", "OP_INVLPG", "OP_MOV_CR3", "SC_SIZE", "kvm_mmu_change_mmu_pages",
    "kvm_mmu_reset_context", "shadow_age_gfn_range", "shadow_clear_dirty_log", "shadow_event_batch",
    "shadow_footprint_counts", "shadow_get_dirty_log", "shadow_ring_reset_masks",
    "shadow_slot_leaf_clear_dirty", "shadow_slot_wrprot",
    "shadow_zap_all_fast", "shadow_zap_collapsible", "shadow_zap_gfn_range", "zap_oldest_mmu_pages",
]
