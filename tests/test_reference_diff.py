"""Differential tests: batchmmu.Host against the pure-Python reference model (tests/reference).

Random event streams (hypothesis, and seeded numpy streams) go through both; after every
call the two must agree on the access outcomes and error codes, raised errors (and their
errno), every statistic the model keeps, host memory, both memslot generations, the dirty
bitmaps returned by get_dirty_log, and every installed leaf / MMIO SPTE (``spte_dump``).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from reference.model import HVA_BASE, KVM_USER_MEM_SLOTS, TASK_SIZE_MAX, RefError, RefHost, RefOOM

import batchmmu as bm
from batchmmu import memslot as bm_memslot
from batchmmu.errors import BatchMMUError, HostMemoryExhausted

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LOG, RO = bm.MEM_LOG_DIRTY_PAGES, bm.MEM_READONLY
R_, W_, X_, U_ = bm.ACC_READ, bm.ACC_WRITE, bm.ACC_FETCH, bm.ACC_USER
AS1 = 1 << 16
U64 = (1 << 64) - 1


class Mismatch(AssertionError):
    pass


# ---------------------------------------------------------------------------- the pair
class Pair:
    """A batchmmu.Host and a RefHost driven by the same calls, compared after each one."""

    def __init__(self, **host_kw):
        self.h = bm.Host(**host_kw)
        self.m = RefHost(**host_kw)
        self.vms = []
        self.log = [f"Host(**{host_kw!r})"]

    def fail(self, what):
        tail = "\n  ".join(self.log[-25:])
        raise Mismatch(f"{what}\n-- last calls:\n  {tail}")

    def _both(self, name, args, kw):
        """Run one call on both; errors must match (type and errno).  Returns (h_result, m_result, err)."""
        self.log.append(f"{name}{args!r} {kw or ''}")
        try:
            ra, ea = getattr(self.h, name)(*args, **kw), None
        except BatchMMUError as e:
            ra, ea = None, e
        try:
            rb, eb = getattr(self.m, name)(*args, **kw), None
        except RefError as e:
            rb, eb = None, e
        if (ea is None) != (eb is None):
            self.fail(f"{name}: batchmmu raised {ea!r}, model raised {eb!r}")
        if ea is not None:
            if isinstance(ea, HostMemoryExhausted) != isinstance(eb, RefOOM):
                self.fail(f"{name}: batchmmu raised {ea!r}, model raised {eb!r}")
            if isinstance(eb, RefOOM) and [bool(x) for x in ea.applied] != eb.applied:
                self.fail(f"{name}: events applied before the OOM: batchmmu {list(ea.applied)}, "
                          f"model {eb.applied}")
            if ea.errno != eb.errno:
                self.fail(f"{name}: errno {ea.errno} (batchmmu: {ea}) != {eb.errno} (model: {eb})")
            self.log[-1] += f" -> {type(ea).__name__} errno={ea.errno}"
        return ra, rb, ea

    def create_vms(self, count, **kw):
        a, b, err = self._both("create_vms", (count,), kw)
        if err is None:
            if [int(x) for x in a] != b:
                self.fail(f"create_vms ids {list(a)} != {b}")
            self.vms += b
        self.check(b if err is None else [])
        return b

    def set_memslot(self, vm, slot, gpa, size, flags=0, hva=None, backing=None):
        kw = {"flags": flags, "hva": hva, "backing": backing}
        _, _, err = self._both("set_memslot", (vm, slot, gpa, size), kw)
        self.check([vm])
        return err

    def access(self, vms, addrs, kinds, vcpus=None):
        vcpus = [0] * len(vms) if vcpus is None else vcpus
        a, b, err = self._both("access", (list(vms), list(vcpus), list(addrs), list(kinds)), {})
        if err is None:
            got = [bm.OUTCOME_NAMES[o] for o in a.outcome]
            if got != b[0] or [int(e) for e in a.error_code] != b[1]:
                self.fail(f"access: batchmmu {list(zip(got, a.error_code.tolist(), strict=True))} != "
                          f"model {list(zip(b[0], b[1], strict=True))}")
            self.log[-1] += f" -> {list(zip(b[0], b[1], strict=True))}"
        self.check(sorted(set(vms) & set(self.vms)))
        return err

    def get_dirty_log(self, vm, slot):
        a, b, err = self._both("get_dirty_log", (vm, slot), {})
        if err is None:
            if [int(x) for x in a] != b:
                self.fail(f"get_dirty_log({vm}, {slot}) bitmap {a.tolist()} != model {b}")
            self.log[-1] += f" -> {sum(bin(w).count('1') for w in b)} dirty"
        self.check([vm])
        return err

    def invalidate_range_start(self, vm, start, end):
        a, b, err = self._both("invalidate_range_start", (vm, start, end), {})
        if err is None:
            if int(a) != b:
                self.fail(f"invalidate_range_start zapped {a} != model {b}")
            self.log[-1] += f" -> {b} zapped"
        self.check([vm] if err is None else [])
        return err

    def invalidate_range_end(self, vm):
        _, _, err = self._both("invalidate_range_end", (vm,), {})
        self.check()
        return err

    def invalidate_hva_range(self, vm, start, end):
        a, b, err = self._both("invalidate_hva_range", (vm, start, end), {})
        if err is None and int(a) != b:
            self.fail(f"invalidate_hva_range zapped {a} != model {b}")
        self.check([vm] if err is None else [])
        return err

    def age(self, vm, start, end, how):
        """how: True / False (age_hva_range's flush) or "test" (test_young)."""
        if how == "test":
            a, b, err = self._both("test_young", (vm, start, end), {})
        else:
            a, b, err = self._both("age_hva_range", (vm, start, end), {"flush": how})
        if err is None:
            got = [bool(x) for x in a]
            if got != b:
                diff = [i for i in range(max(len(got), len(b))) if got[i:i + 1] != b[i:i + 1]][:8]
                self.fail(f"young ({len(got)} vs {len(b)} pages) differs at {diff}: batchmmu "
                          f"{[got[i] for i in diff if i < len(got)]} model {[b[i] for i in diff if i < len(b)]}")
            self.log[-1] += f" -> {sum(b)} young"
        self.check([vm] if err is None else [])
        return err

    def advance_time(self, seconds):
        a, b, err = self._both("advance_time", (seconds,), {})
        if err is None and int(a) != b:
            self.fail(f"advance_time passes {a} != model {b}")
        self.check(all_dumps=err is None)
        return err

    def set_generation(self, vm, gen):
        self.log.append(f"memslots_gen[{vm}] = {gen:#x}")
        self.h.vt.memslots_gen[vm] = gen
        self.m.set_generation(vm, gen)
        self.check([vm])

    def check(self, dump_vms=(), all_dumps=False):
        """Compare every VM's stats and generations, host memory, and the SPTEs of ``dump_vms``."""
        if self.h.host_memory() != self.m.host_memory():
            self.fail(f"host_memory {self.h.host_memory()} != model {self.m.host_memory()}")
        hs = self.h.stats()
        missing = set(self.m.stats(self.vms[0]) if self.vms else ()) - set(hs)
        if missing:
            self.fail(f"host.stats() lacks {sorted(missing)}")
        for vm in self.vms:
            ms = self.m.stats(vm)
            diff = {k: (int(hs[k][vm]), v) for k, v in ms.items() if int(hs[k][vm]) != v}
            if diff:
                self.fail(f"VM {vm} stats differ (batchmmu, model): {diff}")
            for as_id in (0, 1):
                g1, g2 = self.h.memslots_generation(vm, as_id), self.m.memslots_generation(vm, as_id)
                if g1 != g2:
                    self.fail(f"VM {vm} memslots_generation(as_id={as_id}) {g1:#x} != model {g2:#x}")
        for vm in self.vms if all_dumps else dump_vms:
            self.compare_sptes(vm)

    def compare_sptes(self, vm):
        a = {int(g): (int(lv), int(s) & U64) for g, (lv, s) in self.h.spte_dump(vm).items()}
        b = self.m.spte_dump(vm)
        if a != b:
            lines = []
            for g in sorted(set(a) | set(b))[:4000]:
                if a.get(g) != b.get(g):
                    fa = "-" if g not in a else f"L{a[g][0]} {a[g][1]:#018x}"
                    fb = "-" if g not in b else f"L{b[g][0]} {b[g][1]:#018x}"
                    lines.append(f"gfn {g:#x}: batchmmu {fa}  model {fb}")
                    if len(lines) >= 12:
                        break
            self.fail(f"VM {vm}: SPTEs differ ({len(a)} vs {len(b)} entries)\n    " + "\n    ".join(lines))


# ---------------------------------------------------------------------------- random streams
class HypDraw:
    """Choices drawn through hypothesis (so failures shrink)."""

    def __init__(self, data):
        self.data = data

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def pick(self, seq):
        return self.data.draw(st.sampled_from(seq))

    def rare(self, n):
        """True about once in ``n`` draws (never the value hypothesis prefers)."""
        return self.pick([False] * (n - 1) + [True])


class NpDraw:
    """The same choices from a seeded numpy generator (long streams)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def rare(self, n):
        return int(self.rng.integers(n)) == 0


BACKINGS = ("4k", "thp", "hugetlb-2m", "hugetlb-1g")


def random_host_kw(d, small_budget=True):
    budget = d.pick([64 * GiB] * 5 + ([12 * MiB, 40 * MiB] if small_budget else []))
    return {"memory": budget, "backing": d.pick(["4k", "thp", "thp", "hugetlb-2m"]),
            "mmio_caching": d.pick([True, True, True, False]), "nx_huge_pages": d.pick([False, True]),
            "tdp_huge_page_level": d.pick([3, 3, 2, 1]), "eager_page_split": d.pick([True, False]),
            "huge_page_split_on_fault": d.pick([True, True, False]),
            "nx_huge_pages_recovery_ratio": d.pick([60, 60, 1, 2, 3, 0]),
            "nx_huge_pages_recovery_period_ms": d.pick([0, 0, 1000, 250])}


def random_vm_kw(d, host_backing):
    fmt = d.pick(["ept", "npt"])
    levels = d.pick([4, 4, 5])
    backing = d.pick([None, None, "4k", "thp", "hugetlb-2m", "hugetlb-1g"])
    eff = backing or host_backing
    if eff == "hugetlb-1g":
        memory = d.pick([GiB, 2 * GiB])
    elif eff == "hugetlb-2m":
        memory = d.pick([2 * MiB, 4 * MiB, 8 * MiB])
    else:
        memory = d.pick([2 * MiB, 4 * MiB + 12 * KiB, 6 * MiB, 64 * MiB])
    return {"memory": memory, "vcpus": d.pick([1, 2]), "tdp_format": fmt, "tdp_levels": levels,
            "maxphyaddr": d.pick([36, 39, 46] + ([52] if levels == 5 else [])), "backing": backing,
            "ept_ad": fmt == "npt" or d.pick([True, False])}


def _top(p, vm):
    return 1 << p.m.vms[vm].maxphyaddr


def gpa_anchors(p, vm):
    top = _top(p, vm)
    return [GiB, GiB + 4 * KiB, GiB + 2 * MiB - 8 * KiB, GiB + 2 * MiB, GiB + 6 * MiB, GiB + 512 * MiB,
            3 * GiB // 2 - 2 * MiB, top - 8 * KiB, top - 2 * MiB]


def random_addr(d, p, vm):
    v = p.m.vms[vm]
    anchors = [0, 0x1FF, 0x200, 0x400, 0x3FFFF, 0x40000, 0x40200, 0x60000, (_top(p, vm) >> 12) - 1]
    for s in v.slots.values():    # mostly inside slots, some just past their ends
        anchors += [s.base_gfn, s.base_gfn, s.base_gfn + 0x200 - (s.base_gfn & 0x1FF),
                    s.base_gfn + min(s.npages, 0x400) // 2, s.base_gfn + s.npages - 1, s.base_gfn + s.npages]
    gfn = d.pick(anchors) + d.pick([0, 0, 0, 1, 2, 3, 5, 511, 512, 513, -1, -2]) + d.int(0, 3)
    gfn = min(max(gfn, 0), v.max_gfn)
    if d.rare(200):
        gfn = v.max_gfn + 1 + d.int(0, 3)            # outside the guest physical address space
    return (gfn << 12) | d.pick([0, 8, 0xFF8])


def random_kind(d):
    if d.rare(150):
        return d.pick([W_ | X_, 1, 0x40])            # invalid kinds
    return d.pick([R_, R_, W_, W_, X_, U_, W_ | U_, X_ | U_])


def op_access(d, p):
    n = d.pick([1, 1, 2, 3, 6])
    vm0 = d.pick(p.vms)
    vms, addrs, kinds = [], [], []
    for _ in range(n):
        vm = d.pick([vm0, vm0, d.pick(p.vms)])
        vms.append(vm)
        near = addrs and vm == vms[-2] and d.pick([False, True])
        addrs.append(addrs[-1] + 4096 * d.int(0, 2) if near else random_addr(d, p, vm))
        kinds.append(random_kind(d))
    vcpus = [p.m.vms[vm].vcpus if d.rare(100) else d.int(0, p.m.vms[vm].vcpus - 1) for vm in vms]
    p.access(vms, addrs, kinds, vcpus)


def op_memslot(d, p):
    vm = d.pick(p.vms)
    v = p.m.vms[vm]
    existing = sorted(v.slots)
    what = d.pick(["create", "create", "create", "delete", "move", "flags", "flags", "bad"])
    if what in ("delete", "move", "flags") and d.rare(6):
        existing = existing + [7, AS1 | 7]               # missing slots
    if what == "create" or not existing:
        slot = d.pick([1, 2, 3, 4, 5, AS1 | 1, AS1 | 2])
        gpa = d.pick(gpa_anchors(p, vm) + [0])
        size = d.pick([4 * KiB, 8 * KiB, 2 * MiB, 2 * MiB + 8 * KiB, 4 * MiB, 6 * MiB - 4 * KiB, GiB])
        if size == GiB and gpa != GiB:
            size = 2 * MiB
        flags = d.pick([0, 0, LOG, LOG, RO, LOG | RO])
        hva = d.pick([None, None, None, HVA_BASE + gpa + 4 * KiB, HVA_BASE + gpa + 2 * MiB,
                      HVA_BASE + 5 * GiB + gpa])
        backing = d.pick([None, None, None, "4k", "thp", "hugetlb-2m", "hugetlb-1g"])
        p.set_memslot(vm, slot, gpa, size, flags, hva, backing)
        return
    slot = d.pick(existing)
    s = v.slots.get(slot)
    npages = s.npages if s else 512
    if what == "delete":
        p.set_memslot(vm, slot, 0, 0)
    elif what == "move":
        flags = (s.flags if s else 0) ^ d.pick([0, 0, LOG])
        p.set_memslot(vm, slot, d.pick(gpa_anchors(p, vm) + [0, 16 * MiB]), npages << 12, flags)
    elif what == "flags":
        flags = (s.flags if s else 0) ^ d.pick([LOG, LOG, LOG, RO, 0])
        p.set_memslot(vm, slot, (s.base_gfn if s else 0) << 12, npages << 12, flags)
    else:
        base = (s.base_gfn << 12) if s else GiB
        bad = d.pick(["gpa", "size", "slot", "flags", "hva", "resize", "rehva", "backing", "top"])
        if bad == "gpa":
            p.set_memslot(vm, d.pick([6, slot]), base + 2048, npages << 12)
        elif bad == "size":
            p.set_memslot(vm, 6, GiB, 4 * KiB + 8)
        elif bad == "slot":
            p.set_memslot(vm, d.pick([KVM_USER_MEM_SLOTS, 2 << 16, -1]), 3 * GiB, 4 * KiB)
        elif bad == "flags":
            p.set_memslot(vm, 6, 3 * GiB, 4 * KiB, d.pick([4, -1]))
        elif bad == "hva":
            p.set_memslot(vm, 6, 3 * GiB, 4 * KiB, 0, d.pick([HVA_BASE + 12, TASK_SIZE_MAX, -4096]))
        elif bad == "resize":
            p.set_memslot(vm, slot, base, (npages + 1) << 12, s.flags if s else 0)
        elif bad == "rehva":
            p.set_memslot(vm, slot, base, npages << 12, s.flags if s else 0, HVA_BASE + 7 * GiB)
        elif bad == "backing":
            p.set_memslot(vm, slot, base, npages << 12, s.flags if s else 0, None, "4k")
        else:   # beyond MAXPHYADDR, overlapping the slot at the top if there is one (EEXIST first)
            p.set_memslot(vm, 6, _top(p, vm) - 8 * KiB, 16 * KiB)


def op_dirty_log(d, p):
    vm = d.pick(p.vms)
    v = p.m.vms[vm]
    logged = [sid for sid, s in v.slots.items() if s.dirty is not None]
    slot = d.pick(logged * 4 + sorted(v.slots) + [9, AS1 | 9, KVM_USER_MEM_SLOTS, -1])
    p.get_dirty_log(vm, slot)


def random_hva_range(d, p, vm):
    """(start, end, gpas): an hva range, mostly around one memslot's mapping, and gpas of the
    address-space-0 gfns it maps (to access while it is being invalidated)."""
    v = p.m.vms[vm]
    s = v.slots[d.pick(sorted(v.slots))] if v.slots else None
    if s is None or d.rare(8):
        start = HVA_BASE + d.pick([0, 2 * MiB, GiB, GiB + 4 * KiB, 5 * GiB + GiB])
    else:
        off = d.pick([0, 0, 1, 2, 511, 512, 513, s.npages // 2, s.npages - 1]) % s.npages
        start = s.hva + (off << 12)
    size = d.pick([4 * KiB, 4 * KiB, 8 * KiB, 12 * KiB + 8, 2 * MiB, 2 * MiB + 4 * KiB, 4 * MiB, GiB + 4 * MiB])
    if d.rare(60):
        size = d.pick([0, -4 * KiB])                     # end <= start: an error
    gpas = []
    for t in v.slots.values():
        if t.as_id == 0:
            lo, hi = max(start, t.hva), min(start + size, t.hva + (t.npages << 12))
            if lo < hi:
                g = (t.base_gfn << 12) + (lo - t.hva)
                gpas += [g & ~0xFFF, ((g + hi - lo - 1) & ~0xFFF), (g + (hi - lo) // 2) & ~0xFFF]
    return start, start + size, gpas


def op_access_some(d, p, vm, gpas, n):
    """n single accesses by ``vm``, mostly at ``gpas`` (plus random ones, and now and then
    a batch op_access)."""
    for _ in range(n):
        if gpas and d.pick([True, True, False]):
            gpa = min(max(d.pick(gpas) + d.pick([0, 0, 4096, -4096]), 0), _top(p, vm) - 4096)
            p.access([vm], [gpa], [random_kind(d)])
        else:
            op_access(d, p)


def op_invalidate(d, p):
    """invalidate_range_start, accesses (they retry inside the range), maybe a nested start and
    aging, then the ends; or a whole invalidate_hva_range, or an unmatched end."""
    vm = d.pick(p.vms)
    if d.rare(25):
        p.invalidate_range_end(vm)                       # nothing in progress: an error
        return
    start, end, gpas = random_hva_range(d, p, vm)
    if d.rare(4):
        p.invalidate_hva_range(vm, start, end)
        op_access_some(d, p, vm, gpas, d.int(0, 2))
        return
    v = p.m.vms[vm]
    if v.inval_count == 0 and end > start:
        # Keep clear of the batchmmu bug test_invalidate_range_spanning_two_slots shows: the first
        # start of an invalidation keeps only the last memslot's gfn range.  Clip to the first slot.
        meet = [t for _, t in sorted(v.slots.items()) if t.hva < end and start < t.hva + (t.npages << 12)]
        if len(meet) > 1:
            start, end = max(start, meet[0].hva), min(end, meet[0].hva + (meet[0].npages << 12))
    if p.invalidate_range_start(vm, start, end) is not None:
        return
    depth = 1
    if d.rare(3):
        start2, end2, gpas2 = random_hva_range(d, p, vm)
        if p.invalidate_range_start(vm, start2, end2) is None:
            depth += 1
            gpas += gpas2
    for _ in range(d.int(1, 4)):
        if d.rare(4):
            op_age(d, p, vm)
        else:
            op_access_some(d, p, vm, gpas, 1)
    for k in range(depth):
        p.invalidate_range_end(vm)
        op_access_some(d, p, vm, gpas, d.int(0, 1 if k + 1 < depth else 3))


def _aging_hits_nx_bug(p, vm):
    """Keep clear of the batchmmu bug test_split_access_tracked_huge_spte shows: with nx_huge_pages,
    make_small_spte / make_huge_spte flip X on access-tracked (aged, A/D-disabled EPT) SPTEs without
    restoring and re-marking them.  Such VMs are only test_young'ed there."""
    return p.m.nx_huge_pages and not p.m.vms[vm].hw_ad


def op_age(d, p, vm=None):
    vm = d.pick(p.vms) if vm is None else vm
    start, end, _ = random_hva_range(d, p, vm)
    how = d.pick([True, True, False, "test", "test"])
    p.age(vm, start, end, "test" if _aging_hits_nx_bug(p, vm) else how)


def op_access_then_age(d, p):
    """Accesses, then aging over them (so some pages are young), then accesses again."""
    vm = d.pick(p.vms)
    start, end, gpas = random_hva_range(d, p, vm)
    op_access_some(d, p, vm, gpas, d.int(1, 3))
    how = d.pick([True, False, "test"])
    p.age(vm, start, end, "test" if _aging_hits_nx_bug(p, vm) else how)
    if d.pick([True, False]):
        how = d.pick([True, "test"])
        p.age(vm, start, end, "test" if _aging_hits_nx_bug(p, vm) else how)
    op_access_some(d, p, vm, gpas, d.int(0, 3))


def op_advance_time(d, p):
    p.advance_time(d.pick([0, 0.1, 0.25, 1, 1, 2.5, 60, 61, 125]) if not d.rare(80) else d.pick([-1, True]))


OPS = [op_access] * 12 + [op_memslot] * 3 + [op_dirty_log] * 2 + [op_invalidate, op_age, op_access_then_age,
                                                                 op_advance_time]


def run_stream(d, n_ops, n_vms=(1, 3), small_budget=True):
    host_kw = random_host_kw(d, small_budget)
    p = Pair(**host_kw)
    for _ in range(d.int(*n_vms)):
        kw = random_vm_kw(d, host_kw["backing"])
        p.create_vms(d.pick([1, 1, 2]), **kw)
    if not p.vms:
        return p
    for _ in range(n_ops):
        d.pick(OPS)(d, p)
    p.check(all_dumps=True)
    return p


# No shrinking and no list of draws: a failure prints the last calls; shrinking takes minutes.
HYP = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
               verbosity=Verbosity.quiet,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])


