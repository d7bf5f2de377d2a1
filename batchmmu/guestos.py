"""A guest OS workload: processes with their own page tables in guest memory, on many VMs at once.

Each VM runs a small Linux-like kernel (x86-64, 4-level paging, EFER.NXE, CR0.WP):

* guest RAM is handed out by a frame allocator inside the model (LIFO free list, like the per-cpu page
  lists); every new page is zeroed by the kernel (``clear_page``: one supervisor write through the
  direct map; a frame that held a page table is zeroed with 512 stores, so its old entries go away);
* the kernel half is shared: every PML4 gets the kernel's entries (direct map of all RAM in 2M pages at
  0xffff888000000000, kernel text at 0xffffffff80000000) copied in at creation, as ``pgd_alloc`` does;
* a process has code (file pages from the page cache, fault-around of 16 pages), a heap, an mmap area
  and a stack; anonymous read faults map the shared zero page read-only, write faults allocate;
* fork copies the parent's anonymous PTEs into new tables, write-protects both sides with guest stores
  and flushes the parent's TLB; a later write by either side is copy-on-write (copy, clear the PTE,
  INVLPG, store the new PTE), or a reuse in place when the other side already copied;
* munmap clears PTEs with stores, then INVLPGs each page (33 pages or fewer) or flushes the TLB;
* exit clears every PTE and the upper entries, frees the tables and flushes;
* scheduling: time slices of ``switch_every`` user accesses (+ ``kernel_touches``) per vCPU, MOV CR3
  between slices when the process changes.

Guest page-table updates are guest *stores* (``Host.store``, through the direct map), INVLPG / TLB flush /
MOV CR3 are the Host's guest ops, so KVM's shadow MMU sees them as it would (write protection, unsync,
emulation, sync); under TDP they cost no exit.  A #PF (``GUEST_FAULT``) is handled as the kernel would
and the access retried.  Kernel addresses are passed in their 48-bit form (bits 63..48 dropped: Host
takes non-negative gvas, and a 4-level walk only reads bits 47..12).

Every choice comes from one numpy Generator per VM seeded ``(seed, stream)``: VMs with the same stream
run the same guest whatever their MMU (the guest cannot tell), so a TDP VM and a shadow VM can be
compared event for event.  ``GuestOS`` drives any set of VMs of one Host; ``run`` is the scenario op.
"""

import numpy as np

from .constants import ACC_FETCH, ACC_USER, ACC_WRITE, GUEST_FAULT, PFERR_PRESENT
from .errors import BatchMMUError
from .guestlog import Log, execute
from .kernels.state import GAUGE_STATS, MMU_SHADOW, STAT_NAMES

# page-table entry bits
P, W, U, A, D, PS, G = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80, 0x100
NX = -(1 << 63)                    # bit 63 in an int64
PAGE_TABLE = P | W | U | A | D     # _PAGE_TABLE (user upper entries)
KERNPG_TABLE = P | W | A | D       # _KERNPG_TABLE
CR0 = 0x80010033                   # PG | WP | NE | ET | MP | PE
CR4 = 0x20                         # PAE
EFER = 0xD01                       # SCE | LME | LMA | NXE

# kernel layout (48-bit forms of the Linux addresses); the kernel image is gpa [0, 4 MiB)
PHYSMAP = 0x888000000000           # 0xffff888000000000: direct map of all guest RAM (2M pages)
KTEXT = 0xFFFF80000000             # 0xffffffff80000000: kernel text, gpa [0, 2 MiB)
KDATA = 2 << 20                    # kernel data touched by the kernel: gpa [2 MiB, 3 MiB)
ZERO_FRAME = 0x300                 # empty_zero_page (gpa 3 MiB)
FIRST_FREE = 0x400                 # frames below (the kernel image) are never allocated
PINNED = 1 << 30                   # refcount of page-cache and zero pages: never freed
FAULT_AROUND = 16                  # fault_around_bytes / PAGE_SIZE
FLUSH_CEILING = 33                 # tlb_single_page_flush_ceiling
VM_R, VM_W, VM_X = 1, 2, 4

DEFAULTS = {
    "processes": 8,          # processes started at boot (per VM)
    "max_processes": 16,     # a slice ending with more processes than this ends with an exit
    "switch_every": 512,     # user accesses per time slice per vCPU (context switch between slices)
    "kernel_touches": 32,    # kernel accesses per slice (text fetches, kernel data reads/writes)
    "write_percent": 30,     # of the data accesses
    "fetch_percent": 20,     # of the user accesses
    "locality": 0.9,         # fraction of accesses that go to the process's hot pages
    "hot_pages": 64,
    "code_pages": 128,
    "heap_pages": 1024,
    "mmap_pages": 2048,      # the mmap area (mmaps are placed in it, top down)
    "stack_pages": 32,
    "mmap_rate": 0.05,       # probability per slice per vCPU
    "munmap_rate": 0.04,
    "max_mmap_pages": 64,
}
PHASE_KEYS = {"slices", "forks"}
STAGES = ("boot", "run", "exit")
OPS = ("guest_os",)
# the comparison table: (column, stat); gauges (mmu_unsync, mmu_pages) are shown at the end of the phase
COMPARED = (("exits", "pf_taken"), ("emulations", "pf_emulate"), ("pte_writes", "mmu_pte_write"),
            ("cache_miss", "mmu_cache_miss"), ("zapped", "mmu_shadow_zapped"), ("walk_refs", "walk_refs"),
            ("unsync_now", "mmu_unsync"), ("mmu_pages", "mmu_pages"))


