"""KVM's userspace ABI (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h): ioctl numbers,
capability numbers and the structures this package passes, as ctypes types.  Pure Python: nothing here
opens a device."""

import ctypes as C

KVMIO = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return _ioc(0, nr, 0)


def _iow(nr, size):
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr, size):
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr, size):
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


class UserspaceMemoryRegion(C.Structure):
    """struct kvm_userspace_memory_region"""
    _fields_ = [("slot", C.c_uint32), ("flags", C.c_uint32), ("guest_phys_addr", C.c_uint64),
                ("memory_size", C.c_uint64), ("userspace_addr", C.c_uint64)]


class DirtyLog(C.Structure):
    """struct kvm_dirty_log"""
    _fields_ = [("slot", C.c_uint32), ("padding", C.c_uint32), ("dirty_bitmap", C.c_uint64)]


class ClearDirtyLog(C.Structure):
    """struct kvm_clear_dirty_log"""
    _fields_ = [("slot", C.c_uint32), ("num_pages", C.c_uint32), ("first_page", C.c_uint64),
                ("dirty_bitmap", C.c_uint64)]


class EnableCap(C.Structure):
    """struct kvm_enable_cap"""
    _fields_ = [("cap", C.c_uint32), ("flags", C.c_uint32), ("args", C.c_uint64 * 4), ("pad", C.c_uint8 * 64)]


REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "rflags")


class Regs(C.Structure):
    """struct kvm_regs"""
    _fields_ = [(n, C.c_uint64) for n in REG_NAMES]


class Segment(C.Structure):
    """struct kvm_segment"""
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint32), ("selector", C.c_uint16), ("type", C.c_uint8),
                ("present", C.c_uint8), ("dpl", C.c_uint8), ("db", C.c_uint8), ("s", C.c_uint8), ("l", C.c_uint8),
                ("g", C.c_uint8), ("avl", C.c_uint8), ("unusable", C.c_uint8), ("padding", C.c_uint8)]


class Dtable(C.Structure):
    """struct kvm_dtable"""
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


class Sregs(C.Structure):
    """struct kvm_sregs"""
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment), ("gs", Segment),
                ("ss", Segment), ("tr", Segment), ("ldt", Segment), ("gdt", Dtable), ("idt", Dtable),
                ("cr0", C.c_uint64), ("cr2", C.c_uint64), ("cr3", C.c_uint64), ("cr4", C.c_uint64),
                ("cr8", C.c_uint64), ("efer", C.c_uint64), ("apic_base", C.c_uint64),
                ("interrupt_bitmap", C.c_uint64 * 4)]


class CpuidEntry2(C.Structure):
    """struct kvm_cpuid_entry2"""
    _fields_ = [("function", C.c_uint32), ("index", C.c_uint32), ("flags", C.c_uint32), ("eax", C.c_uint32),
                ("ebx", C.c_uint32), ("ecx", C.c_uint32), ("edx", C.c_uint32), ("padding", C.c_uint32 * 3)]


def cpuid2_type(nent):
    """struct kvm_cpuid2 with room for ``nent`` entries."""
    class Cpuid2(C.Structure):
        _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32), ("entries", CpuidEntry2 * nent)]
    return Cpuid2


assert C.sizeof(Regs) == 144 and C.sizeof(Sregs) == 312 and C.sizeof(Segment) == 24
assert C.sizeof(EnableCap) == 104 and C.sizeof(CpuidEntry2) == 40

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, C.sizeof(DirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, C.sizeof(UserspaceMemoryRegion))
KVM_ENABLE_CAP = _iow(0xA3, C.sizeof(EnableCap))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, C.sizeof(ClearDirtyLog))
KVM_GET_STATS_FD = _io(0xCE)
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, C.sizeof(Regs))
KVM_SET_REGS = _iow(0x82, C.sizeof(Regs))
KVM_GET_SREGS = _ior(0x83, C.sizeof(Sregs))
KVM_SET_SREGS = _iow(0x84, C.sizeof(Sregs))
KVM_SET_CPUID2 = _iow(0x90, 8)

# KVM_CAP_* numbers
CAPS = {
    "NR_VCPUS": 9, "NR_MEMSLOTS": 10, "SYNC_MMU": 16, "READONLY_MEM": 81, "MAX_VCPUS": 66,
    "MANUAL_DIRTY_LOG_PROTECT2": 168, "DIRTY_LOG_RING": 192, "BINARY_STATS_FD": 203,
}
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

# struct kvm_run: exit_reason at offset 8, the exit union at 32
RUN_EXIT_REASON = 8
RUN_EXIT_UNION = 32
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
              7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR"}
KVM_EXIT_IO = 2
KVM_EXIT_INTR = 10
KVM_EXIT_IO_OUT = 1

# binary stats (struct kvm_stats_header, struct kvm_stats_desc)
KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0
KVM_STATS_TYPE_INSTANT = 1
KVM_STATS_TYPE_PEAK = 2