@settings(HYP, max_examples=100)
@given(data=st.data())
def test_random_streams(data):
    d = HypDraw(data)
    run_stream(d, d.int(5, 45))


@settings(HYP, max_examples=40)
@given(data=st.data())
def test_random_streams_nx_huge_pages(data):
    """The iTLB-multihit mitigation: fetches map 4K, split huge pages, nx_lpage_splits."""
    d = HypDraw(data)
    p = Pair(memory=64 * GiB, backing=d.pick(["thp", "hugetlb-2m"]), nx_huge_pages=True,
             tdp_huge_page_level=d.pick([3, 2]), mmio_caching=d.pick([True, False]),
             huge_page_split_on_fault=d.pick([True, False]))
    for fmt in ("ept", "npt"):
        p.create_vms(1, memory=d.pick([4 * MiB, 8 * MiB]), tdp_format=fmt, tdp_levels=d.pick([4, 5]),
                     backing=d.pick([None, "hugetlb-1g"]) if fmt == "npt" else None)
    for _ in range(d.int(5, 40)):
        d.pick([op_access] * 6 + [op_memslot, op_dirty_log])(d, p)
    p.check(all_dumps=True)


def op_fetches(d, p):
    """Fetches (4K maps, split huge pages, tracked NX pages), now and then reads and writes."""
    vm = d.pick(p.vms)
    n = d.int(1, 6)
    addrs = [random_addr(d, p, vm) for _ in range(n)]
    p.access([vm] * n, addrs, [d.pick([X_, X_, X_ | U_, R_, W_]) for _ in range(n)])