def resolve(section):
    """The [guest_os] section with defaults filled in and checked."""
    out = dict(DEFAULTS)
    for k, v in section.items():
        if k not in DEFAULTS:
            raise BatchMMUError(f"guest_os.{k}: unknown key; known: {', '.join(sorted(DEFAULTS))}",
                                field=f"guest_os.{k}", value=v)
        want = type(DEFAULTS[k])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)) \
                or v < 0:
            raise BatchMMUError(f"guest_os.{k}={v!r}: must be a non-negative {want.__name__}",
                                field=f"guest_os.{k}", value=v)
        out[k] = v
    for k in ("locality", "mmap_rate", "munmap_rate"):
        if out[k] > 1:
            raise BatchMMUError(f"guest_os.{k}={out[k]!r}: must be in 0..1", field=f"guest_os.{k}", value=out[k])
    if out["write_percent"] > 100 or out["fetch_percent"] > 100:
        raise BatchMMUError("guest_os.write_percent / fetch_percent: at most 100", field="guest_os", value=out)
    if out["code_pages"] < 1 or out["heap_pages"] + out["stack_pages"] < 1 or out["processes"] < 1:
        raise BatchMMUError("guest_os: needs code pages, data pages and a process", field="guest_os", value=out)
    return out


def tdp_guest_paging_unsupported():
    """Why a TDP VM cannot run a paging guest on this build (None when it can): tried, not assumed."""
    from .host import Host
    h = Host(memory="64MiB", backing="4k")
    vm = int(h.create_vms(1, memory="4MiB", mmu="tdp")[0])
    try:
        h.set_vcpu_regs(vm, 0, cr0=CR0, cr4=CR4, efer=EFER, cr3=0x1000)
    except BatchMMUError as e:
        return str(e)
    return None


