"""The real KVM on this machine (pure Python: os, fcntl, ctypes, mmap, struct).

``probe()`` says whether /dev/kvm can create VMs here, which capabilities it reports and how the kvm
module is configured (so the simulator can be set up the same way); ``probe_guest()`` also runs a tiny
CPL3 program.  ``VmStats`` reads a VM's or vCPU's binary statistics (KVM_GET_STATS_FD) by KVM's names.
``KvmVm`` is one VM with slot 0 over anonymous memory and one vCPU in long mode; ``KernelSide`` runs
the ops of a compiled workload (``batchmmu.workload``) on it for ``batchmmu validate``;
``calibrate()`` measures what a fault and an emulated instruction cost on this host.
"""

import ctypes as C
import errno
import fcntl
import mmap
import os
import signal
import statistics
import struct
import threading
import time

import numpy as np

from . import guestimage as gi
from . import kvmapi as K
from .errors import BatchMMUError

CAPS = K.CAPS
MODULE_PARAMS = ("tdp_mmu", "eager_page_split", "nx_huge_pages", "nx_huge_pages_recovery_ratio",
                 "nx_huge_pages_recovery_period_ms", "mmio_caching", "flush_on_reuse")

_HEADER = struct.Struct("<6I")     # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")    # flags, exponent, size, offset, bucket_size (then the name)


def module_params(path="/sys/module/kvm/parameters"):
    """The kvm module's parameters that decide MMU behaviour (missing ones are left out)."""
    out = {}
    for name in MODULE_PARAMS:
        try:
            with open(os.path.join(path, name)) as f:
                out[name] = f.read().strip()
        except OSError:
            pass
    return out


def sim_host_options(params):
    """Host(...) keyword arguments that configure the simulator like a kvm module with ``params``."""
    return {"mmio_caching": params.get("mmio_caching", "Y") == "Y",
            "nx_huge_pages": params.get("nx_huge_pages", "N") not in ("N", "never", "off"),
            "eager_page_split": params.get("eager_page_split", "Y") == "Y"}


def probe(dev="/dev/kvm"):
    """Can this machine create KVM VMs?  Returns a dict: ``available`` (bool), ``reason`` (why not),
    ``api_version``, ``caps`` (name -> value from KVM_CHECK_EXTENSION), ``params`` (kvm module)."""
    info = {"available": False, "reason": "", "api_version": None, "caps": {}, "params": module_params()}
    try:
        kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        info["reason"] = f"cannot open {dev}: {os.strerror(e.errno)}"
        return info
    try:
        info["api_version"] = fcntl.ioctl(kvm, K.KVM_GET_API_VERSION, 0)
        if info["api_version"] != 12:
            info["reason"] = f"unexpected KVM API version {info['api_version']}"
            return info
        info["caps"] = {name: fcntl.ioctl(kvm, K.KVM_CHECK_EXTENSION, nr) for name, nr in CAPS.items()}
        try:
            vm = fcntl.ioctl(kvm, K.KVM_CREATE_VM, 0)
        except OSError as e:
            info["reason"] = f"KVM_CREATE_VM failed: {os.strerror(e.errno)}"
            return info
        os.close(vm)
        info["available"] = True
        return info
    finally:
        os.close(kvm)


_GUEST_PROBE = {}


def probe_guest(dev="/dev/kvm"):
    """``probe()`` plus: can a vCPU run a CPL3 long-mode program to its OUT?  Sets ``guest`` (bool) and,
    if not, ``reason``.  Cached per device."""
    if dev in _GUEST_PROBE:
        return dict(_GUEST_PROBE[dev])
    info = probe(dev)
    info["guest"] = False
    if info["available"]:
        try:
            img = gi.GuestImage("8MiB")
            with KvmVm(img.memory, dev=dev) as vm:
                for gpa, words in img.initial_writes():
                    vm.write(gpa, words)
                vm.set_control_regs(**img.regs())
                vm.run(gi.touch_program(False), {"rax": gi.DATA_GPA, "rcx": gi.DATA_GPA + 4096, "rdx": 4096},
                       cpl=3, timeout=5)
                if vm.regs()["rbx"] != gi.DATA_GPA:
                    raise GuestError("the CPL3 probe read the wrong word")
            info["guest"] = True
        except (OSError, GuestError) as e:
            info["reason"] = f"cannot run a guest: {e}"
    _GUEST_PROBE[dev] = info
    return dict(info)