@settings(HYP, max_examples=25)
@given(data=st.data())
def test_random_streams_nx_recovery(data):
    """NX huge page recovery: fetch-heavy streams, simulated time passing (the recovery worker
    zaps the oldest tracked pages, or untracks them in dirty-logged slots), huge pages coming back."""
    d = HypDraw(data)
    p = Pair(memory=64 * GiB, backing=d.pick(["thp", "hugetlb-2m", "4k"]), nx_huge_pages=True,
             nx_huge_pages_recovery_ratio=d.pick([1, 2, 3, 4, 60]),
             nx_huge_pages_recovery_period_ms=d.pick([0, 1000, 300]),
             tdp_huge_page_level=d.pick([3, 3, 2]), eager_page_split=d.pick([True, False]),
             huge_page_split_on_fault=d.pick([True, False]))
    for fmt in d.pick([("ept",), ("npt",), ("ept", "npt")]):
        backing = d.pick([None, None, "hugetlb-1g"])
        p.create_vms(1, memory=d.pick([GiB, 2 * GiB]) if backing else d.pick([4 * MiB, 8 * MiB]), tdp_format=fmt,
                     tdp_levels=d.pick([4, 5]), backing=backing, ept_ad=fmt == "npt" or d.pick([True, False]))
    for _ in range(d.int(5, 40)):
        d.pick([op_fetches] * 4 + [op_advance_time] * 3 + [op_access, op_memslot, op_dirty_log, op_invalidate,
                                                           op_age])(d, p)
    p.advance_time(d.pick([1, 60, 3600]))
    p.check(all_dumps=True)


