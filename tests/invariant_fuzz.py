"""Security-invariant fuzzer: random memslot / MMU-notifier / dirty-log / register / access sequences on
a TDP VM (paging off), a shadow-MMU VM, a TDP VM whose guest pages (2D walks) and a shadow-MMU VM with paging
off (direct shadow pages), with the MMU's guarantees checked after every step (docs/guarantees.md):

- every leaf SPTE maps host memory inside the slot of its gfn, at that gfn's hva;
- no SPTE is writable for a read-only slot;
- no SPTE maps an hva under an MMU-notifier invalidation in progress;
- every guest write to a dirty-logged slot is in the next collection (bitmap, manual protect with and
  without INITIALLY_SET, PML, ring), and a write to a read-only slot never reaches memory.

``run_case(seed, steps)`` runs one case and returns the number of checks made; a violation raises
InvariantViolation with the last steps.  tests/test_invariant_fuzz.py runs a few seeds,
bench/fuzz_invariants.py many.
"""

import numpy as np
from batchmmu.kernels import state as S
from batchmmu.kernels.spte import (
    PT_WRITABLE_MASK,
    ROLE_DIRECT,
    ROLE_PASSTHROUGH,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    spte_to_child_row,
    spte_to_pfn,
)

import batchmmu as bm

P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
MiB, GiB = 1 << 20, 1 << 30
MEM = 16 * MiB                   # slot 0 (page tables at PML4.., the rest unused)
PML4, PDPT, PD0 = 0x10000, 0x11000, 0x12000
PD_WIN = {1: 0x13000, 2: 0x14000}  # page directories of the [1G, 2G) and [2G, 3G) windows
PT_BASE = 0x20000                # page tables: 8 for slot 0, 2 per window
WINDOWS = (GiB, 2 * GiB)         # slot 1 lives at one of these gpas
SLOT1 = 4 * MiB
HVA1 = (1 << 40, (1 << 40) + 64 * MiB)   # hvas slot 1 may take (2M aligned: THP-able)
MODES = ("get", "manual", "initially_set", "ring")
OK = (bm.HIT, bm.FIXED, bm.SPURIOUS)


class InvariantViolation(AssertionError):
    pass


def _identity_tables(h, vm, huge_windows):
    """4-level identity map of slot 0 (4K pages) and both slot-1 windows (4K or 2M guest pages)."""
    leaf = P | W | U | A | D
    h.write_guest_memory(vm, PML4, [PDPT | P | W | U | A])
    h.write_guest_memory(vm, PDPT, [PD0 | P | W | U | A, PD_WIN[1] | P | W | U | A, PD_WIN[2] | P | W | U | A])
    pt = PT_BASE
    pdes = []
    for i in range(MEM >> 21):
        h.write_guest_memory(vm, pt, [((i * 512 + k) << 12) | leaf for k in range(512)])
        pdes.append(pt | P | W | U | A)
        pt += 0x1000
    h.write_guest_memory(vm, PD0, pdes)
    for w, base in zip((1, 2), WINDOWS, strict=True):
        pdes = []
        for i in range(SLOT1 >> 21):
            gpa = base + (i << 21)
            if huge_windows:
                pdes.append(gpa | leaf | PS)
            else:
                h.write_guest_memory(vm, pt, [(gpa + (k << 12)) | leaf for k in range(512)])
                pdes.append(pt | P | W | U | A)
                pt += 0x1000
        h.write_guest_memory(vm, PD_WIN[w], pdes)


class VMState:
    """What the fuzzer knows of one VM: its slot 1, logging, pending writes, invalidations."""

    def __init__(self, h, vm, kind, mode, rng):
        self.h, self.vm, self.kind, self.mode = h, vm, kind, mode
        self.slot1 = None                # (gpa, hva, flags) or None
        self.alias = None                # slot 2: (gpa, hva, flags), the same hva as slot 1
        self.pending = {1: set(), 2: set()}  # slot -> page offsets written while logging
        self.invals = []                 # hva ranges of the invalidations in progress
        self.vcpus = 2
        self.wp = True
        self.rng = rng


def _slot_of(slots, gfn):
    for s in slots:
        if s["gpa"] >> 12 <= gfn < (s["gpa"] + s["size"]) >> 12:
            return s
    return None