class VmStats:
    """Binary statistics of a VM or vCPU file descriptor, by KVM's names (``read()`` -> dict).
    ``types`` maps each name to KVM_STATS_TYPE_{CUMULATIVE,INSTANT,PEAK}."""

    def __init__(self, obj_fd):
        try:
            self.fd = fcntl.ioctl(obj_fd, K.KVM_GET_STATS_FD, 0)
        except OSError as e:
            raise OSError(e.errno or errno.ENOTTY, f"KVM_GET_STATS_FD: {os.strerror(e.errno)}") from None
        head = os.pread(self.fd, _HEADER.size, 0)
        _flags, name_size, num_desc, id_offset, desc_offset, self.data_offset = _HEADER.unpack(head)
        self.id = os.pread(self.fd, name_size, id_offset).split(b"\0", 1)[0].decode()
        raw = os.pread(self.fd, num_desc * (_DESC.size + name_size), desc_offset)
        self.descs = []
        for k in range(num_desc):
            base = k * (_DESC.size + name_size)
            flags, exponent, size, offset, _bucket = _DESC.unpack_from(raw, base)
            name = raw[base + _DESC.size:base + _DESC.size + name_size].split(b"\0", 1)[0].decode()
            self.descs.append((name, offset, size, flags))
        self.types = {name: flags & K.KVM_STATS_TYPE_MASK for name, _, _, flags in self.descs}
        self.data_size = max((o + 8 * s for _, o, s, _ in self.descs), default=0)

    def read(self):
        """Current values; scalar stats as ints, histogram stats as lists."""
        data = os.pread(self.fd, self.data_size, self.data_offset)
        out = {}
        for name, offset, size, _flags in self.descs:
            vals = struct.unpack_from(f"<{size}Q", data, offset)
            out[name] = vals[0] if size == 1 else list(vals)
        return out

    def close(self):
        os.close(self.fd)


def vm_stats_of_new_vm(dev="/dev/kvm"):
    """Create a VM (no memory, no vCPU), read its statistics, destroy it: a smoke test of the
    stats interface that also lists every statistic name this kernel has."""
    kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    try:
        vm = fcntl.ioctl(kvm, K.KVM_CREATE_VM, 0)
        try:
            st = VmStats(vm)
            try:
                return st.id, st.read()
            finally:
                st.close()
        finally:
            os.close(vm)
    finally:
        os.close(kvm)


# ---------------------------------------------------------------------------- running guests
class GuestError(RuntimeError):
    """The guest did not reach its ``out 0x80`` (another exit, a triple fault, a timeout)."""


class GuestTimeout(GuestError):
    pass


_libc = C.CDLL(None, use_errno=True)
_libc.mmap.restype = C.c_void_p
_libc.mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]
_libc.munmap.argtypes = [C.c_void_p, C.c_size_t]
_libc.madvise.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
_PROT_RW, _MAP_PRIVATE_ANON, _MAP_NORESERVE = 3, 0x22, 0x4000
_MADV_HUGEPAGE, _MADV_NOHUGEPAGE = 14, 15
_MAP_FAILED = C.c_void_p(-1).value


def _ioctl(fd, req, arg, what):
    try:
        return fcntl.ioctl(fd, req, arg, True) if not isinstance(arg, int) else fcntl.ioctl(fd, req, arg)
    except OSError as e:
        raise OSError(e.errno, f"{what}: {os.strerror(e.errno)}") from None