@settings(HYP, max_examples=25)
@given(data=st.data())
def test_random_streams_notifiers(data):
    """MMU notifiers: invalidations with accesses in between (RETRY), aging and test_young."""
    d = HypDraw(data)
    p = Pair(**random_host_kw(d, small_budget=False))
    for _ in range(d.int(1, 2)):
        p.create_vms(1, **random_vm_kw(d, p.m.backing))
    for _ in range(d.int(5, 30)):
        d.pick([op_invalidate] * 3 + [op_age, op_access_then_age] * 2 + [op_access, op_memslot,
                                                                       op_advance_time])(d, p)
    p.check(all_dumps=True)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_long_seeded_streams(seed):
    run_stream(NpDraw(seed), 600, n_vms=(2, 4), small_budget=False)


@pytest.mark.nojit
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_short_seeded_streams(seed):
    run_stream(NpDraw(seed), 80, n_vms=(1, 3))


# ---------------------------------------------------------------------------- directed streams
@pytest.mark.nojit
def test_model_conventions_match_batchmmu():
    """The simulated-VMM constants the model copies are batchmmu's."""
    assert HVA_BASE == bm_memslot.HVA_BASE
    assert TASK_SIZE_MAX == bm_memslot.TASK_SIZE_MAX
    assert KVM_USER_MEM_SLOTS == bm_memslot.KVM_USER_MEM_SLOTS


