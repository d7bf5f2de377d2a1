"""Property fuzzer of the public Host API (used by tests/test_api_fuzz.py and bench/fuzz_api.py).

Each case calls one public Host method with random arguments: all valid, or exactly one argument
drawn from that argument's bad values (wrong types, numpy scalars, bool, floats, NaN/inf, strings,
None, huge/negative ints, wrong shapes, ragged lists, bad ids).  The properties:

* only ``BatchMMUError`` escapes; a call with a bad argument is refused and names that argument;
* a refused call leaves the observable state identical: stats, footprint, memslots and their
  generations, dirty bitmaps and rings, vCPU registers, guest memory, SPTEs, host memory, time;
  for a bad argument also a fixed probe batch run on a deep copy gives the same results.
"""

import copy
import math

import numpy as np

import batchmmu as bm
from batchmmu.units import parse_size

P, W, U, A, D, PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
LOG = bm.MEM_LOG_DIRTY_PAGES
CR0, CR4, EFER = 0x80010033, 0x20, 0xD01
NAN, INF = float("nan"), float("inf")

INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
# values no integer argument takes
TYPE_BAD = (True, False, np.bool_(True), 1.5, 2.0, NAN, INF, -INF, np.float64(4096.0), np.float32(1.0), "12",
            "0x1000", b"1", None, 1j, object(), [1, [2]], np.zeros((2, 2), np.int64), {"a": 1})
# values no integer array argument takes
ARRAY_BAD = (True, 1.5, NAN, "12", None, object(), [1.5], ["1"], [True, 1], [[1, 2], [3]], [1, [2]],
             np.zeros((2, 2), np.int64), np.array([1.0]), np.array(["a"]), np.array([1.5], object),
             [2 ** 64], [-2 ** 70])
HUGE = (2 ** 63, 2 ** 64, 2 ** 64 - 1, 10 ** 30, -2 ** 63 - 1, np.uint64(2 ** 64 - 1), np.int64(2 ** 63 - 8))


def build(pml=False):
    """The fixed host every case starts from: TDP (EPT with a 2D-walking vCPU, NPT with manual
    protect), a dirty-ring VM and a shadow-MMU VM, with some memory touched."""
    h = bm.Host(memory="1GiB", backing="thp", pml=pml)
    h.create_vms(1, memory="8MiB", vcpus=2)                       # 0: EPT, vCPU 1 with guest paging
    h.set_memslot(0, 1, 1 << 30, 1 << 21, flags=LOG)
    h.create_vms(1, memory="4MiB", tdp_format="ept" if pml else "npt")  # 1: manual protect
    h.enable_manual_dirty_log_protect(1, initially_set=True)
    h.set_memslot(1, 1, 1 << 30, 1 << 21, flags=LOG)
    h.create_vms(1, memory="4MiB")                                # 2: dirty ring
    h.enable_dirty_ring(2, 1024)
    h.set_memslot(2, 1, 1 << 30, 1 << 21, flags=LOG)
    h.create_vms(1, memory="8MiB", mmu="shadow")                  # 3: shadow MMU
    h.create_vms(1, memory="4MiB", tdp_mmu=False)                 # 4: legacy TDP MMU
    h.set_memslot(4, 1, 1 << 30, 1 << 21, flags=LOG)
    for vm, vcpu in ((0, 1), (3, 0)):
        # 1:1 map of the first 8 MiB with 2M pages; tables at 0x10000
        h.write_guest_memory(vm, 0x10000, [0x11000 | P | W | U | A])
        h.write_guest_memory(vm, 0x11000, [0x12000 | P | W | U | A])
        h.write_guest_memory(vm, 0x12000, [(k << 21) | P | W | U | A | D | PS for k in range(4)])
        h.set_vcpu_regs(vm, vcpu, cr0=CR0, cr4=CR4, efer=EFER, cr3=0x10000)
    h.access([0, 0, 1, 2, 3, 4, 4], [0, 1, 0, 0, 0, 0, 0], [0x1000, 0x3000, 0x2000, 1 << 30, 0x5000, 0x3000, 1 << 30],
             bm.ACC_WRITE)
    h.access([0, 1], 0, [(1 << 30) + 0x1000, (1 << 30) + 0x1000], bm.ACC_WRITE)
    if not pml:
        # 5: nested (legacy TDP MMU, VMX): EPT12 at 0x100000 maps L2 gpas 0-2 MiB onto L1 2-4 MiB; vCPU 1 runs L2
        h.create_vms(1, memory="4MiB", vcpus=2, tdp_mmu=False, nested=True)
        h.write_guest_memory(5, 0x100000, [0x101000 | 7])
        h.write_guest_memory(5, 0x101000, [0x102000 | 7])
        h.write_guest_memory(5, 0x102000, [0x200000 | 7 | WB | PS])
        h.nested_enter(5, 1, eptp=EPTP, cr0=0x11, cr3=0, cr4=0, efer=0)
        h.access(5, 1, [0x1000, 0x2000], bm.ACC_WRITE)
    return h


