"""The L1 hypervisor's side of a nested test: EPT12 (VMX) or NPT12 (SVM) and L2's own page tables, written into L1's
memory, and VM-entry to L2.  Not a KVM file: it plays the part of the selftests' lib/x86/vmx.c (``nested_pg_map``,
``prepare_eptp``) and lib/x86/svm.c, and of kvm-unit-tests' ``install_ept``; KVM (L0) sees only the memory it
writes and the VM-entries (docs/nested.md).

Layout in L1's memory: EPT12/NPT12 tables and the L1 pages behind L2's tables from 1 MiB up; L2's page tables at
L2 gpas from 64 KiB up; for SVM, L1's own long-mode tables at 512 KiB (the first 4 GiB 1:1 with 1G pages).
"""

from .errors import bad

R, W, X = 1, 2, 4                 # EPT permissions
WB = 6 << 3                       # EPT memory type
LARGE = 1 << 7
EPT_D = 1 << 9                    # EPT dirty flag (with EPT A/D)
P, RW, US, A_, D_ = 1, 2, 4, 32, 64
NX = 1 << 63
CR0_PG_PE = 0x80000011
CR4_PAE = 0x20
EFER_LME_LMA = 0x500
EFER_NX = 0x800
ADDR = ((1 << 52) - 1) & ~0xFFF
U64 = (1 << 64) - 1


class L1:
    """L1 of nested VM ``vm`` (created with ``nested=True``): the tables it writes (``mem``: L1 gpa -> word, copied
    into the VM by ``flush``) and its VM-entries: EPT12 on an EPT VM (VMX, EPT A/D as ``ept_ad``), NPT12 on an
    NPT VM (SVM).  Its EPT12/NPT12 tables and the L1 pages behind L2's tables are taken from ``base`` up."""

    def __init__(self, host, vm, ept_ad=True, base=0x100000):
        from .kernels.spte import FMT_NPT
        from .kernels.state import VM_FMT
        if not host._nested[int(vm)]:
            raise bad("vm", vm, "is not a nested VM (create it with nested=True)")
        self.h, self.vm, self.ad = host, int(vm), bool(ept_ad)
        self.svm = int(host.vt.rec[self.vm, VM_FMT]) == FMT_NPT
        if self.svm:   # L1 in long mode with EFER.NX; its own tables map the first 4 GiB 1:1 (its stores use gva = gpa)
            host.set_vcpu_regs(self.vm, 0, cr0=CR0_PG_PE, cr3=0x80000, cr4=CR4_PAE, efer=EFER_LME_LMA | EFER_NX)
            host.write_guest_memory(self.vm, 0x80000, [0x81000 | 7])
            host.write_guest_memory(self.vm, 0x81000, [(k << 30) | 0x87 for k in range(4)])
        self.mem = {}
        self.dirty_pages = set()
        self.l1_page = {}                 # L2 gpa page -> the L1 page a 4K EPT12/NPT12 leaf maps it to
        self.next = base
        self.root = self.page()
        self.l2_next = 0x10000
        self.cr3 = None
        self.regs = None

    def page(self):
        """A fresh L1 page (for a table, or behind one of L2's tables)."""
        p = self.next
        self.next += 4096
        return p

    def put(self, gpa, word):
        self.mem[gpa] = word & U64
        self.dirty_pages.add(gpa & ~4095)

    @property
    def eptp(self):
        """vmcs12's EPTP (WB, 4-level, A/D as asked) or, for SVM, vmcb12's nCR3."""
        return self.root if self.svm else self.root | 6 | (3 << 3) | (0x40 if self.ad else 0)

    @property
    def full(self):
        """Every access: an NPT12 entry's P|RW|US, an EPT12 entry's R|W|X."""
        return P | RW | US if self.svm else R | W | X

    def entry_gpa(self, l2gpa, level=1):
        """The L1 gpa of the EPT12/NPT12 entry for ``l2gpa`` at ``level`` (tables made on the way, all access)."""
        table = self.root
        for lv in range(4, level, -1):
            e = table + 8 * ((l2gpa >> (12 + 9 * (lv - 1))) & 511)
            if not self.mem.get(e, 0) & 7:
                self.put(e, self.page() | self.full)
            table = self.mem[e] & ADDR
        return table + 8 * ((l2gpa >> (12 + 9 * (level - 1))) & 511)

    def map(self, l2gpa, l1gpa, perms=None, level=1, extra=None):
        """The EPT12 leaf (``perms``: R/W/X, WB) or NPT12 leaf (``perms``: P/RW/US, NX) of ``l2gpa``."""
        perms = self.full if perms is None else perms
        extra = (0 if self.svm else WB) if extra is None else extra
        self.put(self.entry_gpa(l2gpa, level), l1gpa | perms | extra | (LARGE if level > 1 else 0))
        if level == 1:
            self.l1_page[l2gpa & ~4095] = l1gpa & ~4095

    def l2_table(self):
        """A page for L2's page tables: an L2 gpa, mapped to a fresh L1 page."""
        l2 = self.l2_next
        self.l2_next += 4096
        self.map(l2, self.page())
        return l2

    def l1_of(self, l2gpa):
        """The L1 gpa behind an L2 gpa that ``map`` mapped with a 4K leaf."""
        return self.l1_page[l2gpa & ~4095] | (l2gpa & 4095)

    def l2_map(self, gva, l2gpa, flags=P | RW | US):
        """L2's 4-level tables: ``gva`` -> ``l2gpa`` (its tables get P|RW|US)."""
        if self.cr3 is None:
            self.cr3 = self.l2_table()
        table = self.cr3
        for lv in range(4, 1, -1):
            e = self.l1_of(table) + 8 * ((gva >> (12 + 9 * (lv - 1))) & 511)
            if not self.mem.get(e, 0) & P:
                self.put(e, self.l2_table() | P | RW | US)
            table = self.mem[e] & ADDR
        self.put(self.l1_of(table) + 8 * ((gva >> 12) & 511), l2gpa | flags)

    def l2_tables(self):
        """L2 gpas of L2's page-table pages, in the order made (the last: the level-1 table of the last map)."""
        return list(range(0x10000, self.l2_next, 4096))

    def flush(self):
        """Write what changed into L1's memory (as L1 itself would have)."""
        for pg in sorted(self.dirty_pages):
            self.h.write_guest_memory(self.vm, pg, [self.mem.get(pg + 8 * i, 0) for i in range(512)])
        self.dirty_pages.clear()

    def enter(self, paging=True, vcpu=0, **kw):
        """VMLAUNCH / VMRUN of L2 (its 4-level paging on, or off) with this EPTP / nCR3."""
        self.flush()
        regs = dict(cr0=CR0_PG_PE, cr3=self.cr3, cr4=CR4_PAE, efer=EFER_LME_LMA) if paging else \
            dict(cr0=0x11, cr3=0, cr4=0, efer=0)
        self.regs = (regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"])
        self.h.nested_enter(self.vm, vcpu, **{"ncr3" if self.svm else "eptp": self.eptp}, **regs, **kw)

    def reenter(self, vcpu=0):
        """VM-entry again with the registers of the last ``enter``."""
        cr0, cr3, cr4, efer = self.regs
        self.h.nested_enter(self.vm, vcpu, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
                            **{"ncr3" if self.svm else "eptp": self.eptp})

    def read(self, gpa):
        return int(self.h.read_guest_memory(self.vm, gpa, 1)[0])
