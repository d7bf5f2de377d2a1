"""Scenario ops for the memslot and host-memory selftests: ``max_guest_memory_test``,
``memslot_perf_test`` and ``memslot_modification_stress_test`` (``tools/testing/selftests/kvm``).

Each op runs on a Shard (every VM of the shard, independently) and returns the events it ran;
what it measures goes into ``extra`` (summed over shards), and ``report_lines`` prints it the way
the selftest does.  The selftests run their vCPUs and the host side concurrently; here each
iteration runs the two sides one after the other, in the order the test's synchronisation allows.
"""

import time

import numpy as np

from .constants import ACC_WRITE, MMIO
from .errors import BatchMMUError
from .kernels.gmem import gm_discard_slots
from .kernels.reclaim import madvise_dontneed
from .memslot import HVA_BASE, KVM_USER_MEM_SLOTS
from .units import parse_size

OPS = ("add_slots", "sweep", "toggle_cr0_wp", "delete_slots", "discard", "release", "memslot_perf",
       "memslot_stress")
KEYS = {"gpa", "slot_size", "max_bytes", "alias", "backing", "which", "offset", "size", "test", "loops", "slots",
        "ops"}
CR0_WP = 1 << 16
CHUNK = 1 << 21


def _size(ph, key, default):
    return parse_size(ph.get(key, default), f"phase.{key}")


def _bool(v):
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")


def run(shard, ph, extra, progress):
    """Run one of OPS on every VM of the shard; returns the number of guest accesses."""
    return _OPS[ph["op"]](shard, ph, extra, progress)


def _access(shard, vm, vcpu, addr, kind, extra, progress=None):
    """Accesses in order (chunks), counting MMIO exits."""
    n = 0
    for a in range(0, addr.size, CHUNK):
        sl = slice(a, a + CHUNK)
        out = shard.host.access(vm[sl] if np.ndim(vm) else vm, vcpu[sl] if np.ndim(vcpu) else vcpu, addr[sl],
                                kind[sl] if np.ndim(kind) else kind).outcome
        extra["mmio_exits"] = extra.get("mmio_exits", 0) + int((out == MMIO).sum())
        n += int(out.size)
        if progress is not None:
            progress(int(out.size))
    return n


# ----------------------------------------------------------------------------- max_guest_memory_test
def add_slots(shard, ph, extra, progress):
    """Slots first..: ``slot_size`` each from ``gpa`` until ``max_bytes`` or MAXPHYADDR; with ``alias``
    all map one host range (one memfd), as max_guest_memory_test does."""
    h = shard.host
    start = _size(ph, "gpa", "4GiB")
    size = _size(ph, "slot_size", "2GiB")
    max_bytes = _size(ph, "max_bytes", "128GiB")
    alias = _bool(ph.get("alias", True))
    backing = ph.get("backing", "4k")
    shard.added = {}
    for lvm in range(shard.gids.size):
        max_gpa = (1 << int(h._maxphyaddr[lvm])) - 4096          # vm->max_gfn << page_shift
        slot = 1
        while slot < KVM_USER_MEM_SLOTS:
            gpa = start + (slot - 1) * size
            if gpa + size > max_gpa or gpa - start >= max_bytes:
                break
            h.set_memslot(lvm, slot, gpa, size, hva=HVA_BASE + start if alias else None, backing=backing)
            slot += 1
        shard.added[lvm] = (1, slot, start, start + (slot - 1) * size, size)
    extra["vcpus"] = int(shard.vcpus.sum())
    extra["slots_added"] = sum(s - 1 for _, s, _, _, _ in shard.added.values())
    extra["guest_gib"] = sum((e - s) >> 30 for _, _, s, e, _ in shard.added.values())
    return 0


def _added(shard, op):
    added = getattr(shard, "added", None)
    if added is None:
        raise BatchMMUError(f"phase.op={op!r} needs an add_slots phase before it", field="phase.op", value=op)
    return added