@pytest.mark.nojit
@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_mmio_then_slot_then_stale(fmt):
    """MMIO SPTE, the fast MMIO path, a slot created over it (stale generation), deletion."""
    p = Pair(memory=8 * GiB, backing="thp")
    vm = p.create_vms(1, memory=4 * MiB, tdp_format=fmt)[0]
    hole = GiB + 0x5000
    for kind in (R_, W_, R_, X_):
        p.access([vm], [hole], [kind])
    p.set_memslot(vm, 1, GiB, 2 * MiB)
    for kind in (R_, W_, X_):
        p.access([vm], [hole + 0x1000], [kind])
        p.access([vm], [hole], [kind])
    p.set_memslot(vm, 1, 0, 0)
    p.access([vm, vm], [hole, hole], [W_, R_])


@pytest.mark.nojit
@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_stale_mmio_over_readonly_slot(fmt):
    """A write through a stale MMIO SPTE into what is now a read-only slot."""
    p = Pair(memory=8 * GiB, backing="4k")
    vm = p.create_vms(1, memory=4 * MiB, tdp_format=fmt)[0]
    p.access([vm], [GiB], [W_])
    p.set_memslot(vm, 1, GiB, 2 * MiB, RO)
    p.access([vm], [GiB], [W_])
    p.access([vm], [GiB], [R_])


