"""KVM_RUN on the Host: batches of guest accesses and stores for many VMs at once.

One resume loop: the kernel runs the batch until it ends or runs dry; Python grows the page arena
(or reclaims host memory under overcommit) and resumes at the event that stopped, or raises
HostMemoryExhausted saying which events were applied.
"""

from typing import NamedTuple

import numpy as np

from . import args as A
from . import reclaim as _reclaim
from .arena import tdp_rows_bound
from .constants import ACC_FETCH, ACC_VALID_MASK, ACC_WRITE, FIXED, HIT, SPURIOUS
from .errors import HostMemoryExhausted, bad
from .kernels import mmu_internal as MI
from .kernels import state as S
from .kernels.events import (
    EV_BAD_ADDR,
    EV_BAD_KIND,
    EV_BAD_VCPU,
    EV_BAD_VM,
    EV_OK,
    group_by_vm,
    pack_events,
    ungroup_results,
    validate_events,
)
from .kernels.fault import access_batch
from .kernels.guest_walk import X86_CR0_PG
from .kernels.timeline import STOP_DEADLINE
from .units import format_size


def event_record(vm, vcpu, addr, kind=0, op=MI.OP_ACCESS, value=0, size=0):
    """An int64[n, NEVF] event batch (kernels/mmu_internal.py EV_* columns) from equal-length arrays or
    scalars (a scalar applies to every event; n is the length of ``vm``); ``op`` is one OP_* for all."""
    ev = np.empty((np.size(vm), MI.NEVF), np.int64)
    pack_events(*(np.ascontiguousarray(x, np.int64).reshape(-1) for x in (vm, vcpu, addr, kind, value, size)),
                int(op), ev)
    return ev


def result_record(n):
    """An int64[n, NRESF] result record for a kernel: RES_FAULT_GPA -1 (the kernels write only L1 exits')."""
    res = np.zeros((n, MI.NRESF), np.int64)
    res[:, MI.RES_FAULT_GPA] = -1
    return res


def results(res):
    """(outcome int8[n], error code int64[n], fault gpa int64[n]) of an int64[n, NRESF] result record."""
    return (res[:, MI.RES_OUTCOME].astype(np.int8), res[:, MI.RES_ERROR].copy(),
            res[:, MI.RES_FAULT_GPA].copy())


class AccessResult(NamedTuple):
    """Per-access results: ``outcome`` (bm.HIT ...), the error code of the exit or #PF (for bm.L1_EXIT the exit
    qualification L1 receives) and, for bm.L1_EXIT, the L2 gpa that faulted (-1 for other outcomes)."""
    outcome: np.ndarray
    error_code: np.ndarray
    fault_gpa: np.ndarray = None

    @classmethod
    def of(cls, outcome, error_code, fault_gpa=None):
        """An AccessResult; ``fault_gpa`` None: -1 for every access."""
        if fault_gpa is None:
            fault_gpa = np.full(np.shape(outcome), -1, np.int64)
        return cls(outcome, error_code, fault_gpa)


