"""Allocation and growth of the flat arenas (kernels/state.py layouts).

Kernels never allocate: Python tops the page arena's free stack up before a
batch (KVM's ``mmu_topup_memory_caches``) and grows it when a kernel stops for
lack of rows.  Pools (lpage_info, dirty bitmaps, host bitmaps, slot lists) grow
by doubling; offsets into them stay valid across growth.
"""

import numpy as np

from .kernels import state as S
from .kernels.spte import SHADOW_NONPRESENT_VALUE

ROW_BYTES = 512 * 8


def _grow(arr, new_len, fill=0):
    out = np.full((new_len,) + arr.shape[1:], fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class Pool:
    """A growable flat array with a bump allocator."""

    def __init__(self, dtype, cap=1024, width=None):
        self.arr = np.zeros(cap if width is None else (cap, width), dtype=dtype)  # width: a pool of records
        self.used = 0

    def alloc(self, n):
        off = self.used
        need = off + n
        if need > self.arr.shape[0]:
            cap = max(need, 2 * self.arr.shape[0])
            self.arr = _grow(self.arr, cap)
        self.used = need
        return off

    def alloc_many(self, n, count):
        """``count`` regions of ``n`` each; returns their offsets."""
        off = self.alloc(n * count)
        return off + n * np.arange(count, dtype=np.int64)


def _records(cap, width, fills):
    """A record array of ``cap`` rows: column ``c`` starts as ``fills.get(c, 0)``."""
    rec = np.zeros((cap, width), np.int64)
    for col, v in fills.items():
        rec[:, col] = v
    return rec


def _grow_records(rec, new_cap, fills):
    out = _records(new_cap, rec.shape[1], fills)
    out[: rec.shape[0]] = rec
    return out


SP_FILLS = {S.SP_VM: -1, S.SP_PARENT: -1, S.SP_HNEXT: -1, S.SP_ANEXT: -1, S.SP_APREV: -1, S.SP_PARENT_HEAD: -1}
VM_FILLS = {S.VM_ROOT: -1, S.VM_SLOT_LAST: -1, S.VM_HASH_OFF: -1, S.VM_ACT_HEAD: -1, S.VM_ACT_TAIL: -1}
SL_FILLS = {S.SL_VM: -1, S.SL_SLOT_ID: -1, S.SL_DIRTY_OFF: -1, S.SL_WTRACK_OFF: -1,
            **{S.SL_RMAP_OFF + i: -1 for i in range(3)}}


def new_page_arena(cap=64):
    pa = S.PageArena(
        spt=np.full((cap, 512), SHADOW_NONPRESENT_VALUE, dtype=np.int64),
        meta=_records(cap, S.NSP, SP_FILLS),
        free=np.arange(cap - 1, -1, -1, dtype=np.int64),
        ctl=np.zeros(S.NCTL, np.int64),
    )
    pa.ctl[S.CTL_FREE_TOP] = cap
    return pa


def grow_page_arena(pa, min_free, exact=False):
    """Return a larger arena with at least ``min_free`` rows on the free stack (doubling unless
    ``exact``)."""
    cap = pa.spt.shape[0]
    top = int(pa.ctl[S.CTL_FREE_TOP])
    if top >= min_free:
        return pa
    new_cap = cap + (min_free - top) if exact else max(2 * cap, cap + (min_free - top))
    spt = np.empty((new_cap, 512), dtype=np.int64)  # new rows are filled when handed out
    spt[:cap] = pa.spt
    free = np.empty(new_cap, np.int64)
    # new rows go below the old free rows so the old ones are reused first
    added = new_cap - cap
    free[:added] = np.arange(new_cap - 1, cap - 1, -1, dtype=np.int64)
    free[added:added + top] = pa.free[:top]
    ctl = pa.ctl.copy()
    ctl[S.CTL_FREE_TOP] = top + added
    return S.PageArena(spt=spt, meta=_grow_records(pa.meta, new_cap, SP_FILLS), free=free, ctl=ctl)


def new_vm_table(cap=16):
    return S.VMTable(rec=_records(cap, S.NVMF, VM_FILLS), stats=np.zeros((cap, S.NSTAT), np.int64))


def grow_vm_table(vt, need):
    cap = vt.rec.shape[0]
    if need <= cap:
        return vt
    new_cap = max(need, 2 * cap)
    return S.VMTable(rec=_grow_records(vt.rec, new_cap, VM_FILLS), stats=_grow(vt.stats, new_cap))


def new_slot_table(cap=16):
    return S.SlotTable(
        rec=_records(cap, S.NSLF, SL_FILLS),
        order=np.zeros(0, np.int64), lpage=np.zeros(0, np.int32), dirty=np.zeros(0, np.int64),
        host=np.zeros(0, np.int64), swap=np.zeros(0, np.int64), split=np.zeros(0, np.int64),
        age=np.zeros(0, np.uint8),
    )


def sync_host_pools(st, ages):
    """Grow the swap and THP-split bitmaps (and, with ``ages``, the per-page reclaim ages) to match
    the host-resident bitmap pool, whose offsets they share."""
    n = st.host.shape[0]
    out = {}
    if st.swap.shape[0] < n:
        out["swap"] = _grow(st.swap, n)
        out["split"] = _grow(st.split, n)
    if ages and st.age.shape[0] < 64 * n:
        out["age"] = _grow(st.age, 64 * n)
    return st._replace(**out) if out else st


def grow_slot_records(st, need):
    cap = st.rec.shape[0]
    if need <= cap:
        return st
    return st._replace(rec=_grow_records(st.rec, max(need, 2 * cap), SL_FILLS))


def lpage_entries(base_gfn, npages, level):
    """Number of lpage_info entries of a slot at ``level`` (2 = 2M, 3 = 1G)."""
    shift = 9 * (level - 1)
    return ((base_gfn + npages - 1) >> shift) - (base_gfn >> shift) + 1


def table_rows(pages, leaf_level, levels):
    """Page-table pages a TDP tree needs to map ``pages`` contiguous 4K pages with leaves at
    ``leaf_level`` (1 = 4K, 2 = 2M, 3 = 1G): one more per level for a misaligned start, plus the root."""
    rows = 1
    for level in range(leaf_level, levels):
        span = 512 ** level  # 4K pages one table at this level covers
        rows += -(-pages // span) + 1
    return rows


def bytes_per_row():
    """Simulator bytes per page-table page: 512 SPTEs + the metadata record + the free-stack slot."""
    return ROW_BYTES + 8 * S.NSP + 8


def new_vcpu_table(nvcpu_cap=16, pml=False):
    return S.VcpuTable(
        rec=np.zeros((nvcpu_cap, S.NVCF), np.int64),
        pml_buf=np.zeros((nvcpu_cap if pml else 0, S.PML_ENTITY_NUM), np.int64),
        ring=np.zeros((0, S.NRGF), np.int64),
    )


def grow_vcpu_table(ct, nvcpu_need, pml):
    """Room for ``nvcpu_need`` vCPUs (ring pools are grown separately)."""
    def more(a, need):
        return _grow(a, max(need, 2 * a.shape[0])) if need > a.shape[0] else a

    return ct._replace(rec=more(ct.rec, nvcpu_need), pml_buf=more(ct.pml_buf, nvcpu_need if pml else 0))


def slot_bytes(npages, shadow=False, ages=False):
    """Simulator bytes of one memslot of ``npages`` pages (record, lpage_info, host bitmaps; rmaps and
    write-track counts of a shadow-MMU VM), computed without allocating anything."""
    words = (npages + 63) // 64
    b = 320 + ((npages >> 9) + (npages >> 18) + 4) * 4 + words * 8 * 3 + (64 * words if ages else 0)
    if shadow:
        b += (npages + (npages >> 9) + (npages >> 18) + 3) * 8 * S.NRMF + npages * 4
    return b


def vm_group_bytes(count, vcpus, npages, shadow=False, pml=False, ages=False):
    """Simulator bytes that ``count`` new VMs (``vcpus`` vCPUs, one slot of ``npages`` pages) take before
    any access, doubling growth included: O(1), to refuse a request before allocating it."""
    per_vm = 8 * S.NSTAT + 200 + (S.KVM_MMU_HASH_SIZE * 8 if shadow else 0)
    per_vcpu = 6 * 8 + 176 + (S.PML_ENTITY_NUM * 8 if pml else 0)
    return 2 * count * (per_vm + vcpus * per_vcpu + slot_bytes(npages, shadow, ages))
