"""``batchmmu validate``: run one workload on the real KVM and on the simulator, compare step by step.

After every step each side reports its statistics: counters as deltas over the step (VM and vCPU
summed), gauges (``pages_4k``, ``pages_2m``, ``mmu_unsync``, ``max_mmu_rmap_size`` ...) as absolute
values, and the dirty bitmap (set page numbers) where the step read it.  ``COMPARED`` and the bitmap
must agree exactly; ``SHOWN`` depend on the host (exits, emulated instructions, TLB flushes) and are
only displayed.
"""

import json
import platform

import numpy as np

from . import realkvm
from .constants import GUEST_FAULT
from .errors import BatchMMUError
from .units import format_size
from .workload import GuestRun, compile_workload, describe, load

COMPARED = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "invlpg", "mmu_cache_miss", "mmu_shadow_zapped",
            "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_unsync", "pages_4k", "pages_2m",
            "max_mmu_rmap_size", "remote_tlb_flush_requests", "max_mmu_page_hash_collisions")
SHOWN = ("exits", "insn_emulation", "tlb_flush")
GAUGES = frozenset({"pages_4k", "pages_2m", "pages_1g", "mmu_unsync", "max_mmu_rmap_size", "nx_lpage_splits",
                    "max_mmu_page_hash_collisions"})

EXIT_OK, EXIT_DIFF, EXIT_INCOMPLETE = 0, 1, 3


class SimUnavailable(RuntimeError):
    """The simulator cannot run this workload (e.g. the shadow MMU is not built yet)."""


class SimGuestFault(RuntimeError):
    """The simulated guest took a #PF, where the kernel's guest would triple-fault."""


class SimSide:
    """Runs a compiled workload's ops on a ``batchmmu.Host`` with ``mmu="shadow"``, configured like the
    kernel (``params``: kvm module parameters, default this machine's).  ``host`` replaces the Host
    (tests pass a recorder)."""

    name = "simulator"

    def __init__(self, compiled, params=None, host=None):
        from . import Host
        cfg = compiled.config
        self.memory = cfg["memory"]
        self.options = realkvm.sim_host_options(realkvm.module_params() if params is None else params)
        try:
            self.host = host if host is not None else Host(memory=2 * self.memory + (64 << 20),
                                                            backing=cfg["backing"], **self.options)
            self.vm = int(self.host.create_vms(1, memory=self.memory, vcpus=1, mmu="shadow")[0])
            if cfg["manual_protect"]:
                self.host.enable_manual_dirty_log_protect(self.vm, initially_set=cfg["initially_set"])
            # the kernel side writes every page before the guest runs: all host pages are resident
            self.host.touch_host_memory(self.vm, 0, self.memory)
            for gpa, words in compiled.initial_writes:
                self.host.write_guest_memory(self.vm, gpa, words)
            self.host.set_vcpu_regs(self.vm, 0, **compiled.initial_regs)
            missing = [m for m in ("emulated_access", "mov_cr3") if not hasattr(self.host, m)]
            if missing:
                raise AttributeError(f"Host has no {', '.join(missing)}")
        except (BatchMMUError, AttributeError, NotImplementedError, TypeError) as e:
            raise SimUnavailable(f"the simulator cannot run this guest yet (needs mmu='shadow' with guest "
                                 f"paging): {e}") from None
        self.last_bitmap = None
        self.info = {"options": self.options}

    def stats(self):
        return self.host.stats(self.vm)

    def guest(self, op):
        h, vm = self.host, self.vm
        for ev in op.events:
            name = ev[0]
            if name == "access":
                res = h.access(vm, 0, ev[1], ev[2])
                _check_outcomes(res, ev[1])
            elif name == "store":
                _check_outcomes(h.store(vm, 0, ev[1], ev[2], ev[3]), [ev[1]])
            elif name == "emulated_access":
                _check_outcomes(h.emulated_access(vm, 0, ev[1], ev[2], value=ev[3], size=ev[4]), [ev[1]])
            elif name == "mov_cr3":
                h.mov_cr3(vm, 0, ev[1])
            elif name == "invlpg":
                h.invlpg(vm, 0, ev[1])
            else:
                raise ValueError(f"unknown guest event {name!r}")
        return {}

    def host_call(self, op):
        h, vm, name, args = self.host, self.vm, op.name, op.args
        if name == "write_memory":
            for gpa, words in args[0]:
                h.write_guest_memory(vm, gpa, words)
        elif name == "set_cr3":
            h.set_vcpu_regs(vm, 0, cr3=args[0])
        elif name == "set_slot_flags":
            h.set_memslot(vm, args[0], 0, self.memory, flags=args[1])
        elif name == "get_dirty_log":
            self.last_bitmap = np.asarray(h.get_dirty_log(vm, args[0]), np.uint64)
            return {"dirty": self.last_bitmap}
        elif name == "clear_dirty_log":
            slot, first, num, which = args
            h.clear_dirty_log(vm, slot, first, num, realkvm.clear_bitmap(which, first, num, self.last_bitmap))
        else:
            raise ValueError(f"unknown host op {name!r}")
        return {}

    def close(self):
        pass


