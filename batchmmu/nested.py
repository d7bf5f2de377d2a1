"""Nested virtualization on the Host (vmx/nested.c, svm/nested.c): VM-entry to an L2 guest and back, INVEPT.

A VM made with ``create_vms(..., nested=True)`` offers VMX (an EPT VM) or SVM (an NPT VM) to its guest.
``nested_enter`` models VMLAUNCH/VMRESUME or VMRUN with the vmcs12 / vmcb12 state that matters to the MMU: the
EPTP of nested EPT or the nCR3 of nested NPT (or neither: L1 does not use nested paging for L2) and L2's paging
registers.  While a vCPU is in guest mode, ``access`` / ``store`` addresses are L2 gvas (L2 gpas with L2's
paging off); ``nested_exit`` is the VM-exit / #VMEXIT back to L1.  docs/nested.md says what is modelled.
"""

import numpy as np

from . import args as A
from .errors import bad
from .kernels import state as S
from .kernels.guest_walk import EFER_LMA, X86_CR0_PG, X86_CR4_LA57, X86_CR4_PAE
from .kernels.spte import FMT_EPT
from .paging import check_sregs

EPTP_PA_MASK = ((1 << 52) - 1) & ~0xFFF
_ROOTS = slice(S.VR_ROOT, S.VR_ROOT + 8)          # one kvm_mmu's roots: root, pgd, 3 prev roots, 3 prev pgds
_ALT = slice(S.VR_ALT_ROOT, S.VR_ALT_ROOT + 8)
_REGS = (S.VR_CR0, S.VR_CR3, S.VR_CR4, S.VR_EFER)


def is_pae_paging(cr0, cr4, efer):
    """CR0.PG and CR4.PAE outside long mode: the PDPTEs are registers, loaded from memory or vmcs12."""
    return bool(cr0 & int(X86_CR0_PG) and cr4 & int(X86_CR4_PAE) and not efer & int(EFER_LMA))


