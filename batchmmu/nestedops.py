"""Scenario ops that run KVM's nested-paging tests on each nested VM (docs/nested.md): the modelled L1
(batchmmu.l1) writes EPT12 / NPT12 and L2's tables, enters L2, and L2's accesses must end as the tests expect.

- ``nested_tdp_fault``: the selftest nested_tdp_fault_test (final page unmapped / table page unmapped / final page
  write-protected / table page write-protected): exit qualification (VMX) or exit_info_1 (SVM) and the exit gpa;
- ``ept_access``: kvm-unit-tests' ``ept_access_test_*`` (x86/vmx_tests.c: the 8 permissions at each EPT level,
  4K leaves, and 6 ``paddr_*`` cases with the PTE's A and D set) on a VMX VM; ``npt_np``, ``npt_us``,
  ``npt_rw``, ``npt_nx``, ``npt_rw_pfwalk`` and ``svm_npt_rsvd_bits_test``'s PTE case (x86/svm_npt.c) on an SVM
  VM;
- ``nested_dirty_log``: the selftest nested_dirty_log_test (VMX or SVM): L2 pages 2 and 3 alias L1 pages 0 and
  1; the dirty log shows L1 gpas only.

Every case goes into the phase record (``nested_cases``: expected and simulated outcome per VM); a case that ends
otherwise than KVM's tests expect stops the run with the list of them.  The VMs must be ``nested = true`` with
``l2 = "none"`` (L1 runs: these ops enter L2 themselves, and leave it after) on the legacy TDP MMU, with slot 0 of
at least 32 MiB + 8 KiB, MAXPHYADDR of 40 or more and, on VMX, EPT A/D bits.
"""

import numpy as np

from .constants import ACC_FETCH, ACC_WRITE, FIXED, HIT, L1_EXIT, MEM_LOG_DIRTY_PAGES, OUTCOME_NAMES, SPURIOUS
from .errors import BatchMMUError
from .kernels.spte import FMT_EPT
from .kernels.state import VM_FMT, VR_GUEST_MODE
from .l1 import A_, D_, EPT_D, L1, NX, RW, US, WB, P, R, W, X

OPS = ("nested_tdp_fault", "ept_access", "nested_dirty_log")
KEYS = set()
QV, QT = 0x80, 0x100             # exit qualification: GVA_IS_VALID, GVA_TRANSLATED
NPF_FINAL, NPF_PAGE = 1 << 32, 1 << 33
OK = (HIT, FIXED, SPURIOUS)
GVA = 0x7f0000000000
ACCESS = {"read": 0, "write": ACC_WRITE, "exec": ACC_FETCH}
SETUP = 0xC000                   # L1 memory each case's fresh tables use (its EPTP differs from every other's)
FIRST = 0x100000                 # the first case's tables; the data pages are at L1 gpa DATA
DATA = 0x2000000

# kvm-unit-tests x86/vmx_tests.c ept_access_test_*: EPT permissions of the data page -> expected per access
# ("ok", "misconfig", or the violation's qualification without GVA_IS_VALID | GVA_TRANSLATED)
EPT_ACCESS = (
    ("not_present", 0, {"read": 0x1, "write": 0x2, "exec": 0x4}),
    ("read_only", R, {"read": "ok", "write": 0x2 | 0x8, "exec": 0x4 | 0x8}),
    ("write_only", W, {"read": "misconfig", "write": "misconfig", "exec": "misconfig"}),
    ("read_write", R | W, {"read": "ok", "write": "ok", "exec": 0x4 | 0x8 | 0x10}),
    ("execute_only", X, {"read": 0x1 | 0x20, "write": 0x2 | 0x20, "exec": "ok"}),
    ("read_execute", R | X, {"read": "ok", "write": 0x2 | 0x8 | 0x20, "exec": "ok"}),
    ("write_execute", W | X, {"read": "misconfig", "write": "misconfig", "exec": "misconfig"}),
    ("read_write_execute", R | W | X, {"read": "ok", "write": "ok", "exec": "ok"}),
)
# ept_access_test_paddr_*: (name, EPTP A/D, EPT permissions of L2's level-1 page-table page, qualification)
PADDR = (
    ("paddr_not_present_ad_disabled", False, 0, 0x1),
    ("paddr_not_present_ad_enabled", True, 0, 0x3),
    ("paddr_read_only_ad_enabled", True, R, 0x3 | 0x8),
    ("paddr_read_execute_ad_enabled", True, R | X, 0x3 | 0x8 | 0x20),
    ("paddr_read_write", False, R | W, "ok"),
    ("paddr_read_write_execute", False, R | W | X, "ok"),
)
# x86/svm_npt.c: (name, NPT12 leaf flags of the data page, access, exit_info_1)
NPT = (
    ("npt_np", 0, "read", NPF_FINAL | 0x4),
    ("npt_us", P | RW, "read", NPF_FINAL | 0x5),
    ("npt_rw", P | US, "write", NPF_FINAL | 0x7),
    ("npt_nx", P | RW | US | NX, "exec", NPF_FINAL | 0x15),
    ("svm_npt_rsvd_bits_test_pte", P | RW | US | (1 << 50), "exec", NPF_FINAL | 0x1D),   # L1 has EFER.NX
)
# nested_tdp_fault_test: case -> (access, VMX qualification, SVM exit_info_1)
TDP_FAULT = (
    ("final_page_not_present", "read", 0x181, NPF_FINAL | 0x4),
    ("page_table_not_present", "read", 0x083, NPF_PAGE | 0x6),
    ("final_page_write_protected", "write", 0x1AA, NPF_FINAL | 0x7),
    ("page_table_write_protected", "read", 0x0AB, NPF_PAGE | 0x7),
)