WB = 6 << 3
EPTP = 0x100000 | 6 | (3 << 3) | 0x40


# ----------------------------------------------------------------------------- observable state
def snapshot(h):
    """Everything a user can observe, read without changing anything."""
    st, ct = h.st, h.ct
    out = {"stats": h.stats(), "footprint": {k: v for k, v in h.footprint().items() if k != "simulator_bytes"},
           "nvm": h.nvm, "host_memory": h.host_memory(), "swapped": h.swapped_bytes(), "time": h.time_ms,
           "nx_next": h._nx_next_ms, "shrink_count": h.shrink_count()}
    for vm in range(h.nvm):
        slots = h.memslots(vm)
        out[f"vm{vm}"] = {
            "slots": slots, "gen": (h.memslots_generation(vm, 0), h.memslots_generation(vm, 1)),
            "regs": [h.vcpu_regs(vm, c) for c in range(int(h._vcpus[vm]))],
            "mode": (int(h.vt.dirty_mode[vm]), int(h.vt.inval_count[vm])), "sptes": h.spte_dump(vm),
            "host": [{k: v.copy() for k, v in h.host_pages(vm, m["slot"]).items()} for m in slots],
        }
        for m in slots:
            rec = h._slot_rec[(vm, m["slot"])]
            off = int(st.dirty_off[rec])
            if off >= 0:
                words = (int(st.npages[rec]) + 63) // 64
                out[f"vm{vm}"][f"dirty{m['slot']}"] = st.dirty[off:off + 2 * words].copy()
        g, n = int(h.vt.vcpu_off[vm]), int(h._vcpus[vm])
        out[f"vm{vm}"]["ring"] = [getattr(ct, k)[g:g + n].copy() for k in
                                  ("ring_size", "ring_dirty", "ring_reset", "ring_fetch", "pml_count")]
    out["vcpu_records"] = h.vr.rec.copy()   # registers, roots, guest mode (nested)
    gm = h.gm
    live = gm.key >= 0
    out["guest_memory"] = {int(k): gm.page[r].tobytes() for k, r in zip(gm.key[live], gm.row[live], strict=True)}
    return out


def probe(h):
    """A fixed batch run on a deep copy: accesses on every VM, dirty logs, ring and guest memory."""
    h = copy.deepcopy(h)
    out = []
    for vm in range(h.nvm):
        for vcpu in range(int(h._vcpus[vm])):
            try:
                r = h.access(vm, vcpu, [0x1000, 0x201000, 0x4000], [bm.ACC_WRITE, 0, bm.ACC_WRITE])
                out.append((r.outcome.tolist(), r.error_code.tolist()))
            except bm.BatchMMUError as e:
                out.append(str(e))
        for m in h.memslots(vm):
            try:
                out.append(h.get_dirty_log(vm, m["slot"]).tolist())
            except bm.BatchMMUError as e:
                out.append(e.errno)
        try:
            out.append(h.read_guest_memory(vm, 0x1000, 4).tolist())
        except bm.BatchMMUError as e:   # an earlier case deleted or moved the slot there
            out.append(e.errno)
    out.append(h.harvest_dirty_ring(2, 0).tolist() if h.nvm > 2 and h.ct.ring_size[h.vt.vcpu_off[2]] else None)
    out.append(h.stats())
    return out


