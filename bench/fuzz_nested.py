"""Differential fuzz of nested EPT / NPT: the same random stream on an L0 with the legacy TDP MMU and on one
with the TDP MMU (both MMUs in one VM), in lockstep.

    python bench/fuzz_nested.py SEED0 NSEEDS STEPS      (e.g. 0 200 400: a few minutes)

Per seed a random configuration (VMX or SVM, L1 and host EPT A/D, 4k or thp backing, tdp_huge_page_level, eager
split, split on fault, NX huge pages and their recovery, page budget pressure, dirty bitmaps with manual protect
and initially-set, or dirty rings) and a stream of L2 accesses and stores, L1's stores into EPT12 / NPT12 and
into its own memory, INVEPT, nested exits and entries, MMU-notifier invalidations, aging, discards, dirty-log
GET / CLEAR / ring harvests, memslot changes, the shrinker, simulated time and reclaim.  HARD: a difference the
guest or the VMM can see where KVM's two MMUs agree; CRASH: an exception on one side; INSANE: an impossible
count (negative statistics, the shrinker's count against the footprint, a writable SPTE over a write-tracked
gfn or over a clean page of a logged slot).  SOFT: a difference KVM's MMUs also show (prefetch, eager splits,
writable read faults, budget zaps), counted only.  Written by a review of issue 12's TDP-MMU nesting.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import random
import time
import traceback

import numpy as np
from batchmmu.kernels import state as S
from test_nested import WB, Nest, R, W, X

import batchmmu as bm
from batchmmu.errors import BatchMMUError

OKS = {bm.HIT, bm.FIXED, bm.SPURIOUS}
SLOT1_GPAS = [0x4000000, 0x5000000, 0x8000000]
SLOT2_GPA = 0x10000000


def cfg_of(seed):
    r = random.Random(seed * 7919 + 1)
    c = dict(
        svm=r.random() < 0.5,
        l1ad=r.random() < 0.5,
        host_ad=r.random() < 0.6,
        backing=r.choice(["4k", "thp"]),
        nx=r.random() < 0.5,
        period=r.choice([0, 1000, 5000]),
        ratio=r.choice([1, 4, 60]),
        hlevel=r.choice([3, 3, 2, 1]),
        eager=r.random() < 0.7,
        split=r.random() < 0.8,
        pressure=r.random() < 0.35,
        ring=r.random() < 0.25,
        manual=r.random() < 0.4,
        initset=r.random() < 0.5,
        slot1_log=r.random() < 0.6,
        l2pg=r.random() < 0.3,
        overcommit=r.random() < 0.3,
    )
    if not c["host_ad"]:
        c["l1ad"] = False
    return c


class Side:
    def __init__(self, c, tdp):
        hk = dict(backing=c["backing"], nx_huge_pages=c["nx"], nx_huge_pages_recovery_period_ms=c["period"],
                  nx_huge_pages_recovery_ratio=c["ratio"], tdp_huge_page_level=c["hlevel"],
                  eager_page_split=c["eager"], huge_page_split_on_fault=c["split"], overcommit=c["overcommit"])
        self.n = Nest(svm=c["svm"], ept_ad=c["l1ad"], host_ad=c["host_ad"], tdp_mmu=tdp, **hk)
        self.h, self.vm = self.n.h, self.n.vm
        self.tdp = tdp


def call(fn, *a, **k):
    try:
        return ("ok", fn(*a, **k))
    except BatchMMUError as e:
        return ("bmerr", type(e).__name__, str(e)[:160])
    except Exception as e:   # noqa: BLE001
        return ("CRASH", type(e).__name__, str(e)[:300], traceback.format_exc()[-1500:])


def acc_payload(res, store_l1, pressure):
    """(strict, soft) views of an AccessResult."""
    o, e, f = int(res.outcome[0]), int(res.error_code[0]), int(res.fault_gpa[0])
    if o in OKS:
        strict = ("ok",)
    else:   # the exit's error code reaches the guest only when reflected to L1 (or a guest #PF)
        strict = (o, e if o in (bm.L1_EXIT, bm.GUEST_FAULT) else None, f)
    if pressure and store_l1 and (o in OKS or o == bm.EMULATED):
        strict = ("landed",)
    if pressure and not store_l1 and o in (bm.MMIO, bm.L1_EXIT):
        # budget pressure zaps different shadow pages on the two MMUs: an MMIO SPTE left from before an edit of
        # L1's tables is emulated at once on one (handle_mmio_page_fault does not look at the tables again)
        # while the other, its page gone, walks them anew and reflects their refusal to L1
        strict = ("mmio or L1 exit",)
    return strict, (o, e, f)


class Pair:
    def __init__(self, seed, steps):
        self.seed, self.steps = seed, steps
        self.c = c = cfg_of(seed)
        self.rng = random.Random(seed)
        self.sides = [Side(c, False), Side(c, True)]
        self.hard, self.soft, self.insane, self.crash = [], 0, [], []
        self.stale = False
        self.step = 0
        self.in_l2 = False
        self.slot1 = None       # gpa or None
        self.slot2 = False
        self.logged = {0: False, 1: False, 2: False}
        self.inval_open = False
        self.written = {}          # (slot, page offset) written by L1 since the log last re-protected it
        self.ring_seen = []        # per side: ring entries harvested since the last reset

    # ------------------------------------------------------------------ helpers
    def both(self, fn, what, payload=lambda s, r: r, soft=None):
        """fn(side) on both; compare payloads (strict); soft(side, r) compared as soft."""
        rs = [call(fn, s) for s in self.sides]
        for s, r in zip(self.sides, rs, strict=False):
            if r[0] == "CRASH":
                self.crash.append((self.step, what, "tdp" if s.tdp else "legacy", r[1:]))
        if rs[0][0] != rs[1][0] or (rs[0][0] == "bmerr" and rs[0][1:] != rs[1][1:]):
            self.hard.append((self.step, what, "exception differs", rs[0][:3], rs[1][:3]))
            return rs
        if rs[0][0] == "ok":
            p = [payload(s, r[1]) for s, r in zip(self.sides, rs, strict=False)]
            if p[0] != p[1]:
                self.hard.append((self.step, what, p[0], p[1]))
            if soft is not None:
                q = [soft(s, r[1]) for s, r in zip(self.sides, rs, strict=False)]
                if q[0] != q[1]:
                    self.soft += 1
        return rs

    def access(self, what, addr, kind, value=None, l1=False):
        def fn(s):
            if value is None:
                return s.h.access(s.vm, 0, addr, kind)
            return s.h.store(s.vm, 0, addr, value, kind=kind | bm.ACC_WRITE)
        store_l1 = l1 and (value is not None or kind & bm.ACC_WRITE)
        # Under budget pressure the MMUs zap different shadow pages, so after an EPT12 edit without INVEPT one L2
        # may still use the old translation (architecturally undefined until INVEPT) where the other walks anew
        stale = not l1 and self.c["pressure"] and self.stale
        rs = self.both(fn, (what, hex(addr), kind, value is not None),
                         payload=(lambda s, r: ("stale",)) if stale else
                         (lambda s, r: acc_payload(r, store_l1, self.c["pressure"])[0]),
                         soft=lambda s, r: acc_payload(r, store_l1, self.c["pressure"])[1])
        if store_l1 and all(r[0] == "ok" for r in rs):
            for r in rs:
                o = int(r[1].outcome[0])
                if o in OKS or o == bm.EMULATED:
                    sl = self.slot_of(addr)
                    if sl is not None and self.logged.get(sl[0]):
                        self.written[sl] = True
        return rs

    def slot_of(self, gpa):
        if gpa < (64 << 20):
            return (0, gpa >> 12)
        if self.slot1 is not None and self.slot1 <= gpa < self.slot1 + 64 * 4096:
            return (1, (gpa - self.slot1) >> 12)
        if self.slot2 and SLOT2_GPA <= gpa < SLOT2_GPA + (2 << 20):
            return (2, (gpa - SLOT2_GPA) >> 12)
        return None

    def forget(self, slot):
        self.written = {k: v for k, v in self.written.items() if k[0] != slot}

    def check_written(self, what, slot, words):
        """Every page L1 wrote since the log last re-protected it is in the bitmap (on both MMUs)."""
        for s, w in zip(self.sides, words, strict=False):
            bits = np.asarray(w, np.uint64)
            miss = [k for k in self.written if k[0] == slot and not (int(bits[k[1] // 64]) >> (k[1] % 64)) & 1]
            if miss:
                self.hard.append((self.step, what, "tdp" if s.tdp else "legacy", "written page not dirty",
                                  [hex(m[1]) for m in miss[:4]]))

    def exit_l2(self):
        if self.in_l2:
            self.both(lambda s: s.h.nested_exit(s.vm, 0), "nested_exit")
            self.in_l2 = False

    def enter_l2(self):
        if not self.in_l2:
            self.both(lambda s: s.n.reenter(), "reenter")
            self.in_l2 = True
            if self.c["svm"]:
                self.stale = False   # VMRUN syncs guest_mmu (nested_svm_transition_tlb_flush)

    def hva0(self, s):
        return int(s.h.memslots(s.vm)[0]["hva"])

    # ------------------------------------------------------------------ setup
    def setup(self):
        c, rng = self.c, self.rng
        if c["ring"]:
            ent = rng.choice([4096, 8192])
            self.both(lambda s: s.h.enable_dirty_ring(s.vm, ent), "ring")
        elif c["manual"]:
            self.both(lambda s: s.h.enable_manual_dirty_log_protect(s.vm, c["initset"]), "manual")
        self.slot1 = 0x4000000
        fl = bm.MEM_LOG_DIRTY_PAGES if c["slot1_log"] else 0
        self.logged[1] = bool(fl)
        self.both(lambda s: s.h.set_memslot(s.vm, 1, 0x4000000, 64 * 4096, flags=fl), "slot1 create")
        self.data = 0x200000
        self.backs = [0x1000000 + 4096 * k for k in range(32)] + [0x4000000 + 4096 * k for k in range(32)] + \
            [SLOT2_GPA + 4096 * k for k in range(8)] + [0x1200000 + 4096 * k for k in range(512)][::37]
        full = self.sides[0].n.full
        perms = [full] * 4 + [full & ~W, R | X, 0] if not c["svm"] else [full] * 4 + [full & ~2, 1, 0, full | (1 << 63)]
        maps = []
        for k in range(48):
            maps.append((self.data + 4096 * k, rng.choice(self.backs), rng.choice(perms)))
        # a few 2M EPT12 / NPT12 leaves (direct shadow pages below them)
        for k in range(4):
            maps.append((0x40000000 + (k << 21), 0x1000000 + (rng.randrange(8) << 21) if rng.random() < 0.8
                         else 0x4000000, full, 2))
        for s in self.sides:
            for mp in maps:
                if len(mp) == 4:
                    s.n.ept_map(mp[0], mp[1], mp[2], level=2)
                else:
                    s.n.ept_map(*mp)
        self.l2_gpas = [self.data + 4096 * k for k in range(48)] + [0x40000000 + (k << 21) + 4096 * j
                                                                       for k in range(4) for j in (0, 1, 300)]
        self.gvas = None
        if c["l2pg"]:
            P_, RW_, US_ = 1, 2, 4
            fl = [rng.choice([P_ | RW_ | US_] * 3 + [P_ | US_, P_ | RW_, 0]) for _ in range(48)]
            self.gvas = [0x7f0000000000 + 4096 * k + (1 << 21) * (k % 3) for k in range(48)]
            for s in self.sides:
                for k in range(48):
                    s.n.l2_map(self.gvas[k], self.data + 4096 * k, fl[k])
        self.both(lambda s: s.n.enter(paging=bool(c["l2pg"])), "enter")
        self.in_l2 = True

    # ------------------------------------------------------------------ ops
    def op_l2(self):
        rng = self.rng
        self.enter_l2()
        if self.gvas is not None and rng.random() < 0.85:
            gpa = rng.choice(self.gvas) + 8 * rng.randrange(512)
        elif rng.random() < 0.05:
            gpa = rng.choice([0x300000, 0x7f000000, 0x1234000]) + 8 * rng.randrange(512)
        else:
            gpa = rng.choice(self.l2_gpas) + 8 * rng.randrange(512)
        if rng.random() < 0.4:
            self.access("l2 store", gpa, 0, rng.getrandbits(64))
        else:
            self.access("l2 acc", gpa, rng.choice([0, bm.ACC_WRITE, bm.ACC_FETCH, 0]))

    def op_l1_ept(self):
        rng = self.rng
        self.exit_l2()
        n0 = self.sides[0].n
        level = rng.choice([1, 1, 1, 2, 2, 3])
        l2 = rng.choice(self.l2_gpas)
        gpa = n0.entry_gpa(l2, level)
        for s in self.sides[1:]:
            s.n.entry_gpa(l2, level)   # keep the helpers' bookkeeping identical
        cur = n0.mem.get(gpa, 0)
        if level >= 2 and not (cur & (1 << 7)):
            word = cur ^ W if rng.random() < 0.8 else 0
        else:
            word = cur if rng.random() < 0.3 else \
                rng.choice(self.backs) | rng.choice([n0.full, R, n0.full & ~W]) | (0 if self.c["svm"] else WB)
            if level == 2 and rng.random() < 0.5:
                word = (0x1000000 + (rng.randrange(8) << 21)) | n0.full | (0 if self.c["svm"] else WB) | (1 << 7)
        self.access("l1 ept store", gpa, 0, word, l1=True)
        self.stale = True   # until INVEPT (VMX) or the next VMRUN (SVM) L2 may use the old translation
        # the L1 model learns what memory holds now
        vals = [call(lambda s=s: s.n.read(gpa)) for s in self.sides]
        for s, v in zip(self.sides, vals, strict=False):
            if v[0] == "ok":
                s.n.mem[gpa] = v[1] & ((1 << 64) - 1)
        if rng.random() < 0.5 and not self.c["svm"]:
            self.both(lambda s: s.h.invept(s.vm, 0), "invept")
            self.stale = False
        if rng.random() < 0.6:
            self.enter_l2()

    def l1_addr(self):
        rng = self.rng
        r = rng.random()
        n0 = self.sides[0].n
        if r < 0.3:
            return rng.choice(self.backs) + 8 * rng.randrange(512)
        if r < 0.45:
            return rng.randrange(0x100000, n0.next, 8)          # EPT12 tables
        if r < 0.75:
            return rng.randrange(0, 64 << 20, 8)
        if r < 0.9 and self.slot1 is not None:
            return self.slot1 + rng.randrange(0, 64 * 4096, 8)
        return rng.choice([0x4000000, 0x5000000, 0x8000000, SLOT2_GPA]) + rng.randrange(0, 64 * 4096, 8)

    def op_l1_mem(self):
        rng = self.rng
        self.exit_l2()
        addr = self.l1_addr()
        if addr >= 0xFFFFFFFF00:
            return
        if rng.random() < 0.4:
            self.access("l1 store", addr, 0, rng.getrandbits(64), l1=True)
        else:
            self.access("l1 acc", addr, rng.choice([0, bm.ACC_WRITE, bm.ACC_FETCH, bm.ACC_FETCH]), l1=True)

    def op_l1_emul(self):
        rng = self.rng
        self.exit_l2()
        addr = self.l1_addr() & ~7
        if rng.random() < 0.5:
            addr = rng.randrange(0x100000, self.sides[0].n.next, 8)
        write = rng.random() < 0.7
        val = rng.getrandbits(64)
        size = rng.choice([8, 8, 4, 1])
        rs = self.both(lambda s: s.h.emulated_access(s.vm, 0, addr, 2 if write else 0, val, size),
                       ("l1 emul", hex(addr), write, size),
                       payload=lambda s, r: acc_payload(r, False, False)[0],
                       soft=lambda s, r: acc_payload(r, False, False)[1])
        if write and all(r[0] == "ok" for r in rs) and int(rs[0][1].outcome[0]) in OKS | {bm.EMULATED}:
            sl = self.slot_of(addr)
            if sl is not None and self.logged.get(sl[0]):
                self.written[sl] = True
        for s in self.sides:
            v = call(lambda s=s: s.n.read(addr & ~7))
            if v[0] == "ok" and (addr & ~7) in s.n.mem:
                s.n.mem[addr & ~7] = v[1] & ((1 << 64) - 1)

    def op_reclaim(self):
        if not self.c["overcommit"]:
            return self.op_age()
        rng = self.rng
        thr, at = rng.choice([0, 1, 2, 3]), rng.choice([0, 5, 50])
        self.both(lambda s: s.h.reclaim_scan(), "reclaim scan", payload=lambda s, x: None,
                  soft=lambda s, x: np.asarray(x).tolist())
        self.both(lambda s: s.h.reclaim_evict(thr, [at]), ("reclaim evict", thr, at), payload=lambda s, x: None,
                  soft=lambda s, x: np.asarray(x).tolist())

    def op_invept(self):
        if self.c["svm"]:
            return
        self.exit_l2()
        single = self.rng.random() < 0.5
        self.both(lambda s: s.h.invept(s.vm, 0, self.sides[0].n.eptp if single else None), "invept")
        self.stale = False

    def rand_hva_range(self, s, r):
        """(start, end) from rng draws r=(kind, a, b) for side s."""
        kind, a, b = r
        h0 = self.hva0(s)
        if kind == 0:      # data backs in slot 0
            return h0 + 0x1000000 + 4096 * a, h0 + 0x1000000 + 4096 * (a + b)
        if kind == 1:      # tables
            return h0 + 0x100000 + 4096 * (a % 32), h0 + 0x100000 + 4096 * (a % 32 + b)
        if kind == 2:      # a 2M region
            return h0 + 0x1000000 + (a % 8 << 21), h0 + 0x1000000 + ((a % 8 + 1) << 21)
        ms = [m for m in s.h.memslots(s.vm) if m["slot"] == 1]
        if ms:
            return int(ms[0]["hva"]) + 4096 * (a % 60), int(ms[0]["hva"]) + 4096 * (a % 60 + b)
        return h0 + 4096 * a, h0 + 4096 * (a + b)

    def draw_range(self):
        rng = self.rng
        return (rng.choice([0, 0, 1, 2, 3]), rng.randrange(0, 40), rng.choice([1, 1, 4, 16, 64]))

    def op_inval(self):
        r = self.draw_range()
        self.both(lambda s: s.h.invalidate_hva_range(s.vm, *self.rand_hva_range(s, r)), ("inval", r),
                  payload=lambda s, x: None)

    def op_inval_window(self):
        r = self.draw_range()
        self.both(lambda s: s.h.invalidate_range_start(s.vm, *self.rand_hva_range(s, r)), ("inval start", r),
                  payload=lambda s, x: None)
        for _ in range(self.rng.randrange(1, 4)):
            if self.rng.random() < 0.5:
                self.op_l2()
            else:
                self.op_l1_mem()
        self.both(lambda s: s.h.invalidate_range_end(s.vm), "inval end")

    def op_age(self):
        r = self.draw_range()
        not self.c["pressure"]
        test = self.rng.random() < 0.3
        flag = self.rng.random() < 0.7
        fn = (lambda s: s.h.test_young(s.vm, *self.rand_hva_range(s, r))) if test else \
            (lambda s: s.h.age_hva_range(s.vm, *self.rand_hva_range(s, r), flush=flag))
        self.both(fn, ("age", r, test),
                  payload=lambda s, x: None, soft=lambda s, x: np.asarray(x).tolist())

    def op_discard(self):
        r = self.draw_range()
        if (self.rng.random() < 0.85 or self.c["pressure"]) and r[0] == 1:
            r = (0,) + r[1:]   # under budget pressure stale shadow pages of a discarded table differ legitimately
        self.both(lambda s: s.h.discard_hva_range(s.vm, *self.rand_hva_range(s, r)), ("discard", r),
                  payload=(lambda s, x: None) if self.c["overcommit"] else (lambda s, x: x), soft=lambda s, x: x)

    def op_dirty(self):
        rng = self.rng
        not self.c["pressure"]
        pl = lambda s, x: None   # noqa: E731  (bitmaps differ legitimately: prefetch, eager split; see report)
        if self.c["ring"]:
            rs = self.both(lambda s: s.h.harvest_dirty_ring(s.vm, 0), "harvest", payload=lambda s, x: None,
                           soft=lambda s, x: np.asarray(x).tolist())
            if all(r[0] == "ok" for r in rs):
                seen = [set(map(tuple, np.asarray(r[1]).tolist())) for r in rs]
                self.ring_seen = [a | b for a, b in zip(self.ring_seen or [set(), set()], seen, strict=False)]
                for s, sn in zip(self.sides, self.ring_seen, strict=False):
                    miss = [k for k in self.written if k not in sn]
                    if miss:
                        self.hard.append((self.step, "harvest", "tdp" if s.tdp else "legacy",
                                          "written page not in ring", miss[:4]))
            if rng.random() < 0.8:
                self.both(lambda s: s.h.reset_dirty_rings(s.vm), "reset rings", payload=lambda s, x: None,
                          soft=lambda s, x: x)
                self.written, self.ring_seen = {}, []
            return
        slot = rng.choice([0, 1, 2])
        rs = self.both(lambda s: s.h.get_dirty_log(s.vm, slot), ("get", slot), payload=pl,
                       soft=lambda s, x: np.asarray(x).tolist())
        if all(r[0] == "ok" for r in rs):
            self.check_written(("get", slot), slot, [r[1] for r in rs])
            if not self.c["manual"]:
                self.forget(slot)
        if self.c["manual"] and rng.random() < 0.8 and all(r[0] == "ok" for r in rs):
            npages = (64 << 20) >> 12 if slot == 0 else 64
            first = 64 * rng.randrange(0, max(1, npages // 64))
            num = min(npages - first, 64 * rng.choice([1, 2, 8]))
            bits = [rng.getrandbits(64) if rng.random() < 0.7 else (1 << 64) - 1 for _ in range((num + 63) // 64)]
            npages = {0: (64 << 20) >> 12, 1: 64, 2: 512}[slot]
            num = min(npages - first, num) if first < npages else 0
            first = min(first, 64 * ((npages - 1) // 64))
            num = min(num, npages - first)
            self.both(lambda s: s.h.clear_dirty_log(s.vm, slot, first, num, np.array(bits, np.uint64)),
                      ("clear", slot, first, num), payload=lambda s, x: None, soft=lambda s, x: x)
            for k in list(self.written):
                if k[0] == slot and first <= k[1] < first + num and \
                        (bits[(k[1] - first) // 64] >> ((k[1] - first) % 64)) & 1:
                    del self.written[k]

    def op_logtoggle(self):
        slot = self.rng.choice([0, 1])
        if slot == 1 and self.slot1 is None:
            return
        on = not self.logged[slot]
        gpa, size = (0, 64 << 20) if slot == 0 else (self.slot1, 64 * 4096)
        rs = self.both(lambda s: s.h.set_memslot(s.vm, slot, gpa, size, flags=bm.MEM_LOG_DIRTY_PAGES if on else 0),
                       ("log", slot, on))
        if rs[0][0] == "ok":
            self.logged[slot] = on
            if not self.c["ring"]:
                self.forget(slot)

    def op_slot1(self):
        rng = self.rng
        if self.slot1 is None:
            gpa = rng.choice(SLOT1_GPAS)
            fl = bm.MEM_LOG_DIRTY_PAGES if rng.random() < 0.5 else 0
            rs = self.both(lambda s: s.h.set_memslot(s.vm, 1, gpa, 64 * 4096, flags=fl), ("slot1 create", gpa))
            if rs[0][0] == "ok":
                self.slot1, self.logged[1] = gpa, bool(fl)
            return
        if rng.random() < 0.4:
            rs = self.both(lambda s: s.h.set_memslot(s.vm, 1, self.slot1, 0), "slot1 delete")
            if rs[0][0] == "ok":
                self.slot1, self.logged[1] = None, False
                self.forget(1)
            return
        gpa = rng.choice([g for g in SLOT1_GPAS if g != self.slot1])
        fl = bm.MEM_LOG_DIRTY_PAGES if self.logged[1] else 0
        rs = self.both(lambda s: s.h.set_memslot(s.vm, 1, gpa, 64 * 4096, flags=fl), ("slot1 move", gpa))
        if rs[0][0] == "ok":
            self.slot1 = gpa
            self.forget(1)

    def op_slot2(self):
        if self.slot2:
            rs = self.both(lambda s: s.h.set_memslot(s.vm, 2, SLOT2_GPA, 0), "slot2 delete")
            if rs[0][0] == "ok":
                self.slot2 = False
                self.logged[2] = False
                self.forget(2)
        else:
            fl = bm.MEM_LOG_DIRTY_PAGES if self.rng.random() < 0.5 else 0
            rs = self.both(lambda s: s.h.set_memslot(s.vm, 2, SLOT2_GPA, 2 << 20, flags=fl), "slot2 create")
            if rs[0][0] == "ok":
                self.slot2 = True
                self.logged[2] = bool(fl)
                self.forget(2)

    def op_nr(self):
        v = self.rng.choice([64, 64, 70, 100, 200, 400])
        self.both(lambda s: s.h.set_nr_mmu_pages(s.vm, v), ("nr", v))

    def op_shrink(self):
        v = self.rng.choice([1, 5, 30, 1000])
        self.both(lambda s: s.h.shrink(v), ("shrink", v), payload=lambda s, x: None)

    def op_time(self):
        t = self.rng.choice([0.5, 1, 3, 10, 60])
        self.both(lambda s: s.h.advance_time(t), ("time", t), payload=lambda s, x: None)

    def sanity(self):
        for s in self.sides:
            r = call(self._sanity_one, s)
            if r[0] != "ok":
                self.crash.append((self.step, "sanity", "tdp" if s.tdp else "legacy", r[1:]))
            elif r[1]:
                self.insane.append((self.step, "tdp" if s.tdp else "legacy", r[1]))

    @staticmethod
    def _sanity_one(s):
        h, vm = s.h, s.vm
        bad = []
        st = h.stats(vm)
        neg = {k: v for k, v in st.items() if v < 0}
        if neg:
            bad.append(("negative stats", neg))
        fp = h.footprint(vm)
        negf = {k: v for k, v in fp.items() if v < 0}
        if negf:
            bad.append(("negative footprint", negf))
        sc = h.shrink_count()
        if sc != fp["shadow_page_tables"] // 4096:
            bad.append(("shrink_count != shadow_page_tables/4096", sc, fp["shadow_page_tables"]))
        n_used = int(h.vt.n_used[vm])
        mp = st["mmu_pages"]
        meta = h.pa.meta
        live = meta[:, S.SP_VM] == vm
        tdp_rows = int(np.count_nonzero(live & ((meta[:, S.SP_FLAGS] & S.SPF_TDP_MMU) != 0)))
        sh_rows = int(np.count_nonzero(live & ((meta[:, S.SP_FLAGS] & S.SPF_TDP_MMU) == 0)))
        if n_used > mp or n_used < 0:
            bad.append(("n_used vs mmu_pages", n_used, mp))
        if sh_rows != n_used or tdp_rows != mp - n_used:
            bad.append(("rows", "shadow", sh_rows, "n_used", n_used, "tdp", tdp_rows, "mmu_pages-n_used", mp - n_used))
        if not s.tdp and tdp_rows:
            bad.append(("tdp rows on legacy", tdp_rows))
        bad += Pair._spte_invariants(s)
        nmax = int(h.vt.rec[vm, S.VM_N_MAX])
        if h._rmaps(vm) and n_used > nmax:
            bad.append(("n_used > n_max", n_used, nmax))
        return bad

    @staticmethod
    def _spte_invariants(s):
        """L1's leaf SPTEs (TDP MMU or legacy direct root): none writable over a gfn guest_mmu shadows with a
        sync page or write-tracks; in a dirty-logged slot (bitmaps) a writable SPTE's gfns are dirty."""
        from batchmmu.kernels.shadow_mmu import sp_has_gptes
        from batchmmu.kernels.spte import ROLE_INVALID
        h, vm = s.h, s.vm
        bad = []
        meta = h.pa.meta
        gen = int(h.vt.rec[vm, S.VM_VALID_GEN])
        prot = set()
        rows = np.nonzero((meta[:, S.SP_VM] == vm) & ((meta[:, S.SP_FLAGS] & S.SPF_TDP_MMU) == 0))[0]
        for r in rows.tolist():
            role = int(meta[r, S.SP_ROLE])
            if role & ROLE_INVALID or int(meta[r, S.SP_GEN]) != gen or not sp_has_gptes(role):
                continue
            if not int(meta[r, S.SP_UNSYNC]):
                prot.add(int(meta[r, S.SP_GFN]))
        slots = []
        for sl, rec in h._slot_rec.of_vm(vm):
            if sl >> 16:
                continue
            base, n = int(h.st.base_gfn[rec]), int(h.st.npages[rec])
            wo = int(h.st.wtrack_off[rec])
            if wo >= 0:
                wt = np.nonzero(h.sh.wtrack[wo:wo + n] > 0)[0]
                prot.update((wt + base).tolist())
            slots.append((base, n, int(h.st.dirty_off[rec]), rec))
        ring = int(h.vt.dirty_mode[vm]) & S.DM_RING
        from batchmmu.kernels.spte import shadow_mmio_mask, shadow_mmio_value
        fmt = int(h.vt.fmt[vm])
        mm, mv = int(shadow_mmio_mask(fmt)) & ((1 << 64) - 1), int(shadow_mmio_value(fmt)) & ((1 << 64) - 1)
        for g, (lv, spte) in h.spte_dump(vm).items():
            if not spte & 2 or (spte & mm) == mv:
                continue
            span = 1 << (9 * (lv - 1))
            sl = [x for x in slots if x[0] <= g < x[0] + x[1]]
            if not sl:
                continue   # MMIO SPTE
            base, n, doff, rec = sl[0]
            hit = [p for p in prot if g <= p < g + span]
            if hit:
                bad.append(("writable L1 SPTE over a protected gfn", hex(g), lv, hex(spte), [hex(x) for x in hit[:3]]))
            if doff >= 0 and not ring:
                for gg in range(g, min(g + span, base + n)):
                    off = gg - base
                    if not (int(h.st.dirty[doff + off // 64]) >> (off % 64)) & 1:
                        bad.append(("writable SPTE in a logged slot, not dirty", hex(gg), lv, hex(spte)))
                        break
        return bad

    def final(self):
        # guest memory: everything either side could have written
        pages = sorted(set(p & ~4095 for p in self.backs) | set(range(0x100000, self.sides[0].n.next, 4096)))
        extra = [g + 4096 * k for g in SLOT1_GPAS + [SLOT2_GPA] for k in range(64)]
        for pg in pages + extra:
            self.both(lambda s, pg=pg: s.h.read_guest_memory(s.vm, pg, 512).tolist(), ("mem", hex(pg)))

    OPS = [("l2", 40), ("l1_ept", 10), ("l1_mem", 14), ("invept", 2), ("inval", 4), ("inval_window", 2),
           ("age", 4), ("discard", 2), ("dirty", 6), ("logtoggle", 3), ("slot1", 2), ("slot2", 1),
           ("nr", 2), ("shrink", 2), ("time", 3), ("l1_emul", 3), ("reclaim", 2)]

    def run(self):
        self.setup()
        names = [o for o, w in self.OPS for _ in range(w)]
        for step in range(self.steps):
            self.step = step
            op = self.rng.choice(names)
            if op in ("nr", "shrink") and not self.c["pressure"]:
                op = "l2"
            if op == "time" and not self.c["nx"]:
                op = "l1_mem"
            getattr(self, "op_" + op)()
            if self.step % 25 == 0:
                self.sanity()
            if self.hard or self.crash:
                break
        self.sanity()
        if not self.hard and not self.crash:
            self.final()
        return self


def main():
    seed0, nseeds, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    t0 = time.time()
    tot = {"hard": 0, "crash": 0, "insane": 0, "soft": 0}
    for seed in range(seed0, seed0 + nseeds):
        p = Pair(seed, steps)
        try:
            p.run()
        except Exception:   # noqa: BLE001
            print(f"seed {seed}: FUZZER ERROR\n{traceback.format_exc()}", flush=True)
            continue
        tot["soft"] += p.soft
        if p.hard or p.crash or p.insane:
            print(f"seed {seed} cfg={p.c}", flush=True)
            for x in p.hard[:3]:
                print("  HARD", x, flush=True)
            for x in p.crash[:3]:
                print("  CRASH", x, flush=True)
            for x in p.insane[:3]:
                print("  INSANE", x, flush=True)
            tot["hard"] += bool(p.hard)
            tot["crash"] += bool(p.crash)
            tot["insane"] += bool(p.insane)
        print(f"seed {seed} done step={p.step} soft={p.soft} t={time.time() - t0:.0f}s", flush=True)
    print("TOTAL", tot, f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
