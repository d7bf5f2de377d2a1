"""vCPU ioctls on the Host: KVM_SET_SREGS / KVM_SET_REGS, the guest's memory as userspace sees it
(kvm_write_guest / kvm_read_guest) and the guest's TLB instructions (INVLPG, TLB flush).
"""

import errno

import numpy as np

from . import args as A
from .errors import BatchMMUError, bad
from .kernels import shadow as SK
from .kernels import state as S
from .kernels.guest_walk import EFER_LMA, X86_CR0_PG
from .paging import addr_bits, check_sregs


class Vcpus:
    """Mixin of ``batchmmu.host.Host``: one vCPU's registers, guest memory, INVLPG and TLB flush."""

    def _vcpu_index(self, vm, vcpu):
        vm = self._check_vm(vm)
        if isinstance(vcpu, bool) or not isinstance(vcpu, (int, np.integer)) or not 0 <= vcpu < self._vcpus[vm]:
            raise bad("vcpu", vcpu, f"VM {vm} has {int(self._vcpus[vm])} vCPUs")
        return int(self.vt.vcpu_off[vm] + vcpu)

    def set_vcpu_regs(self, vm, vcpu, cr0=None, cr3=None, cr4=None, efer=None, rflags=None, pkru=None):
        """KVM_SET_SREGS/KVM_SET_REGS for one vCPU (None leaves a register as it is).  Under the shadow MMU
        a change of CR0, CR3, CR4 or EFER resets the MMU context (every root of the vCPU is put)."""
        i = self._vcpu_index(vm, vcpu)
        values = {}
        for name, v in (("cr0", cr0), ("cr3", cr3), ("cr4", cr4), ("efer", efer), ("rflags", rflags),
                        ("pkru", pkru)):
            if v is not None:
                hi = (1 << 32) - 1 if name == "pkru" else A.U64_MAX
                values[name] = A.exact_int(v, name, 0, hi, why=f"must be an unsigned {hi.bit_length()}-bit integer")
        if self.vr.guest_mode[i]:
            raise bad("vcpu", vcpu, f"VM {int(vm)} vCPU {vcpu} runs L2: its registers come from nested_enter "
                      "(vmcs12 / vmcb12); call nested_exit first")
        now = self.vcpu_regs(vm, vcpu)
        now.update(values)
        check_sregs(now["cr0"], now["cr3"], now["cr4"], now["efer"], int(self._maxphyaddr[int(vm)]))
        old = {k: int(getattr(self.vr, k)[i]) for k in values}
        try:
            self._set_paging_regs(int(vm), i, values)
        except BatchMMUError:
            for k, v in old.items():  # nothing changes on error
                getattr(self.vr, k)[i] = v
            raise

    def vcpu_regs(self, vm, vcpu):
        i = self._vcpu_index(vm, vcpu)
        return {k: int(np.int64(getattr(self.vr, k)[i]).view(np.uint64))
                for k in ("cr0", "cr3", "cr4", "efer", "rflags", "pkru")}

    def _paging_off_bits(self, vms):
        """Address bits of vCPUs with paging off, per VM: the MAXPHYADDR, and at most 32 on the shadow MMU (its
        nonpaging context maps gpas through a PAE root: 4 GiB, the linear space outside long mode)."""
        mpa = self._maxphyaddr[vms]
        return np.ascontiguousarray(np.where(self._mmu_kind[vms] == S.MMU_SHADOW, np.minimum(mpa, 32), mpa),
                                    dtype=np.int64)

    def _addr_bits(self):
        """(per vCPU, per VM min, per VM max) address bits an access may use: with paging 32 (no long
        mode), 48 or 57 (LA57: gvas in their 48/57-bit form, upper half with bit 47/56 set); with paging
        off the VM's MAXPHYADDR."""
        vr, nvm = self.vr, self.nvm
        mpa = self._paging_off_bits(slice(0, max(nvm, 1)))  # a kernel argument (one signature)
        if nvm == 0 or vr.cr0.size == 0:
            return np.zeros(0, np.int64), mpa, mpa
        owner = np.repeat(np.arange(nvm), self._vcpus[:nvm])
        pg = (vr.cr0 & int(X86_CR0_PG)) != 0
        if not pg.any():
            return mpa[owner], mpa, mpa
        bits = addr_bits(vr.cr0, vr.cr4, vr.efer, mpa[owner])
        first = self.vt.vcpu_off[:nvm]
        return bits, np.minimum.reduceat(bits, first), np.maximum.reduceat(bits, first)

    # ------------------------------------------------------------------ guest memory
    def write_guest_memory(self, vm, gpa, words):
        """Host-side write of u64 ``words`` at 8-byte aligned ``gpa`` (no MMU effects, as userspace
        writing through its mapping: the contents belong to the hva behind the gpa).  Every word must lie
        below MAXPHYADDR and in a memslot (KVM's kvm_write_guest fails with EFAULT otherwise)."""
        vm = self._check_vm(vm)
        w = A.u64_array(words, "words")
        gpa = self._gpa_arg(vm, gpa, 8 * w.size)
        self._check_mapped(vm, gpa, w.size)
        self._gm_write_words(vm, gpa, w)

    def read_guest_memory(self, vm, gpa, n):
        """``n`` u64 words at 8-byte aligned ``gpa``, read through the memslots like ``write_guest_memory``
        (pages never written read as zeros)."""
        vm = self._check_vm(vm)
        top = 1 << int(self._maxphyaddr[vm])
        n = A.exact_int(n, "n", 0, top >> 3, why="must be a non-negative word count within the VM's guest physical "
                        f"address space (MAXPHYADDR {int(self._maxphyaddr[vm])}: gpas below {top:#x})")
        A.check_alloc(8 * n, "n", n, f"{n} words")
        gpa = self._gpa_arg(vm, gpa, 8 * n)
        self._check_mapped(vm, gpa, n)
        return self._gm_read_words(vm, gpa, n)

    def _gpa_arg(self, vm, gpa, nbytes):
        """An 8-byte aligned gpa whose ``nbytes`` lie below the VM's MAXPHYADDR."""
        top = 1 << int(self._maxphyaddr[vm])
        gpa = A.exact_int(gpa, "gpa", 0, A.I64_MAX, why="must be a non-negative guest-physical address")
        if gpa % 8:
            raise bad("gpa", gpa, "must be a multiple of 8")
        if gpa + nbytes > top:
            raise bad("gpa", gpa, f"[gpa, +{nbytes}) goes beyond the VM's {top.bit_length() - 1}-bit "
                      f"physical address space (MAXPHYADDR {int(self._maxphyaddr[vm])}: gpas below {top:#x})")
        return gpa

    def _check_mapped(self, vm, gpa, n):
        """Every page of ``n`` words at ``gpa`` lies in a memslot (kvm_read_guest / kvm_write_guest: EFAULT)."""
        hole = self._gm_unmapped(vm, int(gpa), int(n))
        if hole >= 0:
            raise BatchMMUError(f"gpa={hole:#x}: VM {vm} has no memslot there (KVM: EFAULT)", field="gpa",
                                value=hole, errno=errno.EFAULT)

    # ------------------------------------------------------------------ guest TLB instructions
    def invlpg(self, vm, vcpu, gva):
        """INVLPG by the guest: under shadow paging kvm_mmu_invlpg (sync of unsync SPTEs for the gva in
        every cached root); under TDP it does not exit (no KVM work, no stat).  In long mode INVLPG of a
        non-canonical gva is a NOP (kvm_mmu_invalidate_addr)."""
        i = self._vcpu_index(vm, vcpu)
        vm = int(vm)
        gva = A.exact_int(gva, "gva", 0, A.I64_MAX, why="must be a non-negative gva (integer)")
        if gva >> self._vcpu_addr_bits(vm, i) and self.vr.efer[i] & int(EFER_LMA) \
                and self.vr.cr0[i] & int(X86_CR0_PG):
            if self._mmu_kind[vm] == S.MMU_SHADOW:
                self.vt.stats[vm, S.ST_INVLPG] += 1  # kvm_mmu_invlpg counts it all the same
            return
        self._guest_op(vm, vcpu, SK.OP_INVLPG, self._gva_arg(vm, i, gva, "gva"))

    def flush_tlb(self, vm, vcpu):
        """A guest TLB flush: under shadow paging the current root is synced and unsync previous roots
        are freed (kvm_vcpu_flush_tlb_guest); under TDP it does not exit."""
        self._guest_op(vm, vcpu, SK.OP_FLUSH, 0)