def same(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and \
            a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and type(a) is type(b)


def diff(a, b, path="state"):
    """The first path where two snapshots differ (for messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            if k not in a or k not in b or not same(a[k], b[k]):
                return diff(a.get(k), b.get(k), f"{path}[{k!r}]")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if not same(x, y):
                return diff(x, y, f"{path}[{i}]")
    return path


# ----------------------------------------------------------------------------- argument kinds
class Kinds:
    """Valid and bad values of each kind of argument, for one host."""

    def __init__(self, rng, h):
        self.rng, self.h = rng, h

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def npify(self, v):
        """``v`` as a Python int or a numpy integer scalar of a width that holds it."""
        if self.rng.random() < 0.4:
            return v
        fits = [t for t in INT_DTYPES if np.iinfo(t).min <= v <= np.iinfo(t).max]
        return self.pick(fits)(v)

    def vm(self):
        return self.npify(int(self.rng.integers(self.h.nvm)))

    def valid(self, kind):
        r, pick = self.rng, self.pick
        if kind == "vm":
            return self.vm()
        if kind == "vm_opt":
            return None if self.rng.random() < 0.3 else self.vm()
        if kind == "vcpu":
            return self.npify(0)
        if kind == "vcpus":
            return self.pick([0, [0], np.zeros(3, np.int8), self.npify(0)])
        if kind in ("addr", "gva"):
            return self.npify(pick([0, 0x1000, 0x3ff8, 0x200000 + 8 * int(r.integers(512)), 0x7ff000]))
        if kind == "addrs":
            return pick([self.valid("addr"), [0x1000, 0x2000, 0x3000], np.array([0x1000, 0x5008], np.uint32)])
        if kind == "kind":
            return self.npify(pick([0, bm.ACC_WRITE, bm.ACC_USER, bm.ACC_FETCH, bm.ACC_WRITE | bm.ACC_USER]))
        if kind == "slot":
            return self.npify(pick([0, 1, 2, 7, 0x10001]))
        if kind == "gpa":
            return self.npify(pick([0, 1 << 30, 2 << 30, 3 << 30]))
        if kind == "size":
            return pick([self.npify(pick([0, 4096, 1 << 21])), "2MiB", "4KiB"])
        if kind == "mflags":
            return self.npify(pick([0, LOG, bm.MEM_READONLY, LOG | bm.MEM_READONLY]))
        if kind == "hva_opt":
            return pick([None, None, self.npify((1 << 41) + (int(r.integers(8)) << 21))])
        if kind == "backing_opt":
            return pick([None, "thp", "4k"])
        if kind == "bool":
            return pick([True, False, np.bool_(True), 0, 1])
        if kind == "as_id":
            return self.npify(pick([0, 1]))
        if kind == "reg":
            return None if r.random() < 0.5 else self.npify(pick([CR0, CR4, EFER, 0x10000, 2]))
        if kind == "efer":   # (valid EFERs: kvm_valid_efer refuses reserved bits)
            return None if r.random() < 0.5 else self.npify(pick([EFER, 0]))
        if kind == "gpa8":
            return self.npify(8 * int(r.integers(1 << 17)))
        if kind == "gpa_any":
            return self.npify(int(r.integers(1 << 20)))
        if kind == "words":
            return pick([[1, 2, 3], np.arange(4, dtype=np.uint64), [2 ** 64 - 1, -1], 7, np.int8(-3)])
        if kind == "n":
            return self.npify(int(r.integers(64)))
        if kind == "u64":
            return pick([0, 2 ** 64 - 1, -1, np.uint64(2 ** 63), np.int8(-1), 12345])
        if kind == "values":
            return pick([self.valid("u64"), [1, 2, 3]])
        if kind == "page":
            return self.npify(pick([0, 64, 128]))
        if kind == "bitmap":
            return pick([[-1], np.ones(2, np.uint64), [0, 2 ** 64 - 1], np.array([5], np.int8)])
        if kind == "hva":
            return self.npify(pick([1 << 40, (1 << 40) + 0x1000, 1 << 41]))
        if kind == "hva_end":
            return self.npify(pick([(1 << 40) + (1 << 22), (1 << 41) + (1 << 21)]))
        if kind == "seconds":
            return pick([0, 1, 0.5, np.float32(2.5), 3600, np.int16(7)])
        if kind == "entries":
            return self.npify(pick([1024, 4096]))
        if kind == "rows":
            return self.npify(pick([0, 1, 100]))
        if kind == "mmu_pages":
            return self.npify(pick([64, 100, 1000]))
        if kind == "scan":
            return self.npify(pick([1, 10]))
        if kind == "smode":
            return pick(["zap", "caches"])
        if kind == "esize":
            return self.npify(pick([1, 2, 4, 8]))
        if kind == "ekind":
            return self.npify(pick([0, bm.ACC_WRITE, bm.ACC_USER]))
        if kind == "cr3":
            return self.npify(pick([0x10000, 0x11000]))
        if kind in ("eptp_opt", "invept_eptp_opt"):
            return pick([None, self.npify(EPTP), self.npify(EPTP & ~0x40)])
        if kind == "ncr3_opt":
            return pick([None, None, None, self.npify(0x100000)])
        if kind == "pdptrs_opt":
            return None
        if kind == "count":
            return self.npify(1)
        if kind == "vmem":
            return pick(["2MiB", 1 << 21, np.int32(1 << 21)])
        if kind == "nvcpus":
            return self.npify(pick([1, 2]))
        if kind == "mmu":
            return pick(["tdp", "shadow"])
        if kind == "fmt":
            return "ept"
        if kind == "levels":
            return self.npify(4)
        if kind == "maxphy":
            return self.npify(pick([36, 40, 46]))
        if kind == "threshold":
            return self.npify(pick([0, 255, 256]))
        if kind == "at":
            return np.zeros(self.h.nvm, np.int64)
        raise KeyError(kind)

    def bad(self, kind):
        """A value the argument must refuse (with the name of that argument)."""
        r = self.rng
        nvm = self.h.nvm
        if kind == "at":
            return self.pick(list(ARRAY_BAD) + [np.zeros(nvm + 1, np.int64), [-1] * nvm, 5])
        arrays = kind in ("vcpus", "addrs", "words", "values", "bitmap")
        pool = list(ARRAY_BAD if arrays else TYPE_BAD)
        ranged = {
            "vm": [nvm, -1, *HUGE], "vm_opt": [nvm, -1, *HUGE], "vcpu": [-1, 5000, *HUGE],
            "vcpus": [[0, 5000], [-1], 2 ** 64, np.array([2 ** 64 - 1], np.uint64)],
            "addr": [-8, 1 << 48, 1 << 57, 2 ** 62, *HUGE], "gva": [-8, 2 ** 63, 2 ** 64, np.uint64(2 ** 64 - 1)],
            "addrs": [[0, -1], [1 << 60], 2 ** 64, np.array([2 ** 64 - 1], np.uint64)],
            "kind": [1, 8, 0x20, -1, bm.ACC_WRITE | bm.ACC_FETCH, *HUGE],
            "slot": [-1, 2 ** 32, 2 ** 64, 10 ** 30], "gpa": [-4096, 1 << 60, 2 ** 64, 10 ** 30, 4095],
            "size": [-4096, 4097, 2 ** 64, 10 ** 30, "lots", "1.5", "-4KiB"],
            "mflags": [-1, 4, 2 ** 64, 10 ** 30], "hva_opt": [-4096, 4095, 2 ** 63 - 8192, np.int64(2 ** 63 - 8192),
                                                            2 ** 64, 1 << 47],
            "backing_opt": ["x", 1, "THP"], "bool": ["no", "yes", 2, -1, 0.0, "True"], "as_id": [2, -1, *HUGE],
            "reg": [2 ** 64, -1, 10 ** 30], "efer": [2 ** 64, -1, 10 ** 30, 1 << 40],
            "eptp_opt": [2 ** 64, -1, EPTP | 0x80, EPTP & ~7 | 1, 1 << 50, 0x40000000 | 0x5E, EPTP & ~0x38],
            # INVEPT checks the EPTP's format only (nested_vmx_check_eptp): a table in no memslot is fine there
            "invept_eptp_opt": [2 ** 64, -1, EPTP | 0x80, EPTP & ~7 | 1, 1 << 50, EPTP & ~0x38],
            "ncr3_opt": [2 ** 64, -1, 1 << 50, 0x40000000],
            # vmcs12's GUEST_PDPTRs: only for a PAE L2 under nested EPT (the fuzzer's L2s are not), four of them
            "pdptrs_opt": [[0, 0, 0, 0], [1.5, 0, 0, 0], [2 ** 64, 0, 0, 0], [0, 0, 0], "pdptrs", [[0, 0], [0, 0]]],
            "gpa8": [-8, 4, 1 << 60, 2 ** 64, np.int64(2 ** 63 - 8)],
            "gpa_any": [-8, 1 << 60, 2 ** 64, np.int64(2 ** 63 - 8)],
            "words": [[2 ** 64], np.zeros((2, 2), np.int64), [[1], [2, 3]]],
            "n": [-1, 1 << 60, 2 ** 64, *HUGE], "u64": [2 ** 64, -2 ** 63 - 1], "values": [[2 ** 64], [1, [2]]],
            "page": [-64, 2 ** 64, 10 ** 30], "bitmap": [[2 ** 64], [[1]]],
            "hva": [-4096, 1 << 48, 2 ** 64, *HUGE], "hva_end": [-1, 1 << 48, 2 ** 64, *HUGE],
            "seconds": [-1, NAN, INF, -INF, 1e300, 10 ** 400, "1", None, True],
            "entries": [0, 1000, 2 ** 20, -1024, *HUGE], "rows": [-1, 2 ** 62, 2 ** 64, *HUGE],
            "mmu_pages": [63, -1, 2 ** 64, *HUGE[:-1]], "scan": [0, -1, 2 ** 64, *HUGE[:-1]], "smode": ["x", 1, None],
            "esize": [3, 0, 16, -1, *HUGE], "ekind": [1, 8, -1, *HUGE], "cr3": [-1, 1 << 52, 2 ** 64, *HUGE],
            "count": [0, -1, 10 ** 12, 2 ** 64], "vmem": [4097, -4096, "lots", 2 ** 64, 1 << 60],
            "nvcpus": [0, 4097, -1, *HUGE], "mmu": ["x", 1, None, "TDP"], "fmt": ["x", None, 1],
            "levels": [3, 6, *HUGE], "maxphy": [35, 53, -1, *HUGE], "threshold": [-1, *HUGE[:-1]],
        }[kind]
        if kind in ("reg", "efer", "hva_opt", "backing_opt", "vm_opt", "eptp_opt", "invept_eptp_opt", "ncr3_opt",
                    "pdptrs_opt"):
            pool = [v for v in pool if v is not None]
        if kind == "bool":
            pool = [v for v in pool if not isinstance(v, (bool, np.bool_))]
        if kind == "seconds":
            pool = [v for v in pool if not isinstance(v, (float, np.floating)) or not math.isfinite(v)]
        return ranged[int(r.integers(len(ranged)))] if r.random() < 0.6 else pool[int(r.integers(len(pool)))]


# (method, [(argument, kind)]): every public Host method that takes arguments
METHODS = [
    ("create_vms", [("count", "count"), ("memory", "vmem"), ("vcpus", "nvcpus"), ("mmu", "mmu"),
                    ("tdp_format", "fmt"), ("tdp_levels", "levels"), ("maxphyaddr", "maxphy"),
                    ("backing", "backing_opt"), ("ept_ad", "bool")]),
    ("set_memslot", [("vm", "vm"), ("slot", "slot"), ("gpa", "gpa"), ("size", "size"), ("flags", "mflags"),
                     ("hva", "hva_opt"), ("backing", "backing_opt")]),
    ("memslots", [("vm", "vm")]),
    ("memslots_generation", [("vm", "vm"), ("as_id", "as_id")]),
    ("set_vcpu_regs", [("vm", "vm"), ("vcpu", "vcpu"), ("cr0", "reg"), ("cr3", "reg"), ("cr4", "reg"),
                       ("efer", "efer"), ("rflags", "reg"), ("pkru", "reg")]),
    ("vcpu_regs", [("vm", "vm"), ("vcpu", "vcpu")]),
    ("write_guest_memory", [("vm", "vm"), ("gpa", "gpa8"), ("words", "words")]),
    ("read_guest_memory", [("vm", "vm"), ("gpa", "gpa8"), ("n", "n")]),
    ("access", [("vm", "vm"), ("vcpu", "vcpus"), ("addr", "addrs"), ("kind", "kind")]),
    ("store", [("vm", "vm"), ("vcpu", "vcpus"), ("addr", "addrs"), ("value", "values"), ("kind", "kind")]),
    ("invlpg", [("vm", "vm"), ("vcpu", "vcpu"), ("gva", "gva")]),
    ("flush_tlb", [("vm", "vm"), ("vcpu", "vcpu")]),
    ("get_dirty_log", [("vm", "vm"), ("slot", "slot")]),
    ("clear_dirty_log", [("vm", "vm"), ("slot", "slot"), ("first_page", "page"), ("num_pages", "page"),
                         ("bitmap", "bitmap")]),
    ("invalidate_hva_range", [("vm", "vm"), ("start", "hva"), ("end", "hva_end")]),
    ("invalidate_range_start", [("vm", "vm"), ("start", "hva"), ("end", "hva_end")]),
    ("invalidate_range_end", [("vm", "vm")]),
    ("age_hva_range", [("vm", "vm"), ("start", "hva"), ("end", "hva_end"), ("flush", "bool")]),
    ("test_young", [("vm", "vm"), ("start", "hva"), ("end", "hva_end")]),
    ("advance_time", [("seconds", "seconds")]),
    ("kick_vcpus", [("vm", "vm")]),
    ("enable_manual_dirty_log_protect", [("vm", "vm"), ("initially_set", "bool")]),
    ("enable_dirty_ring", [("vm", "vm"), ("entries", "entries")]),
    ("harvest_dirty_ring", [("vm", "vm"), ("vcpu", "vcpu")]),
    ("reset_dirty_rings", [("vm", "vm")]),
    ("stats", [("vm", "vm_opt")]),
    ("footprint", [("vm", "vm_opt")]),
    ("reserve_tables", [("rows", "rows")]),
    ("reclaim", [("force", "bool")]),
    ("reclaim_evict", [("threshold", "threshold"), ("at_threshold", "at")]),
    ("discard_hva_range", [("vm", "vm"), ("start", "hva"), ("end", "hva_end")]),
    ("host_pages", [("vm", "vm"), ("slot", "slot")]),
    ("mmu_notifier_release", [("vm", "vm")]),
    ("spte_dump", [("vm", "vm")]),
    ("set_nr_mmu_pages", [("vm", "vm"), ("n", "mmu_pages")]),
    ("shrink", [("nr_to_scan", "scan"), ("mode", "smode")]),
    ("touch_host_memory", [("vm", "vm"), ("gpa", "gpa_any"), ("size", "rows")]),
    ("emulated_access", [("vm", "vm"), ("vcpu", "vcpu"), ("addr", "addr"), ("kind", "ekind"), ("value", "u64"),
                         ("size", "esize")]),
    ("mov_cr3", [("vm", "vm"), ("vcpu", "vcpu"), ("cr3", "cr3")]),
    ("nested_enter", [("vm", "vm"), ("vcpu", "vcpu"), ("eptp", "eptp_opt"), ("ncr3", "ncr3_opt"), ("cr0", "reg"),
                      ("cr3", "reg"), ("cr4", "reg"), ("efer", "efer"), ("flush", "bool"), ("pdptrs", "pdptrs_opt")]),
    ("nested_exit", [("vm", "vm"), ("vcpu", "vcpu")]),
    ("invept", [("vm", "vm"), ("vcpu", "vcpu"), ("eptp", "invept_eptp_opt")]),
]
# a length mismatch in a batch is reported on the first short array
BATCH_FIELDS = {"vm", "vcpu", "addr", "kind", "value"}


class Counts:
    def __init__(self):
        self.cases = self.bad_cases = self.refused = self.escapes = self.changed = self.accepted_bad = 0
        self.wrong_field = 0
        self.failures = []

    def fail(self, what):
        self.failures.append(what)

    def __str__(self):
        return (f"{self.cases} cases ({self.bad_cases} with one bad argument, {self.refused} refused): "
                f"{self.escapes} escapes, {self.changed} state changes on rejection, {self.accepted_bad} bad "
                f"arguments accepted, {self.wrong_field} errors naming another argument")


def run(seed, cases, counts=None, rebuild_every=25, methods=None):
    """Fuzz ``cases`` calls; returns Counts (``failures`` lists what broke a property)."""
    rng = np.random.default_rng(seed)
    counts = counts or Counts()
    table = [m for m in METHODS if methods is None or m[0] in methods]
    h = None
    for case in range(cases):
        if case % rebuild_every == 0:
            h = build(pml=bool(rng.integers(2)))
        kinds = Kinds(rng, h)
        name, spec = table[int(rng.integers(len(table)))]
        bad_at = int(rng.integers(len(spec))) if rng.random() < 0.75 else -1
        kw = {}
        for k, (arg, kind) in enumerate(spec):
            kw[arg] = kinds.bad(kind) if k == bad_at else kinds.valid(kind)
        if name in ("access", "store") and bad_at < 0 and not isinstance(kw["vcpu"], (int, np.integer)):
            kw["vcpu"] = 0
        if name in ("access", "store", "emulated_access", "invlpg") and bad_at < 0:
            kw["vm"] = kinds.npify(int(rng.integers(min(h.nvm, 4))))
        bad_name = spec[bad_at][0] if bad_at >= 0 else None
        if name == "nested_enter" and bad_name not in (None, "cr0", "cr3", "cr4", "efer"):
            # L2's registers valid together (paging off): KVM checks the saved state before the controls
            kw.update(cr0=0x11, cr3=0, cr4=0, efer=0)
        if name == "nested_enter" and bad_name != "vm" and h.nvm > 5:
            kw["vm"] = 5   # the nested VM (a VM without VMX / SVM is refused first)
        if name == "set_memslot" and bad_name == "gpa" and isinstance(kw["gpa"], (int, np.integer)) and \
                int(kw["gpa"]) == 1 << 60:
            # beyond MAXPHYADDR is refused only when a slot is created or moved (kvm_arch_prepare_memory_region),
            # after a deletion's or an existing slot's own checks: make it a creation
            kw.update(slot=100, hva=None, size=4096 if parse_size(kw["size"]) == 0 else kw["size"])
        counts.cases += 1
        counts.bad_cases += bad_at >= 0
        check(h, name, kw, spec[bad_at][0] if bad_at >= 0 else None, counts, case)
    return counts


def check(h, name, kw, bad_arg, counts, case):
    before = snapshot(h)
    pr = probe(h) if bad_arg is not None else None
    what = f"case {case}: {name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
    try:
        getattr(h, name)(**kw)
    except bm.BatchMMUError as e:
        counts.refused += 1
        if bad_arg is not None and e.field != bad_arg and not (bad_arg in BATCH_FIELDS and e.field in BATCH_FIELDS):
            counts.wrong_field += 1
            counts.fail(f"{what}: error names {e.field!r}, not {bad_arg!r}: {e}")
        after = snapshot(h)
        if not same(before, after):
            counts.changed += 1
            counts.fail(f"{what}: refused ({e}) but changed {diff(before, after)}")
        elif pr is not None and not same(pr, probe(h)):
            counts.changed += 1
            counts.fail(f"{what}: refused ({e}) but the probe batch differs")
        return
    except Exception as e:  # noqa: BLE001 - any other exception is an escape
        counts.escapes += 1
        counts.fail(f"{what}: {type(e).__name__}: {e}")
        return
    if bad_arg is not None:
        counts.accepted_bad += 1
        counts.fail(f"{what}: the bad {bad_arg}={kw[bad_arg]!r} was accepted")