def run(shard, ph, extra, progress):
    host = shard.host
    out = []
    for lvm in range(shard.gids.size):
        if not shard._runs(lvm):
            continue
        _check_vm(shard, lvm, ph["op"])
        for vc in range(int(shard.vcpus[lvm])):
            if host.vr.rec[int(host.vt.vcpu_off[lvm]) + vc, VR_GUEST_MODE]:
                host.nested_exit(lvm, vc)
        setups = _Setups(host, lvm, shard.l1_cursor)
        cases = _CASES[ph["op"]](setups)
        setups.done()   # L1 runs again after the op
        out += [dict(c, vm=int(shard.gids[lvm])) for c in cases]
    extra["nested_cases"] = extra.get("nested_cases", []) + out
    bad = [c for c in out if c["got"] != c["want"]]
    if bad:
        raise BatchMMUError(f"phase.op={ph['op']!r}: {len(bad)} of {len(out)} cases end otherwise than KVM's tests "
                            f"expect: " + "; ".join(_show(c) for c in bad[:4]), field="phase.op", value=ph["op"])
    return len(out)


def _show(c):
    def v(x):
        return hex(x) if isinstance(x, int) else str(x)
    got = c["got"]
    got = f"{v(got[0])} at {got[1]}" if isinstance(got, tuple) else v(got)
    return f"VM {c['vm']} {c['case']} {c['access']}{' level ' + str(c['level']) if 'level' in c else ''}: " \
        f"want {v(c['want'])}, got {got}"


def _check_vm(shard, lvm, op):
    """The VM fits the tests: nested, its L1 memory holds the tables and the data pages, L2 gpas up to 2^40."""
    host, vm = shard.host, int(shard.gids[lvm])
    if not host._nested[lvm]:
        raise BatchMMUError(f"phase.op={op!r}: VM {vm} is not nested (vm_group.nested = true, l2 = \"none\")",
                            field="vm_group.nested", value=False)
    slot0 = next((m for m in host.memslots(lvm) if m["slot"] == 0), None)
    if slot0 is None or slot0["gpa"] != 0 or slot0["size"] < DATA + 2 * 4096:
        raise BatchMMUError(f"phase.op={op!r}: VM {vm}: the tests' L1 needs slot 0 of at least "
                            f"{(DATA + 2 * 4096) >> 20} MiB + 8 KiB at gpa 0 (its tables from 1 MiB, data at 32 MiB); "
                            "raise vm_group.memory", field="vm_group.memory", value=slot0 and slot0["size"])
    bits = int(host.vt.maxphyaddr[lvm])
    if bits < 40:
        raise BatchMMUError(f"phase.op={op!r}: VM {vm}: the tests' L2 data page is at gpa 2^39: vm_group.maxphyaddr "
                            "must be at least 40", field="vm_group.maxphyaddr", value=bits)
    if int(host.vt.rec[lvm, VM_FMT]) == FMT_EPT and host.vt.ad_disabled[lvm]:
        raise BatchMMUError(f"phase.op={op!r}: VM {vm} has no EPT A/D bits; these cases need them (kvm-unit-tests "
                            "skip them without): drop vm_group.ept_ad = false", field="vm_group.ept_ad", value=False)


