"""The rule of mmu.rst (DESIGN.md section 1): the guest cannot tell which MMU it runs on.

The same guest page tables, CPU state and access stream run on a ``mmu="tdp"`` VM (the processor's
2D walk) and on a ``mmu="shadow"`` VM (KVM's shadow paging): every event must have the same outcome
class (translated / #PF), a #PF the same error code, and guest memory (A/D bits, stored values) must
end up identical.  Guest page-table stores are followed by a TLB flush on both, as a guest must do
before relying on them (a TLB may cache).  Random cases: seeded and hypothesis-drawn; directed
cases: the flag matrix of kvm-unit-tests ``x86/access.c``, with the expected result worked out from
the SDM rules by ``expected()`` below and checked on both MMUs.
"""

import numpy as np
import pytest
from batchmmu.kernels.gmem import GM_VM_SHIFT
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import batchmmu as bm

P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
XD = 1 << 63
ADDR = ((1 << 52) - 1) & ~0xFFF
U64 = (1 << 64) - 1
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 0x10
R_, W_, U_, X_ = 0, bm.ACC_WRITE, bm.ACC_USER, bm.ACC_FETCH
CR0_PG, CR0_WP, CR0_BASE = 1 << 31, 1 << 16, 0x33
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21
EFER_LONG, EFER_NX = 0x500, 1 << 11
RFLAGS_AC = 1 << 18

MEM = 64 << 20                  # slot 0: [0, 64 MiB)
TABLE_BASE = 0x100000           # guest page tables from 1 MiB on
DATA_LO, DATA_HI = 16 << 20, 80 << 20    # data pages; those above 64 MiB are outside every memslot
TABLE_OUTSIDE = 96 << 20        # a "table" outside every memslot (never written: reads as zeros)
WINDOW = 255 << 39              # gva window mapping every table page (supervisor RW) for page-table stores
WINDOW5 = (2 << 48) | WINDOW    # the same for 5-level guests (PML5 index 2: never used by the mappings)
TRANSLATED = "ok"
# Accesses whose #PF error code is 0 (supervisor reads; supervisor fetches without EFER.NXE and CR4.SMEP)
# are in the streams: they once hid a shadow-MMU bug (error code 0 taken for "no fault"); False leaves them out.
CODE0_ACCESSES = True


def regs(levels, wp, nxe, smep, smap, ac, cr3=TABLE_BASE):
    """Registers of a paging mode: levels 5/4 (long mode), 3 (PAE), 2 (32-bit with CR4.PSE)."""
    cr4 = (CR4_PAE if levels >= 3 else CR4_PSE) | (CR4_LA57 if levels == 5 else 0) | (CR4_SMEP if smep else 0) \
        | (CR4_SMAP if smap else 0)
    efer = (EFER_LONG if levels >= 4 else 0) | (EFER_NX if nxe else 0)
    return dict(cr0=CR0_PG | CR0_BASE | (CR0_WP if wp else 0), cr4=cr4, efer=efer, cr3=cr3,
                rflags=2 | (RFLAGS_AC if ac else 0))


class Pair:
    """One guest on both MMUs: a TDP VM and a shadow VM with the same memory and registers (``second="legacy"``:
    a VM of the legacy TDP MMU in place of the shadow VM)."""

    def __init__(self, tdp_format="ept", ept_ad=True, backing="4k", second="shadow"):
        self.tdp = bm.Host(memory="512MiB", backing=backing)
        self.vt = int(self.tdp.create_vms(1, memory=MEM, tdp_format=tdp_format, ept_ad=ept_ad)[0])
        if second == "legacy":
            self.sh = bm.Host(memory="512MiB", backing=backing, tdp_mmu=False)
            self.vs = int(self.sh.create_vms(1, memory=MEM, tdp_format=tdp_format, ept_ad=ept_ad)[0])
        else:
            self.sh = bm.Host(memory="512MiB", backing=backing, mmio_caching=False)
            self.vs = int(self.sh.create_vms(1, memory=MEM, mmu="shadow")[0])

    def both(self):
        return ((self.tdp, self.vt), (self.sh, self.vs))

    def write(self, mem):
        """Write gptes: ``mem`` maps gpa -> value (4-byte gptes at 4-aligned gpas are packed in pairs)."""
        words = {}
        for gpa, v in mem.items():
            sh = 8 * (gpa & 4)
            words[gpa & ~7] = words.get(gpa & ~7, 0) | ((v & U64) << sh)
        for h, vm in self.both():
            for gpa, v in sorted(words.items()):
                h.write_guest_memory(vm, gpa, [v & U64])

    def regs(self, **kw):
        for h, vm in self.both():
            h.set_vcpu_regs(vm, 0, **kw)

    def access(self, gvas, kinds):
        return [h.access(vm, 0, np.asarray(gvas, np.int64), np.asarray(kinds, np.int64)) for h, vm in self.both()]

    def store(self, gva, value, kind=W_):
        return [h.store(vm, 0, gva, value, kind) for h, vm in self.both()]

    def flush(self):
        for h, vm in self.both():
            h.flush_tlb(vm, 0)

    def memory(self, gpas):
        return [[int(x) for x in h.read_guest_memory(vm, g, 512)] for g in gpas for h, vm in self.both()]