class Nested:
    """Mixin of ``batchmmu.host.Host``: nested_enter, nested_exit, invept."""

    def _nested_vcpu(self, vm, i, what):
        if not self._nested[vm]:
            raise bad("vm", vm, f"{what} needs a VM created with nested=True (the guest has no VMX)")
        return vm, i

    def _check_eptp(self, vm, eptp, field="eptp"):
        """nested_vmx_check_eptp: the EPTP values KVM refuses (VM-entry fails, INVEPT fails)."""
        mt, pwl = eptp & 7, ((eptp >> 3) & 7) + 1
        if mt not in (0, 6):
            raise bad(field, eptp, "memory type (bits 2:0) must be UC (0) or WB (6)")
        if pwl != 4 and not (pwl == 5 and int(self.vt.levels[vm]) == 5):
            raise bad(field, eptp, "page-walk length (bits 5:3) must be 4 levels (value 3)"
                      + ("" if int(self.vt.levels[vm]) != 5 else " or 5 (value 4)"))
        if eptp & 0xF80:
            raise bad(field, eptp, "bits 11:7 are reserved")
        if eptp >> int(self._maxphyaddr[vm]):
            raise bad(field, eptp, f"beyond the guest's MAXPHYADDR ({int(self._maxphyaddr[vm])} bits)")
        if eptp & 0x40 and self.vt.ad_disabled[vm]:
            raise bad(field, eptp, "EPT A/D bits (bit 6) are not offered to a VM made with ept_ad=False")
        return eptp

    def _check_pdptes(self, vm, pdptes, field, value):
        """The PDPTEs VM-entry loads (SDM 26.3.1.6, KVM's load_pdptrs): a present one with a reserved bit (bits 1-2,
        5-8, MAXPHYADDR and up) fails the entry."""
        rsvd = ((-1 << int(self._maxphyaddr[vm])) | 0x1E6) & A.U64_MAX
        bad_k = [k for k, v in enumerate(np.asarray(pdptes, np.uint64).tolist()) if v & 1 and v & rsvd]
        if bad_k:
            raise bad(field, value, f"PDPTE {bad_k[0]} is present with reserved bits set: VM-entry fails")

    def nested_enter(self, vm, vcpu, *, eptp=None, ncr3=None, cr0=None, cr3=None, cr4=None, efer=None,
                     flush=False, pdptrs=None):
        """VM-entry to L2 (VMLAUNCH/VMRESUME, or VMRUN) on one vCPU of a nested VM.

        ``eptp`` (VMX): vmcs12's EPT pointer with nested EPT (memory type, walk length, A/D enable and the L1 gpa
        of the top table as the SDM lays them out); ``ncr3`` (SVM): vmcb12's nested CR3 (L1's NPT12 is 4-level
        x86 paging in L1's mode: L1 must be in long mode); neither: L1 does not use nested paging (L2 runs on its
        own TDP root, role.guest_mode).  ``cr0``..``efer``: L2's registers (None: L1's value).  ``flush`` (VMX):
        vmcs12 has no VPID, or a new one (nested_vmx_transition_tlb_flush: a guest TLB flush, counted in
        tlb_flush; it never syncs guest_mmu); SVM flushes and syncs at every VMRUN and #VMEXIT whatever
        TLB_CONTROL says (KVM does not honour it).  ``pdptrs`` (VMX, an L2 in PAE paging under nested EPT):
        vmcs12's GUEST_PDPTR0-3, which VM-entry loads into the PDPTE registers (prepare_vmcs02; the processor checks
        their reserved bits).  Counts ``nested_run``; the vCPU is in guest mode until ``nested_exit``.
        """
        i = self._vcpu_index(vm, vcpu)
        vm = int(vm)
        # every argument's type first, then what KVM checks (an error names the argument that is wrong)
        flush = A.bool_arg(flush, "flush")
        if eptp is not None:
            eptp = A.exact_int(eptp, "eptp", 0, A.U64_MAX, why="must be a 64-bit EPT pointer")
        if ncr3 is not None:
            ncr3 = A.exact_int(ncr3, "ncr3", 0, A.U64_MAX, why="must be the guest-physical address of L1's NPT "
                               "root (an unsigned 64-bit integer)")
        if pdptrs is not None:
            pdptrs = A.u64_array(pdptrs, "pdptrs")
            if pdptrs.size != 4:
                raise bad("pdptrs", f"{pdptrs.size} values", "must be vmcs12's four GUEST_PDPTRs")
        regs = {"cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer}
        l2 = {}
        for (name, v), col in zip(regs.items(), _REGS, strict=True):
            l2[name] = int(np.int64(self.vr.rec[i, col]).view(np.uint64)) if v is None else \
                A.exact_int(v, name, 0, A.U64_MAX, why=f"must be L2's {name.upper()} (an unsigned 64-bit integer)")
        svm = int(self.vt.fmt[vm]) != FMT_EPT
        if eptp is not None:
            self._check_eptp(vm, eptp)
            if self._gm_unmapped(vm, eptp & EPTP_PA_MASK, 1) >= 0:
                raise bad("eptp", eptp, "its top table lies in no memslot (KVM runs L2 on a dummy root then; "
                          "not modelled)")
        if ncr3 is not None:
            if ncr3 >> int(self._maxphyaddr[vm]):
                raise bad("ncr3", ncr3, f"beyond the guest's MAXPHYADDR ({int(self._maxphyaddr[vm])} bits)")
            if self._gm_unmapped(vm, ncr3 & EPTP_PA_MASK, 1) >= 0:
                raise bad("ncr3", ncr3, "its top table lies in no memslot (KVM runs L2 on a dummy root then; "
                          "not modelled)")
        check_sregs(l2["cr0"], l2["cr3"], l2["cr4"], l2["efer"], int(self._maxphyaddr[vm]))
        pae = is_pae_paging(l2["cr0"], l2["cr4"], l2["efer"])
        if pdptrs is not None:
            if not pae or eptp is None:
                raise bad("pdptrs", pdptrs.tolist(), "only for an L2 in PAE paging under nested EPT (eptp): "
                          "VM-entry loads vmcs12's GUEST_PDPTRs only then")
            self._check_pdptes(vm, pdptrs, "pdptrs", pdptrs.tolist())
        if pae and ncr3 is not None:
            raise bad("cr4", l2["cr4"], "an L2 in PAE paging under nested NPT (its PDPTEs read through NPT12) "
                      "is not modelled: use 4-level paging, 32-bit paging or paging off")
        if pae and eptp is not None and pdptrs is None:
            raise bad("pdptrs", None, "an L2 in PAE paging under nested EPT takes its PDPTEs from vmcs12: give "
                      "pdptrs=[GUEST_PDPTR0, .., GUEST_PDPTR3]")
        if pae and pdptrs is None:   # no nested paging: nested_vmx_load_cr3 / nested_svm_load_cr3 -> load_pdptrs
            pdptrs = self._gm_read_words(vm, l2["cr3"] & 0xFFFFFFE0, 4)
            self._check_pdptes(vm, pdptrs, "cr3", l2["cr3"])
        if ncr3 is not None and not svm:
            raise bad("ncr3", ncr3, f"VM {vm} offers VMX (an EPT VM): give eptp; ncr3 is SVM's nested CR3")
        if eptp is not None and svm:
            raise bad("eptp", eptp, f"VM {vm} offers SVM (an NPT VM): give ncr3; eptp is VMX's EPT pointer")
        self._nested_vcpu(vm, i, "nested_enter")
        if ncr3 is not None and (not self.vr.efer[i] & int(EFER_LMA) or self.vr.cr4[i] & int(X86_CR4_LA57)):
            raise bad("vcpu", vcpu, f"VM {vm} vCPU {vcpu}: nested NPT of an L1 outside 4-level long mode (its "
                      "NPT12 in 32-bit, PAE or 5-level format on this 4-level NPT) is not modelled")
        if self.vr.guest_mode[i]:
            raise bad("vcpu", vcpu, f"VM {vm} vCPU {vcpu} is already running L2 (VMLAUNCH in guest mode exits "
                      "to L1; call nested_exit first)")
        pgd = eptp if eptp is not None else ncr3
        if pgd is not None:
            self._first_shadow_root_alloc(vm)   # (allocations first: a refusal leaves the vCPU in L1)
        self.arena.topup_shadow()
        rec = self.vr.rec
        rec[i, S.VR_L1_CR0:S.VR_L1_CR0 + 4] = rec[i, list(_REGS)]
        rec[i, S.VR_L1_PDPTR:S.VR_L1_PDPTR + 4] = rec[i, S.VR_PDPTR:S.VR_PDPTR + 4]
        for v, col in zip(l2.values(), _REGS, strict=True):
            rec[i, col] = np.uint64(v).view(np.int64)
        if pdptrs is not None:
            rec[i, S.VR_PDPTR:S.VR_PDPTR + 4] = pdptrs.view(np.int64)
        if pgd is not None:   # vcpu->arch.mmu = &guest_mmu (without nested paging L2 stays on root_mmu)
            rec[i, _ROOTS], rec[i, _ALT] = rec[i, _ALT].copy(), rec[i, _ROOTS].copy()
        rec[i, S.VR_GUEST_MODE] = 1
        rec[i, S.VR_EPTP] = -1 if pgd is None else np.uint64(pgd).view(np.int64)
        st = self.vt.stats
        st[vm, S.ST_NESTED_RUN] += 1
        st[vm, S.ST_GUEST_MODE] += 1
        if flush or svm:   # SVM: nested_svm_transition_tlb_flush on every VMRUN (TLB_CONTROL is not honoured)
            st[vm, S.ST_TLB_FLUSH] += 1
        if pgd is not None or not self._tdp_mmu(vm):   # on the TDP MMU the vCPU's role picks its root (tdp.py)
            from .kernels.nested import nested_enter_mmu
            nested_enter_mmu(self._mmu_bundle(), np.int64(vm), np.int64(i))

    def nested_exit(self, vm, vcpu):
        """VM-exit from L2 to L1 on one vCPU: L1's registers and root_mmu come back; guest_mmu's roots stay
        cached for the next entry (nested_ept_uninit_mmu_context)."""
        i = self._vcpu_index(vm, vcpu)
        vm, i = self._nested_vcpu(int(vm), i, "nested_exit")
        if not self.vr.guest_mode[i]:
            raise bad("vcpu", vcpu, f"VM {vm} vCPU {vcpu} is not running L2")
        rec = self.vr.rec
        rec[i, list(_REGS)] = rec[i, S.VR_L1_CR0:S.VR_L1_CR0 + 4]
        rec[i, S.VR_PDPTR:S.VR_PDPTR + 4] = rec[i, S.VR_L1_PDPTR:S.VR_L1_PDPTR + 4]
        l1_cr0, l1_cr3, l1_cr4, l1_efer = (int(np.int64(v).view(np.uint64)) for v in rec[i, list(_REGS)])
        if is_pae_paging(l1_cr0, l1_cr4, l1_efer):
            # load_vmcs12_host_state / nested_svm_vmexit: nested_*_load_cr3(..., reload_pdptrs) reads L1's from memory
            rec[i, S.VR_PDPTR:S.VR_PDPTR + 4] = self._gm_read_words(vm, l1_cr3 & 0xFFFFFFE0, 4).view(np.int64)
        nested_paging = rec[i, S.VR_EPTP] >= 0
        rec[i, S.VR_GUEST_MODE] = 0
        rec[i, S.VR_EPTP] = -1
        if nested_paging:   # back to root_mmu; guest_mmu's roots stay cached for the next entry
            rec[i, _ROOTS], rec[i, _ALT] = rec[i, _ALT].copy(), rec[i, _ROOTS].copy()
        elif not self._tdp_mmu(vm):   # root_mmu back to L1's role (on the TDP MMU: L1's root, by the vCPU's role)
            from .kernels.nested import nested_exit_mmu
            self.arena.topup_shadow()
            nested_exit_mmu(self._mmu_bundle(), np.int64(vm), np.int64(i))
        self.vt.stats[vm, S.ST_GUEST_MODE] -= 1
        if int(self.vt.fmt[vm]) != FMT_EPT:
            self.vt.stats[vm, S.ST_TLB_FLUSH] += 1   # SVM's #VMEXIT: nested_svm_transition_tlb_flush

    def invept(self, vm, vcpu, eptp=None):
        """INVEPT by L1 (handle_invept) on guest_mmu: single-context for ``eptp`` (the current and previous roots
        whose EPTP has the same table address are freed) or, with None, global (every guest_mmu root)."""
        i = self._vcpu_index(vm, vcpu)
        vm = int(vm)
        single = eptp is not None
        if single:
            eptp = A.exact_int(eptp, "eptp", 0, A.U64_MAX, why="must be a 64-bit EPT pointer")
        eptp = self._check_eptp(vm, eptp) if single else 0
        self._nested_vcpu(vm, i, "invept")
        if int(self.vt.fmt[vm]) != FMT_EPT:
            raise bad("vm", vm, "INVEPT is VMX's: this VM offers SVM (an NPT VM)")
        if self.vr.guest_mode[i]:
            raise bad("vcpu", vcpu, f"VM {vm} vCPU {vcpu} runs L2: INVEPT in L2 exits to L1 (call nested_exit)")
        from .kernels.nested import handle_invept
        handle_invept(self._mmu_bundle(), np.int64(vm), np.int64(i), np.int64(eptp & EPTP_PA_MASK), single)


GiB = 1 << 30


def enter_identity_l2(host, vm, ranges):
    """memstress_setup_nested / memstress_setup_ept: L1 maps the gpa ``ranges`` [(start, size)] 1:1 for L2 with
    1G EPT12 pages (WB, RWX; EPT A/D when the VM has them), its tables in the last pages of slot 0, and every
    vCPU enters L2 with paging off, so the guest's accesses run in L2 at the same addresses.  Returns the EPTP."""
    slot0 = next(m for m in host.memslots(vm) if m["slot"] == 0)
    pml4_idx = sorted({k >> 9 for start, size in ranges for k in range(start // GiB, -(-(start + size) // GiB))})
    tables = slot0["gpa"] + slot0["size"] - 4096 * (1 + len(pml4_idx))
    if tables < slot0["gpa"]:
        raise bad("vm_group.memory", slot0["size"], "slot 0 is too small for the EPT12 tables of nested=true")
    words = np.zeros(512 * (1 + len(pml4_idx)), np.int64)
    for n, p in enumerate(pml4_idx):
        words[p] = (tables + 4096 * (1 + n)) | 7
    for start, size in ranges:
        for k in range(start // GiB, -(-(start + size) // GiB)):
            n = pml4_idx.index(k >> 9)
            words[512 * (1 + n) + (k & 511)] = (k * GiB) | 7 | (6 << 3) | (1 << 7)
    host.write_guest_memory(vm, tables, words.view(np.uint64))
    eptp = tables | 6 | (3 << 3) | (0 if host.vt.ad_disabled[vm] else 0x40)
    for vcpu in range(int(host._vcpus[vm])):
        host.nested_enter(vm, vcpu, eptp=eptp, cr0=0x11, cr3=0, cr4=0, efer=0)
    return eptp