def _anon_huge_kb(addr):
    """AnonHugePages (kB) of the mapping that starts at ``addr`` (from /proc/self/smaps)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    inside = int(head.split("-")[0], 16) == addr
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class KvmVm:
    """One KVM VM: slot 0 = ``memory`` bytes at gpa 0 over private anonymous memory (``backing`` "4k":
    MADV_NOHUGEPAGE, "thp": MADV_HUGEPAGE, 2 MiB aligned), pre-populated so KVM never maps the zero
    page (every page's first word holds its own gpa), and vCPU 0 (supported CPUID, long mode).
    Use as a context manager or call ``close()``."""

    def __init__(self, memory, backing="4k", manual_protect=False, initially_set=False, dev="/dev/kvm"):
        if backing not in ("4k", "thp"):
            raise BatchMMUError(f"backing={backing!r}: must be '4k' or 'thp'", field="backing", value=backing)
        self.size = int(memory)
        self.fds = []
        self.mem_addr = None
        self.cpl = None
        self.rflags = gi.RFLAGS
        self.slot_flags = 0
        try:
            self.kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            self.fds.append(self.kvm)
            self.vm = _ioctl(self.kvm, K.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            self.fds.append(self.vm)
            if manual_protect:
                cap = K.EnableCap(cap=K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                cap.args[0] = K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (K.KVM_DIRTY_LOG_INITIALLY_SET
                                                                        if initially_set else 0)
                _ioctl(self.vm, K.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)")
            self._map_memory(backing)
            self.set_slot_flags(0)
            self.vcpu = _ioctl(self.vm, K.KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
            self.fds.append(self.vcpu)
            run_size = _ioctl(self.kvm, K.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
            self.run_map = mmap.mmap(self.vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._set_cpuid()
            self.vm_stats = VmStats(self.vm)
            self.fds.append(self.vm_stats.fd)
            self.vcpu_stats = VmStats(self.vcpu)
            self.fds.append(self.vcpu_stats.fd)
        except BaseException:
            self.close()
            raise

    # memory
    def _map_memory(self, backing):
        span = self.size + gi.HUGE
        base = _libc.mmap(None, span, _PROT_RW, _MAP_PRIVATE_ANON | _MAP_NORESERVE, -1, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(C.get_errno(), f"mmap of {span} bytes failed")
        self._map = (base, span)
        self.mem_addr = (base + gi.HUGE - 1) & ~(gi.HUGE - 1)
        _libc.madvise(self.mem_addr, self.size, _MADV_HUGEPAGE if backing == "thp" else _MADV_NOHUGEPAGE)
        self.words = np.ctypeslib.as_array((C.c_uint64 * (self.size // 8)).from_address(self.mem_addr))
        self.words[::512] = np.arange(0, self.size, gi.PAGE, dtype=np.uint64)
        self.huge_kb = _anon_huge_kb(self.mem_addr) if backing == "thp" else 0

    def write(self, gpa, words):
        """Host-side write of u64 ``words`` at ``gpa`` (through the mapping; no MMU effect)."""
        w = np.asarray(words, dtype=np.uint64)
        self.words[gpa // 8:gpa // 8 + w.size] = w

    def write_bytes(self, gpa, data):
        C.memmove(self.mem_addr + gpa, bytes(data), len(data))

    def read(self, gpa, n):
        return self.words[gpa // 8:gpa // 8 + n].copy()

    # memslot and dirty log
    def set_slot_flags(self, flags):
        """KVM_SET_USER_MEMORY_REGION on slot 0 with new ``flags`` (KVM_MEM_LOG_DIRTY_PAGES)."""
        region = K.UserspaceMemoryRegion(slot=0, flags=flags, guest_phys_addr=0, memory_size=self.size,
                                         userspace_addr=self.mem_addr)
        _ioctl(self.vm, K.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        self.slot_flags = flags

    def get_dirty_log(self):
        """KVM_GET_DIRTY_LOG of slot 0: bitmap as uint64 words."""
        buf = (C.c_uint64 * ((self.size // gi.PAGE + 63) // 64))()
        _ioctl(self.vm, K.KVM_GET_DIRTY_LOG, K.DirtyLog(slot=0, dirty_bitmap=C.addressof(buf)), "KVM_GET_DIRTY_LOG")
        return np.ctypeslib.as_array(buf).copy()

    def clear_dirty_log(self, first_page, num_pages, bitmap):
        """KVM_CLEAR_DIRTY_LOG of slot 0 (manual protect)."""
        bm = np.ascontiguousarray(bitmap, dtype=np.uint64)
        arg = K.ClearDirtyLog(slot=0, num_pages=num_pages, first_page=first_page, dirty_bitmap=bm.ctypes.data)
        _ioctl(self.vm, K.KVM_CLEAR_DIRTY_LOG, arg, "KVM_CLEAR_DIRTY_LOG")

    # vCPU state
    def _set_cpuid(self):
        nent = 128
        while True:
            cpuid = K.cpuid2_type(nent)(nent=nent)
            try:
                fcntl.ioctl(self.kvm, K.KVM_GET_SUPPORTED_CPUID, cpuid, True)
                break
            except OSError as e:
                if e.errno != errno.E2BIG or nent > 4096:
                    raise OSError(e.errno, f"KVM_GET_SUPPORTED_CPUID: {os.strerror(e.errno)}") from None
                nent *= 2
        _ioctl(self.vcpu, K.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def sregs(self):
        s = K.Sregs()
        _ioctl(self.vcpu, K.KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_control_regs(self, cr0=None, cr3=None, cr4=None, efer=None, rflags=None):
        """KVM_SET_SREGS with new control registers (a change of a paging register resets KVM's MMU
        context, kvm_mmu_reset_context) and the image's GDT, IDT, TR; ``rflags`` goes with the next run."""
        s = self.sregs()
        for name, v in (("cr0", cr0), ("cr3", cr3), ("cr4", cr4), ("efer", efer)):
            if v is not None:
                setattr(s, name, v)
        s.gdt.base, s.gdt.limit = gi.GDT_GPA, 8 * 7 - 1
        s.idt.base, s.idt.limit = gi.IDT_GPA, 0xFFF
        s.ldt.selector, s.ldt.unusable, s.ldt.present = 0, 1, 0
        if self.cpl is None:
            self._fill_segments(s, 3)
            self.cpl = 3
        _ioctl(self.vcpu, K.KVM_SET_SREGS, s, "KVM_SET_SREGS")
        if rflags is not None:
            self.rflags = rflags

    @staticmethod
    def _fill_segments(s, cpl):
        for name, fields in gi.segments(cpl).items():
            seg = getattr(s, name)
            for k, v in fields.items():
                setattr(seg, k, v)
            seg.unusable = 0

    def set_cpl(self, cpl):
        """Switch CPL by rewriting only the segment registers (control registers unchanged: no MMU reset)."""
        if cpl != self.cpl:
            s = self.sregs()
            self._fill_segments(s, cpl)
            _ioctl(self.vcpu, K.KVM_SET_SREGS, s, "KVM_SET_SREGS")
            self.cpl = cpl

    def regs(self):
        r = K.Regs()
        _ioctl(self.vcpu, K.KVM_GET_REGS, r, "KVM_GET_REGS")
        return {n: getattr(r, n) for n in K.REG_NAMES}

    def run(self, code, regs, cpl=3, timeout=10.0):
        """Write ``code`` to the code page, enter it at ``cpl`` with ``regs`` and KVM_RUN until the
        guest's ``out 0x80``.  Returns the seconds spent in KVM_RUN."""
        self.write_bytes(gi.CODE_GPA, code)
        self.set_cpl(cpl)
        r = K.Regs(rip=gi.CODE_GPA, rflags=self.rflags)
        for k, v in regs.items():
            setattr(r, k, v & 0xFFFFFFFFFFFFFFFF)
        _ioctl(self.vcpu, K.KVM_SET_REGS, r, "KVM_SET_REGS")
        spent = 0.0
        deadline = time.monotonic() + timeout
        with _alarm(timeout):
            while True:
                t = time.perf_counter()
                try:
                    fcntl.ioctl(self.vcpu, K.KVM_RUN, 0)
                except InterruptedError:
                    pass
                except OSError as e:
                    raise GuestError(f"KVM_RUN: {os.strerror(e.errno)}") from None
                finally:
                    spent += time.perf_counter() - t
                reason = struct.unpack_from("<I", self.run_map, K.RUN_EXIT_REASON)[0]
                if reason == K.KVM_EXIT_IO:
                    direction, _size, port, _count = struct.unpack_from("<BBHI", self.run_map, K.RUN_EXIT_UNION)
                    if port == gi.EXIT_PORT and direction == K.KVM_EXIT_IO_OUT:
                        return spent
                elif reason == K.KVM_EXIT_INTR and time.monotonic() < deadline:
                    continue
                raise GuestError(self._describe_exit(reason))

    def _describe_exit(self, reason):
        name = K.EXIT_NAMES.get(reason, str(reason))
        detail = ""
        if reason == K.KVM_EXIT_IO:
            direction, size, port, count = struct.unpack_from("<BBHI", self.run_map, K.RUN_EXIT_UNION)
            detail = f" port {port:#x} {'out' if direction else 'in'}"
        elif reason == 6:  # MMIO
            detail = f" gpa {struct.unpack_from('<Q', self.run_map, K.RUN_EXIT_UNION)[0]:#x}"
        elif reason in (9, 17):
            detail = f" code {struct.unpack_from('<Q', self.run_map, K.RUN_EXIT_UNION)[0]:#x}"
        try:
            r = self.regs()
            where = f" at rip {r['rip']:#x} (rax {r['rax']:#x})"
        except OSError:
            where = ""
        hint = " (guest exception -> triple fault: an unmapped or protected address?)" if reason == 8 else ""
        return f"guest stopped with exit {name}{detail}{where}{hint}"

    def stats(self):
        """VM and vCPU binary stats, summed by name (scalars only)."""
        out = {k: v for k, v in self.vm_stats.read().items() if isinstance(v, int)}
        for k, v in self.vcpu_stats.read().items():
            if isinstance(v, int):
                out[k] = out.get(k, 0) + v
        return out

    def stat_types(self):
        return {**self.vcpu_stats.types, **self.vm_stats.types}

    def close(self):
        """Destroy the VM (every fd) and unmap its memory."""
        if getattr(self, "run_map", None) is not None:
            self.run_map.close()
            self.run_map = None
        while self.fds:
            os.close(self.fds.pop())
        if self.mem_addr is not None:
            self.words = None
            _libc.munmap(*self._map)
            self.mem_addr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _alarm:
    """SIGALRM after ``seconds`` interrupts KVM_RUN and raises GuestTimeout (main thread only; elsewhere
    the run has no timeout)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.active = threading.current_thread() is threading.main_thread() and seconds > 0

    def _fire(self, signum, frame):
        raise GuestTimeout(f"the guest did not reach its OUT within {self.seconds} s")

    def __enter__(self):
        if self.active:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


# ---------------------------------------------------------------------------- workload side
class KernelSide:
    """Runs a compiled workload's ops (``batchmmu.workload``) on a ``KvmVm``; one side of validate."""

    name = "kernel"

    def __init__(self, compiled, dev="/dev/kvm"):
        cfg = compiled.config
        self.timeout = cfg["timeout"]
        self.vm = KvmVm(cfg["memory"], backing=cfg["backing"], manual_protect=cfg["manual_protect"],
                        initially_set=cfg["initially_set"], dev=dev)
        try:
            for gpa, words in compiled.initial_writes:
                self.vm.write(gpa, words)
            self.vm.set_control_regs(**compiled.initial_regs)
            self.types = self.vm.stat_types()
            self.gauges = {k for k, t in self.types.items() if t != K.KVM_STATS_TYPE_CUMULATIVE}
        except BaseException:
            self.vm.close()
            raise
        self.last_bitmap = None
        self.info = {"thp_huge_kb": self.vm.huge_kb} if cfg["backing"] == "thp" else {}

    def stats(self):
        return self.vm.stats()

    def guest(self, op):
        """Run one guest program; returns extra results (``loaded``: the last word a read loop loaded)."""
        seconds = self.vm.run(op.code, op.regs, cpl=op.cpl, timeout=self.timeout)
        out = {"seconds": seconds}
        if op.loads:
            out["loaded"] = self.vm.regs()["rbx"]
        return out

    def host_call(self, op):
        name, args = op.name, op.args
        if name == "write_memory":
            for gpa, words in args[0]:
                self.vm.write(gpa, words)
        elif name == "set_cr3":
            self.vm.set_control_regs(cr3=args[0])
        elif name == "set_slot_flags":
            self.vm.set_slot_flags(args[1])
        elif name == "get_dirty_log":
            self.last_bitmap = self.vm.get_dirty_log()
            return {"dirty": self.last_bitmap}
        elif name == "clear_dirty_log":
            _slot, first, num, which = args
            self.vm.clear_dirty_log(first, num, clear_bitmap(which, first, num, self.last_bitmap))
        else:
            raise ValueError(f"unknown host op {name!r}")
        return {}

    def close(self):
        self.vm.close()


def clear_bitmap(which, first, num, last):
    """The bitmap a clear_dirty_log step passes: ``"all"`` ones, or the slice of the ``last`` GET."""
    words = (num + 63) // 64
    if which == "all":
        bm = np.full(words, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
        if num % 64:
            bm[-1] = np.uint64((1 << (num % 64)) - 1)
        return bm
    if last is None:
        return np.zeros(words, np.uint64)
    return np.asarray(last, np.uint64)[first // 64:first // 64 + words].copy()


# ---------------------------------------------------------------------------- calibration
def calibrate(repeats=5, pages=10000, insns=8000, dev="/dev/kvm"):
    """What the kernel costs per fault and per emulated instruction here (median of ``repeats`` fresh
    VMs).  Returns µs per read fault (A/D clear: one SPTE each), per write fault after a read (making
    the SPTE writable), per emulated instruction (a CPL0 loop), with the raw runs.  On a nested host
    (kvm_pvm under Firecracker) every figure includes the exit to the outer hypervisor."""
    img = gi.GuestImage(gi.DATA_GPA + ((pages * gi.PAGE + gi.HUGE - 1) & ~(gi.HUGE - 1)))
    runs = {"read_fault": [], "write_fault": [], "emulated_insn": []}
    end = gi.DATA_GPA + pages * gi.PAGE
    loop = {"rax": gi.DATA_GPA, "rcx": end, "rdx": gi.PAGE}
    image = img.initial_writes()
    for _ in range(repeats):
        with KvmVm(img.memory, dev=dev) as vm:
            for gpa, words in image:
                vm.write(gpa, words)
            vm.set_control_regs(**img.regs())
            vm.run(gi.touch_program(False), {"rax": gi.CODE_GPA, "rcx": gi.CODE_GPA + 1, "rdx": 1})  # code page
            for key, write in (("read_fault", False), ("write_fault", True)):
                s0 = vm.stats()
                t = vm.run(gi.touch_program(write), loop)
                n = vm.stats()["pf_fixed"] - s0["pf_fixed"]
                runs[key].append(1e6 * t / max(n, 1))
            iters = max(insns // 4, 1)
            s0 = vm.stats()
            t = vm.run(gi.touch_program(False), {"rax": gi.DATA_GPA, "rcx": gi.DATA_GPA + 8 * iters, "rdx": 8},
                       cpl=0)
            n = vm.stats()["insn_emulation"] - s0["insn_emulation"]
            runs["emulated_insn"].append(1e6 * t / max(n, 1))
    out = {f"us_per_{k}": statistics.median(v) for k, v in runs.items()}
    out.update(runs=runs, pages=pages, repeats=repeats, kernel=os.uname().release, vendor_module=vendor_module())
    return out


def vendor_module():
    """The loaded KVM vendor module (kvm_intel, kvm_amd, kvm_pvm), or None."""
    return next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.isdir(f"/sys/module/{m}")), None)