def classes(res):
    """What the guest sees of each event: ("pf", error code), "retry" (not executed yet) or translated."""
    return [("pf", int(e)) if o == bm.GUEST_FAULT else "retry" if o == bm.RETRY else TRANSLATED
            for o, e in zip(res.outcome, res.error_code, strict=True)]


def guest_pages(host, vm):
    """Every guest page the simulator holds contents for (written by the host or the guest), as gfns."""
    keys = host.gm.key[host.gm.key >= 0]
    hpages = {int(k) & ((1 << GM_VM_SHIFT) - 1) for k in keys if int(k) >> GM_VM_SHIFT == vm}
    return {(s["gpa"] >> 12) + p - (s["hva"] >> 12) for s in host.memslots(vm) for p in hpages
            if 0 <= p - (s["hva"] >> 12) < s["size"] >> 12}


# ----------------------------------------------------------------------------- random guests
class Guest:
    """Random guest page tables: tables in [TABLE_BASE, ...), leaves into the data region (some outside
    memory), 2M and 1G pages, random P/RW/US/A/D/XD bits, a few reserved bits and tables outside memory."""

    def __init__(self, rng, levels):
        self.rng, self.levels = rng, levels
        self.window = WINDOW5 if levels == 5 else WINDOW
        self.mem = {}                 # gpte gpa -> value
        self.level_of = {}            # table gpa -> level
        self.window_tables = set()
        self.next = TABLE_BASE
        self.rewriting = False
        self.root = self.alloc(levels)
        self.leaves = []              # (gva, size_level, store_ok)
        for _ in range(int(rng.integers(8, 28))):
            self.add_mapping()
        self.add_window()

    def alloc(self, level):
        g = self.next
        self.next += 0x1000
        self.level_of[g] = level
        return g

    def flags(self, leaf):
        r = self.rng.random(8)
        f = (P if r[0] < 0.95 else 0) | (RW if r[1] < 0.85 else 0) | (US if r[2] < 0.85 else 0) \
            | (A if r[3] < 0.5 else 0) | (XD if r[5] < 0.15 else 0)
        if leaf:
            f |= D if r[4] < 0.5 else 0
        if r[6] < 0.03:
            f |= 1 << 51                          # above MAXPHYADDR: reserved
        return f

    def leaf_value(self, level):
        rng = self.rng
        if level == 3:
            # 1 GiB at 0 (covers the tables: every store gva has bits 21..29 >= 8, so a store through it
            # lands at >= 16 MiB) or outside memory; page-table stores only make the latter
            gpa = 0 if rng.random() < 0.7 and not self.rewriting else 1 << 30
        elif level == 2:
            gpa = int(rng.integers(DATA_LO >> 21, DATA_HI >> 21)) << 21
        else:
            gpa = int(rng.integers(DATA_LO >> 12, DATA_HI >> 12)) << 12
        v = gpa | self.flags(True) | (PS if level > 1 else 0)
        if level == 2 and rng.random() < 0.04:
            v |= 1 << 13                          # reserved in a 2M PDE
        return v

    def pointer_value(self, level):
        """An upper-level gpte at ``level`` (pointing to a table of level - 1), new or existing."""
        rng = self.rng
        if rng.random() < 0.04:
            return TABLE_OUTSIDE | P | RW | US | A
        cands = [g for g, lv in self.level_of.items() if lv == level - 1 and g not in self.window_tables]
        if cands and rng.random() < 0.4:
            child = cands[int(rng.integers(len(cands)))]
        else:
            child = self.alloc(level - 1)
        v = child | self.flags(False)
        if level >= 4 and rng.random() < 0.03:
            v |= PS                               # PS is reserved in a PML4E / PML5E
        return v

    def add_mapping(self):
        rng = self.rng
        size_level = 1 if rng.random() < 0.7 else (2 if rng.random() < 0.7 else 3)
        idx = {lv: int(rng.choice([0, 1, 2, 3, 100, 254, int(rng.integers(255))])) for lv in range(1, 6)}
        idx[2] = int(rng.choice([8, 9, 10, 100, 254, int(rng.integers(8, 512))]))  # never below 16 MiB in a 1G page
        idx[5] = int(rng.choice([0, 1]))
        table, gva = self.root, 0
        for level in range(self.levels, 0, -1):
            gva |= idx[level] << (12 + 9 * (level - 1))
            slot = table + 8 * idx[level]
            if level == size_level:
                if slot not in self.mem:
                    self.mem[slot] = self.leaf_value(level)
                    off_bits = 12 + 9 * (level - 1)
                    off = int(rng.integers(1 << min(off_bits, 21))) & ~7
                    if level == 3:
                        off |= idx[2] << 21
                    self.leaves.append((gva | off, level, True))
                return
            if slot not in self.mem:
                self.mem[slot] = self.pointer_value(level)
            v = self.mem[slot]
            if v & PS or not v & P or (v & ADDR) not in self.level_of:
                self.leaves.append((gva, level, False))  # a walk that ends early (fault or huge page)
                return
            table = v & ADDR

    def add_window(self):
        """Map every table page at WINDOW + i * 4K (i = its index from TABLE_BASE) for the guest's stores."""
        table = self.root
        for level in range(self.levels, 1, -1):
            slot = table + 8 * ((self.window >> (12 + 9 * (level - 1))) & 511)
            child = self.alloc(level - 1)
            self.window_tables.add(child)
            self.mem[slot] = child | P | RW | US | A
            table = child
        for g in self.level_of:
            i = (g - TABLE_BASE) >> 12
            self.mem[table + 8 * i] = g | P | RW | A | D

    def pt_store(self):
        """(gva of a gpte through the window, new value) for a random entry of a random table."""
        rng = self.rng
        self.rewriting = True
        tables = sorted(self.level_of)
        g = tables[int(rng.integers(len(tables)))]
        used = [s for s in self.mem if s & ~0xFFF == g]
        slot = used[int(rng.integers(len(used)))] if used and rng.random() < 0.7 else g + 8 * int(rng.integers(512))
        level = self.level_of[g]
        if level == 1 or (level <= 3 and rng.random() < 0.25):
            value = self.leaf_value(level)
        elif rng.random() < 0.1:
            value = self.mem.get(slot, 0) & ~P   # clear P (munmap)
        else:
            value = self.pointer_value(level)
        self.mem[slot] = value
        return self.window + (g - TABLE_BASE) + (slot & 0xFFF), value