def _check_outcomes(res, addrs):
    out = getattr(res, "outcome", None)
    if out is None:
        return
    bad = np.nonzero(np.asarray(out) == GUEST_FAULT)[0]
    if bad.size:
        j = int(bad[0])
        raise SimGuestFault(f"guest #PF (error code {int(res.error_code[j]):#x}) at {int(addrs[j]):#x}: the "
                            "kernel's guest would triple-fault here")


def _do(side, op):
    return side.guest(op) if isinstance(op, GuestRun) else side.host_call(op)


def _bits(words):
    """Set page numbers of a bitmap of u64 words."""
    w = np.asarray(words, np.uint64)
    bits = np.unpackbits(w.view(np.uint8), bitorder="little")
    return [int(x) for x in np.nonzero(bits)[0]]


def run_side(side, compiled, names=COMPARED + SHOWN):
    """Run every step on one side.  Returns {"steps": [per-step results], "error": None or {step, message}}."""
    steps, error = [], None
    prev = side.stats()
    for i, ops in enumerate(compiled.steps):
        extra = {}
        try:
            for op in ops:
                extra.update(_do(side, op) or {})
        except (realkvm.GuestError, BatchMMUError, SimGuestFault, OSError, AttributeError, TypeError) as e:
            error = {"step": i, "message": f"{type(e).__name__}: {e}"}
            break
        cur = side.stats()
        stats = {}
        for n in names:
            if n in cur:
                stats[n] = int(cur[n]) if n in GAUGES else int(cur[n]) - int(prev.get(n, 0))
        r = {"stats": stats}
        if "dirty" in extra:
            r["dirty"] = _bits(extra["dirty"])
        for k in ("loaded", "seconds"):
            if k in extra:
                r[k] = extra[k]
        steps.append(r)
        prev = cur
    return {"steps": steps, "error": error}


def compare_step(k, s):
    """Names in COMPARED (and "dirty") whose values differ between a kernel and a simulator step."""
    diffs = [n for n in COMPARED if k["stats"].get(n) != s["stats"].get(n)]
    if ("dirty" in k or "dirty" in s) and k.get("dirty") != s.get("dirty"):
        diffs.append("dirty")
    return diffs


def environment():
    """What ran: kernel release, kvm module parameters, batchmmu version."""
    from . import __version__
    return {"kernel": platform.release(), "kvm_params": realkvm.module_params(), "batchmmu": __version__,
            "vendor_module": realkvm.vendor_module()}


def validate(workload, sides="both", dev="/dev/kvm", params=None):
    """Run ``workload`` (anything ``workload.load`` takes) on the kernel and/or the simulator.

    ``sides``: "both", "kernel" or "sim".  Returns the report dict (what ``--json`` writes): workload,
    config, environment, ``kernel`` / ``sim`` (per-step results, error, skipped reason), ``steps`` (per
    step: description, and with both sides the differing names), ``differences``, ``status``.
    """
    wl = workload if hasattr(workload, "steps") and hasattr(workload, "config") else load(workload)
    compiled = compile_workload(wl)
    rep = {"workload": wl.name, "description": wl.description, "config": wl.config, "environment": environment(),
           "kernel": None, "sim": None, "kernel_skipped": None, "sim_skipped": None,
           "steps": [{"index": i, "op": s["op"], "desc": describe(s)} for i, s in enumerate(wl.steps)]}
    if sides in ("both", "kernel"):
        pr = realkvm.probe_guest(dev)
        if not pr["guest"]:
            rep["kernel_skipped"] = pr["reason"] or "no usable /dev/kvm"
        else:
            try:
                side = realkvm.KernelSide(compiled, dev=dev)
            except (OSError, realkvm.GuestError) as e:
                rep["kernel"] = {"steps": [], "error": {"step": "setup", "message": f"{type(e).__name__}: {e}"}}
            else:
                try:
                    rep["kernel"] = run_side(side, compiled)
                    rep["kernel"]["info"] = side.info
                finally:
                    side.close()
    if sides in ("both", "sim"):
        try:
            side = SimSide(compiled, params=params)
        except SimUnavailable as e:
            rep["sim_skipped"] = str(e)
        else:
            rep["sim"] = run_side(side, compiled)
            rep["sim"]["info"] = side.info
    ndiff = 0
    if rep["kernel"] and rep["sim"]:
        for i, (k, s) in enumerate(zip(rep["kernel"]["steps"], rep["sim"]["steps"], strict=False)):
            d = compare_step(k, s)
            rep["steps"][i]["differences"] = d
            ndiff += len(d)
    rep["differences"] = ndiff
    rep["steps_compared"] = (min(len(rep["kernel"]["steps"]), len(rep["sim"]["steps"]))
                             if rep["kernel"] and rep["sim"] else 0)
    errors = [f"{n}: step {r['error']['step']}: {r['error']['message']}" for n, r in
              (("kernel", rep["kernel"]), ("simulator", rep["sim"])) if r and r["error"]]
    rep["errors"] = errors
    if ndiff:
        rep["status"] = "differences"
    elif errors or rep["sim_skipped"] and sides != "kernel":
        rep["status"] = "incomplete"
    elif rep["kernel_skipped"] and sides != "sim":
        rep["status"] = "skipped"
    else:
        rep["status"] = "ok"
    return rep