class _Setups:
    """A fresh L1 for each case, its tables in L1 memory no earlier case used, in this op or an earlier one on the
    VM (``cursor``: the next fresh page per VM), so no shadow page or cached root of an earlier case's tables
    applies; entered after leaving the last case's L2."""

    def __init__(self, host, vm, cursor):
        self.h, self.vm, self.cursor, self.l1 = host, vm, cursor, None

    def __call__(self, ept_ad=False):
        self.done()
        base = self.cursor.get(self.vm, FIRST)
        if base + SETUP > DATA:
            raise BatchMMUError(f"VM {self.vm}: the nested test ops ran out of fresh L1 memory for their tables "
                                f"({(DATA - FIRST) // SETUP} cases per VM)", field="phase.op", value=None)
        l1 = L1(self.h, self.vm, ept_ad=ept_ad, base=base)
        self.cursor[self.vm] = base + SETUP
        self.l1 = (l1, base)
        return l1

    def done(self):
        """Back to L1 after a case (its tables must have fit its share of memory)."""
        if self.l1 is not None:
            l1, base = self.l1
            if l1.next > base + SETUP:
                raise BatchMMUError(f"VM {self.vm}: a nested test case outgrew its tables' memory ({SETUP} bytes)",
                                    field="phase.op", value=None)
            self.h.nested_exit(self.vm, 0)
            self.l1 = None


def _result(r, svm):
    """(outcome as the tests name it: "ok", "misconfig", or the exit qualification / exit_info_1; exit gpa)."""
    o = int(r.outcome[0])
    if o in OK:
        return "ok", -1
    if o != L1_EXIT:
        return OUTCOME_NAMES[o] if 0 <= o < len(OUTCOME_NAMES) else f"outcome {o}", -1
    code = int(r.error_code[0])
    if not svm and code == 0:
        return "misconfig", -1
    return code, int(r.fault_gpa[0])


def _q(want, bits):
    """An expected EPT violation's qualification with the GVA bits the processor sets."""
    return want | bits if isinstance(want, int) else want


def _case(name, access, want, got, gpa=-1, want_gpa=-1, **more):
    return dict(case=name, access=access, want=want, got=got if gpa == want_gpa else (got, hex(gpa)), **more)


def ept_access(new):
    l1 = new()
    if l1.svm:
        return _npt_cases(new, l1)
    out = []
    data = 1 << 39                       # a data page with its own EPT12 entry at every level, as KUT's
    for level in (1, 2, 3, 4):
        for name, perms, expect in EPT_ACCESS:
            l1 = l1 or new()
            l1.map(data, DATA)
            l1.l2_map(GVA, data)
            e = l1.entry_gpa(data, level)
            l1.put(e, (l1.mem[e] & ~7) | perms)
            l1.enter()
            for op, want in expect.items():
                got, gpa = _result(l1.h.access(l1.vm, 0, GVA + 8, ACCESS[op]), False)
                out.append(_case(f"ept_access_test_{name}", op, _q(want, QV | QT), got, gpa,
                                 data + 8 if isinstance(want, int) else -1, level=level))
            l1 = None
    for name, ad, perms, want in PADDR:
        for op in ACCESS:
            l1 = new(ept_ad=ad)
            l1.map(data, DATA)
            l1.l2_map(GVA, data, P | RW | US | A_ | D_)
            pt = l1.l2_tables()[-1]      # L2's level-1 page table
            l1.map(pt, l1.l1_of(pt), perms)
            l1.enter()
            got, gpa = _result(l1.h.access(l1.vm, 0, GVA, ACCESS[op]), False)
            # a fault on a paging-structure access: GVA_TRANSLATED clear
            out.append(_case(f"ept_access_test_{name}", op, _q(want, QV), got, gpa,
                             pt if isinstance(want, int) else -1))
    return out