def leaves(h, vm):
    """(gfn, level, spte) of every leaf SPTE reachable from the VM's roots (TDP root, or every vCPU's
    current, PAE and previous shadow roots)."""
    out = []
    if h._mmu_kind[vm] != S.MMU_SHADOW:
        fmt, cfg = int(h.vt.fmt[vm]), bool(h.cfg[S.CFG_MMIO_CACHING])
        for gfn, (level, spte) in h.spte_dump(vm).items():
            if not is_mmio_spte(fmt, np.uint64(spte).view(np.int64), cfg):
                out.append((gfn, level, spte))
        return out
    spt, role, sgfn, trans = h.pa.spt, h.pa.sp_role, h.pa.sp_gfn, h.sh.trans
    roots = set()
    g0 = int(h.vt.vcpu_off[vm])
    for g in range(g0, g0 + int(h._vcpus[vm])):
        for r in [int(h.vr.root[g])] + [int(x) for x in h.vr.pae_root[g]] + [int(x) for x in h.vr.prev_root[g]]:
            if r >= 0:
                roots.add(r)
    seen, stack = set(), list(roots)
    while stack:
        row = stack.pop()
        if row in seen:
            continue
        seen.add(row)
        rl = int(role[row])
        level = rl & 0xF
        for i in range(512):
            spte = int(spt[row, i])
            if not is_shadow_present_pte(spte):
                continue
            if not is_last_spte(spte, level):
                stack.append(int(spte_to_child_row(np.int64(spte))))
                continue
            if rl & int(ROLE_PASSTHROUGH):
                gfn = int(sgfn[row])
            elif rl & int(ROLE_DIRECT):
                gfn = int(sgfn[row]) + (i << (9 * (level - 1)))
            else:
                gfn = int(trans[row, i]) >> 12
            out.append((gfn, level, spte & ((1 << 64) - 1)))
    return out


def check(st, log):
    """The MMU invariants of one VM after a step; returns the number of SPTEs checked."""
    h, vm = st.h, st.vm
    slots = h.memslots(vm)

    def fail(why):
        raise InvariantViolation(f"VM {vm} ({st.kind}, {st.mode}): {why}\n-- last steps:\n  " + "\n  ".join(log[-25:]))
    n = 0
    for gfn, level, spte in leaves(h, vm):
        n += 1
        span = 1 << (9 * (level - 1))
        s = _slot_of(slots, gfn)
        if s is None or _slot_of(slots, gfn + span - 1) is not s:
            fail(f"SPTE {spte:#x} (level {level}) for gfn {gfn:#x} is outside every memslot")
        hva = s["hva"] + ((gfn << 12) - s["gpa"])
        pfn = int(spte_to_pfn(np.uint64(spte).view(np.int64)))
        if pfn != hva >> 12:
            fail(f"SPTE {spte:#x} for gfn {gfn:#x} maps pfn {pfn:#x}, its slot's hva is {hva:#x}")
        if spte & int(PT_WRITABLE_MASK) and s["flags"] & bm.MEM_READONLY:
            fail(f"writable SPTE {spte:#x} for gfn {gfn:#x} in read-only slot {s['slot']}")
        for lo, hi in st.invals:
            if hva < hi and lo < hva + (span << 12):
                fail(f"SPTE {spte:#x} (level {level}) maps hva {hva:#x} under invalidation [{lo:#x}, {hi:#x})")
    return n


# ----------------------------------------------------------------------------- the steps
def _collect(st):
    """Userspace collects the dirty pages of every logging slot (and re-arms them): slot -> page offsets."""
    h, vm = st.h, st.vm
    got = {1: set(), 2: set()}
    if st.mode == "ring":
        for c in range(st.vcpus):
            for s, o in h.harvest_dirty_ring(vm, c):
                got.setdefault(int(s), set()).add(int(o))
        h.reset_dirty_rings(vm)
        return got
    for slot in (1, 2):
        if not _logging(st, slot):
            continue
        words = h.get_dirty_log(vm, slot)
        got[slot] = {w * 64 + b for w, x in enumerate(words) for b in range(64) if (int(x) >> b) & 1}
        if st.mode in ("manual", "initially_set"):
            h.clear_dirty_log(vm, slot, 0, SLOT1 >> 12, np.full(SLOT1 >> 18, -1, np.int64))
    return got