def exit_code(rep):
    return {"ok": EXIT_OK, "skipped": EXIT_OK, "differences": EXIT_DIFF}.get(rep["status"], EXIT_INCOMPLETE)


# ---------------------------------------------------------------------------- text report
def _fmt(v):
    return "-" if v is None else str(v)


def _dirty_text(pages, limit=8):
    """"N [gfn,gfn,...]" for a list of set page numbers."""
    if pages is None:
        return "-"
    head = ",".join(hex(p) for p in pages[:limit])
    return f"{len(pages)} [{head}{',...' if len(pages) > limit else ''}]"


def format_report(rep, full=False):
    """Per step the compared stats side by side (``<<`` marks a difference), then a summary.  Without
    ``full`` only stats that moved (or differ) are listed."""
    cfg = rep["config"]
    env = rep["environment"]
    lines = [f"workload {rep['workload']}: {rep['description']}",
             "config: memory={} ad={} guest_2m={} backing={} manual_protect={} initially_set={}".format(
                 format_size(cfg["memory"]), cfg["ad"], cfg["guest_2m"], cfg["backing"], cfg["manual_protect"],
                 cfg["initially_set"]),
             "kernel: Linux {} ({}; {})".format(env["kernel"], env["vendor_module"] or "no kvm vendor module",
                                                " ".join(f"{k}={v}" for k, v in env["kvm_params"].items()))]
    if rep["kernel_skipped"]:
        lines.append(f"kernel side skipped: {rep['kernel_skipped']}")
    if rep["sim_skipped"]:
        lines.append(f"simulator side unavailable: {rep['sim_skipped']}")
    ks = rep["kernel"]["steps"] if rep["kernel"] else []
    ss = rep["sim"]["steps"] if rep["sim"] else []
    prev_k, prev_s = {}, {}
    for st in rep["steps"]:
        i = st["index"]
        k = ks[i] if i < len(ks) else None
        s = ss[i] if i < len(ss) else None
        if k is None and s is None:
            break
        diffs = st.get("differences", [])
        mark = f"  ** {len(diffs)} difference(s)" if diffs else ""
        lines.append(f"\nstep {i}: {st['desc']}{mark}")
        lines.append(f"  {'stat':<26}{'kernel':>10}{'sim':>10}")
        for n in COMPARED + SHOWN:
            kv = k["stats"].get(n) if k else None
            sv = s["stats"].get(n) if s else None
            moved = any(v not in (None, 0) for v in (kv, sv)) if n not in GAUGES else \
                (kv is not None and kv != prev_k.get(n, 0)) or (sv is not None and sv != prev_s.get(n, 0))
            if not (full or moved or n in diffs):
                continue
            note = "  <<" if n in diffs else ("  (shown)" if n in SHOWN else "")
            lines.append(f"  {n:<26}{_fmt(kv):>10}{_fmt(sv):>10}{note}")
        if (k and "dirty" in k) or (s and "dirty" in s):
            kd, sd = (k or {}).get("dirty"), (s or {}).get("dirty")
            note = "  <<" if "dirty" in diffs else ""
            lines.append(f"  dirty pages: kernel {_dirty_text(kd)}{note}")
            lines.append(f"               sim    {_dirty_text(sd)}")
            if kd is not None and sd is not None and kd != sd:
                lines.append(f"               only kernel {_dirty_text(sorted(set(kd) - set(sd)))}; "
                             f"only sim {_dirty_text(sorted(set(sd) - set(kd)))}")
        if k and "loaded" in k:
            lines.append(f"  {'loaded (kernel)':<26}{k['loaded']:>#10x}")
        prev_k = k["stats"] if k else prev_k
        prev_s = s["stats"] if s else prev_s
    lines.append("")
    for e in rep["errors"]:
        lines.append(f"error: {e}")
    info = (rep["kernel"] or {}).get("info", {})
    if "thp_huge_kb" in info:
        lines.append(f"kernel: THP backing got {info['thp_huge_kb']} kB of huge pages")
    lines.append(f"{rep['status'].upper()}: {rep['steps_compared']} steps compared, {rep['differences']} "
                 f"difference(s)" + ("" if rep["kernel"] else " (kernel side did not run)")
                 + ("" if rep["sim"] else " (simulator side did not run)"))
    return "\n".join(lines)


def to_json(rep):
    return json.dumps(rep, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def format_calibration(cal):
    return "\n".join([
        f"kernel {cal['kernel']} ({cal['vendor_module']}): {cal['repeats']} fresh VMs, {cal['pages']} pages each "
        "(median)",
        f"  read fault (A/D clear, 1 SPTE)     {cal['us_per_read_fault']:8.2f} us",
        f"  write fault after read (make W)    {cal['us_per_write_fault']:8.2f} us",
        f"  emulated instruction (CPL0 loop)   {cal['us_per_emulated_insn']:8.2f} us",
        "  (on a nested host every figure includes the exit to the outer hypervisor)"])