class Batches:
    """Mixin of ``batchmmu.host.Host``: ``access`` and ``store`` and the batch loop behind them."""

    def access(self, vm, vcpu, addr, kind=0):
        """Guest memory accesses, in order within each VM.  Scalars broadcast; returns AccessResult."""
        vm_a, vcpu_a, addr_a, kind_a = self._events(vm, vcpu, addr, kind)
        return self._run_accesses(vm_a, vcpu_a, addr_a, kind_a)

    def _events(self, vm, vcpu, addr, kind):
        args = (("vm", vm), ("vcpu", vcpu), ("addr", addr), ("kind", kind))
        given = [A.int_array(x, name) for name, x in args]
        lengths = [a.size for a, (_, x) in zip(given, args, strict=True) if not A.is_int(x)]
        n = max(lengths) if lengths else 1
        arrs = []
        for (name, _), a in zip(args, given, strict=True):
            if a.size == 1 and n != 1:
                a = np.full(n, a[0], np.int64)  # a scalar applies to every event
            elif a.size != n:
                raise bad(name, f"length {a.size}", f"arrays must have equal lengths (or be scalars); expected {n}")
            arrs.append(a)
        vm_a, vcpu_a, addr_a, kind_a = arrs
        # per VM the widest address any of its vCPUs takes (a gva under paging, else a gpa)
        bits, lo, hi = self._addr_bits()
        j, code = validate_events(vm_a, vcpu_a, addr_a, kind_a, self.nvm, self._vcpus, hi,
                                  ACC_VALID_MASK, ACC_WRITE, ACC_FETCH)
        if code == EV_OK and (lo != hi).any():  # vCPUs of one VM in different modes: check each event
            sel = np.nonzero((lo != hi)[vm_a])[0]
            over = np.nonzero(addr_a[sel] >> bits[self.vt.vcpu_off[vm_a[sel]] + vcpu_a[sel]])[0]
            if over.size:
                j, code = int(sel[over[0]]), EV_BAD_ADDR
        if code == EV_BAD_ADDR:
            g = int(self.vt.vcpu_off[vm_a[j]] + vcpu_a[j])
            if self.vr.cr0[g] & int(X86_CR0_PG):
                raise bad("addr", int(addr_a[j]), f"not a gva of VM {int(vm_a[j])} vCPU {int(vcpu_a[j])} in its "
                          f"paging mode (takes [0, 2**{int(bits[g])})): a non-canonical address is a #GP, not a "
                          "page fault")
            if self._mmu_kind[vm_a[j]] == S.MMU_SHADOW and not addr_a[j] >> int(self._maxphyaddr[vm_a[j]]):
                raise bad("addr", int(addr_a[j]), f"VM {int(vm_a[j])} vCPU {int(vcpu_a[j])} has paging off: under the "
                          "shadow MMU its addresses are 32-bit gpas (KVM's nonpaging context maps them through a PAE "
                          "root, 4 GiB)")
            raise bad("addr", int(addr_a[j]), f"outside VM {int(vm_a[j])}'s guest physical address space")
        if code == EV_BAD_VM:
            raise bad("vm", int(vm_a[j]), f"no such VM (this host has {self.nvm})")
        if code == EV_BAD_VCPU:
            raise bad("vcpu", int(vcpu_a[j]), f"VM {int(vm_a[j])} has {int(self._vcpus[vm_a[j]])} vCPUs")
        if code == EV_BAD_KIND:
            raise bad("kind", int(kind_a[j]),
                      "use ACC_WRITE, ACC_USER, ACC_FETCH bits (write and fetch exclude each other)")
        return vm_a, vcpu_a, addr_a, kind_a

    def _run_accesses(self, vm_a, vcpu_a, addr_a, kind_a, value_a=None, size_a=None):
        """Route a validated batch: shadow-MMU VMs to the shadow kernels, the rest to the TDP kernels."""
        n = vm_a.size
        if n >= self.nvm and not (self._mmu_kind[:self.nvm] == S.MMU_SHADOW).any():
            shadow = np.zeros(n, bool)   # no shadow VM on this host: no per-event look-up
        else:
            shadow = self._mmu_kind[vm_a] == S.MMU_SHADOW
        if shadow.all():   # one kernel for the whole batch: its results are the batch's
            try:
                return AccessResult(*self._run_shadow(
                    self._event_record(vm_a, vcpu_a, addr_a, kind_a, value_a, size_a), checked=True))
            except HostMemoryExhausted as exc:
                z = np.zeros(n, np.int8)
                raise self._partial(exc, slice(None), n, z, z.astype(np.int64), z.astype(bool)) from None
        twod = self._tdp2d_mask(vm_a, vcpu_a, shadow, stores=value_a is not None)  # TDP with guest paging
        if not shadow.any() and not twod.any():
            return self._run_tdp_accesses(vm_a, vcpu_a, addr_a, kind_a)
        ev = self._event_record(vm_a, vcpu_a, addr_a, kind_a, value_a, size_a)
        out = np.zeros(n, np.int8)
        err = np.zeros(n, np.int64)
        fgpa = np.full(n, -1, np.int64)
        done = np.zeros(n, bool)  # events of the sub-batches that completed (VMs are independent)
        ran = np.zeros(n, np.int8)   # time model: the events that ran before a deadline stopped the batch
        route = np.where(shadow, 0, np.where(twod, 1, 2))
        if self._tm is None and not self._groups_by_vm():
            # direct reclaim: the caller's order across MMUs too, as runs of consecutive events of one kernel
            cuts = [0, *(np.flatnonzero(route[1:] != route[:-1]) + 1).tolist(), n]
            parts = [(np.arange(a, b), route[a]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        else:
            parts = [(np.flatnonzero(route == k), k) for k in range(3)]
        for idx, k in parts:
            run = ("shadow", "2d", "tdp")[k]
            if not idx.size:
                continue
            try:
                sub = ev if idx.size == n else ev[idx]
                if run == "shadow":
                    o, e, f = self._run_shadow(sub)
                elif run == "2d":
                    o, e, f = self._run_tdp2d(sub)
                else:
                    o, e, f = self._run_tdp_accesses(vm_a[idx], vcpu_a[idx], addr_a[idx], kind_a[idx])
            except HostMemoryExhausted as exc:
                raise self._partial(exc, idx, n, out, err, done) from None
            out[idx], err[idx], fgpa[idx] = o, e, f
            done[idx] = True
            if self._tm is not None:
                ran[idx] = self._last_ran
        if self._tm is not None:
            self._last_ran = ran
        return AccessResult(out, err, fgpa)

    @staticmethod
    def _event_record(vm_a, vcpu_a, addr_a, kind_a, value_a, size_a):
        """The OP_ACCESS event record of a validated batch (``value_a``/``size_a`` None: plain accesses)."""
        return event_record(vm_a, vcpu_a, addr_a, kind_a, MI.OP_ACCESS, 0 if value_a is None else value_a,
                            0 if size_a is None else size_a)

    def _run_tdp_accesses(self, vm_a, vcpu_a, addr_a, kind_a):
        """Run a validated batch.  A batch that interleaves VMs runs grouped by VM where no other order could
        be seen (``_groups_by_vm``: a stable sort, each VM's events keep their order) and the results go
        back to the caller's order; grouped batches keep each VM's tables in cache."""
        n = vm_a.size
        if self._tm is not None:
            return self._run_tdp_timed(vm_a, vcpu_a, addr_a, kind_a)
        perm = None
        if n > 1 and self._groups_by_vm() and np.any(vm_a[1:] < vm_a[:-1]):
            grouped = [np.empty(n, np.int64) for _ in range(5)]
            group_by_vm(vm_a, vcpu_a, addr_a, kind_a, self.nvm, np.empty(self.nvm + 1, np.int64), *grouped)
            vm_a, vcpu_a, addr_a, kind_a, perm = grouped
        out = np.zeros(n, np.int8)
        err = np.zeros(n, np.int64)

        def fail(i):
            applied = np.zeros(n, bool)
            applied[perm[:i] if perm is not None else slice(0, i)] = True
            o, e = out, err
            if perm is not None:
                o, e = np.zeros_like(out), np.zeros_like(err)
                o[perm[:i]], e[perm[:i]] = out[:i], err[:i]
            return self._budget_exhausted(int(vm_a[i]), f"gpa {int(addr_a[i]):#x}", applied,
                                          " (err.applied says which: each VM's events run in order, VM by VM)", o, e)
        def grow(i):   # the page arena sized from the events left, not doubled
            self.arena.grow_pages_for(tdp_rows_bound(self.vt, self.st, self.nrec, self.nvm, vm_a[i:]))

        self._resume(n, lambda i: access_batch(self.pa, self.vt, self.st, self.ct, self.sh, self.host_ctl, vm_a, vcpu_a,
                                               addr_a, kind_a, i, out, err),
                     fail, grow=grow, oom_vm=lambda i: int(vm_a[i]), oom_gpa=lambda i: int(addr_a[i]))
        if perm is not None:
            out_c, err_c = np.empty_like(out), np.empty_like(err)
            ungroup_results(perm, out, err, out_c, err_c)
            out, err = out_c, err_c
        return AccessResult.of(out, err)

    def _run_tdp_timed(self, vm_a, vcpu_a, addr_a, kind_a):
        """_run_tdp_accesses under the time model: vCPUs interleave by their simulated clocks."""
        from .kernels.timeline import timed_access_batch
        n = vm_a.size
        out = np.zeros(n, np.int8)
        err = np.zeros(n, np.int64)
        nxt, ran = self._sched(vm_a, vcpu_a)
        self._last_ran = ran
        self._resume(n, lambda i: timed_access_batch(self.pa, self.vt, self.st, self.ct, self.sh, self.host_ctl, vm_a,
                                                     vcpu_a, addr_a, kind_a, out, err, self._tm, nxt, ran),
                     lambda i: self._budget_exhausted(int(vm_a[i]), f"gpa {int(addr_a[i]):#x}", ran.astype(bool),
                                                      " (err.applied says which)", out, err),
                     oom_vm=lambda i: int(vm_a[i]), oom_gpa=lambda i: int(addr_a[i]))
        return AccessResult.of(out, err)

    def _resume(self, n, run, fail, topup=None, grow=None, oom_vm=None, oom_gpa=None):
        """The one resume loop of every event batch: ``topup()`` (mmu_topup_memory_caches), ``run(i)`` the
        kernel from event i -> (next event, STOP_*); STOP_NEED_PAGES: top up again (without ``topup``: ``grow(i)``
        the page arena for the events left, the first time in a batch, else double it) and go on;
        STOP_HOST_OOM: with overcommit and ``oom_gpa``, reclaim once for that event and run it again, else raise
        ``fail(i)``."""
        i, oom_at = 0, -1
        while i < n:
            if topup is not None:
                topup()
            i, stop = run(i)
            if stop == STOP_DEADLINE:   # the time model's deadline: the events not marked ran are left
                return
            if stop == S.STOP_NEED_PAGES and topup is None:
                if grow is not None:
                    grow(i)
                    grow = None   # a bound that fell short (huge pages split, say): double from now on
                else:
                    self.arena.grow_pages(max(S.MAX_ROWS_PER_EVENT, self.pa.spt.shape[0]))
            elif stop == S.STOP_HOST_OOM:
                if oom_gpa is not None and i != oom_at and _reclaim.direct_reclaim(self, oom_vm(i), oom_gpa(i)):
                    oom_at = i  # overcommit: reclaimed; the event runs again
                else:
                    raise fail(i)

    def _budget_exhausted(self, vm, where, applied, how="", out=None, err=None):
        """The HostMemoryExhausted a batch raises when the host budget cannot back an event's page;
        ``applied`` marks the events that ran, ``out``/``err`` their results."""
        e = HostMemoryExhausted(
            f"memory={format_size(self.memory)}: host memory budget exhausted at VM {vm}, {where}; "
            f"{int(applied.sum())} of {applied.size} events were applied{how}. Give the Host more memory.",
            field="memory", value=self.memory)
        e.applied = applied
        e.outcome = np.where(applied, out, 0).astype(np.int8) if out is not None else np.zeros(applied.size, np.int8)
        e.error_code = np.where(applied, err, 0).astype(np.int64) if err is not None \
            else np.zeros(applied.size, np.int64)
        return e

    def _partial(self, e, idx, n, out, err, before):
        """Re-raise a sub-batch's HostMemoryExhausted over the whole batch of ``n`` events: the events
        ``before`` (done by earlier sub-batches) and those the sub-batch applied took effect."""
        applied = before.copy()
        applied[idx] = e.applied
        out, err = out.copy(), err.copy()
        out[idx], err[idx] = e.outcome, e.error_code
        return self._exhausted_over(e, applied, out, err)

    def _exhausted_over(self, e, applied, out, err):
        n = applied.size
        e2 = HostMemoryExhausted(str(e).split("; ")[0] + f"; {int(applied.sum())} of {n} events were applied "
                                 "(err.applied says which). Give the Host more memory.", field=e.field, value=e.value)
        e2.applied = applied
        e2.outcome = np.where(applied, out, 0).astype(np.int8)
        e2.error_code = np.where(applied, err, 0).astype(np.int64)
        return e2

    def store(self, vm, vcpu, addr, value, kind=ACC_WRITE):
        """Guest 8-byte stores of ``value`` at ``addr`` (may be unaligned; a store that crosses a
        page is two accesses).  Stores KVM emulates as MMIO or to read-only memory leave memory as it was."""
        k = A.int_array(kind, "kind", 0, ACC_VALID_MASK)
        kind = int(k[0] | ACC_WRITE) if A.is_int(kind) else k | ACC_WRITE
        val = A.u64_array(value, "value")
        vm_a, vcpu_a, addr_a, kind_a = self._events(vm, vcpu, addr, kind)
        if val.size == 1 and vm_a.size > 1:
            val = np.full(vm_a.size, val[0], np.uint64)
        if val.size != vm_a.size:
            raise bad("value", f"length {val.size}", "must match the addresses")
        if np.any(self._mmu_kind[vm_a] != S.MMU_TDP) or np.any(self._nested[vm_a]) or \
                self._guest_paging_on(vm_a, vcpu_a).any():
            return self._shadow_store(vm_a, vcpu_a, addr_a, kind_a, val.view(np.int64))
        # A host out-of-memory stop keeps what ran: the stores that completed get their values written and
        # err.applied names them; a page-crossing store whose second page was not backed wrote nothing.
        exc = None
        ran = np.ones(vm_a.size, bool)
        try:
            res = self._run_accesses(vm_a, vcpu_a, addr_a, kind_a)
            out, err = res.outcome, res.error_code
        except HostMemoryExhausted as e:
            exc, out, err, ran = e, e.outcome, e.error_code, e.applied
        cross = ((addr_a & 4095) > 4088) & ran
        done = (HIT, FIXED, SPURIOUS)
        ok = np.isin(out, done) & ran  # the store reached guest memory (not emulated/MMIO/stopped)
        if cross.any():
            # a page-crossing store completes only if both halves translate; else report the second's
            idx = np.nonzero(cross)[0]
            try:
                res2 = self._run_accesses(vm_a[idx], vcpu_a[idx], (addr_a[idx] | 4095) + 1, kind_a[idx])
                out2, err2, ran2 = res2.outcome, res2.error_code, np.ones(idx.size, bool)
            except HostMemoryExhausted as e:
                exc, out2, err2, ran2 = exc or e, e.outcome, e.error_code, e.applied
            ran[idx] &= ran2
            ok2 = np.isin(out2, done)
            first_ok = np.isin(out[idx], done)
            ok[idx] &= ok2 & ran2
            sel = first_ok & ~ok2 & ran2
            out, err = out.copy(), err.copy()
            out[idx[sel]] = out2[sel]
            err[idx[sel]] = err2[sel]
        for j in np.nonzero(ok)[0]:
            self._write_bytes(int(vm_a[j]), int(addr_a[j]), int(val[j]))
        if exc is not None:
            raise self._exhausted_over(exc, ran, out, err) from None
        return AccessResult.of(out, err)

    def _shadow_store(self, vm_a, vcpu_a, addr_a, kind_a, val):
        """Stores under guest paging: the kernel writes guest memory once the store translates (or the
        emulator writes it).  A page-crossing store is two stores; the second runs if the first landed."""
        off = addr_a & 4095
        first = np.minimum(8, 4096 - off)
        exc = None
        ran = np.ones(vm_a.size, bool)
        try:
            res = self._run_accesses(vm_a, vcpu_a, addr_a, kind_a, val, first)
        except HostMemoryExhausted as e:  # what ran is kept: its second halves run below
            exc, ran = e, e.applied
            res = AccessResult.of(e.outcome.copy(), e.error_code.copy())
        cross = np.nonzero((first < 8) & ran & np.isin(res.outcome, (HIT, FIXED, SPURIOUS, S.OUT_EMULATED)))[0]
        if cross.size:
            rest = (val[cross].view(np.uint64) >> (8 * first[cross]).astype(np.uint64)).view(np.int64)
            try:
                r2 = self._run_accesses(vm_a[cross], vcpu_a[cross], addr_a[cross] + first[cross], kind_a[cross],
                                        rest, 8 - first[cross])
            except HostMemoryExhausted as e:
                exc = exc or e
                ran[cross] &= e.applied
                r2 = AccessResult.of(e.outcome, e.error_code)
            bad2 = ~np.isin(r2.outcome, (HIT, FIXED, SPURIOUS, S.OUT_EMULATED)) & ran[cross]
            res.outcome[cross[bad2]] = r2.outcome[bad2]
            res.error_code[cross[bad2]] = r2.error_code[bad2]
            res.fault_gpa[cross[bad2]] = r2.fault_gpa[bad2]
        if exc is not None:
            raise self._exhausted_over(exc, ran, res.outcome, res.error_code) from None
        return res

    def _write_bytes(self, vm, addr, value):
        from .kernels.gmem import gm_write_bytes
        self._gm_reserve(2)
        gm_write_bytes(self.gm, self._slot_map(), vm, addr, np.uint64(value).view(np.int64), 8)
