"""The guest both sides of ``batchmmu validate`` run: a deterministic 64-bit long-mode image.

Layout (guest physical = guest virtual in the first tree): GDT at 0x1000, IDT at 0x2000 (empty: any
exception ends in a triple fault), TSS at 0x3000, guest page tables in the pool 0x10000-0xFFFFF
(allocated in order: PML4, PDPT, PD, PT0, PT1 ...; each tree after the previous one), code page at
0x100000, data from 0x400000.  Every tree maps the whole memslot (gva -> gpa identity, except for its
remap rules) with 4 KiB leaves, or with 2 MiB leaves from DATA on (``guest_2m``); every entry has U/S
set so CPL3 code may touch anything.  ``ad`` presets the accessed (and, in leaves, dirty) bits.

Programs are hand-assembled and end with ``out 0x80, al; jmp $``: the runner stops at that IO exit.
"""

from typing import NamedTuple

import numpy as np

from .errors import bad
from .units import parse_size

PAGE = 1 << 12
HUGE = 1 << 21
GDT_GPA = 0x1000
IDT_GPA = 0x2000
TSS_GPA = 0x3000
POOL_START = 0x10000
POOL_END = 0x100000
CODE_GPA = 0x100000
DATA_GPA = 0x400000
EXIT_PORT = 0x80

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
PTE_ADDR_MASK = 0x000FFFFFFFFFF000

CR0 = 0x80010033          # PE MP ET NE WP PG
CR4 = 0x620               # PAE OSFXSR OSXMMEXCPT
EFER = 0xD01              # SCE LME LMA NXE
RFLAGS = 0x3002           # IOPL=3 (CPL3 may execute OUT), bit 1
SEL_KCODE, SEL_KDATA, SEL_TSS, SEL_UCODE, SEL_UDATA = 0x08, 0x10, 0x18, 0x2B, 0x33

# GDT descriptors (flat 64-bit code, flat data, 16-byte TSS at 0x3000)
_GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF,
        0x67 | (TSS_GPA << 16) | (0x8B << 40), 0,
        0x00AFFB000000FFFF, 0x00CFF3000000FFFF)


def segments(cpl):
    """Segment registers for CPL0 or CPL3, as kvm_segment field dicts (cs, ss/ds/es/fs/gs, tr)."""
    if cpl not in (0, 3):
        raise bad("cpl", cpl, "must be 0 or 3")
    code = dict(base=0, limit=0xFFFFFFFF, selector=SEL_UCODE if cpl else SEL_KCODE, type=11, present=1,
                dpl=cpl, db=0, s=1, l=1, g=1)
    data = dict(base=0, limit=0xFFFFFFFF, selector=SEL_UDATA if cpl else SEL_KDATA, type=3, present=1,
                dpl=cpl, db=1, s=1, l=0, g=1)
    tr = dict(base=TSS_GPA, limit=0x67, selector=SEL_TSS, type=11, present=1, dpl=0, db=0, s=0, l=0, g=0)
    return {"cs": code, "ss": data, "ds": data, "es": data, "fs": data, "gs": data, "tr": tr}


# ---------------------------------------------------------------------------- programs
# Registers: rax = address (or value for mov cr3), rbx = value, rcx = end, rdx = stride.
_OUT_JMP = bytes([0xE6, EXIT_PORT, 0xEB, 0xFE])              # out 0x80, al; jmp $
_STORE = {8: b"\x48\x89\x18", 4: b"\x89\x18", 2: b"\x66\x89\x18", 1: b"\x88\x18"}   # mov [rax], rbx/ebx/bx/bl


def out_program():
    """out; jmp $: enter the guest once (the VM entry services pending requests) and come back."""
    return _OUT_JMP


def touch_program(write):
    """do { mov rbx, [rax] | mov [rax], rax; add rax, rdx } while (rax < rcx); out; jmp $."""
    body = (b"\x48\x89\x00" if write else b"\x48\x8B\x18") + b"\x48\x01\xD0" + b"\x48\x39\xC8"
    return body + bytes([0x72, (-(len(body) + 2)) & 0xFF]) + _OUT_JMP


def store_program(size=8):
    """mov [rax], rbx (``size`` bytes); out; jmp $."""
    if size not in _STORE:
        raise bad("size", size, "must be 1, 2, 4 or 8")
    return _STORE[size] + _OUT_JMP


def invlpg_program():
    """invlpg [rax]; out; jmp $."""
    return b"\x0F\x01\x38" + _OUT_JMP


def mov_cr3_program():
    """mov cr3, rax; out; jmp $."""
    return b"\x0F\x22\xD8" + _OUT_JMP


# ---------------------------------------------------------------------------- page tables
class Tree(NamedTuple):
    """One page-table tree: its PML4 gpa and every table as built, keyed (level, gva >> covered bits)."""
    name: str
    root: int
    tables: dict
    remap: tuple


_COVER = {4: 48, 3: 39, 2: 30, 1: 21}    # a level-L table covers gvas sharing bits >= _COVER[L]
_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}    # index bits of a level-L entry