def _logging(st, slot):
    s = st.slot1 if slot == 1 else st.alias
    return s is not None and bool(s[2] & bm.MEM_LOG_DIRTY_PAGES)


def _harvest_all(st, log):
    """Collect every log and check that no write since the last collection is missing."""
    got = _collect(st)
    for slot in (1, 2):
        missing = st.pending[slot] - got[slot]
        if missing:
            raise InvariantViolation(f"VM {st.vm} ({st.kind}, {st.mode}): lost writes to slot {slot}: pages "
                                     f"{sorted(missing)[:8]}\n-- last steps:\n  " + "\n  ".join(log[-25:]))
        st.pending[slot] = set()


def _set_slot(st, log, slot, spec):
    """KVM_SET_USER_MEMORY_REGION; False when refused during an invalidation (as KVM would wait)."""
    h, vm = st.h, st.vm
    try:
        if spec is None:
            old = st.slot1 if slot == 1 else st.alias
            if old is None:
                return True
            h.set_memslot(vm, slot, old[0], 0)
        else:
            gpa, hva, flags, backing = spec
            h.set_memslot(vm, slot, gpa, SLOT1, flags=flags, hva=hva, backing=backing)
    except bm.InvalidationInProgress:
        assert st.invals, "refused without an invalidation in progress"
        log.append("  -> refused: invalidation in progress")
        return False
    except bm.BatchMMUError as e:
        log.append(f"  -> rejected: {e}")
        return False
    return True