def _npt_cases(new, l1):
    out = []
    data = 1 << 39
    for name, flags, op, want in NPT:
        l1 = l1 or new()
        l1.map(data, DATA, flags)
        l1.l2_map(GVA, data)
        l1.enter()
        got, gpa = _result(l1.h.access(l1.vm, 0, GVA + 8, ACCESS[op]), True)
        out.append(_case(name, op, want, got, gpa, data + 8))
        l1 = None
    l1 = new()                             # npt_rw_pfwalk: L2's top page table read-only in NPT12
    l1.map(data, DATA)
    l1.l2_map(GVA, data)
    l1.map(l1.cr3, l1.l1_of(l1.cr3), P | US)
    l1.enter()
    got, gpa = _result(l1.h.access(l1.vm, 0, GVA, 0), True)
    out.append(_case("npt_rw_pfwalk", "read", NPF_PAGE | 0x7, got, gpa, l1.cr3 + 8 * ((GVA >> 39) & 511)))
    return out


def nested_tdp_fault(new):
    out = []
    gpa = 0x40000000
    for name, op, vmx_want, svm_want in TDP_FAULT:
        l1 = new(ept_ad=True)
        wrprot = P | US if l1.svm else R | X
        l1.map(gpa, DATA)
        l1.l2_map(GVA, gpa)
        pt = l1.l2_tables()[-1]
        if name == "final_page_not_present":
            l1.map(gpa, DATA, 0)
        elif name == "final_page_write_protected":
            l1.map(gpa, DATA, wrprot)
        elif name == "page_table_not_present":
            l1.map(pt, l1.l1_of(pt), 0)
        else:
            l1.map(pt, l1.l1_of(pt), wrprot)
        l1.enter()
        got, at = _result(l1.h.access(l1.vm, 0, GVA, ACCESS[op]), l1.svm)
        out.append(_case(f"nested_tdp_fault_test {name}", op, svm_want if l1.svm else vmx_want, got, at,
                         gpa if name.startswith("final") else pt))
    return out


def nested_dirty_log(new):
    """L2 gpas base+2/+3 pages alias L1 base+0/+1 (EPT12 leaves with D preset); after each step the log of slot
    NESTED_SLOT (by L1 gpa) holds exactly the page that step dirtied."""
    l1 = new(ept_ad=True)
    h, vm = l1.h, l1.vm
    base = 0xc0000000
    if any(m["slot"] == NESTED_SLOT for m in h.memslots(vm)):
        raise BatchMMUError(f"phase.op='nested_dirty_log': memslot {NESTED_SLOT} is taken (use [workload] region = "
                            "\"slot0\")", field="phase.op", value="nested_dirty_log")
    h.set_memslot(vm, NESTED_SLOT, base, 4 * 4096, flags=MEM_LOG_DIRTY_PAGES)
    for k in range(4):   # EPT12 / NPT12 leaves with the dirty bit preset
        l1.map(base + 4096 * k, base + 4096 * (k if k < 2 else k - 2), None,
               extra=D_ if l1.svm else WB | EPT_D)
        l1.l2_map(base + 4096 * k, base + 4096 * k)
    l1.enter()
    h.get_dirty_log(vm, NESTED_SLOT)
    out = []
    for page, write, want in ((0, False, [1, 0, 0, 0]), (0, True, [1, 0, 0, 0]), (0, False, [0, 0, 0, 0]),
                              (1, True, [0, 1, 0, 0]), (1, True, [0, 1, 0, 0]), (1, False, [0, 0, 0, 0])):
        gva = base + 4096 * (2 + page)
        r = h.store(vm, 0, gva, 1) if write else h.access(vm, 0, gva, 0)
        log = [int(b) for b in np.unpackbits(h.get_dirty_log(vm, NESTED_SLOT).view(np.uint8), bitorder="little")[:4]]
        out.append(_case(f"nested_dirty_log_test L2 page {2 + page}", "write" if write else "read", want,
                         log if int(r.outcome[0]) in OK else _result(r, l1.svm)[0]))
    h.set_memslot(vm, NESTED_SLOT, base, 0)   # the slot goes with the op: a later one can make it again
    return out


NESTED_SLOT = 1
_CASES = {"nested_tdp_fault": nested_tdp_fault, "ept_access": ept_access, "nested_dirty_log": nested_dirty_log}


def report_lines(rec):
    cases = rec.get("nested_cases", [])
    if not cases:
        return []
    by = {}
    for c in cases:
        by.setdefault(c["vm"], []).append(c)
    return [f"    VM {vm}: {sum(c['got'] == c['want'] for c in cs)}/{len(cs)} cases end as KVM's tests expect"
            for vm, cs in by.items()]
