"""The time model: simulated time for KVM's MMU work, per vCPU, with ``mmu_lock`` contention (docs/time.md).

``CostModel`` is the cost table (nanoseconds per unit of work, each key tied to the statistic that counts
that work and documented with its source).  ``Timing`` is the Host's mixin: with ``Host(time=...)`` every
batch runs through kernels/timeline.py, which interleaves a VM's vCPUs by their clocks and charges each event
for the change it made to the VM's statistics.  Work no event was charged for (ioctls: dirty-log GET/CLEAR,
enabling logging, memslot changes, notifiers, reclaim) is charged to the VM's own thread at ``sim_end``.
Without a cost model nothing here runs and every result is as without it.
"""

import math
import os
import tomllib
from pathlib import Path

import numpy as np

from .errors import BatchMMUError, bad
from .kernels import state as S
from .kernels import timeline as T

PS = 1000   # picoseconds per nanosecond: the kernels count time in int64 ps

_V, _M, _L = T.PART_VCPU, T.PART_MM, T.PART_LOCK
_BOTH = (T.KIND_TDP_MMU, T.KIND_SHADOW)
_TDP = (T.KIND_TDP_MMU,)
_SHADOW = (T.KIND_SHADOW,)

# (section, key, default ns, statistic (None: special), part, kinds, what and where the figure comes from)
ENTRIES = (
    ("guest", "access", 3.0, None, _V, _BOTH,
     "the guest's own work per access (memstress: one 8-byte store or load and the loop)"),
    ("guest", "walk_ref", 1.0, "walk_refs", _V, _BOTH,
     "one memory reference of a hardware page walk, cached (perf_limits.md: 43-64 M random 4-level walks/s)"),
    ("exit", "vm_exit", 350.0, "pf_taken", _V, _BOTH,
     "an EPT violation / #NPF exit and the VM entry after it, with kvm_mmu_page_fault's dispatch: with fast_fault "
     "0.5 us per write-protection fault, the eager-split series' iteration-2 dirty pass (0.13 s for 96 vCPUs x "
     "1 GiB)"),
    ("exit", "guest_fault", 300.0, "pf_guest", _V, _BOTH, "injecting a #PF into the guest"),
    ("exit", "emulate", 3000.0, "pf_emulate", _V, _BOTH, "x86_emulate_instruction of the faulting instruction"),
    ("host", "fault_in", 2000.0, "host_pages_faulted_in", _V, _BOTH,
     "get_user_pages of a page not yet present: allocate, zero 4 KiB, charge the memcg"),
    ("host", "fault_in_serial", 210.0, "host_pages_faulted_in", _M, _BOTH,
     "the serialized share of that host fault (mmap_lock cacheline, LRU and zone locks): the TDP MMU's populate "
     "in the 2021 parallel-faults series, 16.11 s for 96 vCPUs x 3 GiB = 75.5 M faults"),
    ("host", "gup", 300.0, "pf_fixed", _V, _BOTH,
     "kvm_faultin_pfn of a page already present (hva_to_pfn: get_user_pages_fast), outside mmu_lock"),
    ("host", "major_fault", 30000.0, "host_major_faults", _V, _BOTH, "a swap-in from SSD"),
    ("host", "thp_split", 5000.0, "host_thp_splits", _V, _BOTH, "split_huge_pmd + split_huge_page"),
    ("host", "reclaim", 1000.0, "host_pages_reclaimed", _V, _BOTH, "reclaiming one host page (rmap walk, unmap)"),
    ("tdp_mmu", "fault", 300.0, "pf_fixed", _L, _TDP,
     "kvm_tdp_mmu_map under read_lock(mmu_lock): the walk and the cmpxchg of the new SPTEs"),
    ("tdp_mmu", "read_lock_word", 105.0, None, _L, _TDP,
     "read_lock + read_unlock of mmu_lock by a fault: the atomics on the lock word (and the VM-wide page counters) "
     "move its cacheline, one reader at a time when many contend: the eager-split series' baseline (v5.17), "
     "96 vCPUs x 1 GiB re-faulting every 4K page under the read lock in 2.75 s = 25.2 M faults"),
    ("tdp_mmu", "table_page", 200.0, "mmu_pages", _L, _TDP, "a page-table page linked or freed"),
    ("tdp_mmu", "spurious", 100.0, "pf_spurious", _L, _TDP, "a fault another vCPU already fixed"),
    ("tdp_mmu", "fast_fault", 150.0, "pf_fast", _V, _TDP, "fast_page_fault: lockless cmpxchg of one SPTE"),
    ("tdp_mmu", "split", 30000.0, "pages_split", _L, _TDP,
     "tdp_mmu_split_huge_page: a new table page of 512 SPTEs under the read lock: the eager-split series' first "
     "CLEAR, 1.67 s - 0.05 s for 96 x 513 splits"),
    ("tdp_mmu", "mmio", 500.0, "pf_mmio_spte_created", _L, _TDP, "an MMIO SPTE installed"),
    ("tdp_mmu", "write_protect", 17.0, "pages_write_protected", _L, _TDP,
     "clearing a writable bit for dirty logging (cloud-hypervisor #8899: start_dirty_log 4-5 ms per GiB)"),
    ("shadow_mmu", "fault", 1150.0, "pf_fixed", _L, _SHADOW,
     "the shadow MMU's fault under write_lock(mmu_lock) (legacy TDP, shadow paging, nested): the legacy MMU's "
     "populate in the 2021 parallel-faults series, 110.19 s / 75.5 M faults = 1.46 us with its rmap"),
    ("shadow_mmu", "rmap", 150.0, "rmap_entries", _L, _SHADOW, "pte_list_add / pte_list_remove"),
    ("shadow_mmu", "table_page", 400.0, "mmu_pages", _L, _SHADOW,
     "kvm_mmu_get_shadow_page: hash insert, account_shadowed, link (or free on zap)"),
    ("shadow_mmu", "cache_miss", 150.0, "mmu_cache_miss", _L, _SHADOW, "a hash miss before the allocation"),
    ("shadow_mmu", "spurious", 100.0, "pf_spurious", _L, _SHADOW, "a fault another vCPU already fixed"),
    ("shadow_mmu", "fast_fault", 150.0, "pf_fast", _V, _SHADOW, "fast_page_fault: lockless cmpxchg of one SPTE"),
    ("shadow_mmu", "zap", 300.0, "mmu_shadow_zapped", _L, _SHADOW, "kvm_mmu_prepare_zap_page of one shadow page"),
    ("shadow_mmu", "pte_write", 500.0, "mmu_pte_write", _L, _SHADOW, "kvm_mmu_track_write on a shadowed gpte"),
    ("shadow_mmu", "unsync", 300.0, "mmu_unsync", _L, _SHADOW, "marking a shadow page unsync (or syncing it)"),
    ("shadow_mmu", "split", 1200.0, "pages_split", _L, _SHADOW, "a huge SPTE split through the rmaps"),
    ("shadow_mmu", "mmio", 500.0, "pf_mmio_spte_created", _L, _SHADOW, "an MMIO SPTE installed"),
    ("shadow_mmu", "write_protect", 25.0, "pages_write_protected", _L, _SHADOW,
     "rmap_write_protect of one SPTE for dirty logging or a shadowed gpte"),
    ("tlb", "flush", 300.0, "tlb_flush", _V, _BOTH, "a local TLB flush request serviced at VM entry"),
    ("tlb", "invlpg", 300.0, "invlpg", _V, _BOTH, "an INVLPG exit"),
    ("tlb", "remote_flush", 1000.0, None, _L, _BOTH, "kvm_flush_remote_tlbs: the request and the wait"),
    ("tlb", "remote_flush_per_vcpu", 150.0, None, _L, _BOTH, "... plus one IPI round trip per other vCPU"),
    ("dirty_log", "pml_flush", 400.0, "pml_flushes", _V, _BOTH, "draining a PML buffer into the bitmap"),
    ("dirty_log", "pml_full", 1500.0, "pml_full_exits", _V, _BOTH, "a PML-full exit"),
    ("dirty_log", "ring_full", 1500.0, "dirty_ring_full", _V, _BOTH, "a dirty-ring-full exit"),
    ("dirty_log", "ioctl", 2000.0, None, _V, _BOTH,
     "one KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG / KVM_RESET_DIRTY_RINGS: the ioctl, slots_lock, SRCU"),
    ("dirty_log", "bitmap_word", 4.0, None, _V, _BOTH, "one 64-page word of a dirty bitmap copied out (GET)"),
    ("dirty_log", "clear_word", 120.0, None, _L, _BOTH,
     "one 64-page word of KVM_CLEAR_DIRTY_LOG with bits to clear: kvm_arch_mmu_enable_log_dirty_pt_masked walks "
     "its SPTEs (words with none are skipped): the eager-split series' first CLEAR without splitting, 0.05 s for "
     "96 GiB"),
    ("dirty_log", "ring_entry", 20.0, None, _L, _BOTH, "one dirty-ring entry reset (under mmu_lock)"),
    ("memslot", "update", 20000.0, None, _V, _BOTH,
     "KVM_SET_USER_MEMORY_REGION that changes a slot: kvm_swap_active_memslots, synchronize_srcu_expedited"),
    ("notifier", "zap", 100.0, "mmu_notifier_zapped", _L, _BOTH, "one SPTE zapped by an MMU notifier"),
    ("notifier", "age", 30.0, "pages_aged", _L, _BOTH, "one SPTE aged (clear_young)"),
    ("nested", "run", 1500.0, "nested_run", _V, _BOTH, "an emulated VM entry to L2 (vmcs12/vmcb12 sync)"),
    ("nx", "recover", 500.0, "nx_lpage_recovered", _L, _BOTH, "zapping one NX-split page for recovery"),
)
_KEYS = {f"{sec}.{key}": i for i, (sec, key, *_rest) in enumerate(ENTRIES)}
MAX_NS = 1e9    # one cost at most 1 s per unit (kernels multiply per-event counts by it in int64 ps)