class GuestImage:
    """The guest's memory image and registers.  ``memory``: slot 0 size (bytes or "64MiB", a multiple
    of 2 MiB above DATA); ``ad``: accessed/dirty bits preset; ``guest_2m``: 2 MiB leaves from DATA on."""

    def __init__(self, memory="64MiB", ad=False, guest_2m=False):
        self.memory = parse_size(memory, "memory")
        if self.memory % HUGE or self.memory <= DATA_GPA:
            raise bad("memory", memory, f"must be a multiple of 2 MiB above {DATA_GPA:#x}")
        if self.memory > 1 << 39:
            raise bad("memory", memory, "at most 512 GiB")
        self.ad = bool(ad)
        self.guest_2m = bool(guest_2m)
        self.trees = {}
        self.next_table = POOL_START

    # flags
    def table_flags(self):
        return PTE_P | PTE_RW | PTE_US | (PTE_A if self.ad else 0)

    def leaf_flags(self, level=1):
        f = PTE_P | PTE_RW | PTE_US | ((PTE_A | PTE_D) if self.ad else 0)
        return f | (PTE_PS if level == 2 else 0)

    def entry_flags(self, level, leaf):
        """Flags of a gpte the builder would write at ``level``: a leaf, else a table pointer."""
        return self.leaf_flags(level) if leaf else self.table_flags()

    def leaf_size(self, gva):
        return HUGE if self.guest_2m and gva >= DATA_GPA else PAGE

    def regs(self, tree="main"):
        """Control registers and RFLAGS the vCPU starts with (cr3 -> ``tree``'s PML4)."""
        return {"cr0": CR0, "cr3": self.trees[tree].root, "cr4": CR4, "efer": EFER, "rflags": RFLAGS}

    def initial_writes(self):
        """The image before the first step: GDT, TSS and the tree "main" (list of (gpa, u64 words))."""
        gdt = np.zeros(512, np.uint64)
        gdt[:len(_GDT)] = _GDT
        return [(GDT_GPA, gdt), (IDT_GPA, np.zeros(512, np.uint64)), (TSS_GPA, np.zeros(512, np.uint64))] \
            + self.new_tree("main")

    # trees
    def _check_remap(self, name, rules):
        out = []
        for k, r in enumerate(rules):
            field = f"{name}.remap[{k}]"
            try:
                src, dst, size = (int(r[key]) for key in ("from", "to", "size"))
            except (KeyError, TypeError, ValueError):
                raise bad(field, r, "needs integer keys from, to, size") from None
            align = HUGE if self.guest_2m else PAGE
            if src < DATA_GPA or size <= 0 or src + size > self.memory or dst < 0 or dst + size > self.memory:
                raise bad(field, r, f"from..from+size must lie in [{DATA_GPA:#x}, memory) and to..to+size "
                          "in [0, memory) (the low 4 MiB holds the image)")
            if src % align or dst % align or size % align:
                raise bad(field, r, f"from, to and size must be multiples of the leaf size {align:#x}")
            out.append((src, dst, size))
        return tuple(out)

    def translate(self, tree, gva):
        """The gpa ``tree`` maps ``gva`` to, as built."""
        for src, dst, size in self.trees[tree].remap:
            if src <= gva < src + size:
                return dst + gva - src
        return gva

    def _alloc(self):
        gpa = self.next_table
        if gpa >= POOL_END:
            raise bad("memory", self.memory, f"page-table pool {POOL_START:#x}-{POOL_END - 1:#x} is full "
                      "(fewer trees, less memory or guest_2m)")
        self.next_table += PAGE
        return gpa

    def new_tree(self, name, remap=()):
        """Build a tree in the pool (depth first, in address order); returns its (gpa, words) writes."""
        if not isinstance(name, str) or not name:
            raise bad("name", name, "must be a non-empty string")
        if name in self.trees:
            raise bad("name", name, "a tree of that name exists")
        rules = self._check_remap(name, remap)
        saved = self.next_table
        tables, words = {}, {}

        def table(level, gva):
            key = (level, gva >> _COVER[level])
            if key not in tables:
                tables[key] = self._alloc()
                words[tables[key]] = np.zeros(512, np.uint64)
            return tables[key]

        tree = Tree(name, 0, tables, rules)
        self.trees[name] = tree
        try:
            root = table(4, 0)
            gva = 0
            while gva < self.memory:
                parent = root
                size = self.leaf_size(gva)
                leaf_level = 2 if size == HUGE else 1
                for level in (4, 3, 2, 1):
                    idx = (gva >> _SHIFT[level]) & 511
                    if level == leaf_level:
                        words[parent][idx] = self.translate(name, gva) | self.leaf_flags(level)
                        break
                    child = table(level - 1, gva)
                    words[parent][idx] = child | self.table_flags()
                    parent = child
                gva += size
        except Exception:
            del self.trees[name]
            self.next_table = saved
            raise
        self.trees[name] = tree._replace(root=root)
        return [(gpa, words[gpa]) for gpa in sorted(words)]

    def pte_gpa(self, tree, gva, level):
        """gpa of the level-``level`` gpte (4 = PML4E ... 1 = PTE) that ``tree`` uses for ``gva``, as built."""
        if tree not in self.trees:
            raise bad("tree", tree, f"no such tree (have {', '.join(self.trees)})")
        if level not in (1, 2, 3, 4):
            raise bad("level", level, "must be 1 (PTE), 2 (PDE), 3 (PDPTE) or 4 (PML4E)")
        if not isinstance(gva, int) or not 0 <= gva < 1 << 48:
            raise bad("gva", gva, "must be a 48-bit address")
        t = self.trees[tree].tables.get((level, gva >> _COVER[level]))
        if t is None:
            raise bad("gva", gva, f"tree {tree!r} has no level-{level} table for this address")
        return t + 8 * ((gva >> _SHIFT[level]) & 511)

    def table_gpas(self, tree, level):
        """gpas of ``tree``'s level-``level`` tables, in address order."""
        return [g for (lv, _), g in sorted(self.trees[tree].tables.items()) if lv == level]