def step(st, log):
    """One random operation on the VM."""
    h, vm, rng = st.h, st.vm, st.rng
    r = int(rng.integers(0, 100))
    s1 = st.slot1
    if r < 45 and s1 is not None:
        gpa0 = s1[0]
        slot = 1
        if st.alias is not None and rng.integers(0, 3) == 0:
            gpa0, slot = st.alias[0], 2
        pages = rng.integers(0, SLOT1 >> 12, int(rng.integers(1, 12)))
        addr = gpa0 + pages * 4096 + 8 * rng.integers(0, 500, pages.size)
        write = bool(rng.integers(0, 2))
        vcpu = int(rng.integers(0, st.vcpus))
        if write and rng.integers(0, 2):
            vals = rng.integers(1, 1 << 62, pages.size)
            log.append(f"store vcpu{vcpu} {[hex(int(a)) for a in addr[:4]]}.. ({pages.size})")
            res = h.store(vm, vcpu, addr, vals)
        else:
            vals = None
            log.append(f"access {'W' if write else 'R'} vcpu{vcpu} {[hex(int(a)) for a in addr[:4]]}.. ({pages.size})")
            res = h.access(vm, vcpu, addr, (bm.ACC_WRITE if write else 0) | bm.ACC_USER)
        while (res.outcome == bm.RING_FULL).any():
            _note_writes(st, slot, pages, res.outcome, write, vals, addr)
            full = res.outcome == bm.RING_FULL
            _harvest_all(st, log)
            pages, addr = pages[full], addr[full]
            vals = vals[full] if vals is not None else None
            res = h.store(vm, vcpu, addr, vals) if vals is not None else \
                h.access(vm, vcpu, addr, (bm.ACC_WRITE if write else 0) | bm.ACC_USER)
        _note_writes(st, slot, pages, res.outcome, write, vals, addr)
    elif r < 52:
        _harvest_all(st, log)
        log.append("collect dirty logs")
    elif r < 58 and s1 is not None:
        flags = s1[2] ^ bm.MEM_LOG_DIRTY_PAGES
        log.append(f"slot 1 flags -> {flags:#x}")
        _harvest_all(st, log)              # userspace collects before logging goes off (or on again)
        if _set_slot(st, log, 1, (s1[0], s1[1], flags, None)):
            st.slot1 = (s1[0], s1[1], flags)
    elif r < 63 and s1 is not None:
        gpa = WINDOWS[1] if s1[0] == WINDOWS[0] else WINDOWS[0]
        if st.alias is not None and st.alias[0] == gpa:
            return
        log.append(f"move slot 1 to {gpa:#x}")
        if _set_slot(st, log, 1, (gpa, s1[1], s1[2], None)):
            st.slot1 = (gpa, s1[1], s1[2])
    elif r < 68:
        # delete and recreate slot 1: read-only or not, logging or not, a new hva or the same
        log.append("recreate slot 1")
        _harvest_all(st, log)
        if not _set_slot(st, log, 1, None):
            return
        if st.alias is not None:
            if not _set_slot(st, log, 2, None):
                return
            st.alias = None
        st.slot1 = None
        st.pending = {1: set(), 2: set()}
        flags = (bm.MEM_READONLY if rng.integers(0, 3) == 0 else 0) | \
            (bm.MEM_LOG_DIRTY_PAGES if rng.integers(0, 2) else 0)
        hva = HVA1[int(rng.integers(0, 2))]
        gpa = WINDOWS[int(rng.integers(0, 2))]
        backing = ["4k", "thp"][int(rng.integers(0, 2))]
        log.append(f"  slot 1 at {gpa:#x} hva {hva:#x} flags {flags:#x} {backing}")
        if _set_slot(st, log, 1, (gpa, hva, flags, backing)):
            st.slot1 = (gpa, hva, flags)
    elif r < 71 and s1 is not None and st.alias is None:
        gpa = WINDOWS[1] if s1[0] == WINDOWS[0] else WINDOWS[0]
        flags = bm.MEM_READONLY if rng.integers(0, 2) else bm.MEM_LOG_DIRTY_PAGES
        log.append(f"alias slot 2 at {gpa:#x} of hva {s1[1]:#x} flags {flags:#x}")
        if _set_slot(st, log, 2, (gpa, s1[1], flags, None)):
            st.alias = (gpa, s1[1], flags)
    elif r < 80 and s1 is not None:
        if st.invals and rng.integers(0, 2):
            log.append("invalidate_range_end")
            h.invalidate_range_end(vm)
            st.invals.pop()
        elif len(st.invals) < 2:
            lo = s1[1] + int(rng.integers(0, SLOT1 >> 12)) * 4096
            hi = min(lo + int(rng.integers(1, 600)) * 4096, s1[1] + SLOT1)
            log.append(f"invalidate_range_start [{lo:#x}, {hi:#x})")
            h.invalidate_range_start(vm, lo, hi)
            st.invals.append((lo, hi))
    elif r < 84 and s1 is not None:
        lo = s1[1] + int(rng.integers(0, SLOT1 >> 12)) * 4096
        hi = min(lo + int(rng.integers(1, 1024)) * 4096, s1[1] + SLOT1)
        if rng.integers(0, 2):
            log.append(f"age [{lo:#x}, {hi:#x})")
            h.age_hva_range(vm, lo, hi)
        else:
            log.append(f"invalidate_hva_range [{lo:#x}, {hi:#x})")
            h.invalidate_hva_range(vm, lo, hi)
    elif r < 90 and st.kind in ("shadow", "2d", "legacy2d"):
        vcpu = int(rng.integers(0, st.vcpus))
        st.wp = not st.wp if rng.integers(0, 2) else st.wp
        log.append(f"set_vcpu_regs vcpu{vcpu} cr0.wp={int(st.wp)} cr3={PML4:#x}")
        h.set_vcpu_regs(vm, vcpu, cr0=0x80010033 if st.wp else 0x80000033, cr3=PML4)
    elif r < 94 and st.kind in ("shadow", "nonpaging") and s1 is not None:
        vcpu = int(rng.integers(0, st.vcpus))
        page = int(rng.integers(0, SLOT1 >> 12))
        log.append(f"emulated write vcpu{vcpu} {s1[0] + page * 4096:#x}")
        res = h.emulated_access(vm, vcpu, s1[0] + page * 4096, bm.ACC_WRITE, 0x5A5A, 8)
        if int(res.outcome[0]) == bm.EMULATED and not s1[2] & bm.MEM_READONLY and _logging(st, 1):
            st.pending[1].add(page)
    elif st.kind in ("shadow", "nonpaging"):
        vcpu = int(rng.integers(0, st.vcpus))
        op = int(rng.integers(0, 3))
        log.append(f"{('invlpg', 'flush_tlb', 'mov_cr3')[op]} vcpu{vcpu}")
        if op == 0 and s1 is not None:
            h.invlpg(vm, vcpu, s1[0] + int(rng.integers(0, SLOT1 >> 12)) * 4096)
        elif op == 1:
            h.flush_tlb(vm, vcpu)
        else:
            h.mov_cr3(vm, vcpu, PML4)