class CostModel:
    """The cost table: ``{"section.key": nanoseconds}`` over the defaults (``CostModel.keys()`` lists them).

    ``CostModel()`` is the default table; ``CostModel({"shadow_mmu.fault": 900})`` or
    ``CostModel.load("costs.toml")`` (sections and keys as in docs/time.md) change some of it."""

    def __init__(self, values=None, source="default"):
        self.values = {k: e[2] for k, e in zip(_KEYS, ENTRIES, strict=True)}
        self.source = str(source)
        if values is not None and not isinstance(values, dict):
            raise bad("cost_model", values, "must be a dict of {\"section.key\": nanoseconds}")
        for key, v in (values or {}).items():
            if key not in _KEYS:
                raise bad("cost_model", key, "no such cost key (CostModel.keys() lists them)")
            self.values[key] = _ns(v, key)

    @classmethod
    def keys(cls):
        """``{"section.key": (default ns, statistic or None, what it is and where the figure is from)}``."""
        return {k: (e[2], e[3], e[6]) for k, e in zip(_KEYS, ENTRIES, strict=True)}

    @classmethod
    def load(cls, path):
        """A cost table from a TOML file: ``[section]`` tables of ``key = nanoseconds``."""
        p = Path(os.fspath(path))
        try:
            text = p.read_text()
            data = tomllib.loads(text)
        except (OSError, ValueError) as e:   # ValueError: a path with a NUL byte
            raise BatchMMUError(f"cost model {str(p)!r}: {getattr(e, 'strerror', None) or e}", field="cost_model",
                                value=str(p)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BatchMMUError(f"cost model {str(p)!r}: not TOML: {e}", field="cost_model", value=str(p)) from None
        flat = {}
        for sec, table in data.items():
            if not isinstance(table, dict):
                raise BatchMMUError(f"cost model {str(p)!r} line {_line(text, sec)}: {sec!r} must be a [section] "
                                    "of key = nanoseconds", field="cost_model", value=sec)
            for key, v in table.items():
                name = f"{sec}.{key}"
                if name not in _KEYS:
                    raise BatchMMUError(f"cost model {str(p)!r} line {_line(text, key)}: unknown key {name!r} "
                                        "(docs/time.md lists the keys)", field="cost_model", value=name)
                flat[name] = v
        return cls(flat, source=str(p))

    def __getitem__(self, key):
        return self.values[key]

    def __eq__(self, other):
        return isinstance(other, CostModel) and self.values == other.values

    def __repr__(self):
        changed = {k: v for k, v in self.values.items() if v != ENTRIES[_KEYS[k]][2]}
        return f"CostModel({changed!r}, source={self.source!r})"

    def to_dict(self):
        return dict(self.values)

    def tables(self):
        """(cost int64[NKIND, NPART, NSTAT] ps, base int64[NKIND, NBASE] ps, remote flush ps, ps per vCPU)."""
        cost = np.zeros((T.NKIND, T.NPART, S.NSTAT), np.int64)
        base = np.zeros((T.NKIND, T.NBASE), np.int64)
        for name, (_sec, _key, _d, stat, part, kinds, _w) in zip(_KEYS, ENTRIES, strict=True):
            ps = int(round(self.values[name] * PS))
            if stat is not None:
                for kd in kinds:
                    cost[kd, part, S.STAT_NAMES.index(stat)] += ps
            elif name == "guest.access":
                base[:, T.BASE_EVENT] = ps
            elif name == "tdp_mmu.read_lock_word":
                base[T.KIND_TDP_MMU, T.BASE_READ_WORD] = ps
        # a fast page fault counts pf_fixed too, but neither faults the page in nor takes mmu_lock
        fast, fixed = S.STAT_NAMES.index("pf_fast"), S.STAT_NAMES.index("pf_fixed")
        cost[:, :, fast] -= cost[:, :, fixed]
        return cost, base, int(round(self.values["tlb.remote_flush"] * PS)), \
            int(round(self.values["tlb.remote_flush_per_vcpu"] * PS))


def _ns(v, key):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise bad(key, v, "must be a number of nanoseconds")
    f = float(v) if not isinstance(v, int) or abs(v) < 1 << 60 else math.inf
    if not math.isfinite(f) or not 0 <= f <= MAX_NS:
        raise bad(key, v, f"must be a number of nanoseconds in [0, {MAX_NS:.0e}]")
    return f


def _line(text, word):
    for n, line in enumerate(text.splitlines(), 1):
        if word in line:
            return n
    return "?"


def timed_kernels_cold():
    """Whether numba's cache lacks one of the time model's four wrappers (kernels/timeline.py ``timed_*``): they
    are then compiled (each links its batch kernel's code: 10-25 s apiece on 2 cores)."""
    from pathlib import Path as _P

    from .kernels import CACHE_DIR
    found = _P(CACHE_DIR).rglob("timeline.timed_*.nbi") if _P(CACHE_DIR).exists() else ()
    have = {p.name.split(".")[1].split("-")[0] for p in found}   # timeline.<name>-<line>.py311.nbi
    return not {"timed_access_batch", "timed_shadow_batch", "timed_tdp2d_batch", "timed_l2_batch"} <= have


def cost_model_arg(time, field="time"):
    """``Host(time=...)``: None/False (off), True (the default table), a CostModel or a TOML path."""
    if time is None or time is False or (isinstance(time, np.bool_) and not time):
        return None
    if time is True or (isinstance(time, np.bool_) and time):
        return CostModel()
    if isinstance(time, CostModel):
        return CostModel(time.values, time.source)   # a copy: the kernels' tables are made from it once
    if isinstance(time, (str, os.PathLike)):
        return CostModel.load(time)
    raise bad(field, time, "must be True, False, a bm.CostModel or the path of a cost-model TOML file")


def _grow(a, n, fill=0):
    if a.shape[0] >= n:
        return a
    out = np.full((max(n, 2 * a.shape[0]),) + a.shape[1:], fill, a.dtype)
    out[:a.shape[0]] = a
    return out


def new_state(cm):
    cost, base, _, _ = cm.tables()
    z = lambda *shape: np.zeros(shape, np.int64)  # noqa: E731
    return T.TimeState(cost=cost, base=base, clock=z(16), vm=z(16, T.NTV), charged=z(16, S.NSTAT),
                       hist=z(T.NBINS + 1), heap=z(16), head=np.full(16, -1, np.int64),
                       ctl=np.array([0, -1], np.int64), race_key=np.full((16, T.NRACE), -1, np.int64),
                       race_end=z(16, T.NRACE),
                       before=z(S.NSTAT), ev1=z(1, T.NEVF), res1=z(1, T.NRESF), vm1=z(1), vcpu1=z(1), addr1=z(1),
                       kind1=z(1), out1=np.zeros(1, np.int8), err1=z(1))


# the lock counters a phase reports (TimeState.vm columns)
_LOCK_COLS = {"mmu_lock": (T.TV_RD_ACQ, T.TV_WR_ACQ, T.TV_HOLD, T.TV_WAIT, T.TV_CONTENDED),
              "mmap_lock": (None, T.TV_MM_ACQ, T.TV_MM_HOLD, T.TV_MM_WAIT, T.TV_MM_CONTENDED)}


class Timing:
    """Mixin of ``batchmmu.host.Host``: the time model's state and its phases (``sim_begin`` / ``sim_end``)."""

    def _time_init(self, time):
        self.cost_model = cost_model_arg(time)
        self._tm = new_state(self.cost_model) if self.cost_model is not None else None
        self._sim_mark = None
        # VM -> [outside, under mmu_lock]: ioctl work charged outside the statistics (Python ints: no wrap-around)
        self._sim_host_ps = {}

    def _sim_charge(self, vm, key, units=1):
        """Charge ``units`` of ``key`` (a cost-table key without a statistic) to VM ``vm``'s own thread."""
        if self._tm is not None:
            acc = self._sim_host_ps.setdefault(vm, [0, 0])
            acc[ENTRIES[_KEYS[key]][4] == _L] += int(round(self.cost_model[key] * PS)) * int(units)

    @property
    def timed(self):
        """Whether the time model is on (``Host(time=...)``)."""
        return self._tm is not None

    def _time_add_vms(self, vms, vcpus, kind):
        tm = self._tm
        if tm is None:
            return
        nvcpu = self.vr.rec.shape[0]
        _, _, flush, per = self.cost_model.tables()
        self._tm = tm = tm._replace(clock=_grow(tm.clock, nvcpu), heap=_grow(tm.heap, nvcpu),
                                    head=_grow(tm.head, nvcpu, -1), vm=_grow(tm.vm, self.nvm),
                                    charged=_grow(tm.charged, self.nvm), race_key=_grow(tm.race_key, self.nvm, -1),
                                    race_end=_grow(tm.race_end, self.nvm))
        tm.vm[vms] = 0
        tm.vm[vms, T.TV_KIND] = T.KIND_TDP_MMU if kind == S.MMU_TDP else T.KIND_SHADOW
        tm.vm[vms, T.TV_FLUSH] = flush + per * (int(vcpus) - 1)
        tm.charged[vms] = 0
        tm.race_key[vms] = -1

    def _sched(self, ev_vm, ev_vcpu):
        """Program order and the scheduler heap for a batch: (nxt, ran) for a timed kernel."""
        tm = self._tm
        if tm.ctl[T.CTL_HEAP]:   # a batch that stopped with an error: its vCPUs are still queued
            tm.head.fill(-1)
        n = ev_vm.shape[0]
        nxt = np.empty(n, np.int64)
        T.sched_build(np.ascontiguousarray(ev_vm), np.ascontiguousarray(ev_vcpu), self.vt.vcpu_off, tm.clock,
                      tm.head, nxt, tm.heap, tm.ctl)
        return nxt, np.zeros(n, np.int8)

    # ------------------------------------------------------------------ phases
    def sim_begin(self):
        """Start a phase of simulated time: every vCPU's clock and every lock at 0 (the vCPUs start together,
        as the selftests' vCPU threads do after a barrier)."""
        self._need_time()
        tm = self._tm
        tm.clock[:] = 0
        tm.vm[:, [T.TV_W_FREE, T.TV_R_FREE, T.TV_MM_FREE, T.TV_WORD_FREE]] = 0
        tm.hist[:] = 0
        tm.race_key[:] = -1
        n = self.nvm
        self._sim_host_ps = {}
        self._sim_mark = (self.vt.stats[:n].copy(), tm.charged[:n].copy(), tm.vm[:n].copy())

    def sim_end(self):
        """Figures of the phase since ``sim_begin`` (docs/time.md): ``sim_seconds`` (the last VM to finish),
        per VM ``sim_seconds_per_vm``, vCPU times, fault latencies and lock statistics."""
        self._need_time()
        if self._sim_mark is None:
            raise BatchMMUError("sim_end: call sim_begin first", field="sim_end", value=None)
        tm = self._tm
        n = self.nvm
        st0, ch0, tv0 = self._sim_mark
        k = st0.shape[0]   # VMs created during the phase start from zero
        st0 = np.concatenate([st0, np.zeros((n - k, S.NSTAT), np.int64)])
        ch0 = np.concatenate([ch0, np.zeros((n - k, S.NSTAT), np.int64)])
        tv0 = np.concatenate([tv0, np.zeros((n - k, T.NTV), np.int64)])
        # ioctl work no event was charged for, on each VM's own thread (no vCPU runs meanwhile in a phase);
        # Python ints: a huge cost table cannot wrap around
        rest = np.abs((self.vt.stats[:n] - st0) - (tm.charged[:n] - ch0)).astype(object)
        per_unit = tm.cost.sum(axis=1)[tm.vm[:n, T.TV_KIND]].astype(object)     # [n, NSTAT]
        host_ps = [int(x) for x in (rest * per_unit).sum(axis=1)] if n else []
        for v in range(n):
            host_ps[v] += int(rest[v, S.ST_REMOTE_TLB_FLUSH]) * int(tm.vm[v, T.TV_FLUSH]) + \
                sum(self._sim_host_ps.get(v, ()))
        off = self.vt.vcpu_off[:n]
        clock = tm.clock
        vmin = [int(clock[o:o + c].min()) if c else 0 for o, c in zip(off, self._vcpus[:n], strict=True)]
        vmax = [int(clock[o:o + c].max()) if c else 0 for o, c in zip(off, self._vcpus[:n], strict=True)]
        d = tm.vm[:n] - tv0
        # per VM: its end (last vCPU, then its thread's ioctl work), its thread's work, its vCPUs' min and max
        out = {"per_vm": [[vmax[v] + host_ps[v], host_ps[v], vmin[v], vmax[v]] for v in range(n)],
               "hist": tm.hist.tolist(), "faults": int(d[:, T.TV_FAULTS].sum())}
        for lock, cols in _LOCK_COLS.items():
            rd, wr, hold, wait, cont = cols
            out[lock] = {"read_acquisitions": int(d[:, rd].sum()) if rd is not None else 0,
                         "write_acquisitions": int(d[:, wr].sum()), "hold_ps": int(d[:, hold].sum()),
                         "wait_ps": int(d[:, wait].sum()), "contended": int(d[:, cont].sum())}
        self._sim_mark = None
        return out

    def _sim_settle(self, vm, split=False):
        """The ioctl work VM ``vm``'s thread did since the last settle (or sim_begin), in ps, now charged (sim_end
        leaves it out): the migration and dirty-rate ops time their syncs with it.  ``split``: (before mmu_lock,
        under it, after it: the remote TLB flushes, which the ioctls do once they unlock) instead of the sum."""
        tm = self._tm
        st0, ch0, _ = self._sim_mark
        base0 = st0[vm] if vm < st0.shape[0] else 0
        c0 = ch0[vm] if vm < ch0.shape[0] else 0
        rest = (self.vt.stats[vm] - base0) - (tm.charged[vm] - c0)
        units = np.abs(rest).astype(object)
        cost = tm.cost[tm.vm[vm, T.TV_KIND]].astype(object)
        out, lock = self._sim_host_ps.pop(vm, (0, 0))
        out += int((units * (cost[T.PART_VCPU] + cost[T.PART_MM])).sum())
        lock += int((units * cost[T.PART_LOCK]).sum())
        after = int(units[S.ST_REMOTE_TLB_FLUSH]) * int(tm.vm[vm, T.TV_FLUSH])
        tm.charged[vm] += rest
        return (out, lock, after) if split else out + lock + after

    def _sim_hold(self, vm, at, hold, write=True, yields=False, always=False):
        """VM ``vm``'s own thread (an ioctl) asks for mmu_lock at ``at`` ps and holds it ``hold`` ps, among the
        vCPUs' holders: the fair rwlock of kernels/timeline.py (a writer waits for every holder before it, a
        reader for the writers), counted in the VM's lock figures.  A holder that ``yields``
        (cond_resched_rwlock_*, tdp_mmu_iter_cond_resched) lets a waiting vCPU in at its next step, so it holds
        no vCPU up.  An ioctl with no work under the lock takes it only if ``always`` (CLEAR_DIRTY_LOG does).
        Returns (when it releases the lock, how long it waited)."""
        tv = self._tm.vm[vm]
        at, hold = int(at), int(hold)
        if hold <= 0 and not always:
            return at, 0
        granted = max(at, int(tv[T.TV_W_FREE]), int(tv[T.TV_R_FREE]) if write else 0)
        tv[T.TV_WR_ACQ if write else T.TV_RD_ACQ] += 1
        tv[T.TV_HOLD] += hold
        if granted > at:
            tv[T.TV_WAIT] += granted - at
            tv[T.TV_CONTENDED] += 1
        end = granted + hold
        if not yields:
            if write:
                tv[T.TV_W_FREE] = end
            else:
                tv[T.TV_R_FREE] = max(int(tv[T.TV_R_FREE]), end)
        return end, granted - at

    def _sim_writer(self, vm):
        """Whether VM ``vm``'s MMU takes mmu_lock for write where the TDP MMU takes it for read."""
        return int(self._tm.vm[vm, T.TV_KIND]) != T.KIND_TDP_MMU

    def _need_time(self):
        if self._tm is None:
            raise BatchMMUError("the time model is off: create the Host with time=True (or a bm.CostModel)",
                                field="time", value=None)


def latency(hist):
    """(p50, p99, max) fault latency in ns from a merged histogram (bin upper edges; the max is exact)."""
    h = np.asarray(hist[:T.NBINS], np.int64)
    total = int(h.sum())
    if not total:
        return {"count": 0, "p50_ns": 0.0, "p99_ns": 0.0, "max_ns": 0.0}
    c = np.cumsum(h)
    def q(f):
        b = int(np.searchsorted(c, math.ceil(f * total)))
        return min(2.0 ** ((b + 1) / 8), float(hist[T.NBINS])) / PS
    return {"count": total, "p50_ns": round(q(0.5), 3), "p99_ns": round(q(0.99), 3),
            "max_ns": round(int(hist[T.NBINS]) / PS, 3)}


def merge(figs, parts):
    """One phase's figures over shards, ``figs[i]`` from the shard of global VM ids ``parts[i]``: per VM in VM order
    (VMs are independent: the phase ends with the last VM)."""
    nvm = sum(len(p) for p in parts)
    out = {"per_vm": [None] * nvm, "faults": sum(f["faults"] for f in figs),
           "hist": np.sum([f["hist"] for f in figs], axis=0).tolist()}
    for f, part in zip(figs, parts, strict=True):
        for v, row in zip(part, f["per_vm"], strict=True):
            out["per_vm"][int(v)] = row
    out["hist"][T.NBINS] = max(f["hist"][T.NBINS] for f in figs)
    for lock in _LOCK_COLS:
        out[lock] = {k: sum(f[lock][k] for f in figs) for k in figs[0][lock]}
    return out


def chain(a, b):
    """Figures of two steps of one shard run one after the other (the epochs of a phase): per VM, the sums."""
    out = {"faults": a["faults"] + b["faults"],
           "per_vm": [[x + y for x, y in zip(ra, rb, strict=True)]
                      for ra, rb in zip(a["per_vm"], b["per_vm"], strict=True)]}
    out["hist"] = [x + y for x, y in zip(a["hist"], b["hist"], strict=True)]
    out["hist"][T.NBINS] = max(a["hist"][T.NBINS], b["hist"][T.NBINS])
    for lock in _LOCK_COLS:
        out[lock] = {k: a[lock][k] + b[lock][k] for k in a[lock]}
    return out


def phase_record(fig):
    """The ``sim_*`` fields of a phase record (JSON) from merged figures."""
    h = fig["hist"]
    rows = fig["per_vm"] or [[0, 0, 0, 0]]
    rec = {"sim_seconds": max(r[0] for r in rows) / 1e12,
           "sim": {"vcpu_seconds": {"min": min(r[2] for r in rows) / 1e12, "max": max(r[3] for r in rows) / 1e12},
                   "host_seconds": max(r[1] for r in rows) / 1e12,
                   "fault_latency": latency(h),
                   # [bin's upper edge in ns, faults] of every non-empty bin: the latency CDF
                   "fault_latency_hist": [[round(2.0 ** ((b + 1) / 8) / PS, 3), int(h[b])] for b in range(T.NBINS)
                                          if h[b]],
                   "per_vm_seconds": [r[0] / 1e12 for r in rows]}}
    for lock in _LOCK_COLS:
        d = fig[lock]
        rec["sim"][lock] = {"read_acquisitions": d["read_acquisitions"], "write_acquisitions": d["write_acquisitions"],
                            "contended": d["contended"], "hold_seconds": d["hold_ps"] / 1e12,
                            "wait_seconds": d["wait_ps"] / 1e12}
    return rec
