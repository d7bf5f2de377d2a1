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

    def __init__(self, dtype, cap=1024):
        self.arr = np.zeros(cap, dtype=dtype)
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


def new_page_arena(cap=64):
    pa = S.PageArena(
        spt=np.full((cap, 512), SHADOW_NONPRESENT_VALUE, dtype=np.int64),
        sp_vm=np.full(cap, -1, np.int32),
        sp_level=np.zeros(cap, np.int8),
        sp_gfn=np.zeros(cap, np.int64),
        sp_role=np.zeros(cap, np.int32),
        sp_parent=np.full(cap, -1, np.int64),
        sp_parent_index=np.zeros(cap, np.int16),
        sp_flags=np.zeros(cap, np.int8),
        sp_seq=np.zeros(cap, np.int64),
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
    return S.PageArena(
        spt=spt, sp_vm=_grow(pa.sp_vm, new_cap, -1), sp_level=_grow(pa.sp_level, new_cap),
        sp_gfn=_grow(pa.sp_gfn, new_cap), sp_role=_grow(pa.sp_role, new_cap),
        sp_parent=_grow(pa.sp_parent, new_cap, -1), sp_parent_index=_grow(pa.sp_parent_index, new_cap),
        sp_flags=_grow(pa.sp_flags, new_cap), sp_seq=_grow(pa.sp_seq, new_cap), free=free, ctl=ctl,
    )


def new_vm_table(cap=16):
    return S.VMTable(
        root=np.full(cap, -1, np.int64), fmt=np.zeros(cap, np.int8), levels=np.zeros(cap, np.int8),
        ad_disabled=np.zeros(cap, np.int8), max_gfn=np.zeros(cap, np.int64),
        memslots_gen=np.zeros(cap, np.int64), slot_off=np.zeros(cap, np.int64),
        slot_cnt=np.zeros(cap, np.int64), slot_last=np.full(cap, -1, np.int64),
        host_bytes=np.zeros(cap, np.int64), dirty_mode=np.zeros(cap, np.int8),
        inval_count=np.zeros(cap, np.int64), inval_start=np.zeros(cap, np.int64), inval_end=np.zeros(cap, np.int64),
        stats=np.zeros((cap, S.NSTAT), np.int64),
    )


def grow_vm_table(vt, need):
    cap = vt.root.shape[0]
    if need <= cap:
        return vt
    new_cap = max(need, 2 * cap)
    fills = {"root": -1, "slot_last": -1}
    return S.VMTable(**{k: _grow(getattr(vt, k), new_cap, fills.get(k, 0)) for k in S.VMTable._fields})


def new_slot_table(cap=16):
    return S.SlotTable(
        vm=np.full(cap, -1, np.int32), slot_id=np.full(cap, -1, np.int32), base_gfn=np.zeros(cap, np.int64),
        npages=np.zeros(cap, np.int64), hva=np.zeros(cap, np.int64), flags=np.zeros(cap, np.int32),
        backing=np.zeros(cap, np.int8), lpage_off=np.zeros((cap, 2), np.int64),
        dirty_off=np.full(cap, -1, np.int64), host_off=np.zeros(cap, np.int64),
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
    cap = st.vm.shape[0]
    if need <= cap:
        return st
    new_cap = max(need, 2 * cap)
    fills = {"vm": -1, "slot_id": -1, "dirty_off": -1}
    pooled = {"order", "lpage", "dirty", "host", "swap", "split", "age"}
    return S.SlotTable(**{k: (getattr(st, k) if k in pooled else _grow(getattr(st, k), new_cap, fills.get(k, 0)))
                          for k in S.SlotTable._fields})


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
    """Simulator bytes per page-table page: 512 SPTEs + metadata + the free-stack slot."""
    return ROW_BYTES + 4 + 1 + 8 + 4 + 8 + 2 + 1 + 8


def new_vcpu_table(nvm_cap=16, nvcpu_cap=16, pml=False):
    return S.VcpuTable(
        vcpu_off=np.zeros(nvm_cap, np.int64), pml_count=np.zeros(nvcpu_cap, np.int64),
        pml_buf=np.zeros((nvcpu_cap if pml else 0, S.PML_ENTITY_NUM), np.int64),
        ring_size=np.zeros(nvcpu_cap, np.int64), ring_off=np.zeros(nvcpu_cap, np.int64),
        ring_dirty=np.zeros(nvcpu_cap, np.int64), ring_reset=np.zeros(nvcpu_cap, np.int64),
        ring_fetch=np.zeros(nvcpu_cap, np.int64), ring_slot=np.zeros(0, np.int32), ring_gfn=np.zeros(0, np.int64),
        ring_flags=np.zeros(0, np.int8),
    )


def grow_vcpu_table(ct, nvm_need, nvcpu_need, pml):
    """Room for ``nvm_need`` VMs and ``nvcpu_need`` vCPUs (ring pools are grown separately)."""
    out = {}
    for k in S.VcpuTable._fields:
        a = getattr(ct, k)
        if k == "vcpu_off":
            out[k] = _grow(a, max(nvm_need, 2 * a.shape[0])) if nvm_need > a.shape[0] else a
        elif k.startswith("ring_") and k in ("ring_slot", "ring_gfn", "ring_flags"):
            out[k] = a
        elif k == "pml_buf":
            need = nvcpu_need if pml else 0
            out[k] = _grow(a, max(need, 2 * a.shape[0])) if need > a.shape[0] else a
        else:
            out[k] = _grow(a, max(nvcpu_need, 2 * a.shape[0])) if nvcpu_need > a.shape[0] else a
    return S.VcpuTable(**out)


def slot_bytes(npages, shadow=False, ages=False):
    """Simulator bytes of one memslot of ``npages`` pages (record, lpage_info, host bitmaps; rmaps and
    write-track counts of a shadow-MMU VM), computed without allocating anything."""
    words = (npages + 63) // 64
    b = 320 + ((npages >> 9) + (npages >> 18) + 4) * 4 + words * 8 * 3 + (64 * words if ages else 0)
    if shadow:
        b += (npages + (npages >> 9) + (npages >> 18) + 3) * 12 + npages * 4
    return b


def vm_group_bytes(count, vcpus, npages, shadow=False, pml=False, ages=False):
    """Simulator bytes that ``count`` new VMs (``vcpus`` vCPUs, one slot of ``npages`` pages) take before
    any access, doubling growth included: O(1), to refuse a request before allocating it."""
    per_vm = 8 * S.NSTAT + 200 + (S.KVM_MMU_HASH_SIZE * 8 if shadow else 0)
    per_vcpu = 6 * 8 + 176 + (S.PML_ENTITY_NUM * 8 if pml else 0)
    return 2 * count * (per_vm + vcpus * per_vcpu + slot_bytes(npages, shadow, ages))