@pytest.mark.nojit
@pytest.mark.parametrize("eager_page_split", [True, False])
@pytest.mark.parametrize("fmt", ["ept", "npt"])
@pytest.mark.parametrize("split_on_fault", [True, False])
def test_dirty_log_cycle(fmt, eager_page_split, split_on_fault):
    """Enable logging over huge mappings, write, harvest, write again, disable (huge pages come back); a write
    fault on a huge page splits it (v6.2+) or zaps it (before)."""
    p = Pair(memory=8 * GiB, backing="thp", eager_page_split=eager_page_split,
             huge_page_split_on_fault=split_on_fault)
    vm = p.create_vms(1, memory=8 * MiB, tdp_format=fmt)[0]
    p.access([vm] * 4, [0x1000, 0x201000, 0x400000, 0x600000], [W_, R_, W_, R_])
    p.set_memslot(vm, 0, 0, 8 * MiB, LOG)
    p.access([vm] * 4, [0x1000, 0x2000, 0x201000, 0x401000], [W_, W_, W_, R_])
    p.get_dirty_log(vm, 0)
    p.access([vm] * 3, [0x1000, 0x3000, 0x1000], [W_, W_, W_])
    p.get_dirty_log(vm, 0)
    p.set_memslot(vm, 0, 0, 8 * MiB, 0)
    p.access([vm] * 3, [0x1000, 0x201000, 0x3000], [W_, W_, R_])


@pytest.mark.parametrize("split_on_fault", [True, False])
def test_write_fault_on_a_logged_huge_page_splits_or_zaps(split_on_fault):
    """With eager splitting off, the first write to a write-protected 2M page: v6.2+ splits it into 512
    write-protected 4K SPTEs (a read elsewhere in the range hits); before v6.2 KVM zapped it (one remote flush)
    and mapped only the written page, so a read elsewhere faults again."""
    h = bm.Host(memory="8GiB", backing="thp", eager_page_split=False, huge_page_split_on_fault=split_on_fault)
    vm = h.create_vms(1, memory="8MiB")[0]
    h.access(vm, 0, 0x200000, W_)
    h.set_memslot(vm, 0, 0, 8 * MiB, LOG)
    before = h.stats(vm)
    assert h.access(vm, 0, 0x201000, W_).outcome[0] == bm.FIXED
    after = h.stats(vm)
    assert after["pages_2m"] == before["pages_2m"] - 1
    assert after["pages_4k"] - before["pages_4k"] == (512 if split_on_fault else 1)
    assert after["remote_tlb_flush"] - before["remote_tlb_flush"] == (0 if split_on_fault else 1)
    assert h.access(vm, 0, 0x3ff000, R_).outcome[0] == (bm.HIT if split_on_fault else bm.FIXED)


@pytest.mark.nojit
def test_nx_huge_pages_exec_split():
    p = Pair(memory=8 * GiB, backing="thp", nx_huge_pages=True)
    vm = p.create_vms(1, memory=8 * MiB, tdp_format="ept")[0]
    p.access([vm] * 5, [0x1000, 0x1000, 0x2000, 0x201000, 0x202000], [R_, X_, X_, X_, R_])
    p.access([vm], [0x400000], [X_])
    p.access([vm], [0x401000], [R_])      # a huge page is not installed over an NX-split table
    p.access([vm], [GiB], [X_])           # MMIO