class Layout:
    """A process's user address space: window 0 (code, heap) at 0x400000, window 1 (mmap area, stack)
    at 0x7f0000000000; a user page is numbered ``vpi`` 0..n-1 over both windows."""

    def __init__(self, p):
        self.code = p["code_pages"]
        self.heap = p["heap_pages"]
        self.n0 = -(-(self.code + self.heap) // 512) * 512
        self.mmap = p["mmap_pages"]
        self.n1 = -(-(self.mmap + p["stack_pages"]) // 512) * 512
        self.n = self.n0 + self.n1
        self.stack0 = self.n - p["stack_pages"]
        self.base = np.array([0x400000, 0x7F0000000000], np.int64)
        if self.n0 * 4096 + 0x400000 > 1 << 30 or self.n1 * 4096 > 1 << 30:
            raise BatchMMUError("guest_os: a window of the user address space is over 1 GiB", field="guest_os",
                                value=self.n)

    def window(self, vpi):
        return (np.asarray(vpi) >= self.n0).astype(np.int64)

    def gva(self, vpi):
        vpi = np.asarray(vpi, np.int64)
        w = self.window(vpi)
        return self.base[w] + (vpi - w * self.n0) * 4096


class Proc:
    """One process: its page-table pages (gpa, -1 = none) and the model's view of each user page."""

    def __init__(self, pid, pml4, lay, key):
        self.pid, self.pml4 = pid, pml4
        self.pdpt = [-1, -1]                       # per window
        self.pd = [-1, -1]
        self.pt = np.full(lay.n // 512, -1, np.int64)
        self.frame = np.full(lay.n, -1, np.int64)  # mapped frame (the PTE's), -1 = no PTE
        self.vma = np.zeros(lay.n, np.int8)        # VM_R | VM_W | VM_X, 0 = no mapping
        self.cow = np.zeros(lay.n, bool)           # PTE read-only in a writable mapping (fork, zero page)
        self.regions = []                          # mmap regions: [start vpi, pages]
        self.key = key                             # random order of the pages: the first ones are hot
        self._pools = None

    def pool(self, bit):
        """Pages of the mappings with ``bit``, hottest first."""
        if self._pools is None:
            self._pools = {}
        if bit not in self._pools:
            v = np.flatnonzero(self.vma & bit)
            self._pools[bit] = v[np.argsort(self.key[v], kind="stable")]
        return self._pools[bit]

    def changed(self):
        self._pools = None


class GuestVM:
    """The guest kernel of one VM: frames, processes, scheduling, and the fault handler."""

    def __init__(self, host, vm, vcpus, rng, p):
        self.host, self.vm, self.vcpus, self.rng, self.p = host, vm, vcpus, rng, p
        self.lay = Layout(p)
        self.nframes = int(next(m["size"] for m in host.memslots(vm) if m["slot"] == 0)) >> 12
        if self.nframes < FIRST_FREE + 64:
            raise BatchMMUError(f"guest_os: VM {vm} needs more than {FIRST_FREE * 4} KiB of memory",
                                field="memory", value=self.nframes * 4096)
        self.free = np.arange(self.nframes - 1, FIRST_FREE - 1, -1, dtype=np.int64)  # pop from the end
        self.nfree = self.free.size
        self.ref = np.zeros(self.nframes, np.int32)
        self.ref[ZERO_FRAME] = PINNED
        self.was_table = np.zeros(self.nframes, bool)
        self.procs = {}
        self.runq = []
        self.cursor = 0
        self.next_pid = 1
        self.current = [0] * vcpus          # pid 0: the kernel's own tables (CR3 = swapper)
        self.counts = {}
        self.log = Log()

    # ------------------------------------------------------------------ frames
    def _count(self, name, n=1):
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def alloc(self, k, vcpu, table=False, zero=True):
        """``k`` frames off the free list, zeroed by the kernel on ``vcpu`` (``zero=False``: the caller fills
        them, as copy_page does; a frame that held a page table is zeroed with stores either way, since
        the model writes no data contents)."""
        if k > self.nfree:
            raise BatchMMUError(f"guest_os: VM {self.vm} is out of guest memory ({self.nframes} frames); give the "
                                "VMs more memory or the processes fewer pages", field="memory",
                                value=self.nframes * 4096)
        f = self.free[self.nfree - k:self.nfree][::-1].copy()
        self.nfree -= k
        old = self.was_table[f]
        if zero:
            self.log.add("acc", vcpu, PHYSMAP + (f[~old] << 12), ACC_WRITE)   # clear_page
        words = (f[old, None] << 12) + 8 * np.arange(512)
        self.log.add("store", vcpu, PHYSMAP + words.ravel(), 0)               # old table entries cleared
        self.was_table[f] = table
        self.ref[f] = 1
        self._count("frames_allocated", k)
        return f

    def put(self, frames):
        """Drop a reference to each frame; free the ones nobody maps."""
        frames = np.asarray(frames, np.int64)
        frames = frames[self.ref[frames] < PINNED]
        np.subtract.at(self.ref, frames, 1)
        gone = np.unique(frames[self.ref[frames] == 0])
        self.free[self.nfree:self.nfree + gone.size] = gone
        self.nfree += gone.size

    # ------------------------------------------------------------------ boot
    def setup_kernel(self):
        """The kernel's page tables (written by the boot loader, host side) and the vCPUs in long mode
        on them; the program's code in the page cache."""
        h, vm, nf = self.host, self.vm, self.nframes
        ngib = -(-nf // (1 << 18))
        tabs = [int(t) << 12 for t in self.alloc(4 + ngib, 0, table=True, zero=False)]
        self.swapper, pdpt_k, pd_k, pdpt_phys = tabs[:4]
        self.kernel_entries = {273: pdpt_phys | KERNPG_TABLE, 511: pdpt_k | KERNPG_TABLE}
        for i, e in self.kernel_entries.items():
            h.write_guest_memory(vm, self.swapper + 8 * i, [e])
        h.write_guest_memory(vm, pdpt_phys, [t | KERNPG_TABLE for t in tabs[4:]])
        big = (np.arange(-(-nf // 512), dtype=np.int64) << 21) | P | W | A | D | PS | G | NX
        for k, pd in enumerate(tabs[4:]):
            h.write_guest_memory(vm, pd, big[512 * k:512 * (k + 1)].view(np.uint64))
        h.write_guest_memory(vm, pdpt_k + 8 * 510, [pd_k | KERNPG_TABLE])
        h.write_guest_memory(vm, pd_k, [P | A | PS | G])                  # text: gpa [0, 2M), r-x
        for c in range(self.vcpus):
            h.set_vcpu_regs(vm, c, cr0=CR0, cr4=CR4, efer=EFER, cr3=self.swapper)
        self.code_frames = self.alloc(self.lay.code, 0, zero=False)
        self.ref[self.code_frames] = PINNED

    def new_proc(self, vcpu):
        """A new mm: a PML4 with the kernel half, no user pages."""
        pml4 = int(self.alloc(1, vcpu, table=True)[0]) << 12
        proc = Proc(self.next_pid, pml4, self.lay, self.rng.random(self.lay.n))
        self.next_pid += 1
        self._kernel_half(pml4, vcpu)
        self.procs[proc.pid] = proc
        self.runq.append(proc.pid)
        return proc

    def exec_new(self, vcpu):
        """A new process running the program: code, heap and stack mappings."""
        lay = self.lay
        proc = self.new_proc(vcpu)
        proc.vma[:lay.code] = VM_R | VM_X
        proc.vma[lay.code:lay.code + lay.heap] = VM_R | VM_W
        proc.vma[lay.stack0:] = VM_R | VM_W
        self._count("execs")
        return proc

    def _kernel_half(self, pml4, vcpu):
        idx = np.array(sorted(self.kernel_entries), np.int64)
        self.log.add("store", vcpu, PHYSMAP + pml4 + 8 * idx, np.array([self.kernel_entries[i] for i in idx]))

    # ------------------------------------------------------------------ page tables
    def pte_gpa(self, proc, vpi):
        gva = self.lay.gva(vpi)
        return proc.pt[np.asarray(vpi) >> 9] + 8 * ((gva >> 12) & 511)

    def ensure_tables(self, proc, vpis, vcpu):
        """Allocate the missing PDPT / PD / PT pages above ``vpis`` and store their entries, top down."""
        lay = self.lay
        for w in np.unique(lay.window(vpis)):
            base = int(lay.base[w])
            if proc.pdpt[w] < 0:
                proc.pdpt[w] = int(self.alloc(1, vcpu, table=True)[0]) << 12
                self.log.add("store", vcpu, PHYSMAP + proc.pml4 + 8 * ((base >> 39) & 511), proc.pdpt[w] | PAGE_TABLE)
            if proc.pd[w] < 0:
                proc.pd[w] = int(self.alloc(1, vcpu, table=True)[0]) << 12
                self.log.add("store", vcpu, PHYSMAP + proc.pdpt[w] + 8 * ((base >> 30) & 511), proc.pd[w] | PAGE_TABLE)
        slots = np.unique(np.asarray(vpis) >> 9)
        new = slots[proc.pt[slots] < 0]
        if new.size:
            proc.pt[new] = self.alloc(new.size, vcpu, table=True) << 12
            gva = lay.gva(new << 9)
            pd = np.array(proc.pd, np.int64)[lay.window(new << 9)]
            self.log.add("store", vcpu, PHYSMAP + pd + 8 * ((gva >> 21) & 511), proc.pt[new] | PAGE_TABLE)
            self._count("tables_allocated", new.size)

    def set_ptes(self, proc, vpis, values, vcpu):
        self.log.add("store", vcpu, PHYSMAP + self.pte_gpa(proc, vpis), values)
        self._count("pte_stores", np.size(vpis))

    def read_ptes(self, proc, vpis):
        """The PTEs as the guest sees them (A/D set by the CPU): one read per table page."""
        out = np.zeros(len(vpis), np.int64)
        slots = np.asarray(vpis) >> 9
        for s in np.unique(slots):
            table = self.host.read_guest_memory(self.vm, int(proc.pt[s]), 512).view(np.int64)
            sel = slots == s
            out[sel] = table[(self.lay.gva(np.asarray(vpis)[sel]) >> 12) & 511]
        return out

    # ------------------------------------------------------------------ faults
    def handle_faults(self, vcpu, vpi, err):
        """#PF handler for faulting user accesses (their vCPU, page, error code), in order."""
        for c in np.unique(vcpu):
            proc = self.procs[self.current[c]]
            sel = vcpu == c
            pages, first = np.unique(vpi[sel], return_index=True)
            e = err[sel][first]
            write = (e & ACC_WRITE) != 0
            absent = (e & PFERR_PRESENT) == 0
            ok = (proc.vma[pages] != 0) & (absent | (write & proc.cow[pages]))
            if not ok.all():
                j = int(np.flatnonzero(~ok)[0])
                at = int(self.lay.gva(pages[j]))
                raise BatchMMUError(f"guest_os: VM {self.vm} pid {proc.pid}: segfault at {at:#x} (error code "
                                    f"{int(e[j]):#x})", field="guest_os", value=int(e[j]))
            self.demand(proc, int(c), pages[absent], write[absent])
            self.cow_fault(proc, int(c), pages[~absent])

    def demand(self, proc, vcpu, pages, write):
        """do_read_fault (code, with fault-around) / do_anonymous_page (zero page or a new page)."""
        if not pages.size:
            return
        code = (proc.vma[pages] & VM_X) != 0
        around = (pages[code, None] & ~(FAULT_AROUND - 1)) + np.arange(FAULT_AROUND)
        around = np.unique(around)
        around = around[around < self.lay.code]
        around = around[proc.frame[around] < 0]
        anon_w = pages[~code & write]
        anon_r = pages[~code & ~write]
        self.ensure_tables(proc, np.concatenate([around, anon_w, anon_r]), vcpu)
        frames = self.alloc(anon_w.size, vcpu)
        proc.frame[around] = self.code_frames[around]
        proc.frame[anon_w] = frames
        proc.frame[anon_r] = ZERO_FRAME
        proc.cow[anon_r] = True
        self.set_ptes(proc, around, (self.code_frames[around] << 12) | P | U | A, vcpu)
        self.set_ptes(proc, anon_w, (frames << 12) | P | U | W | A | D | NX, vcpu)
        self.set_ptes(proc, anon_r, (ZERO_FRAME << 12) | P | U | A | NX, vcpu)
        self._count("demand_faults", pages.size)
        self._count("zero_page_maps", anon_r.size)

    def cow_fault(self, proc, vcpu, pages):
        """do_wp_page: reuse the page in place when nobody else maps it, else copy it (wp_page_copy:
        new page, clear the PTE and flush it, store the new PTE)."""
        if not pages.size:
            return
        old = proc.frame[pages]
        reuse = (self.ref[old] == 1)
        copy = pages[~reuse]
        src = old[~reuse]
        new = self.alloc(copy.size, vcpu, zero=False)
        zsrc = src == ZERO_FRAME
        self.log.add("acc", vcpu, PHYSMAP + (new[zsrc] << 12), ACC_WRITE)          # clear_page
        both = np.stack([PHYSMAP + (src[~zsrc] << 12), PHYSMAP + (new[~zsrc] << 12)], 1).ravel()
        self.log.add("acc", vcpu, both, np.tile([0, ACC_WRITE], (~zsrc).sum()))   # copy_page
        self.set_ptes(proc, copy, 0, vcpu)                                         # ptep_clear_flush
        self.log.add("invlpg", vcpu, self.lay.gva(copy))
        self.set_ptes(proc, copy, (new << 12) | P | U | W | A | D | NX, vcpu)
        keep = pages[reuse]
        self.set_ptes(proc, keep, (old[reuse] << 12) | P | U | W | A | D | NX, vcpu)  # wp_page_reuse
        self.put(src)
        proc.frame[copy] = new
        proc.cow[pages] = False
        self._count("cow_copies", copy.size)
        self._count("cow_reuses", keep.size)

    # ------------------------------------------------------------------ process operations
    def switch(self, vcpu, pid):
        """schedule(): MOV CR3 to the next process's PML4 (pid 0: the kernel's own tables)."""
        if self.current[vcpu] == pid:
            return
        self.current[vcpu] = pid
        self.log.add("cr3", vcpu, 0, self.procs[pid].pml4 if pid else self.swapper)
        self._count("context_switches")

    def schedule(self):
        """Round robin: each vCPU takes the next process that no other vCPU runs."""
        for c in range(self.vcpus):
            taken = {self.current[k] for k in range(self.vcpus) if k != c}
            for _ in range(len(self.runq)):
                pid = self.runq[self.cursor % len(self.runq)]
                self.cursor += 1
                if pid not in taken:
                    self.switch(c, pid)
                    break

    def fork(self, vcpu):
        """fork() by the process on ``vcpu``: copy_page_range of its anonymous mappings, then
        flush_tlb_mm.  Returns the child."""
        parent = self.procs[self.current[vcpu]]
        child = self.new_proc(vcpu)
        child.vma[:] = parent.vma
        child.regions = [list(r) for r in parent.regions]
        pages = np.flatnonzero((parent.frame >= 0) & ((parent.vma & VM_W) != 0))
        if pages.size:
            val = self.read_ptes(parent, pages)
            self.ensure_tables(child, pages, vcpu)
            writable = (val & W) != 0
            par = np.where(writable, val & ~W, val)
            kid = val & ~(W | A)                                 # pte_wrprotect + pte_mkold
            addr = np.stack([self.pte_gpa(parent, pages), self.pte_gpa(child, pages)], 1)
            vals = np.stack([par, kid], 1)
            keep = np.stack([writable, np.ones_like(writable)], 1)   # only writable parent PTEs are stored
            self.log.add("store", vcpu, PHYSMAP + addr[keep], vals[keep])
            self._count("pte_stores", int(keep.sum()))
            child.frame[pages] = parent.frame[pages]
            np.add.at(self.ref, parent.frame[pages], 1)
            self.ref[self.ref >= PINNED] = PINNED
            parent.cow[pages] = True
            child.cow[pages] = True
        self.log.add("flush", vcpu, [])
        self._count("forks")
        self._count("fork_ptes", pages.size)
        return child

    def mmap(self, vcpu):
        """An anonymous mmap in the mmap area, top down (no PTEs until touched)."""
        proc = self.procs[self.current[vcpu]]
        lay = self.lay
        n = int(self.rng.integers(1, self.p["max_mmap_pages"] + 1))
        free = proc.vma[lay.n0:lay.n0 + lay.mmap] == 0
        cs = np.concatenate([[0], np.cumsum(free)])
        fits = np.flatnonzero(cs[n:] - cs[:-n] == n) if n <= free.size else np.zeros(0, np.int64)
        if not fits.size:
            return
        start = lay.n0 + int(fits[-1])
        proc.vma[start:start + n] = VM_R | VM_W
        proc.regions.append([start, n])
        proc.changed()
        self._count("mmaps")

    def munmap(self, vcpu):
        """munmap of one of the process's mmap regions: clear its PTEs, then INVLPG each page or flush."""
        proc = self.procs[self.current[vcpu]]
        if not proc.regions:
            return
        start, n = proc.regions.pop(int(self.rng.integers(0, len(proc.regions))))
        pages = np.arange(start, start + n)
        mapped = pages[proc.frame[pages] >= 0]
        self.set_ptes(proc, mapped, 0, vcpu)
        self.put(proc.frame[mapped])
        proc.frame[pages], proc.cow[pages], proc.vma[pages] = -1, False, 0
        proc.changed()
        if mapped.size:
            lo, hi = int(mapped[0]), int(mapped[-1])
            if hi - lo + 1 <= FLUSH_CEILING:
                self.log.add("invlpg", vcpu, self.lay.gva(np.arange(lo, hi + 1)))
            else:
                self.log.add("flush", vcpu, [])
        self._count("munmaps")

    def exit(self, vcpu):
        """exit_mmap of the process on ``vcpu``: PTEs cleared, tables unhooked and freed, TLB flushed;
        the vCPU then runs the kernel's own tables until the next slice."""
        proc = self.procs.pop(self.current[vcpu])
        self.runq.remove(proc.pid)
        mapped = np.flatnonzero(proc.frame >= 0)
        self.set_ptes(proc, mapped, 0, vcpu)
        self.put(proc.frame[mapped])
        slots = np.flatnonzero(proc.pt >= 0)
        gva = self.lay.gva(slots << 9)
        pd = np.array(proc.pd, np.int64)[self.lay.window(slots << 9)]
        self.log.add("store", vcpu, PHYSMAP + pd + 8 * ((gva >> 21) & 511), 0)
        for w in (0, 1):
            base = int(self.lay.base[w])
            if proc.pd[w] >= 0:
                self.log.add("store", vcpu, PHYSMAP + proc.pdpt[w] + 8 * ((base >> 30) & 511), 0)
            if proc.pdpt[w] >= 0:
                self.log.add("store", vcpu, PHYSMAP + proc.pml4 + 8 * ((base >> 39) & 511), 0)
        self.log.add("flush", vcpu, [])
        tables = np.concatenate([proc.pt[slots], [t for t in proc.pd + proc.pdpt if t >= 0], [proc.pml4]]) >> 12
        self.put(tables.astype(np.int64))
        self.current[vcpu] = -1
        self.switch(vcpu, 0)
        self._count("exits")

    # ------------------------------------------------------------------ touches
    def touches(self):
        """One slice of accesses per vCPU (kernel entry work, then the user process), vCPUs
        interleaved: (vcpu, gva, kind, vpi or -1 for kernel accesses)."""
        p, rng, lay = self.p, self.rng, self.lay
        per = []
        for c in range(self.vcpus):
            k = p["kernel_touches"]
            fetch = rng.random(k) < 0.5
            kpage = rng.integers(0, 256, k)
            kgva = np.where(fetch, KTEXT + (kpage << 12), PHYSMAP + KDATA + (kpage << 12))
            kkind = np.where(fetch, ACC_FETCH, np.where(rng.random(k) < 0.3, ACC_WRITE, 0))
            pid = self.current[c]
            if pid <= 0:
                per.append((kgva, kkind, np.full(k, -1, np.int64)))
                continue
            proc = self.procs[pid]
            n = p["switch_every"]
            fetch = rng.random(n) * 100 < p["fetch_percent"]
            write = rng.random(n) * 100 < p["write_percent"]
            hot = rng.random(n) < p["locality"]
            pick = rng.random(n)
            vpi = np.empty(n, np.int64)
            for mask, pool in ((fetch, proc.pool(VM_X)), (~fetch, proc.pool(VM_W))):
                m = min(p["hot_pages"], pool.size)
                idx = np.where(hot[mask], pick[mask] * m, pick[mask] * pool.size).astype(np.int64)
                vpi[mask] = pool[idx]
            kind = ACC_USER | np.where(fetch, ACC_FETCH, np.where(write, ACC_WRITE, 0))
            per.append((np.concatenate([kgva, lay.gva(vpi)]), np.concatenate([kkind, kind]),
                        np.concatenate([np.full(k, -1, np.int64), vpi])))
        order = []
        for c, (g, k, v) in enumerate(per):   # round-robin over vCPUs: position i of each, then i + 1
            order.append((np.arange(g.size) * self.vcpus + c, np.full(g.size, c), g, k, v))
        pos = np.concatenate([o[0] for o in order])
        srt = np.argsort(pos, kind="stable")
        return tuple(np.concatenate([o[i] for o in order])[srt] for i in range(1, 5))


class GuestOS:
    """The guest OS on VMs ``vms`` of ``host``; VM i draws from stream ``streams[i]`` (default i).

    ``boot()``, then ``run(slices, forks)`` any number of times, ``exit_all()``; directed steps for tests:
    ``switch``, ``user_access``, ``fork``, ``mmap``, ``munmap``.  Each method acts on every VM.
    """

    def __init__(self, host, vms, seed=0, streams=None, **params):
        self.host = host
        self.vms = [int(v) for v in np.atleast_1d(vms)]
        self.p = resolve(params)
        self.seed = seed
        self.streams = list(range(len(self.vms))) if streams is None else [int(s) for s in streams]
        self.guests = {}
        self.skipped = {}           # vm -> why the VM cannot run the guest (TDP without guest paging)
        self.events = 0
        self.counts = {}
        self.booted = False

    def boot(self):
        """Kernel tables and vCPU state on every VM, ``processes`` processes, and a slice for each.
        A VM whose MMU cannot run a paging guest (TDP before 2D walks) is skipped: ``skipped[vm]``."""
        self.booted = True
        for vm, s in zip(self.vms, self.streams, strict=True):
            g = GuestVM(self.host, vm, int(self.host._vcpus[vm]), np.random.default_rng([self.seed, s, 0x6057]),
                        self.p)
            try:
                g.setup_kernel()
            except BatchMMUError as e:
                if self.host._mmu_kind[vm] == MMU_SHADOW:
                    raise
                self.skipped[vm] = str(e)
                continue
            for _ in range(self.p["processes"]):
                g.exec_new(0)
            self.guests[vm] = g
        self._flush()
        vcpus = min((g.vcpus for g in self.guests.values()), default=1)
        self.run(-(-self.p["processes"] // vcpus))

    def _flush(self):
        logs = {vm: g.log for vm, g in self.guests.items() if g.log.chunks}
        self.events += execute(self.host, logs, self.counts)
        for g in self.guests.values():
            g.log = Log()

    def _each(self, fn):
        for g in self.guests.values():
            fn(g)
        self._flush()

    # ------------------------------------------------------------------ directed steps (all VMs alike)
    def switch(self, vcpu, pid):
        self._each(lambda g: g.switch(vcpu, pid))

    def fork(self, vcpu=0):
        """Fork the process on ``vcpu`` in every VM; returns the child's pid (the same in every VM)."""
        kids = []
        self._each(lambda g: kids.append(g.fork(vcpu).pid))
        return kids[0] if kids else None

    def mmap(self, vcpu=0):
        self._each(lambda g: g.mmap(vcpu))

    def munmap(self, vcpu=0):
        self._each(lambda g: g.munmap(vcpu))

    def user_access(self, vcpu, vpis, kinds):
        """The processes on ``vcpu`` access user pages ``vpis`` (``kinds``: ACC_WRITE / ACC_FETCH bits,
        ACC_USER added), faults handled; returns the outcomes of the first try of the last VM."""
        vpis = np.atleast_1d(np.asarray(vpis, np.int64))
        kinds = np.broadcast_to(np.asarray(kinds, np.int64) | ACC_USER, vpis.shape)
        batch = {vm: (np.full(vpis.size, vcpu), g.lay.gva(vpis), kinds, vpis) for vm, g in self.guests.items()}
        return self._access(batch)

    # ------------------------------------------------------------------ workload
    def _access(self, batch):
        """Run {vm: (vcpu, gva, kind, vpi)}, handling #PFs and retrying until every access ran."""
        outcome = None
        for _ in range(8):
            if not batch:
                return outcome
            vms = list(batch)
            vm = np.concatenate([np.full(batch[v][0].size, v, np.int64) for v in vms])
            vc, gva, kind, vpi = (np.concatenate([batch[v][i] for v in vms]) for i in range(4))
            res = self.host.access(vm, vc, gva, kind)
            self.events += vm.size
            if outcome is None:
                outcome = res.outcome
            bad = res.outcome == GUEST_FAULT
            if (bad & (vpi < 0)).any():
                j = int(np.flatnonzero(bad & (vpi < 0))[0])
                raise BatchMMUError(f"guest_os: kernel access {int(gva[j]):#x} of VM {int(vm[j])} faulted",
                                    field="guest_os", value=int(gva[j]))
            self._count("guest_faults", int(bad.sum()))
            batch = {}
            for v in np.unique(vm[bad]):
                sel = bad & (vm == v)
                self.guests[int(v)].handle_faults(vc[sel], vpi[sel], res.error_code[sel])
                batch[int(v)] = (vc[sel], gva[sel], kind[sel], vpi[sel])
            self._flush()
        raise BatchMMUError("guest_os: accesses still fault after 8 tries", field="guest_os", value=None)

    def _count(self, name, n):
        self.counts[name] = self.counts.get(name, 0) + n

    def run(self, slices, forks=0, progress=None):
        """``slices`` time slices on every VM: schedule (MOV CR3), mmap / munmap, ``forks`` forks spread
        over the slices (by vCPU 0's process), the slice's accesses, and an exit when there are too many
        processes."""
        p = self.p
        for s in range(slices):
            for g in self.guests.values():
                g.schedule()
                for c in range(g.vcpus):
                    if g.current[c] <= 0:
                        continue
                    if g.rng.random() < p["mmap_rate"]:
                        g.mmap(c)
                    if g.rng.random() < p["munmap_rate"]:
                        g.munmap(c)
            self._flush()
            if forks and (s + 1) * forks // slices > s * forks // slices:
                for g in self.guests.values():   # fork reads the parent's PTEs: after the flush above
                    if g.current[0] > 0:
                        g.fork(0)
                self._flush()
            before = self.events
            self._access({vm: g.touches() for vm, g in self.guests.items()})
            for g in self.guests.values():
                if len(g.procs) > p["max_processes"] and g.current[0] > 0:
                    g.exit(0)
            self._flush()
            if progress is not None:
                progress(self.events - before)

    def exit_all(self):
        """Every process exits (on vCPU 0), then the vCPUs run the kernel's tables."""
        while any(g.procs for g in self.guests.values()):
            for g in self.guests.values():
                if g.procs:
                    g.switch(0, g.runq[0])
                    for c in range(1, g.vcpus):
                        if g.current[c] == g.runq[0]:
                            g.switch(c, 0)
                    g.exit(0)
            self._flush()

    def model_counts(self, vms=None):
        """What the guest did (forks, cow copies, faults...), summed over ``vms`` (default all)."""
        out = {}
        for vm, g in self.guests.items():
            if vms is None or vm in vms:
                for k, v in g.counts.items():
                    out[k] = out.get(k, 0) + v
        return out


# ----------------------------------------------------------------------------- scenario op
def _stream_ids(shard):
    """Each VM's index inside its vm_group: VM k of every group runs the same guest."""
    first, n = [], 0
    for g in shard.spec["groups"]:
        first.append(n)
        n += int(g.get("count", 1))
    return [int(gid) - first[int(gi)] for gid, gi in zip(shard.gids, shard.group, strict=True)]


def run(shard, ph, extra, progress=None):
    """The ``guest_os`` op on a Shard: ``stage`` boot | run | exit; the phase's cost per MMU goes into
    ``extra`` as ``<mmu>.<name>`` (stat deltas, footprint at the end of the phase)."""
    stage = ph.get("stage", "run")
    if stage not in STAGES:
        raise BatchMMUError(f"phase.stage={stage!r}: use {', '.join(STAGES)}", field="phase.stage", value=stage)
    host = shard.host
    gos = getattr(shard, "guest_os", None)
    before = host.vt.stats[:host.nvm].copy()
    if gos is None:
        lvms = [v for v in range(shard.gids.size) if shard._runs(v)]
        streams = _stream_ids(shard)
        gos = shard.guest_os = GuestOS(host, lvms, seed=shard.seed, streams=[streams[v] for v in lvms],
                                       **shard.spec.get("guest_os", {}))
    counts0 = {vm: dict(g.counts) for vm, g in gos.guests.items()}
    ev0 = gos.events
    if not gos.booted:
        gos.boot()
    if stage == "run":
        gos.run(int(ph.get("slices", 100)), int(ph.get("forks", 0)), progress)
    elif stage == "exit":
        gos.exit_all()
    now = host.vt.stats[:host.nvm]
    mmu = np.array([shard.spec["groups"][int(gi)].get("mmu", "tdp") for gi in shard.group])
    for kind in ("tdp", "shadow"):
        vms = [vm for vm in gos.guests if mmu[vm] == kind]
        extra[f"{kind}.vms"] = len(vms)
        extra[f"{kind}.skipped"] = sum(1 for vm in gos.skipped if mmu[vm] == kind)
        for _, stat in COMPARED:   # counters: what the phase added; gauges: the value at its end
            k = STAT_NAMES.index(stat)
            d = now[vms, k] if stat in GAUGE_STATS else now[vms, k] - before[vms, k]
            extra[f"{kind}.{stat}"] = int(d.sum())
        extra[f"{kind}.kvm_bytes"] = sum(host.footprint(vm)["kvm_total"] for vm in vms)
        for vm in vms:
            for k, v in gos.guests[vm].counts.items():
                d = v - counts0.get(vm, {}).get(k, 0)
                extra[f"{kind}.guest.{k}"] = extra.get(f"{kind}.guest.{k}", 0) + d
    return gos.events - ev0


def report_lines(rec):
    """The shadow/TDP comparison of a guest_os phase."""
    if rec.get("op") != "guest_os":
        return []
    lines = []
    cols = [c for c, _ in COMPARED] + ["kvm_bytes"]
    stats = [s for _, s in COMPARED] + ["kvm_bytes"]
    lines.append("    " + f"{'':<12}" + "".join(f"{c:>13}" for c in cols))
    have = {}
    for kind in ("tdp", "shadow"):
        n = rec.get(f"{kind}.vms", 0)
        if not n:
            if rec.get(f"{kind}.skipped"):
                why = tdp_guest_paging_unsupported() if kind == "tdp" else None
                why = why or "cannot run a paging guest"
                lines.append(f"    {kind:<12}skipped ({rec[f'{kind}.skipped']} VMs): {why}")
            continue
        have[kind] = [rec.get(f"{kind}.{s}", 0) for s in stats]
        lines.append(f"    {kind + f' ({n})':<12}" + "".join(f"{v:>13,}" for v in have[kind]))
    if len(have) == 2:
        ratio = [f"{s / t:.1f}x" if t else ("-" if not s else "inf") for s, t in zip(have["shadow"], have["tdp"],
                                                                                     strict=True)]
        lines.append(f"    {'shadow/tdp':<12}" + "".join(f"{r:>13}" for r in ratio))
    kind = "shadow" if rec.get("shadow.vms") else "tdp"
    g = {k.split(".", 2)[2]: v for k, v in rec.items() if k.startswith(f"{kind}.guest.")}
    if len(have) == 2 and rec["tdp.vms"] == rec["shadow.vms"]:
        t = {k.split(".", 2)[2]: v for k, v in rec.items() if k.startswith("tdp.guest.")}
        if t != g:   # same streams: a guest that behaves differently could tell the MMUs apart
            lines.append("    WARNING: the guests on tdp and shadow diverged (guest-visible difference)")
    if g:
        lines.append(f"    guest ({kind}): " + ", ".join(f"{k}={v:,}" for k, v in sorted(g.items()) if v))
    return lines