def _note_writes(st, slot, pages, outcome, write, vals, addr):
    """Writes that landed are pending for the next collection; stores to read-only memory never land."""
    if not write:
        return
    spec = st.slot1 if slot == 1 else st.alias
    if spec is None:
        return
    ro = bool(spec[2] & bm.MEM_READONLY)
    landed = np.isin(outcome, OK if ro else OK + (bm.EMULATED,))
    if ro and landed.any():
        raise InvariantViolation(f"VM {st.vm} ({st.kind}): a write to read-only slot {slot} did not exit "
                                 f"(outcome {bm.OUTCOME_NAMES[int(outcome[landed][0])]} at {int(addr[landed][0]):#x})")
    if ro and vals is not None:
        got = st.h.read_guest_memory(st.vm, int(addr[0]) & ~7, 1)[0]
        if int(got) == int(vals[0]) and int(vals[0]) != 0:
            raise InvariantViolation(f"VM {st.vm} ({st.kind}): a store to read-only slot {slot} changed memory")
    if not ro and _logging(st, slot):
        st.pending[slot].update(int(p) for p in pages[landed])
        # an alias that logs the same host pages does not see writes through the other gpa (per-slot logs)


# the VMs of a case: TDP MMU (paging off / 2D), shadow paging (paging on / off), legacy TDP MMU (off / 2D)
KINDS = ("tdp", "shadow", "2d", "nonpaging", "legacy", "legacy2d")


def make_case(seed):
    rng = np.random.default_rng(seed)
    pml = bool(rng.integers(0, 4) == 0)
    h = bm.Host(memory="4GiB", backing="4k", mmio_caching=bool(rng.integers(0, 2)), pml=pml,
                eager_page_split=bool(rng.integers(0, 2)))
    states = []
    for kind in KINDS:
        vm = int(h.create_vms(1, memory=MEM, vcpus=2, mmu="shadow" if kind in ("shadow", "nonpaging") else "tdp",
                              tdp_mmu=not kind.startswith("legacy"))[0])
        mode = MODES[int(rng.integers(0, len(MODES)))]
        if mode in ("manual", "initially_set"):
            h.enable_manual_dirty_log_protect(vm, initially_set=(mode == "initially_set"))
        if mode == "ring":
            h.enable_dirty_ring(vm, 1024 if pml else 128)
        st = VMState(h, vm, kind, mode, rng)
        if kind in ("shadow", "2d", "legacy2d"):
            _identity_tables(h, vm, huge_windows=bool(rng.integers(0, 2)))
            for c in range(2):
                h.set_vcpu_regs(vm, c, cr0=0x80010033, cr4=0x20, efer=0xD01, cr3=PML4)
        flags = bm.MEM_LOG_DIRTY_PAGES if rng.integers(0, 2) else 0
        backing = ["4k", "thp"][int(rng.integers(0, 2))]
        h.set_memslot(vm, 1, WINDOWS[0], SLOT1, flags=flags, hva=HVA1[0], backing=backing)
        h.touch_host_memory(vm, WINDOWS[0], SLOT1)
        st.slot1 = (WINDOWS[0], HVA1[0], flags)
        states.append(st)
    return h, states


def run_case(seed, steps=60):
    """One random case: ``steps`` operations on each VM of KINDS, interleaved; returns SPTE checks made."""
    h, states = make_case(seed)
    logs = {st.vm: [f"seed {seed}: {st.kind} VM, dirty mode {st.mode}"] for st in states}
    checks = 0
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps * len(states)):
        st = states[int(rng.integers(0, len(states)))]
        step(st, logs[st.vm])
        for other in states:
            checks += 1 + check(other, logs[other.vm])
    for st in states:
        while st.invals:
            h.invalidate_range_end(st.vm)
            st.invals.pop()
        _harvest_all(st, logs[st.vm])
    return checks