@pytest.mark.nojit
def test_mmio_fetch_then_slot_with_nx_huge_pages():
    """kvm_mmu_hugepage_adjust sets huge_page_disallowed for every fetch, MMIO ones included, so the
    tables a fetch from an MMIO gpa creates are nx_huge_page_disallowed and later keep the 2 MiB
    region at 4K (disallowed_hugepage_adjust) once a slot appears there."""
    p = Pair(memory=8 * GiB, backing="thp", nx_huge_pages=True)
    for fmt in ("ept", "npt"):
        vm = p.create_vms(1, memory=4 * MiB, tdp_format=fmt)[0]
        p.access([vm], [GiB + 0x3000], [X_])
        p.set_memslot(vm, 1, GiB, 2 * MiB)
        p.access([vm, vm], [GiB + 0x5000, GiB + 0x3000], [R_, W_])


@pytest.mark.nojit
def test_address_space_1_slots():
    """SMM memslots: their own generation and overlap rules; vCPUs (AS0) never map them."""
    p = Pair(memory=8 * GiB, backing="thp")
    vm = p.create_vms(1, memory=4 * MiB)[0]
    p.access([vm, vm], [0x1000, GiB], [W_, R_])
    p.set_memslot(vm, AS1 | 1, 0, 4 * MiB)             # overlaps AS0 slot 0: allowed
    p.access([vm], [GiB], [R_])                           # the AS0 MMIO SPTE is still valid
    p.set_memslot(vm, AS1 | 2, 2 * MiB, 2 * MiB)          # overlaps AS1 slot 1: EEXIST
    p.set_memslot(vm, AS1 | 1, 0, 4 * MiB, LOG)           # logging on an AS1 slot
    p.access([vm], [0x1000], [W_])
    p.get_dirty_log(vm, AS1 | 1)
    p.set_memslot(vm, AS1 | 1, 0, 0)


@pytest.mark.nojit
def test_readonly_slot_logging_toggle():
    p = Pair(memory=8 * GiB, backing="4k")
    vm = p.create_vms(1, memory=4 * MiB)[0]
    p.set_memslot(vm, 1, GiB, 2 * MiB, RO)
    p.access([vm, vm], [GiB, GiB], [R_, W_])
    p.set_memslot(vm, 1, GiB, 2 * MiB, RO | LOG)
    p.get_dirty_log(vm, 1)
    p.set_memslot(vm, 1, GiB, 2 * MiB, RO)


@pytest.mark.nojit
def test_memslot_errno_order():
    """EEXIST (kvm_check_memslot_overlap) is checked before MAXPHYADDR (kvm_arch_prepare_memory_region)."""
    p = Pair(memory=8 * GiB)
    vm = p.create_vms(1, memory=4 * MiB, maxphyaddr=36)[0]
    top = 1 << 36
    p.set_memslot(vm, 1, top - 8 * KiB, 4 * KiB)
    p.set_memslot(vm, 2, top - 8 * KiB, 16 * KiB)
    p.get_dirty_log(vm, 5)                              # no such slot: ENOENT
    p.get_dirty_log(vm, 1)                              # no bitmap: ENOENT


@pytest.mark.nojit
def test_host_memory_exhausted():
    """The budget runs out mid-batch: batches run VM by VM, and HostMemoryExhausted.applied says
    which events took effect (earlier VMs' events, and this VM's before the one that failed)."""
    p = Pair(memory=6 * MiB, backing="thp")
    vm, other = p.create_vms(2, memory=8 * MiB)
    p.access([other, vm, other, vm, vm, vm], [0x1000, 0x1000, 0x2000, 0x201000, 0x401000, 0x601000],
             [R_, R_, W_, W_, R_, W_])
    p.access([vm], [0x401000], [R_])
    p.set_memslot(vm, 0, 0, 0)
    p.access([vm, other], [0x1000, 0x1000], [R_, R_])


# ---------------------------------------------------------------------------- MMIO generation wrap
@settings(HYP, max_examples=40)
@given(data=st.data())
def test_mmio_generation_wrap(data):
    """Memslot updates across the 19-bit MMIO generation wrap: the wrap zaps everything."""
    d = HypDraw(data)
    p = Pair(memory=64 * GiB, backing=d.pick(["4k", "thp"]), nx_huge_pages=d.pick([False, True]))
    vm = p.create_vms(1, memory=4 * MiB, tdp_format=d.pick(["ept", "npt"]))[0]
    other = p.create_vms(1, memory=4 * MiB)[0]
    p.set_generation(vm, (1 << 19) * d.int(1, 3) - 2 * d.int(1, 6))
    p.access([vm, vm, other], [0x1000, GiB + 0x3000, GiB], [W_, R_, R_])
    for _ in range(d.int(3, 12)):
        d.pick([op_access, op_access, op_memslot])(d, p)
        p.access([vm, vm], [GiB + 0x3000, 0x1000], [R_, R_])
    p.check(all_dumps=True)


@pytest.mark.nojit
@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_mmio_generation_wrap_small(fmt):
    p = Pair(memory=8 * GiB, backing="thp")
    vm = p.create_vms(1, memory=4 * MiB, tdp_format=fmt)[0]
    p.set_generation(vm, (1 << 19) - 4)
    p.access([vm, vm], [0x1000, GiB], [W_, R_])
    p.set_memslot(vm, 1, 2 * GiB, 2 * MiB)         # gen -> 2^19 - 2
    p.access([vm, vm], [GiB, GiB], [R_, R_])       # stale MMIO SPTE, then valid again
    p.set_memslot(vm, 1, 2 * GiB, 2 * MiB, LOG)    # gen -> 2^19: wrap, everything zapped
    p.access([vm, vm, vm], [GiB, 0x1000, 2 * GiB], [R_, R_, W_])
    p.set_memslot(vm, 1, 0, 0)


