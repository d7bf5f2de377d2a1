"""The real KVM on this machine (pure Python: os, fcntl, struct): what it offers and its statistics.

The first piece of "validate against the real kernel": ``probe()`` says whether /dev/kvm can create
VMs here, which capabilities it reports and how the kvm module is configured, so the simulator can
be set up the same way; ``VmStats`` reads a VM's (or vCPU's) binary statistics (KVM_GET_STATS_FD)
by KVM's own names.  Running guests on it (the workload runner and ``batchmmu validate``) is future
work; see README.
"""

import errno
import fcntl
import os
import struct

KVMIO = 0xAE


def _io(nr):
    return (KVMIO << 8) | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_STATS_FD = _io(0xCE)

# KVM_CAP_* numbers (include/uapi/linux/kvm.h)
CAPS = {
    "NR_VCPUS": 9, "NR_MEMSLOTS": 10, "SYNC_MMU": 16, "READONLY_MEM": 81, "MAX_VCPUS": 66,
    "MANUAL_DIRTY_LOG_PROTECT2": 168, "DIRTY_LOG_RING": 192, "BINARY_STATS_FD": 203,
}
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
        info["api_version"] = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
        if info["api_version"] != 12:
            info["reason"] = f"unexpected KVM API version {info['api_version']}"
            return info
        info["caps"] = {name: fcntl.ioctl(kvm, KVM_CHECK_EXTENSION, nr) for name, nr in CAPS.items()}
        try:
            vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        except OSError as e:
            info["reason"] = f"KVM_CREATE_VM failed: {os.strerror(e.errno)}"
            return info
        os.close(vm)
        info["available"] = True
        return info
    finally:
        os.close(kvm)


class VmStats:
    """Binary statistics of a VM or vCPU file descriptor, by KVM's names (``read()`` -> dict)."""

    def __init__(self, obj_fd):
        try:
            self.fd = fcntl.ioctl(obj_fd, KVM_GET_STATS_FD, 0)
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
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
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