def sweep(shard, ph, extra, progress):
    """Each vCPU writes every 4K page of its equal share of the added range (vCPUs in lockstep)."""
    events = 0
    for lvm, (_, _, start, end, _) in _added(shard, "sweep").items():
        v = int(shard.vcpus[lvm])
        nr = ((end - start) // v) & ~4095
        if nr == 0:
            raise BatchMMUError(f"vcpus={v}: more vCPUs than pages", field="vcpus", value=v)
        pages = nr // 4096
        for p0 in range(0, pages, max(1, CHUNK // v)):
            p1 = min(pages, p0 + max(1, CHUNK // v))
            addr = (start + np.arange(v, dtype=np.int64)[None, :] * nr
                    + np.arange(p0, p1, dtype=np.int64)[:, None] * 4096).ravel()
            vcpu = np.tile(np.arange(v, dtype=np.int64), p1 - p0)
            events += _access(shard, lvm, vcpu, addr, ACC_WRITE, extra, progress)
    return events


def toggle_cr0_wp(shard, ph, extra, progress):
    """vcpu_sregs_set with CR0.WP flipped on every vCPU.  With TDP KVM keeps the root
    (kvm_post_set_cr0: a CR0.WP-only change re-inits the MMU context but does not unload it)."""
    h = shard.host
    for lvm in range(shard.gids.size):
        for c in range(int(shard.vcpus[lvm])):
            h.set_vcpu_regs(lvm, c, cr0=h.vcpu_regs(lvm, c)["cr0"] ^ CR0_WP)
    return 0


def delete_slots(shard, ph, extra, progress):
    """Delete the added slots: ``which`` = "even" (the selftest: from the last even one down), "odd"
    or "all"."""
    which = ph.get("which", "even")
    if which not in ("even", "odd", "all"):
        raise BatchMMUError(f"phase.which={which!r}: use even, odd or all", field="phase.which", value=which)
    n = 0
    for lvm, (first, end_slot, start, _end, size) in _added(shard, "delete_slots").items():
        top = end_slot - 1
        if which == "all":
            slots = range(top, first - 1, -1)
        else:
            s0 = top & ~1 if which == "even" else (top if top & 1 else top - 1)
            slots = range(s0, first - 1, -2)
        for s in slots:
            shard.host.set_memslot(lvm, s, start + (s - first) * size, 0)
            n += 1
    extra["slots_deleted"] = n
    return 0


def discard(shard, ph, extra, progress):
    """munmap / MADV_DONTNEED of [offset, offset + size) of the added slots' host range."""
    for lvm, (_, _, start, _, slot_size) in _added(shard, "discard").items():
        off = _size(ph, "offset", 0)
        size = _size(ph, "size", slot_size // 2)
        hva = HVA_BASE + start + off
        extra["bytes_freed"] = extra.get("bytes_freed", 0) + shard.host.discard_hva_range(lvm, hva, hva + size)
    return 0


def release(shard, ph, extra, progress):
    """The VMM exits without deleting the slots: mmu_notifier release zaps everything."""
    for lvm in range(shard.gids.size):
        shard.host.mmu_notifier_release(lvm)
    return 0


# ----------------------------------------------------------------------------- memslot_perf_test
MEM_EXTRA = 64 << 10
MEM_GPA = 256 << 20
MEM_SIZE = (512 << 20) + MEM_EXTRA
MEM_TEST_GPA = MEM_GPA + MEM_EXTRA
MOVE_SIZE = 3 * (64 << 10)
UNMAP_SIZE = 128 << 20
VAL_WRITES = {"map": (32 << 20) + MEM_EXTRA, "unmap": UNMAP_SIZE + MEM_EXTRA, "unmap_chunked": UNMAP_SIZE + MEM_EXTRA,
              "move_active": MEM_SIZE, "move_inactive": MEM_SIZE, "rw": MEM_SIZE}
TEST_NAMES = {"map": "map", "unmap": "unmap", "unmap_chunked": "unmap chunked", "move_active": "move active area",
              "move_inactive": "move inactive area", "rw": "RW"}


class _Layout:
    """Slots 1..nslots over ``mempages`` from MEM_GPA: pages_per_slot each, the last one the rest."""

    def __init__(self, mempages, nslots):
        self.mempages, self.nslots = mempages, nslots
        self.pps = mempages // nslots
        self.rem = mempages % nslots

    def slot_pages(self, s):            # s: 0-based
        return self.pps + (self.rem if s == self.nslots - 1 else 0)

    def gpa2slot(self, gpa):
        """(0-based slot, page in it) of a test gpa (vm_gpa2hva)."""
        gpage = (gpa - MEM_GPA) // 4096
        s = min(gpage // self.pps, self.nslots - 1)
        return s, gpage - s * self.pps

    def max_slots(self):
        """get_max_slots: the most slots (slot 0 included) with at least a page each."""
        return self.mempages + 1 if self.mempages > 1 else 0


def _dontneed_calls(lay, first_page, count, chunk):
    """test_memslot_do_unmap of test pages [first_page, +count) in ``chunk``-page calls: one madvise
    per slot piece of each call.  Returns (0-based slot, first page, end page) arrays."""
    pages = np.arange(count, dtype=np.int64)
    gpage = (MEM_TEST_GPA - MEM_GPA) // 4096 + first_page + pages
    s = np.minimum(gpage // lay.pps, lay.nslots - 1)
    off = gpage - s * lay.pps
    idx = np.nonzero((pages % chunk == 0) | (off == 0))[0]
    ends = np.append(idx[1:], count)
    return s[idx], off[idx], off[idx] + (ends - idx)


def memslot_perf(shard, ph, extra, progress):
    """One test of memslot_perf_test (``test``: map, unmap, unmap_chunked, move_active, move_inactive,
    rw) for ``loops`` iterations with up to ``slots`` memslots (-1: KVM's 32764)."""
    test = ph.get("test", "map")
    if test not in VAL_WRITES:
        raise BatchMMUError(f"phase.test={test!r}: use {', '.join(VAL_WRITES)}", field="phase.test", value=test)
    loops = int(ph.get("loops", 10))
    cap = int(ph.get("slots", -1))
    if cap != -1 and cap <= 1:
        raise BatchMMUError(f"phase.slots={cap}: the slot cap must be larger than 1 or -1 for no cap",
                            field="phase.slots", value=cap)
    nslots = (KVM_USER_MEM_SLOTS if cap == -1 else min(cap, KVM_USER_MEM_SLOTS)) - 1
    lay = _Layout(VAL_WRITES[test] // 4096, nslots)
    first = int(shard.gids[0]) == 0       # the layout is reported once, by the shard with VM 0
    if first:
        extra.update({"test_" + test: 1, "nslots": nslots, "pages_per_slot": lay.pps, "extra_pages_last": lay.rem})
    if lay.pps == 0:
        if first:
            extra["max_slots"] = lay.max_slots()
        return 0
    h = shard.host
    events = 0
    for lvm in range(shard.gids.size):
        t0 = time.perf_counter()
        recs = []
        gpa = MEM_GPA
        for s in range(nslots):
            n = lay.slot_pages(s)
            h.set_memslot(lvm, s + 1, gpa, n * 4096, backing="4k")
            recs.append(h._slot_rec[(lvm, s + 1)])
            gpa += n * 4096
            if progress is not None and s % 1024 == 1023:   # a step per slot and per loop (phase_work)
                progress(1024)
        extra["slot_setup_seconds"] = extra.get("slot_setup_seconds", 0.0) + time.perf_counter() - t0
        if progress is not None:
            progress(nslots % 1024)
        recs = np.array(recs, np.int64)
        if test == "move_active" and lay.slot_pages(nslots - 1) * 4096 < MOVE_SIZE // 2:
            if first:
                extra["max_slots"] = 0  # "Memslot count may be too high for this test"
        else:
            t0 = time.perf_counter()
            for _ in range(loops):
                events += _LOOPS[test](shard, lvm, lay, recs, extra)
                if progress is not None:
                    progress(1)
            extra["loop_seconds"] = extra.get("loop_seconds", 0.0) + time.perf_counter() - t0
            extra["loops"] = extra.get("loops", 0) + loops
        for s in range(nslots, 0, -1):   # kvm_vm_free
            h.set_memslot(lvm, s, MEM_GPA + (s - 1) * lay.pps * 4096, 0)
    return events


def _sync(shard, lvm, extra):
    """guest_perform_sync: the guest's cmpxchg of the sync flag (a write to the sync page)."""
    return _access(shard, lvm, 0, np.array([MEM_GPA], np.int64), ACC_WRITE, extra)


def _writes(shard, lvm, gpa0, pages, extra, kind=ACC_WRITE):
    return _access(shard, lvm, 0, gpa0 + np.arange(pages, dtype=np.int64) * 4096, kind, extra)


def _dontneed(shard, lvm, lay, recs, first_page, count, chunk):
    s, p0, p1 = _dontneed_calls(lay, first_page, count, chunk)
    h = shard.host
    madvise_dontneed(h._mmu_bundle(), lvm, np.stack([recs[s], p0, p1]))
    gm_discard_slots(h.gm, h.st, lvm, recs[s], p0, p1)  # anonymous memory reads back as zeros


def _loop_map(shard, lvm, lay, recs, extra):
    half = ((32 << 20) // 4096) // 2
    n = 0
    _dontneed(shard, lvm, lay, recs, half, half, half)          # the host unmaps the second half ...
    n += _writes(shard, lvm, MEM_TEST_GPA, half, extra)         # ... while the guest maps the first
    n += _sync(shard, lvm, extra)
    _dontneed(shard, lvm, lay, recs, 0, half, half)
    n += _writes(shard, lvm, MEM_TEST_GPA + half * 4096, half, extra)
    n += _sync(shard, lvm, extra)
    return n


def _loop_unmap(shard, lvm, lay, recs, extra, chunk=1):
    half = UNMAP_SIZE // 4096 // 2
    n = _writes(shard, lvm, MEM_TEST_GPA, 1, extra) + _sync(shard, lvm, extra)
    _dontneed(shard, lvm, lay, recs, 0, half, chunk)
    n += _writes(shard, lvm, MEM_TEST_GPA + half * 4096, 1, extra) + _sync(shard, lvm, extra)
    _dontneed(shard, lvm, lay, recs, half, half, chunk)
    return n


def _loop_unmap_chunked(shard, lvm, lay, recs, extra):
    return _loop_unmap(shard, lvm, lay, recs, extra, chunk=(2 << 20) // 4096)


def _loop_move(shard, lvm, lay, recs, extra, active):
    src = MEM_GPA + (lay.nslots - 1) * lay.pps * 4096       # vm_slot2gpa(nslots - 1)
    base = src - (MOVE_SIZE // 2 if active else MOVE_SIZE)
    size = lay.slot_pages(lay.nslots - 1) * 4096
    h = shard.host
    n = 0
    for dest in (MEM_GPA + MEM_SIZE, src):                    # vm_mem_region_move there and back
        h.set_memslot(lvm, lay.nslots, dest, size)
        n += _writes(shard, lvm, base, MOVE_SIZE // 4096, extra)
    return n


def _loop_rw(shard, lvm, lay, recs, extra):
    pages = (MEM_SIZE - MEM_EXTRA) // 4096
    n = _writes(shard, lvm, MEM_TEST_GPA, pages, extra) + _sync(shard, lvm, extra)
    # the host wrote MEM_TEST_VAL_2 into every page; the guest checks it and writes 0
    addr = MEM_TEST_GPA + 2048 + np.arange(pages, dtype=np.int64) * 4096
    kind = np.tile(np.array([0, ACC_WRITE], np.int64), pages)
    n += _access(shard, lvm, 0, np.repeat(addr, 2), kind, extra) + _sync(shard, lvm, extra)
    return n


_LOOPS = {"map": _loop_map, "unmap": _loop_unmap, "unmap_chunked": _loop_unmap_chunked,
          "move_active": lambda *a: _loop_move(*a, active=True),
          "move_inactive": lambda *a: _loop_move(*a, active=False), "rw": _loop_rw}


# ----------------------------------------------------------------------------- memslot_modification_stress_test
STRESS_SLOT = 7


def memslot_stress(shard, ph, extra, progress):
    """The memstress vCPUs write their memory (``passes`` passes) while the host adds and deletes a
    1-page memslot 7 just below the test region ``ops`` times, at evenly spaced points."""
    ops = int(ph.get("ops", 10))
    passes = int(ph.get("passes", 1))
    if ops < 0 or passes < 1:
        raise BatchMMUError(f"phase.ops={ops}, passes={passes}: need ops >= 0 and passes >= 1",
                            field="phase.ops", value=ops)
    n = -(-(ops + 1) // passes)           # slices per pass; a memslot op after each but the last
    events = 0
    done = 0
    for j in range(passes * n):
        shard._epoch = (j, n)
        try:
            events += shard._drive(shard.memstress_events(100, False), extra, progress)
        finally:
            shard._epoch = None
        if done < ops:
            for lvm in range(shard.gids.size):
                gpa = int(shard.test_base[lvm]) - 4096
                shard.host.set_memslot(lvm, STRESS_SLOT, gpa, 4096, backing="4k")
                shard.host.set_memslot(lvm, STRESS_SLOT, gpa, 0)
            done += 1
    extra["memslot_ops"] = done
    return events


_OPS = {"add_slots": add_slots, "sweep": sweep, "toggle_cr0_wp": toggle_cr0_wp, "delete_slots": delete_slots,
        "discard": discard, "release": release, "memslot_perf": memslot_perf, "memslot_stress": memslot_stress}


# ----------------------------------------------------------------------------- printing
def _ts(sec):
    ns = int(round(sec * 1e9))
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


def report_lines(rec):
    """The selftests' own lines for a phase record of these ops (and the host-memory figures)."""
    out = []
    op = rec.get("op")
    if op == "add_slots":
        out.append(f"  Running with {rec.get('guest_gib', 0)}gb of guest memory and {rec.get('vcpus', 0)} vCPUs "
                   f"({rec.get('slots_added', 0)} slots)")
    elif op == "memslot_perf":
        test = next((k[5:] for k in rec if k.startswith("test_")), "")
        out.append(f"  Testing {TEST_NAMES.get(test, test)} performance with {rec.get('nslots', 0)} slots: "
                   f"{rec.get('pages_per_slot', 0)} pages each + {rec.get('extra_pages_last', 0)} extra pages last")
        if "max_slots" in rec:
            if rec["max_slots"]:
                out.append(f"  Memslot count too high for this test, decrease the cap (max is {rec['max_slots']})")
            else:
                out.append("  Memslot count may be too high for this test, try adjusting the cap")
        elif rec.get("loops"):
            out.append(f"  Test took {_ts(rec.get('slot_setup_seconds', 0))} for slot setup + "
                       f"{_ts(rec.get('loop_seconds', 0))} all iterations")
            out.append(f"  Done {rec['loops']} iterations, avg {_ts(rec['loop_seconds'] / rec['loops'])} each"
                       + (f" ({rec['mmio_exits']} MMIO exits)" if rec.get("mmio_exits") else ""))
    elif op == "memslot_stress":
        out.append(f"  {rec.get('memslot_ops', 0)} times slot {STRESS_SLOT} added and deleted while the vCPUs wrote")
    host = rec.get("host")
    if host:
        out.append(f"  host: resident {host['host_resident'] >> 20} MiB, swapped {host['host_swapped'] >> 20} MiB, "
                   f"page tables {host['page_table_bytes'] >> 10} KiB, major faults {host['host_major_faults']:,}, "
                   f"reclaimed {host['host_pages_reclaimed']:,} pages, THP splits {host['host_thp_splits']:,}")
    return out


def closing_lines(phases):
    """max_guest_memory_test's ``run1 = ..., reset = ..., run2 = ...`` after a sweep, a CR0.WP toggle
    and a sweep."""
    ops = [p["op"] for p in phases]
    for i in range(len(ops) - 2):
        if ops[i:i + 3] == ["sweep", "toggle_cr0_wp", "sweep"]:
            a, b, c = (phases[i + k]["seconds"] for k in range(3))
            return [f"  run1 = {_ts(a)}, reset = {_ts(b)}, run2 = {_ts(c)}"]
    return []