# ---------------------------------------------------------------------------- notifiers, NX recovery
@pytest.mark.nojit
@pytest.mark.parametrize("ept_ad", [True, False])
def test_age_and_access_track(ept_ad):
    """Aging clears A (A/D SPTEs) or access-tracks (A/D disabled); accesses make pages young again
    (the fast path restores access-tracked SPTEs)."""
    p = Pair(memory=8 * GiB, backing="thp")
    vm = p.create_vms(1, memory=8 * MiB, ept_ad=ept_ad)[0]
    p.access([vm] * 4, [0x1000, 0x201000, 0x400000, 0x401000], [W_, R_, X_, R_])
    p.set_memslot(vm, 1, GiB, 2 * MiB, 0, None, "4k")
    p.access([vm] * 3, [GiB, GiB + 0x1000, GiB + 0x5000], [W_, R_, X_])
    for how in ("test", True, "test", False):
        p.age(vm, HVA_BASE, HVA_BASE + 8 * MiB, how)
        p.age(vm, HVA_BASE + GiB, HVA_BASE + GiB + 0x8000, how)
    p.access([vm] * 4, [0x1000, 0x202000, GiB + 0x1000, GiB], [R_, W_, W_, X_])
    p.age(vm, HVA_BASE, HVA_BASE + GiB + 2 * MiB, "test")
    p.age(vm, HVA_BASE, HVA_BASE + GiB + 2 * MiB, True)


@pytest.mark.nojit
@pytest.mark.parametrize("fmt", ["ept", "npt"])
def test_invalidate_retry(fmt):
    """Leaves (any level) overlapping the range are zapped; faults inside it retry until the end."""
    p = Pair(memory=8 * GiB, backing="thp")
    vm = p.create_vms(1, memory=8 * MiB, tdp_format=fmt)[0]
    p.set_memslot(vm, 1, GiB, 2 * MiB, RO, None, "4k")
    p.access([vm] * 4, [0x1000, 0x201000, GiB, GiB + 0x3000], [W_, R_, R_, R_])
    p.invalidate_range_start(vm, HVA_BASE + 0x202000, HVA_BASE + 0x203000)
    p.access([vm] * 4, [0x1000, 0x201000, 0x202000, 0x203000], [R_, R_, W_, R_])
    p.invalidate_range_start(vm, HVA_BASE + GiB + 0x2000, HVA_BASE + GiB + 0x4000)
    p.access([vm] * 4, [GiB, GiB + 0x2000, GiB + 0x3000, GiB + 0x3000], [R_, R_, W_, R_])
    p.invalidate_range_end(vm)
    p.access([vm] * 2, [0x202000, GiB + 0x3000], [R_, W_])
    p.invalidate_range_end(vm)
    p.access([vm] * 3, [0x202000, 0x400000, GiB + 0x3000], [W_, R_, W_])
    p.invalidate_range_end(vm)


@pytest.mark.nojit
def test_invalidate_range_spanning_two_slots():
    """One hva range mapped by two memslots (aliases): KVM's kvm_mmu_invalidate_range_add merges
    the gfn ranges of both slots (min start, max end) because kvm_mmu_invalidate_begin (on_lock)
    has already counted the invalidation when the first range is added, so faults on gfns
    between the two ranges retry as well until the end."""
    p = Pair(memory=8 * GiB, backing="4k")
    vm = p.create_vms(1, memory=4 * MiB)[0]
    p.set_memslot(vm, 1, GiB, 2 * MiB, 0, HVA_BASE)     # aliases gfns 0..511 of slot 0
    p.access([vm] * 3, [0x1000, 0x100000, GiB + 0x1000], [W_, R_, R_])
    p.invalidate_range_start(vm, HVA_BASE + 0x1000, HVA_BASE + 0x2000)   # gfn 1 and gfn 0x40001
    p.access([vm] * 3, [0x1000, 0x100000, GiB + 0x1000], [R_, R_, R_])
    p.invalidate_range_end(vm)


@pytest.mark.nojit
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_nx_recovery_oldest_first(ratio):
    """With a 1 GiB host page, a fetch tracks a 2M-level table (req_level 1G) and a 4K-level one
    under it; kvm_recover_nx_huge_pages takes the head of possible_nx_huge_pages each time, so
    pages freed along with an older one do not use up to_zap."""
    p = Pair(memory=8 * GiB, backing="hugetlb-1g", nx_huge_pages=True, nx_huge_pages_recovery_ratio=ratio)
    vm = p.create_vms(1, memory=2 * GiB, tdp_format="npt")[0]
    p.access([vm] * 4, [0x1000, GiB + 0x201000, 0x401000, 0x601000], [X_, X_, X_, R_])
    for _ in range(4):
        p.advance_time(3600 / min(ratio, 3600))
        p.access([vm] * 3, [0x1000, 0x201000, 0x801000], [R_, X_, X_])


@pytest.mark.nojit
def test_split_access_tracked_huge_spte():
    p = Pair(memory=8 * GiB, backing="thp", nx_huge_pages=True)
    vm = p.create_vms(1, memory=4 * MiB, ept_ad=False)[0]
    p.access([vm], [0x1000], [R_])                 # a 2M SPTE
    p.age(vm, HVA_BASE, HVA_BASE + 4 * MiB, True)  # access-tracked
    p.access([vm], [0x1000], [X_])                 # split to 4K (make_small_spte of a tracked SPTE)
    p.access([vm, vm], [0x2000, 0x3000], [R_, X_])