class LegacyGuest:
    """Random 32-bit (4-byte gptes, 4M pages) or PAE (PDPTE registers, 8-byte gptes, 2M pages) tables:
    the PD and PT levels are random like ``Guest``'s; the window for page-table stores is the last PD
    entry (32-bit) or PDPTE 3 (PAE).  4M PDEs never use bits 17..20 (PSE-36 address bits above 36: the
    SDM and KVM's walker disagree there)."""

    def __init__(self, rng, pae):
        self.rng, self.pae = rng, pae
        self.levels = 3 if pae else 2
        self.esize, self.nbits = (8, 9) if pae else (4, 10)
        self.mem, self.level_of, self.window_tables, self.leaves = {}, {}, set(), []
        self.next = TABLE_BASE
        self.root = self.alloc(3 if pae else 2)          # PAE: the PDPT (its 4 entries are registers)
        self.window = (3 << 30) | (511 << 21) if pae else 1023 << 22
        if pae:
            for i in range(3):
                self.mem[self.root + 8 * i] = (self.alloc(2) | P) if rng.random() < 0.9 else 0
        for _ in range(int(rng.integers(8, 28))):
            self.add_mapping()
        self.add_window()

    def alloc(self, level):
        g = self.next
        self.next += 0x1000
        self.level_of[g] = level
        return g

    def flags(self, leaf):
        r = self.rng.random(8)
        f = (P if r[0] < 0.95 else 0) | (RW if r[1] < 0.85 else 0) | (US if r[2] < 0.85 else 0) \
            | (A if r[3] < 0.5 else 0)
        if leaf:
            f |= D if r[4] < 0.5 else 0
        if self.pae and r[5] < 0.15:
            f |= XD
        if self.pae and r[6] < 0.03:
            f |= 1 << 51
        return f

    def leaf_value(self, level):
        shift = 12 if level == 1 else 12 + self.nbits
        gpa = int(self.rng.integers(DATA_LO >> shift, DATA_HI >> shift)) << shift
        v = gpa | self.flags(True) | (PS if level == 2 else 0)
        if level == 2 and self.rng.random() < 0.04:
            v |= 1 << 21 if not self.pae else 1 << 13     # reserved in a 4M / 2M PDE
        return v

    def pointer_value(self):
        rng = self.rng
        if rng.random() < 0.04:
            return TABLE_OUTSIDE | P | RW | US | A
        cands = [g for g, lv in self.level_of.items() if lv == 1 and g not in self.window_tables]
        child = cands[int(rng.integers(len(cands)))] if cands and rng.random() < 0.4 else self.alloc(1)
        return child | self.flags(False)

    def index(self, gva, level):
        return (gva >> (12 + self.nbits * (level - 1))) & ((1 << self.nbits) - 1)

    def add_mapping(self):
        rng = self.rng
        size_level = 1 if rng.random() < 0.7 else 2
        hi = int(rng.integers(3)) if self.pae else 0
        pd_i = int(rng.choice([0, 1, 2, 100, 500, int(rng.integers(500))]))
        pt_i = int(rng.choice([0, 1, 2, 3, 100, 254, int(rng.integers(1 << self.nbits))]))
        gva = (hi << 30) | (pd_i << (12 + self.nbits)) | (pt_i << 12)
        pd = self.root
        if self.pae:
            e = self.mem.get(self.root + 8 * hi, 0)
            if not e & P:
                self.leaves.append((gva, 3, False))
                return
            pd = e & ADDR
        slot = pd + self.esize * pd_i
        if size_level == 2:
            if slot not in self.mem:
                self.mem[slot] = self.leaf_value(2)
                off = int(rng.integers(1 << (12 + self.nbits))) & ~7
                self.leaves.append(((gva & ~((1 << (12 + self.nbits)) - 1)) | off, 2, True))
            return
        if slot not in self.mem:
            self.mem[slot] = self.pointer_value()
        v = self.mem[slot]
        if v & PS or not v & P or (v & ADDR) not in self.level_of:
            self.leaves.append((gva, 2, False))
            return
        pt_slot = (v & ADDR) + self.esize * pt_i
        if pt_slot not in self.mem:
            self.mem[pt_slot] = self.leaf_value(1)
            self.leaves.append((gva | (int(rng.integers(4096)) & ~7), 1, True))

    def add_window(self):
        if self.pae:
            pd = self.alloc(2)
            self.mem[self.root + 8 * 3] = pd | P
            self.window_tables.add(pd)
        else:
            pd = self.root
        pt = self.alloc(1)
        self.window_tables.add(pt)
        self.mem[pd + self.esize * self.index(self.window, 2)] = pt | P | RW | US | A
        for g in self.level_of:
            self.mem[pt + self.esize * ((g - TABLE_BASE) >> 12)] = g | P | RW | A | D

    def pt_store(self):
        """(gva, 8-byte value) of a store of a new gpte (with its 4-byte neighbour as the model has it)."""
        rng = self.rng
        tables = sorted(g for g in self.level_of if not (self.pae and g == self.root))
        g = tables[int(rng.integers(len(tables)))]
        used = [x for x in self.mem if x & ~0xFFF == g]
        slot = used[int(rng.integers(len(used)))] if used and rng.random() < 0.7 else \
            g + self.esize * int(rng.integers(4096 // self.esize))
        level = self.level_of[g]
        if level == 1 or rng.random() < 0.25:
            value = self.leaf_value(level)
        elif rng.random() < 0.1:
            value = self.mem.get(slot, 0) & ~P
        else:
            value = self.pointer_value()
        self.mem[slot] = value
        w = slot & ~7
        word = value if self.esize == 8 else (self.mem.get(w, 0) & 0xFFFFFFFF) | (self.mem.get(w + 4, 0) << 32)
        return self.window + (g - TABLE_BASE) + (w & 0xFFF), word


def random_gva(rng, guest):
    if guest.leaves and rng.random() < 0.9:
        gva, level, _ = guest.leaves[int(rng.integers(len(guest.leaves)))]
        return gva
    gva = int(rng.integers(1 << (32 if guest.levels <= 3 else 39))) & ~7      # mostly unmapped
    return gva | (int(rng.integers(2)) << 48 if guest.levels == 5 else 0)


def run_random(seed, levels, wp, nxe, smep, smap, ac, n_events=120, tdp_format="ept", ept_ad=True,
               code0=CODE0_ACCESSES, second="shadow"):
    """Run one random guest on both MMUs; returns a list of divergences (empty when they agree)."""
    rng = np.random.default_rng(seed)
    guest = Guest(rng, levels) if levels >= 4 else LegacyGuest(rng, levels == 3)
    pair = Pair(tdp_format, ept_ad, second=second)
    pair.write(guest.mem)
    r = regs(levels, wp, nxe, smep, smap, ac)
    pair.regs(**r)
    bad = []
    batch = []

    def flush_batch():
        if batch:
            gvas, kinds = zip(*batch, strict=True)
            rt, rs = pair.access(gvas, kinds)
            for j, (a, b) in enumerate(zip(classes(rt), classes(rs), strict=True)):
                if a != b:
                    bad.append(("access", hex(gvas[j]), kinds[j], a, b))
            batch.clear()

    for _ in range(n_events):
        x = rng.random()
        if x < 0.75:
            kind = int(rng.choice([R_, W_, X_])) | (U_ if rng.random() < 0.5 else 0)
            if not code0 and not kind & (W_ | U_) and (kind == R_ or not (nxe or smep)):
                kind |= U_
            batch.append((random_gva(rng, guest), kind))
            continue
        flush_batch()
        if x < 0.87:
            stores = [lf for lf in guest.leaves if lf[2]]
            if stores:
                gva = stores[int(rng.integers(len(stores)))][0]
                kind = W_ | (U_ if rng.random() < 0.5 else 0)
                rt, rs = pair.store(gva, int(rng.integers(1 << 62)), kind)
                if classes(rt) != classes(rs):
                    bad.append(("store", hex(gva), kind, classes(rt), classes(rs)))
        elif x < 0.97:
            gva, value = guest.pt_store()
            rt, rs = pair.store(gva, value)
            if classes(rt) != classes(rs):
                bad.append(("pt-store", hex(gva), hex(value), classes(rt), classes(rs)))
            pair.flush()
        else:
            # RFLAGS.AC stays put under SMAP: see test_kvm_divergence_cr0_wp0_smap_ac
            wp, ac = (not wp, ac) if smap or rng.random() < 0.5 else (wp, not ac)
            r = regs(levels, wp, nxe, smep, smap, ac)
            pair.regs(**r)
    flush_batch()
    pages = guest_pages(pair.tdp, pair.vt) | guest_pages(pair.sh, pair.vs)
    for gfn in sorted(pages):
        mt, ms = pair.memory([gfn << 12])
        if mt != ms:
            diff = [(i, hex(a), hex(b)) for i, (a, b) in enumerate(zip(mt, ms, strict=True)) if a != b]
            bad.append(("memory", hex(gfn << 12), diff[:4]))
    return bad


CPU_STATES = [  # (levels, wp, nxe, smep, smap, ac)
    (4, True, True, False, False, False), (4, False, True, False, False, False), (4, True, False, False, False, False),
    (4, True, True, True, True, False), (4, False, True, True, True, False), (4, True, True, True, True, True),
    (5, True, True, False, False, False), (5, False, False, True, True, True),
    (3, True, True, False, False, False), (3, False, True, True, True, False), (3, True, False, True, False, True),
    (2, True, False, False, False, False), (2, False, False, True, True, False), (2, True, False, True, True, True),
]


@pytest.mark.parametrize("seed", range(28))
def test_random_guests_seeded(seed):
    state = CPU_STATES[seed % len(CPU_STATES)]
    assert run_random(1000 + seed, *state, n_events=300) == []


@pytest.mark.parametrize("tdp_format,ept_ad", [("ept", False), ("npt", True)])
def test_random_guests_other_tdp_formats(tdp_format, ept_ad):
    for seed in range(4):
        state = CPU_STATES[(3 * seed) % len(CPU_STATES)]
        assert run_random(2000 + seed, *state, n_events=300, tdp_format=tdp_format, ept_ad=ept_ad) == []


HYP = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
               suppress_health_check=[HealthCheck.too_slow])


@settings(HYP, max_examples=100)
@given(seed=st.integers(0, 2**32 - 1), levels=st.sampled_from([2, 3, 4, 5]), wp=st.booleans(), nxe=st.booleans(),
       smep=st.booleans(), smap=st.booleans(), ac=st.booleans())
def test_random_guests_hypothesis(seed, levels, wp, nxe, smep, smap, ac):
    nxe = nxe and levels > 2   # see test_kvm_divergence_32bit_nxe_fetch_error_code
    assert run_random(seed, levels, wp, nxe, smep, smap, ac, n_events=200) == []


@pytest.mark.nojit
def test_random_guest_small():
    assert run_random(77, 4, False, True, True, False, True, n_events=60) == []


# ----------------------------------------------------------------------------- kvm-unit-tests x86/access.c
# Each case: one gva whose PDE and PTE (or 2M PDE) carry the flags of the case, upper levels P|RW|US|A.
FLAGS = ("pte_p", "pte_w", "pte_u", "pte_a", "pte_d", "pte_nx", "pte_bit51",
         "pde_p", "pde_w", "pde_u", "pde_a", "pde_d", "pde_nx", "pde_pse", "pde_bit51", "pde_bit13",
         "user", "write", "fetch", "wp", "efer_nx", "smep")


def expected(f):
    """(error code or None, PDE A/D, PTE A/D after the access) by the SDM (access.c ac_emulate_access)."""
    code = (PF_U if f["user"] else 0) | (PF_W if f["write"] else 0)
    if f["fetch"] and (f["efer_nx"] or f["smep"]):
        code |= PF_I

    def rsvd(nx, bit51, bit13=False):
        return bit51 or bit13 or (nx and not f["efer_nx"])

    pde_ad = (A if f["pde_a"] else 0) | (D if f["pde_d"] and f["pde_pse"] else 0)
    pte_ad = (A if f["pte_a"] else 0) | (D if f["pte_d"] else 0)
    if not f["pde_p"]:
        return code, pde_ad, pte_ad
    if rsvd(f["pde_nx"], f["pde_bit51"], f["pde_bit13"] and f["pde_pse"]):
        return code | PF_P | PF_RSVD, pde_ad, pte_ad
    w, u, nx = f["pde_w"], f["pde_u"], f["pde_nx"]
    if not f["pde_pse"]:
        if not f["pte_p"]:
            return code, pde_ad, pte_ad
        if rsvd(f["pte_nx"], f["pte_bit51"]):
            return code | PF_P | PF_RSVD, pde_ad, pte_ad
        w, u, nx = w and f["pte_w"], u and f["pte_u"], nx or f["pte_nx"]
    fault = False
    if f["user"] and not u:
        fault = True
    if f["write"] and not w and (f["user"] or f["wp"]):
        fault = True
    if f["fetch"] and nx and f["efer_nx"]:
        fault = True
    if f["fetch"] and not f["user"] and u and f["smep"]:
        fault = True
    if fault:
        return code | PF_P, pde_ad, pte_ad
    if f["pde_pse"]:
        return None, pde_ad | A | (D if f["write"] else 0), pte_ad
    return None, pde_ad | A, pte_ad | A | (D if f["write"] else 0)


def access_c_cases(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        f = {k: bool(rng.random() < (0.8 if k in ("pte_p", "pde_p") else 0.12 if "bit" in k else 0.5))
             for k in FLAGS}
        if f["write"] and f["fetch"]:
            f["fetch"] = False
        if not CODE0_ACCESSES and not f["user"] and not f["write"] and not (f["fetch"] and (f["efer_nx"] or f["smep"])):
            f["user"] = True
        out.append(f)
    return out


def build_case(i, f, pd, pt):
    """gptes of case i: PML4[0] -> PDPT; PDPT[i] -> PD page ``pd``; PD[0] -> PT page ``pt`` or a 2M page."""
    pde = (P if f["pde_p"] else 0) | (RW if f["pde_w"] else 0) | (US if f["pde_u"] else 0) | \
        (A if f["pde_a"] else 0) | (XD if f["pde_nx"] else 0) | (1 << 51 if f["pde_bit51"] else 0)
    pte = (P if f["pte_p"] else 0) | (RW if f["pte_w"] else 0) | (US if f["pte_u"] else 0) | \
        (A if f["pte_a"] else 0) | (D if f["pte_d"] else 0) | (XD if f["pte_nx"] else 0) | \
        (1 << 51 if f["pte_bit51"] else 0)
    if f["pde_pse"]:
        pde |= PS | (DATA_LO + (i << 21)) | (D if f["pde_d"] else 0) | (1 << 13 if f["pde_bit13"] else 0)
    else:
        pde |= pt
    return pde, pte | (DATA_LO + (i << 21))


def test_access_c_flag_matrix_on_both_mmus():
    cases = access_c_cases(400, 7)
    pair = Pair()
    pml4, pdpt = TABLE_BASE, TABLE_BASE + 0x1000
    mem = {pml4: pdpt | P | RW | US | A}
    gvas, slots = [], []
    for i, f in enumerate(cases):
        pd, pt = TABLE_BASE + 0x2000 + 0x2000 * i, TABLE_BASE + 0x3000 + 0x2000 * i
        pde, pte = build_case(i, f, pd, pt)
        mem[pdpt + 8 * i] = pd | P | RW | US | A
        mem[pd] = pde
        mem[pt] = pte
        gvas.append(i << 30)
        slots.append((pd, pt))
    pair.write(mem)
    bad = []
    by_cpu = {}
    for i, f in enumerate(cases):
        by_cpu.setdefault((f["wp"], f["efer_nx"], f["smep"]), []).append(i)
    for (wp, nxe, smep), idx in sorted(by_cpu.items()):
        pair.regs(**regs(4, wp, nxe, smep, False, False))
        kinds = [(U_ if cases[i]["user"] else 0) | (W_ if cases[i]["write"] else 0) |
                 (X_ if cases[i]["fetch"] else 0) for i in idx]
        results = pair.access([gvas[i] for i in idx], kinds)
        for name, res in zip(("tdp", "shadow"), results, strict=True):
            h, vm = (pair.tdp, pair.vt) if name == "tdp" else (pair.sh, pair.vs)
            for j, i in enumerate(idx):
                code, pde_ad, pte_ad = expected(cases[i])
                got = classes(res)[j]
                want = TRANSLATED if code is None else ("pf", code)
                pd, pt = slots[i]
                ad = tuple(int(h.read_guest_memory(vm, g, 1)[0]) & (A | D) for g in (pd, pt))
                if got != want or ad != (pde_ad, pte_ad):
                    bad.append((name, i, {k for k, v in cases[i].items() if v}, got, want, ad, (pde_ad, pte_ad)))
    assert bad == [], bad[:6]


# ----------------------------------------------------------------------------- where KVM itself differs
@pytest.mark.nojit
def test_kvm_divergence_cr0_wp0_smap_ac():
    # paging_tmpl.h FNAME(page_fault): with CR0.WP=0 a supervisor write through a read-only user gpte is
    # mapped by an SPTE with U=0, W=1 (mmu.rst "Emulating cr0.wp").  KVM's note that SMAP needs no care
    # there (the permission check injects #PF) misses RFLAGS.AC: a write with AC=1 passes the check and
    # installs that SPTE; once AC=0 the processor sees a supervisor page, so SMAP no longer refuses
    # supervisor accesses to the user page.  Under TDP the processor checks the guest's own gpte.  The
    # random streams therefore keep AC fixed while CR4.SMAP is set.
    pair = Pair()
    _one_page_guest(pair, P | US | A | D)
    pair.regs(**regs(4, False, True, False, True, True))     # WP=0, SMAP, AC=1
    assert [classes(r) for r in pair.access([0x5000], [W_])] == [[TRANSLATED], [TRANSLATED]]
    pair.regs(**regs(4, False, True, False, True, False))    # AC=0
    rt, rs = pair.access([0x5000, 0x5008], [W_, R_])
    assert classes(rt) == [("pf", PF_P | PF_W), ("pf", PF_P)]   # SMAP, as the SDM says
    assert classes(rs) == [TRANSLATED, TRANSLATED]               # KVM's shadow SPTE lets both through


@pytest.mark.nojit
def test_kvm_divergence_32bit_nxe_fetch_error_code():
    # SDM 4.7: the I/D bit of a #PF error code needs CR4.SMEP, or EFER.NXE with PAE-format tables (PAE,
    # 4- or 5-level paging).  KVM's software walker (paging_tmpl.h, walk_addr_generic's error path) tests
    # EFER.NX alone, so a 32-bit guest with EFER.NXE=1 sees I/D under shadow paging but not under TDP.
    # The random streams run 32-bit guests with EFER.NXE=0.
    pair = Pair()
    pair.write({TABLE_BASE: (TABLE_BASE + 0x1000) | P | RW | US})   # PDE 0 -> a PT of zeros
    pair.regs(**regs(2, True, True, False, False, False))
    rt, rs = pair.access([0x3000], [X_ | U_])
    assert classes(rt) == [("pf", PF_U)]
    assert classes(rs) == [("pf", PF_U | PF_I)]


@pytest.mark.nojit
def test_kvm_divergence_pse36_above_36_bits():
    # a 4M PDE's bits 13..(M-20) hold gpa bits 32.., M = min(MAXPHYADDR, 40) (SDM 4.3); KVM's walker
    # hard-codes 36-bit PSE (bits 17..21 reserved).  With MAXPHYADDR 46, bit 17 (gpa bit 36) is an address
    # bit for the processor and a reserved bit for KVM.  The random 4M PDEs leave bits 17..20 clear.
    pair = Pair()
    pair.write({TABLE_BASE: (1 << 17) | P | RW | US | A | D | PS})
    pair.regs(**regs(2, True, False, False, False, False))
    rt, rs = pair.access([0x1000], [U_])
    assert [int(rt.outcome[0]), int(rs.outcome[0])] == [bm.MMIO, bm.GUEST_FAULT]   # gpa 2**36 + 0x1000: no memslot
    assert int(rs.error_code[0]) == PF_P | PF_RSVD | PF_U


# ----------------------------------------------------------------------------- shadow-MMU bugs found here
def _one_page_guest(pair, leaf_flags, nxe=True):
    """gva 0x5000 -> gpa 0x800000 through tables at TABLE_BASE.. (4-level, CR0.WP)."""
    t = [TABLE_BASE + 0x1000 * i for i in range(4)]
    mem = {t[0]: t[1] | P | RW | US, t[1]: t[2] | P | RW | US, t[2]: t[3] | P | RW | US,
           t[3] + 8 * 5: 0x800000 | leaf_flags}
    pair.write(mem)
    pair.regs(**regs(4, True, nxe, False, False, False))
    return t[:3] + [t[3] + 8 * 5]


def test_shadow_supervisor_read_miss():
    pair = Pair()
    gptes = _one_page_guest(pair, P | RW | US)
    # a supervisor read of a mapped page: the first one faults (KVM walks, sets A, maps it)
    rt, rs = pair.access([0x5000], [R_])
    assert (int(rt.outcome[0]), int(rt.error_code[0])) == (bm.FIXED, PF_U)   # the data gpa's EPT violation
    assert [int(pair.tdp.read_guest_memory(pair.vt, g, 1)[0]) & A for g in gptes] == [A] * 4
    assert int(rs.outcome[0]) == bm.FIXED and pair.sh.stats(pair.vs)["pf_fixed"] == 1
    assert [int(pair.sh.read_guest_memory(pair.vs, g, 1)[0]) & A for g in gptes] == [A] * 4
    # a supervisor read of an unmapped gva: #PF, error code 0
    assert classes(pair.access([0x6000], [R_])[1]) == [("pf", 0)]


def test_shadow_guest_fault_with_error_code_zero():
    pair = Pair()
    _one_page_guest(pair, P | RW | US, nxe=False)
    rt, rs = pair.access([0x6000], [X_])
    assert classes(rt) == [("pf", 0)] and pair.tdp.stats(pair.vt)["pf_guest"] == 0
    assert classes(rs) == [("pf", 0)]
    assert pair.sh.stats(pair.vs)["pf_guest"] == 1 and pair.sh.stats(pair.vs)["pf_retry"] == 0
