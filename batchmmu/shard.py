"""A shard: some VMs of a scenario on their own Host, driven phase by phase.

Every backend (serial, process, ray) runs the same ``Shard`` code; the only thing
exchanged between shards is a phase's results at the phase boundary (the epoch), so
statistics are identical for any number of workers.  Random choices are drawn per
(seed, VM, vCPU, pass) or, for the selftests' guests (``batchmmu.memstress``), from each
vCPU's own LCG stream (seeded ``seed + vcpu_idx``, as in every VM of the selftest), never
from a stream shared between VMs.
"""

import time

import numpy as np

from . import constants as _constants
from . import guestos, hostops, migrate, nestedops, trace
from . import memstress as ms
from .constants import ACC_FETCH, ACC_WRITE, MEM_LOG_DIRTY_PAGES, OUTCOME_NAMES
from .errors import BatchMMUError
from .host import Host
from .nested import enter_identity_l2
from .reclaim import host_figures, shard_step
from .timemodel import CostModel
from .units import parse_size

TEST_SLOT = 1
CHUNK_EVENTS = 1 << 22
_MEMO_EVENTS = 1 << 20          # memoise generated streams of VMs up to this many events per chunk

_BACKING_PAGE = {"4k": 4096, "thp": 2 << 20, "hugetlb-2m": 2 << 20, "hugetlb-1g": 1 << 30}
_LEAF_LEVEL = {"4k": 1, "thp": 2, "hugetlb-2m": 2, "hugetlb-1g": 3}
_LOGGING_OPS = ("enable_logging", "dirty_log")


class Workload(dict):
    """The resolved scenario (plain data, picklable): host, groups, workload, phases."""


def _region_bytes(spec, g):
    if spec.get("region_bytes"):
        return spec["region_bytes"]
    return int(g.get("vcpus", 1)) * spec["bpv"]


def _slot_backing(spec, g):
    return spec["workload"].get("slot_backing", g.get("backing", spec["host"].get("backing", "thp")))


def plan(spec):
    """Per global VM id: (group index, vcpus, weight).  Weight = events per pass + memory."""
    out = []
    for gi, g in enumerate(spec["groups"]):
        vcpus = int(g.get("vcpus", 1))
        w = max(vcpus * spec["bpv"], _region_bytes(spec, g) * (vcpus if spec.get("overlap") else 1))
        out += [(gi, vcpus, w)] * int(g.get("count", 1))
    return out


# Python bytes per VM of plan() and split() (a tuple, list slots, sort keys): checked before building them
PLAN_BYTES_PER_VM = 400


def vm_count(spec):
    return sum(int(g.get("count", 1)) for g in spec["groups"])


def split(spec, workers):
    """Deal VMs to workers by weight (greedy, heaviest first, ties by id): sorted id lists."""
    if workers < 1:
        raise BatchMMUError(f"workers={workers!r}: must be at least 1", field="workers", value=workers)
    from .scenario import refuse_memory
    refuse_memory(vm_count(spec) * PLAN_BYTES_PER_VM + estimate_groups(spec), vm_count(spec))
    vms = plan(spec)
    order = sorted(range(len(vms)), key=lambda v: (-vms[v][2], v))
    load = [0] * workers
    parts = [[] for _ in range(workers)]
    for v in order:
        k = min(range(workers), key=lambda i: (load[i], i))
        parts[k].append(v)
        load[k] += vms[v][2]
    return [sorted(p) for p in parts if p]


def _logs(spec):
    return any(ph["op"] in _LOGGING_OPS and ph.get("enable", True) for ph in spec["phases"])


def vm_table_rows(spec, gi):
    """Upper bound of page-table pages one VM of group ``gi`` builds (its test region fully mapped;
    4K leaves where the scenario turns dirty logging on, which splits huge pages)."""
    from .arena import table_rows
    g = spec["groups"][gi]
    leaf = 1 if _logs(spec) else _LEAF_LEVEL.get(_slot_backing(spec, g), 1)
    pages = _region_bytes(spec, g) // 4096
    return table_rows(pages, leaf, int(g.get("tdp_levels", 4))) + spec.get("slots", 1)


