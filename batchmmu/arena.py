"""The Arena: every record layout the kernels read (kernels/state.py), its pools, and their growth.

Kernels never allocate: Python tops the page arena's free stack up before a batch (KVM's
``mmu_topup_memory_caches``) and grows it when a kernel stops for lack of rows.  A pool (lpage_info,
dirty bitmaps, host bitmaps, slot lists, dirty rings, shadow hash buckets, rmap heads, write-track
counts) is one array field of a record tuple with a bump allocator; it grows by doubling, offsets into
it stay valid, and growing it replaces the field, so kernels are always handed the one copy.
"""

import numpy as np

from .kernels import gmem as GM
from .kernels import shadow as K
from .kernels import state as S
from .kernels.spte import SHADOW_NONPRESENT_VALUE

ROW_BYTES = 512 * 8


def _grow(arr, new_len, fill=0):
    # np.zeros (calloc): the kernel zeroes a page of the new part only when a kernel touches it (shadowed
    # translations of direct or TDP MMU pages, unused pool rows never are)
    shape = (new_len,) + arr.shape[1:]
    out = np.zeros(shape, dtype=arr.dtype) if fill == 0 else np.full(shape, fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


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
VM_FILLS = {S.VM_ROOT: -1, S.VM_ROOT_L2: -1, S.VM_SLOT_LAST: -1, S.VM_HASH_OFF: -1, S.VM_ACT_HEAD: -1,
            S.VM_ACT_TAIL: -1}
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
    ``leaf_level`` (1 = 4K, 2 = 2M, 3 = 1G): one more per level for a misaligned start, plus the root.
    ``pages`` and ``levels`` (4 or 5) may be arrays, one tree each; scalars give an int."""
    pages = np.asarray(pages, np.int64)
    rows = np.ones_like(pages)
    for level in range(leaf_level, 5):
        span = 512 ** level  # 4K pages one table at this level covers
        rows += np.where(level < np.asarray(levels), -(-pages // span) + 1, 0)
    return rows if rows.ndim else int(rows)


def tdp_rows_bound(vt, st, nrec, nvm, vm_a):
    """At most how many new TDP table rows the events of ``vm_a`` can take: per VM, ``levels`` rows per event
    and no more than a full tree over its memslots (4K leaves) needs beyond the rows it holds."""
    events = np.bincount(vm_a, minlength=nvm)[:nvm]
    live = np.nonzero(st.vm[:nrec] >= 0)[0]
    svm = st.vm[live]
    full = np.bincount(svm, weights=table_rows(st.npages[live], 1, vt.levels[svm]), minlength=nvm)[:nvm]
    levels = vt.levels[:nvm]
    held = vt.stats[:nvm, S.ST_MMU_PAGES]
    return int(np.maximum(0, np.minimum(events * levels, full.astype(np.int64) - held)).sum())


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


CR0_RESET = 0x60000010   # CR0 after RESET / INIT: CD, NW, ET
VR_FILLS = {S.VR_CR0: CR0_RESET, S.VR_RFLAGS: 2, S.VR_ROOT: -1, **{S.VR_PREV_ROOT + i: -1 for i in range(3)},
            **{S.VR_PAE_ROOT + i: -1 for i in range(4)}, S.VR_EPTP: -1,
            S.VR_ALT_ROOT: -1, **{S.VR_ALT_ROOT + (S.VR_PREV_ROOT - S.VR_ROOT) + i: -1 for i in range(3)}}


def new_shadow_state(rows):
    return S.ShadowState(
        trans=np.zeros((rows, 512), np.int64), pl=np.zeros((0, 2), np.int64), rn=np.zeros((0, 2), np.int64),
        rmap=np.zeros((0, S.NRMF), np.int64), wtrack=np.zeros(0, np.int32),
        hash=np.zeros(0, np.int64), ctl=np.concatenate([np.zeros(S.SH_SCRATCH, np.int64), np.full(K.SC_SIZE, -1)]),
    )


def new_vcpu_regs(n):
    return S.VcpuRegs(rec=_records(n, S.NVRF, VR_FILLS))


def gm_table(hcap):
    """An empty guest-memory key table of ``hcap`` (key, row) slots."""
    ht = np.zeros((hcap, S.NGMH), np.int64)
    ht[:, S.GMH_KEY] = -1
    return ht


def new_guest_mem(rows=16, hcap=64):
    return S.GuestMem(hash=gm_table(hcap), page=np.zeros((rows, 512), np.int64), free=np.zeros(rows, np.int64),
                      ctl=np.zeros(GM.NGMCTL, np.int64))


class Arena:
    """Owns every struct the kernels read and every pool carved out of them; the only place they grow.

    ``pa`` pages (kvm_mmu_page + its table), ``vt`` VMs, ``st`` memslots, ``ct`` vCPUs' PML buffers and
    dirty rings, ``vr`` vCPU registers and roots, ``sh`` the shadow MMU's extras, ``gm`` guest memory.
    A kernel is handed the tuples (or the parts) it reads; Python code grows them only through the methods
    here, which replace a tuple whole.
    """

    # pool -> the record tuple whose field (of the same name) it is
    POOLS = {"lpage": "st", "dirty": "st", "host": "st", "order": "st", "ring": "ct",
             "hash": "sh", "rmap": "sh", "wtrack": "sh"}

    def __init__(self, pml=False, ages=False):
        self.pa = new_page_arena()
        self.vt = new_vm_table()
        self.st = new_slot_table()
        self.ct = new_vcpu_table(pml=pml)
        self.vr = new_vcpu_regs(0)
        self.sh = new_shadow_state(0)
        self.gm = new_guest_mem()
        self.pml = pml
        self.ages = ages           # reclaim keeps an age byte per host page (st.age, beside st.host)
        self.used = dict.fromkeys(self.POOLS, 0)

    def tuples(self):
        """Every record tuple (for footprint)."""
        return (self.pa, self.vt, self.st, self.ct, self.sh, self.gm, self.vr)

    # ------------------------------------------------------------------ pools
    def alloc(self, pool, n, fill=None):
        """``n`` entries of ``pool`` (rows for record pools); their offset.  ``fill``: their start value."""
        return int(self.alloc_many(pool, n, 1, fill)[0])

    def alloc_many(self, pool, n, count, fill=None):
        """``count`` regions of ``n`` entries each of ``pool``; their offsets."""
        name = self.POOLS[pool]
        rec = getattr(self, name)
        arr = getattr(rec, pool)
        off = self.used[pool]
        need = off + n * count
        if need > arr.shape[0]:
            arr = _grow(arr, max(need, 2 * arr.shape[0]))
            rec = rec._replace(**{pool: arr})
            if pool == "host":
                rec = sync_host_pools(rec, self.ages)
            setattr(self, name, rec)
        self.used[pool] = need
        if fill is not None:
            arr[off:need] = fill
        return off + n * np.arange(count, dtype=np.int64)

    # ------------------------------------------------------------------ records
    def grow_pages(self, min_free, exact=False):
        """At least ``min_free`` rows on the page arena's free stack (by doubling unless ``exact``)."""
        self.pa = grow_page_arena(self.pa, min_free, exact)

    def grow_pages_for(self, rows):
        """Room for ``rows`` more table rows, sized from the work (``tdp_rows_bound``) rather than doubled: at least
        an eighth of the arena, so that many small batches do not copy it over and over."""
        self.grow_pages(max(rows, self.pa.spt.shape[0] // 8) + S.MAX_ROWS_PER_EVENT, exact=True)

    def grow_vms(self, need):
        self.vt = grow_vm_table(self.vt, need)

    def grow_vcpus(self, need):
        self.ct = grow_vcpu_table(self.ct, need, self.pml)

    def add_vcpu_regs(self, n):
        """Registers (at RESET) for ``n`` more vCPUs; the global index of the first."""
        first = self.vr.rec.shape[0]
        self.vr = S.VcpuRegs(rec=np.concatenate([self.vr.rec, new_vcpu_regs(n).rec]))
        return first

    def grow_slots(self, need):
        self.st = grow_slot_records(self.st, need)

    def topup_shadow(self):
        """mmu_topup_memory_caches for the shadow MMU: a shadowed_translation row per page row, and free
        parent-pte links (pl) and rmap nodes (rn) chained on their free lists."""
        sh = self.sh
        rows = self.pa.spt.shape[0]
        if sh.trans.shape[0] < rows:
            sh = sh._replace(trans=_grow(sh.trans, rows))
        for name, free_i, avail_i, want in (("pl", S.SH_PL_FREE, S.SH_PL_AVAIL, 64),
                                            ("rn", S.SH_RN_FREE, S.SH_RN_AVAIL, 256)):
            if sh.ctl[avail_i] >= want:
                continue
            old = getattr(sh, name).shape[0]
            new = max(2 * old, old + want)
            nodes = _grow(getattr(sh, name), new)
            # chain the new nodes in front of the free list
            nodes[old:new - 1, S.NODE_NEXT] = np.arange(old + 1, new)
            nodes[new - 1, S.NODE_NEXT] = sh.ctl[free_i] if sh.ctl[avail_i] > 0 else -1
            sh.ctl[free_i] = old
            sh.ctl[avail_i] += new - old
            sh = sh._replace(**{name: nodes})
        self.sh = sh

    def reserve_guest_mem(self, n):
        """Room for ``n`` more guest-memory pages: free rows, and a key table at most 1/GM_MAX_LOAD full."""
        gm = self.gm
        used, keys, nfree = (int(gm.ctl[i]) for i in (GM.GM_USED, GM.GM_KEYS, GM.GM_NFREE))
        page, free = gm.page, gm.free
        if page.shape[0] - used + nfree < n:
            page = _grow(page, max(2 * page.shape[0], used + n))
            free = _grow(free, page.shape[0])
        ht = gm.hash
        if GM.GM_MAX_LOAD * (keys + n) > ht.shape[0]:
            cap = ht.shape[0]
            while GM.GM_MAX_LOAD * (keys + n) > cap:
                cap *= 2
            ht = gm_table(cap)
            GM.gm_rehash(gm.hash, ht)
        self.gm = S.GuestMem(hash=ht, page=page, free=free, ctl=gm.ctl)