def estimate_groups(spec, shards=1):
    """Bytes all VMs of the run need, in O(VM groups): the sum of estimate_memory over ``shards`` shards."""
    from .arena import bytes_per_row
    rows = pages = 0
    for gi, g in enumerate(spec["groups"]):
        count = int(g.get("count", 1))
        rows += count * vm_table_rows(spec, gi)
        pages += count * (_region_bytes(spec, g) // 4096)
    events = shards * min(CHUNK_EVENTS, max(1, pages)) * 80
    verify = pages if spec.get("verify", "off") != "off" else 0
    return rows * bytes_per_row() + pages // 8 + pages // 128 + vm_count(spec) * 2048 + events + verify


def estimate_memory(spec, vm_ids):
    """Bytes a shard of these VMs needs: page tables, metadata, bitmaps, one chunk of events."""
    from .arena import bytes_per_row
    vms = plan(spec)
    rows = sum(vm_table_rows(spec, vms[v][0]) for v in vm_ids)
    pages = sum(_region_bytes(spec, spec["groups"][vms[v][0]]) // 4096 for v in vm_ids)
    per_vm = 2048  # VM table, stats, memslot records, slot lists
    events = min(CHUNK_EVENTS, max(1, pages)) * 80  # vm, vcpu, addr, kind, sort copies, results
    verify = pages if spec.get("verify", "off") != "off" else 0
    return rows * bytes_per_row() + pages // 8 + pages // 128 + len(vm_ids) * per_vm + events + verify


def _popcount_bits(words, npages):
    """Bool array of the first ``npages`` bits of uint64 bitmap words (bit i of word w = page 64w+i)."""
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")[:npages].astype(bool)


def _bitmap_words(bits):
    """Bool array -> uint64 bitmap words."""
    n = bits.size
    padded = np.zeros(((n + 63) // 64) * 64, bool)
    padded[:n] = bits
    return np.packbits(padded, bitorder="little").view(np.uint64)


class Shard:
    """The VMs ``vm_ids`` (global ids, sorted) of a scenario on one Host."""

    def __init__(self, spec, seed, vm_ids):
        self.spec, self.seed = spec, seed
        self.gids = np.asarray(vm_ids, np.int64)
        vms = plan(spec)
        host_kw = dict(spec["host"])
        host_kw["memory"] = spec["host_memory"]
        if host_kw.get("overcommit"):
            host_kw["overcommit"] = "epoch"  # the coordinator reclaims for all shards (batchmmu/reclaim.py)
        if spec.get("time") is not None:   # the time model: the cost table's values (picklable for any backend)
            host_kw["time"] = CostModel(spec["time"]["values"], spec["time"]["source"])
        self.host = Host(**host_kw)
        n = len(vm_ids)
        self.vcpus = np.array([vms[v][1] for v in vm_ids], np.int64)
        self.test_base = np.zeros(n, np.int64)
        self.region_pages = np.zeros(n, np.int64)
        self.large_page = np.zeros(n, np.int64)
        self.nslots = int(spec.get("slots", 1))
        region = spec["region"]
        # consecutive ids of one group become one create_vms call
        i = 0
        while i < n:
            gi = vms[vm_ids[i]][0]
            j = i
            while j < n and vms[vm_ids[j]][0] == gi:
                j += 1
            g = dict(spec["groups"][gi])
            g.pop("count", None)
            l2 = g.pop("l2", "identity")
            size = _region_bytes(spec, g)
            if region == "slot0":
                g["memory"] = max(parse_size(g.get("memory", 0), "vm_group.memory"), size)
            local = self.host.create_vms(j - i, **g)
            self._enable_caps(local)
            backing = _slot_backing(spec, g)
            page = _BACKING_PAGE.get(backing, 4096)
            if region == "top":
                # memstress_create_vm: the test region at the top of guest physical memory, aligned down
                # to the backing page size, split evenly into memslots 1..slots
                max_gfn = (1 << (int(g.get("maxphyaddr", 46)) - 12)) - 1
                gpa = ms.region_gpa(max_gfn, size // 4096, page)
                per = size // self.nslots
                for vm in local:
                    for s in range(self.nslots):
                        self.host.set_memslot(int(vm), TEST_SLOT + s, gpa + s * per, per, backing=backing)
                self.test_base[i:j] = gpa
            if g.get("nested") and l2 == "identity":
                for vm in local:   # memstress_setup_nested: every vCPU runs L2 on an identity EPT12
                    enter_identity_l2(self.host, int(vm), [(0, 1 << 32), (int(self.test_base[i]), size)])
            self.region_pages[i:j] = size // 4096
            self.large_page[i:j] = page
            i = j
        self.l1_cursor = {}   # nested test ops (batchmmu/nestedops.py): the next fresh L1 page per local VM
        self.slot = TEST_SLOT if region == "top" else 0
        self.slot_ids = [self.slot + s for s in range(self.nslots)]
        self.slot_pages = self.region_pages // self.nslots
        self.logging = np.zeros(n, bool)
        # each vCPU's guest_random_state, persisting across passes and phases
        self.rng = [(spec.get("seed", ms.GUEST_RANDOM_SEED) + np.arange(v, dtype=np.int64)) & 0xFFFFFFFF
                    for v in self.vcpus]
        self.last_get = {}              # (local vm, slot index) -> bitmap words of the last GET
        # verification: pages written since they were last collected, per VM (flat over the VMs)
        self.verify = spec.get("verify", "off")
        # pages each VM's guest ever wrote (QEMU's sampled dirty rate sees only changed contents)
        self.ever_written = [np.zeros(int(p), bool) for p in self.region_pages] \
            if any(ph.get("op") == "dirty_rate" for ph in spec["phases"]) else None
        self.roff = np.concatenate([[0], np.cumsum(self.region_pages)]).astype(np.int64)
        if self.verify != "off":
            self.pending = np.zeros(int(self.roff[-1]), bool)
            self.extra_ok = np.zeros(n, bool)
        self._phase_name = ""
        self._epoch = None              # (j, n): run epoch j of the phase (its pass j // n, slice j % n)
        self._groups = None             # the phase's vm group filter
        self.group = np.array([vms[v][0] for v in vm_ids], np.int64)
        # size the page arena once for the whole run instead of doubling it on the way
        self.host.reserve_tables(sum(vm_table_rows(spec, vms[v][0]) for v in vm_ids))

    def _enable_caps(self, local):
        spec = self.spec
        for vm in local:
            vm = int(vm)
            if spec.get("manual_protect"):
                self.host.enable_manual_dirty_log_protect(vm, initially_set=bool(spec.get("initially_set")))
            if spec.get("dirty_ring"):
                self.host.enable_dirty_ring(vm, int(spec["dirty_ring"]))

    # ------------------------------------------------------------------ running accesses
    def _run(self, vm, vc, addr, kind, extra):
        """Run a batch.  A vCPU stopped by a soft-full dirty ring (outcome RING_FULL: the access did not
        run) gets its VM's rings harvested and reset, as a VMM does on KVM_EXIT_DIRTY_RING_FULL, and the
        accesses that did not run are run again, in their order."""
        out = self.host.access(vm, vc, addr, kind).outcome
        extra["writes"] = extra.get("writes", 0)
        full = getattr(_constants, "RING_FULL", None)
        todo = np.nonzero(out == full)[0] if full is not None and self.spec.get("dirty_ring") else np.zeros(0, int)
        ran = np.ones(addr.size, bool)
        ran[todo] = False
        self._track_writes(vm[ran], addr[ran], kind[ran], extra)
        while todo.size:
            for v in np.unique(vm[todo]):
                stopped = np.unique(vc[todo][vm[todo] == v]).size
                extra["ring_full_exits"] = extra.get("ring_full_exits", 0) + int(stopped)
                self._harvest(int(v), extra, stopped=True)
            res = self.host.access(vm[todo], vc[todo], addr[todo], kind[todo]).outcome
            ok = res != full
            if not ok.any():
                raise BatchMMUError(f"dirty_ring={self.spec['dirty_ring']}: vCPUs still stopped by a full ring "
                                    "right after a reset; the ring is too small", field="dirty_ring",
                                    value=self.spec["dirty_ring"])
            idx = todo[ok]
            self._track_writes(vm[idx], addr[idx], kind[idx], extra)
            todo = todo[~ok]
        return addr.size

    def _track_writes(self, vm, addr, kind, extra):
        """Count the writes that ran; with verification, note their pages as written."""
        w = (kind & ACC_WRITE) != 0
        extra["writes"] += int(w.sum())
        if self.ever_written is not None and w.any():   # a dirty_rate phase samples pages as QEMU does
            for v in np.unique(vm[w]):
                sel = w & (vm == v)
                page = (addr[sel] - self.test_base[v]) >> 12
                self.ever_written[v][page[(page >= 0) & (page < self.region_pages[v])]] = True
        if self.verify == "off" or not w.any():
            return
        vm, addr = vm[w], addr[w]
        page = (addr - self.test_base[vm]) >> 12
        inside = (page >= 0) & (page < self.region_pages[vm])
        self.pending[self.roff[vm[inside]] + page[inside]] = True

    def _batches(self, gen):
        """Concatenate per-VM event pieces into batches of about CHUNK_EVENTS.  Under the time model each piece
        is a batch of its own: a batch is a barrier for its vCPUs, so where a VM's batches end must not depend on
        the other VMs of the shard."""
        if self.host.timed:
            yield from gen
            return
        buf, n = [], 0
        for ev in gen:
            buf.append(ev)
            n += ev[0].size
            if n >= CHUNK_EVENTS:
                yield tuple(np.concatenate(x) for x in zip(*buf, strict=True))
                buf, n = [], 0
        if buf:
            yield tuple(np.concatenate(x) for x in zip(*buf, strict=True))

    def _drive(self, gen, extra, progress):
        events = 0
        for vm, vc, addr, kind in self._batches(gen):
            events += self._run(vm, vc, addr, kind, extra)
            if progress is not None:
                progress(addr.size)
        return events

    # ------------------------------------------------------------------ event streams
    def _vm_events(self, lvm, pass_no, p0, p1):
        """Events of local VM ``lvm`` for pages p0..p1 of each vCPU's partition, vCPUs round-robin."""
        spec = self.spec
        pages = spec["bpv"] // spec["stride"]
        v = int(self.vcpus[lvm])
        gvm = int(self.gids[lvm])
        offs = np.empty((v, p1 - p0), np.int64)
        kinds = np.empty((v, p1 - p0), np.int64)
        wp = spec["write_percent"]
        for c in range(v):
            rng = np.random.default_rng([self.seed, gvm, c, pass_no])
            order = rng.permutation(pages) if spec["pattern"] == "random" else None
            offs[c] = np.arange(p0, p1) if order is None else order[p0:p1]
            if 0 < wp < 100:
                kinds[c] = np.where(rng.integers(0, 100, pages)[p0:p1] < wp, ACC_WRITE, 0)
            else:
                kinds[c] = ACC_WRITE if wp >= 100 else 0
        base = self.test_base[lvm] + np.arange(v, dtype=np.int64)[:, None] * spec["bpv"]
        addr = (base + offs * spec["stride"]).T.ravel()
        vcpu = np.broadcast_to(np.arange(v, dtype=np.int64), (p1 - p0, v)).ravel()
        return np.full(addr.size, lvm, np.int64), vcpu, addr, kinds.T.ravel()

    def _slice(self, pages):
        """The pages of a pass this epoch covers (all of them outside epochs)."""
        if self._epoch is None:
            return 0, pages
        j, n = self._epoch
        return pages * (j % n) // n, pages * (j % n + 1) // n

    def _passes(self, passes):
        return range(passes) if self._epoch is None else [self._epoch[0] // self._epoch[1]]

    def _runs(self, lvm):
        return self._groups is None or int(self.group[lvm]) in self._groups

    def events(self, pass_no):
        """The ``access`` op's pieces for sequential/random patterns: whole VMs at a time."""
        pages = self.spec["bpv"] // self.spec["stride"]
        lo, hi = self._slice(pages)
        for lvm in range(self.gids.size):
            if not self._runs(lvm):
                continue
            step = max(1, CHUNK_EVENTS // int(self.vcpus[lvm]))
            for p0 in range(lo, hi, step):
                yield self._vm_events(lvm, pass_no, p0, min(hi, p0 + step))

    @staticmethod
    def _interleave(lvm, v, addr2d, kind2d):
        """(v, m) per-vCPU sequences -> one round-robin stream (vCPU 0 access k, vCPU 1 access k, ...)."""
        m = addr2d.shape[1]
        vcpu = np.tile(np.arange(v, dtype=np.int64), m)
        return np.full(v * m, lvm, np.int64), vcpu, addr2d.T.ravel(), kind2d.T.ravel()

    def memstress_events(self, write_percent, random_access, only=None):
        """One memstress pass of every vCPU of every VM, or of local VM ``only`` (each vCPU's stream advances by
        one pass)."""
        spec = self.spec
        overlap = bool(spec.get("overlap"))
        memo = {}
        for lvm in range(self.gids.size):
            if not self._runs(lvm) or (only is not None and lvm != only):
                continue
            v = int(self.vcpus[lvm])
            st = self.rng[lvm]
            pages = int(self.region_pages[lvm]) if overlap else spec["bpv"] // 4096
            if overlap:
                base = np.full(v, self.test_base[lvm], np.int64)
            else:
                base = self.test_base[lvm] + np.arange(v, dtype=np.int64) * spec["bpv"]
            step = max(1, CHUNK_EVENTS // v)
            lo, hi = self._slice(pages)
            for p0 in range(lo, hi, step):
                p1 = min(hi, p0 + step)
                key = (st.tobytes(), base.tobytes(), pages, p0, p1)
                got = memo.get(key)
                if got is None:
                    page, write = ms.memstress_pass(st, pages, write_percent, random_access, p0, p1)
                    addr = base[:, None] + page * 4096
                    kind = np.where(write, ACC_WRITE, 0).astype(np.int64)
                    got = self._interleave(0, v, addr, kind)[1:]
                    if v * (p1 - p0) <= _MEMO_EVENTS:
                        memo[key] = got
                vcpu, addr, kind = got
                yield np.full(addr.size, lvm, np.int64), vcpu, addr, kind
            if hi == pages:  # the pass is over (its last epoch)
                self.rng[lvm] = ms.lcg_advance(st, ms.draws_per_pass(pages, random_access))

    def random_writer_events(self, writes):
        """dirty_log_test's guest: ``writes`` writes per vCPU to pages ``rng64() % pages``."""
        for lvm in range(self.gids.size):
            v = int(self.vcpus[lvm])
            st = self.rng[lvm]
            pages = int(self.region_pages[lvm])
            step = max(1, CHUNK_EVENTS // v)
            for w0 in range(0, writes, step):
                w1 = min(writes, w0 + step)
                page = ms.random_writer(st, pages, w1 - w0, w0)
                addr = self.test_base[lvm] + page * 4096
                yield self._interleave(lvm, v, addr, np.full(addr.shape, ACC_WRITE, np.int64))
            self.rng[lvm] = ms.lcg_advance(st, 2 * writes)

    def kvm_page_table_events(self, stage):
        """kvm_page_table_test's guest for one stage; every vCPU walks the whole region, even vCPU ids
        write and odd ones read in the create stage."""
        for lvm in range(self.gids.size):
            v = int(self.vcpus[lvm])
            start, size = int(self.test_base[lvm]), int(self.region_pages[lvm]) * 4096
            large = int(self.large_page[lvm])
            if stage == "create":
                addr = start + np.arange(size // large, dtype=np.int64) * large
                kind1 = None
            elif stage == "update" and large == 4096:
                addr = start + np.arange(size // 4096, dtype=np.int64) * 4096
                kind1 = np.full(addr.size, ACC_WRITE, np.int64)
            elif stage == "update":
                # per large page: write its first 4K page, then read the 4K pages of its second half
                per = 1 + large // 4096 // 2
                lp = start + np.arange(size // large, dtype=np.int64) * large
                off = np.concatenate([[0], large // 2 + np.arange(per - 1, dtype=np.int64) * 4096])
                addr = (lp[:, None] + off[None, :]).ravel()
                kind1 = np.tile(np.concatenate([[ACC_WRITE], np.zeros(per - 1, np.int64)]), lp.size)
            else:
                addr = start + np.arange(size // 4096, dtype=np.int64) * 4096
                kind1 = np.zeros(addr.size, np.int64)
            step = max(1, CHUNK_EVENTS // v)
            for a0 in range(0, addr.size, step):
                a = addr[a0:a0 + step]
                a2 = np.broadcast_to(a, (v, a.size))
                if kind1 is None:
                    k2 = np.where((np.arange(v) % 2 == 0)[:, None], ACC_WRITE, 0) * np.ones((1, a.size), np.int64)
                else:
                    k2 = np.broadcast_to(kind1[a0:a0 + step], (v, a.size))
                yield self._interleave(lvm, v, np.ascontiguousarray(a2), np.ascontiguousarray(k2))

    # ------------------------------------------------------------------ dirty log
    def _slot_range(self, lvm, si):
        n = int(self.slot_pages[lvm])
        g0 = int(self.roff[lvm]) + si * n
        return g0, g0 + n

    def _fail(self, lvm, si, off, what):
        gpa = int(self.test_base[lvm]) + (si * int(self.slot_pages[lvm]) + int(off)) * 4096
        raise BatchMMUError(
            f"{what}: VM {lvm} slot {self.slot_ids[si]} page {int(off)} (gpa {gpa:#x}), "
            f"phase {self._phase_name!r}", field="verify", value=self.verify)

    def _check_collected(self, lvm, si, bits, extra, complete=True):
        """Pages written since their last collection must be in ``bits`` (no lost write; only checked
        for a ``complete`` collection); with ``verify = "exact"`` every page in ``bits`` must have been
        written (but for the bitmap that KVM_DIRTY_LOG_INITIALLY_SET sets before the first CLEAR)."""
        g0, g1 = self._slot_range(lvm, si)
        pend = self.pending[g0:g1]
        lost = np.nonzero(pend & ~bits)[0] if complete else ()
        if len(lost):
            self._fail(lvm, si, lost[0], f"lost write ({lost.size} pages written but not in the dirty log)")
        unwritten = bits & ~pend
        nun = int(unwritten.sum())
        if nun and not self.extra_ok[lvm]:
            extra["dirty_unwritten"] = extra.get("dirty_unwritten", 0) + nun
            if self.verify == "exact":
                self._fail(lvm, si, np.nonzero(unwritten)[0][0],
                           f"dirty page that was not written ({nun} pages)")
        if not complete:
            return
        nd = int(bits.sum())
        extra["bits_checked_dirty"] = extra.get("bits_checked_dirty", 0) + nd
        extra["bits_checked_clean"] = extra.get("bits_checked_clean", 0) + bits.size - nd

    def _set_logging(self, enable):
        for lvm in range(self.gids.size):
            flags = MEM_LOG_DIRTY_PAGES if enable else 0
            per = int(self.slot_pages[lvm]) * 4096
            for si, slot in enumerate(self.slot_ids):
                gpa = int(self.test_base[lvm]) + si * per if self.slot else 0
                size = per if self.slot else self._slot0_size(lvm)
                self.host.set_memslot(lvm, slot, gpa, size, flags)
            self.logging[lvm] = enable
            if self.verify != "off":
                self.pending[self.roff[lvm]:self.roff[lvm + 1]] = False
                self.extra_ok[lvm] = enable and bool(self.spec.get("manual_protect")) \
                    and bool(self.spec.get("initially_set"))

    def _slot0_size(self, lvm):
        info = next(m for m in self.host.memslots(lvm) if m["slot"] == 0)
        return info["size"]

    def _get(self, extra):
        manual = bool(self.spec.get("manual_protect"))
        dirty = 0
        for lvm in range(self.gids.size):
            for si, slot in enumerate(self.slot_ids):
                words = self.host.get_dirty_log(lvm, slot)
                bits = _popcount_bits(words, int(self.slot_pages[lvm]))
                self.last_get[(lvm, si)] = np.array(words, np.uint64)
                dirty += int(bits.sum())
                if self.verify != "off":
                    self._check_collected(lvm, si, bits, extra)
                    if not manual:
                        g0, g1 = self._slot_range(lvm, si)
                        self.pending[g0:g1] &= ~bits
        extra["dirty_pages"] = extra.get("dirty_pages", 0) + dirty

    def _clear(self, extra):
        cleared = 0
        for lvm in range(self.gids.size):
            n = int(self.slot_pages[lvm])
            for si, slot in enumerate(self.slot_ids):
                words = self.last_get.pop((lvm, si), None)
                if words is None:
                    words = _bitmap_words(np.ones(n, bool))
                cleared += int(self.host.clear_dirty_log(lvm, slot, 0, n, words))
                if self.verify != "off":
                    g0, g1 = self._slot_range(lvm, si)
                    self.pending[g0:g1] &= ~_popcount_bits(words, n)
            if self.verify != "off":
                self.extra_ok[lvm] = False
        extra["cleared_pages"] = extra.get("cleared_pages", 0) + cleared

    def _vcpus_exited(self, lvm):
        """The VM's vCPUs are out of the guest (GUEST_SYNC, or stopped by the VMM): KVM flushes a vCPU's
        PML buffer on every VM exit (``__vmx_handle_exit``), so what the CPU logged reaches the rings."""
        self.host.kick_vcpus(lvm)

    def _harvest(self, lvm, extra, stopped=False):
        """Harvest every vCPU's dirty ring of local VM ``lvm``, then KVM_RESET_DIRTY_RINGS.

        ``stopped``: in the middle of a pass, for a vCPU stopped by a full ring; the other vCPUs are still
        running, so pages they wrote may still sit in their PML buffers: a page written but not harvested
        stays expected (and is checked at the next collection after the vCPUs exited)."""
        if not stopped:
            self._vcpus_exited(lvm)
        ents = [np.asarray(self.host.harvest_dirty_ring(lvm, c), np.int64).reshape(-1, 2)
                for c in range(int(self.vcpus[lvm]))]
        e = np.concatenate(ents) if ents else np.zeros((0, 2), np.int64)
        reset = int(self.host.reset_dirty_rings(lvm))
        extra["ring_entries"] = extra.get("ring_entries", 0) + int(e.shape[0])
        extra["ring_reset"] = extra.get("ring_reset", 0) + reset
        n = int(self.slot_pages[lvm])
        inside = np.isin(e[:, 0], self.slot_ids) & (e[:, 1] >= 0) & (e[:, 1] < n)
        si = e[inside, 0] - self.slot
        flat = si * n + e[inside, 1]
        bits = np.zeros(int(self.region_pages[lvm]), bool)
        bits[flat] = True
        extra["dirty_pages"] = extra.get("dirty_pages", 0) + int(bits.sum()) + int((~inside).sum())
        if self.verify != "off":
            if reset != e.shape[0]:
                raise BatchMMUError(f"VM {lvm}: KVM_RESET_DIRTY_RINGS reset {reset} entries but "
                                    f"{e.shape[0]} were harvested (phase {self._phase_name!r})", field="verify",
                                    value=self.verify)
            for s in range(self.nslots):
                self._check_collected(lvm, s, bits[s * n:(s + 1) * n], extra, complete=not stopped)
            self.pending[self.roff[lvm]:self.roff[lvm + 1]] &= ~bits

    def _test_ranges(self, lvm):
        """(hva, size) of every test memslot of local VM ``lvm``."""
        return [(m["hva"], m["size"]) for m in self.host.memslots(lvm) if m["slot"] in self.slot_ids]

    def _touch(self, ph, extra):
        """Accesses by vCPU 0 of every VM at ``offsets`` (bytes into its test region), of ``kind``."""
        kinds = {"read": 0, "write": ACC_WRITE, "fetch": ACC_FETCH}
        kind = ph.get("kind", "read")
        if kind not in kinds:
            raise BatchMMUError(f"phase.kind={kind!r}: use read, write or fetch", field="phase.kind", value=kind)
        offs = np.asarray(ph.get("offsets", [0]), np.int64)
        vm = np.repeat(np.arange(self.gids.size, dtype=np.int64), offs.size)
        addr = np.repeat(self.test_base, offs.size) + np.tile(offs, self.gids.size)
        r = self.host.access(vm, 0, addr, kinds[kind])
        for code, name in enumerate(OUTCOME_NAMES):
            if (r.outcome == code).any():
                extra[name.lower()] = int((r.outcome == code).sum())
        return addr.size

    def _idle(self, mark, extra):
        """page_idle: mark every test page idle (mmu_notifier clear_young, no flush) or count the
        pages still idle (test_young)."""
        young = pages = 0
        for lvm in range(self.gids.size):
            for hva, size in self._test_ranges(lvm):
                y = self.host.age_hva_range(lvm, hva, hva + size, flush=False) if mark \
                    else self.host.test_young(lvm, hva, hva + size)
                young += int(y.sum())
                pages += y.size
        extra["young_pages"] = young
        extra["idle_pages"] = pages - young
        extra["pages"] = pages

    def _collect(self, extra):
        if self.spec.get("dirty_ring"):
            for lvm in range(self.gids.size):
                self._harvest(lvm, extra)
            return
        self._get(extra)
        if self.spec.get("manual_protect"):
            self._clear(extra)

    # ------------------------------------------------------------------ phases
    def run_phase(self, k, progress=None):
        if not self.host.timed:
            return self._run_phase(k, progress)
        self.host.sim_begin()   # a phase (or an epoch of one) starts with every vCPU together
        res = self._run_phase(k, progress)
        res["sim"] = self.host.sim_end()
        return res

    def _run_phase(self, k, progress=None):
        if isinstance(k, tuple):  # a host-wide step: an epoch of a phase, or reclaim
            return shard_step(self, k, progress)
        ph = self.spec["phases"][k]
        op = ph.get("op", "access")
        self._phase_name = ph.get("name", op)
        self._groups = set(ph["groups"]) if "groups" in ph else None
        t0 = time.perf_counter()
        events, extra = 0, {}
        wl = self.spec
        if op == "access" and wl["pattern"] == "trace":
            events += self._drive(trace.events(self, ph), extra, progress)
        elif op == "access" and wl["pattern"] != "memstress":
            for p in self._passes(int(ph.get("passes", 1))):
                events += self._drive(self.events(p), extra, progress)
        elif op in ("access", "dirty_pass", "populate"):
            wp = 100 if op == "populate" else int(ph.get("write_percent", wl["write_percent"]))
            ra = False if op == "populate" else bool(ph.get("random_access", wl.get("random_access", False)))
            for _ in self._passes(int(ph.get("passes", 1))):
                events += self._drive(self.memstress_events(wp, ra), extra, progress)
        elif op == "random_writes":
            events += self._drive(self.random_writer_events(int(ph.get("writes", 0x100))), extra, progress)
        elif op == "kvm_page_table":
            events += self._drive(self.kvm_page_table_events(ph["stage"]), extra, progress)
        elif op in ("dirty_log", "enable_logging", "disable_logging"):
            self._set_logging(op == "enable_logging" or (op == "dirty_log" and bool(ph.get("enable", True))))
        elif op == "get_dirty_log":
            self._get(extra)
        elif op == "clear_dirty_log":
            self._clear(extra)
        elif op == "harvest_dirty_ring":
            for lvm in range(self.gids.size):
                self._harvest(lvm, extra)
        elif op == "collect_dirty_log":
            self._collect(extra)
        elif op == "touch":
            events += self._touch(ph, extra)
        elif op in ("mark_idle", "check_idle"):
            self._idle(op == "mark_idle", extra)
        elif op in guestos.OPS:
            events += guestos.run(self, ph, extra, progress)
        elif op in hostops.OPS:
            events += hostops.run(self, ph, extra, progress)
        elif op in migrate.OPS:
            events += migrate.run(self, ph, extra, progress)
        elif op in nestedops.OPS:
            events += nestedops.run(self, ph, extra, progress)
        elif op == "advance_time":
            extra["nx_recovery_passes"] = self.host.advance_time(float(ph.get("seconds", 0)))
        stats = self.host.vt.stats[:self.host.nvm].copy()
        return {"seconds": time.perf_counter() - t0, "events": events, "extra": extra, "stats": stats,
                **host_figures(self.host)}

    def footprint(self):
        return self.host.footprint()


def total_events(spec, k):
    """Accesses phase ``k`` runs (for the progress bar)."""
    ph = spec["phases"][k]
    op = ph.get("op", "access")
    vms = plan(spec)
    if op == "access" and spec["pattern"] == "trace":
        return trace.total_events(spec, ph)
    if op == "access" and spec["pattern"] != "memstress":
        return int(ph.get("passes", 1)) * sum(v[1] for v in vms) * (spec["bpv"] // spec["stride"])
    if op in ("access", "dirty_pass", "populate"):
        per = 0
        for gi, vcpus, _ in vms:
            region = _region_bytes(spec, spec["groups"][gi]) // 4096
            per += vcpus * (region if spec.get("overlap") else spec["bpv"] // 4096)
        return int(ph.get("passes", 1)) * per
    if op == "random_writes":
        return int(ph.get("writes", 0x100)) * sum(v[1] for v in vms)
    if op == "kvm_page_table":
        return sum(v[1] * _region_bytes(spec, spec["groups"][v[0]]) // 4096 for v in vms)
    return 0
