"""Regression tests for the public-API input defects of issue 15 (items 2, 3, 11-14, 16-18)."""

import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from apifuzz import CR0, CR4, EFER, build, same, snapshot

import batchmmu as bm

MiB = 1 << 20


def refused(call, field, err=None):
    with pytest.raises(bm.BatchMMUError) as ei:
        call()
    assert ei.value.field == field, ei.value
    if err is not None:
        assert ei.value.errno == err, ei.value
    return ei.value


@pytest.fixture
def host():
    return build()


# ---------------------------------------------------------------- item 2: numpy ints range-checked exactly
@pytest.mark.nojit
def test_numpy_hva_does_not_wrap():
    h = bm.Host(memory="1GiB")
    vm = int(h.create_vms(1, memory="4MiB")[0])
    for hva in (2 ** 63 - 8192, np.int64(2 ** 63 - 8192), np.uint64(2 ** 64 - 4096)):
        refused(lambda hva=hva: h.set_memslot(vm, 1, 1 << 30, 8192, flags=bm.MEM_READONLY, hva=hva), "hva",
                errno.EINVAL)
    assert [m["slot"] for m in h.memslots(vm)] == [0]
    # numpy ints of any width that are in range are fine, and end up as Python ints
    h.set_memslot(np.int8(vm), np.uint16(1), np.int64(1 << 30), np.int32(8192), flags=np.uint64(bm.MEM_READONLY),
                  hva=np.uint64(1 << 41))
    m = h.memslots(vm)[1]
    assert (m["gpa"], m["size"], m["hva"], m["flags"]) == (1 << 30, 8192, 1 << 41, bm.MEM_READONLY)


# ---------------------------------------------------------------- item 3: small numpy ints do not overflow
def test_int8_counts_do_not_wrap():
    h = bm.Host(memory="1GiB")
    vms = h.create_vms(np.int8(100), memory="4MiB", vcpus=np.int8(100))
    assert len(vms) == 100 and int(h._vcpus[99]) == 100
    assert int(h.vt.vcpu_off[99]) == 99 * 100                       # not 100*100 wrapped in int8
    r = h.access(99, 99, 0x1000, bm.ACC_WRITE)
    assert r.outcome[0] == bm.FIXED
    h.set_memslot(99, 1, 1 << 30, 2 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)
    h.access(99, 99, (1 << 30) + 0x2000, bm.ACC_WRITE)
    assert h.get_dirty_log(99, 1)[0] == 1 << 2


# ---------------------------------------------------------------- item 11: validate everything, then act
def test_no_state_change_before_raising(host):
    before = snapshot(host)
    refused(lambda: host.write_guest_memory(0, np.int64(2 ** 63 - 8), [1]), "gpa")
    refused(lambda: host.write_guest_memory(0, 0x1000, np.ones((2, 2), np.int64)), "words")
    refused(lambda: host.write_guest_memory(0, 0x1000, [1, 1.5]), "words")
    refused(lambda: host.harvest_dirty_ring(0, 0), "vm", errno.EINVAL)
    assert same(before, snapshot(host))


def test_harvest_without_ring_leaves_pml_buffers():
    h = bm.Host(memory="1GiB", pml=True)
    vm = int(h.create_vms(1, memory="4MiB")[0])
    h.access(vm, 0, 0x1000, bm.ACC_WRITE)
    h.set_memslot(vm, 0, 0, 4 * MiB, flags=bm.MEM_LOG_DIRTY_PAGES)   # D bits cleared
    h.access(vm, 0, 0x1000, bm.ACC_WRITE)                  # the CPU sets D: a PML entry
    logged = int(h.ct.pml_count[0])
    assert logged > 0
    refused(lambda: h.harvest_dirty_ring(vm, 0), "vm", errno.EINVAL)
    assert int(h.ct.pml_count[0]) == logged                           # not flushed by a refused call


# ---------------------------------------------------------------- item 12: time
@pytest.mark.nojit
def test_advance_time_refuses_inf_and_nan_and_returns_for_long_spans():
    h = bm.Host(memory="1GiB", nx_huge_pages=True, nx_huge_pages_recovery_ratio=60)
    for v in (float("inf"), float("nan"), -1.0, "5", None, True, 1e300):
        refused(lambda v=v: h.advance_time(v), "seconds")
    assert h.time_ms == 0.0 and h._nx_next_ms is None
    t = time.perf_counter()
    passes = h.advance_time(1e9)                   # ~31 years: 1.8e7 recovery periods of 60 s
    assert time.perf_counter() - t < 1.0
    assert passes == int(1e9 // 60)
    assert h.advance_time(60) == 1


# ---------------------------------------------------------------- item 14: refuse before allocating
@pytest.mark.nojit
def test_create_vms_estimates_before_allocating():
    h = bm.Host(memory="1GiB")
    cap = h.vt.root.shape[0]
    t = time.perf_counter()
    e = refused(lambda: h.create_vms(10 ** 9), "count", errno.ENOMEM)
    assert "GiB" in str(e) or "TiB" in str(e)
    refused(lambda: h.create_vms(10 ** 12, memory="4KiB"), "count", errno.ENOMEM)
    assert time.perf_counter() - t < 1.0
    assert h.nvm == 0 and h.vt.root.shape[0] == cap


@pytest.mark.nojit
def test_huge_memslot_refused_with_the_figure(monkeypatch):
    h = bm.Host(memory="1GiB")
    vm = int(h.create_vms(1, memory="4MiB")[0])
    monkeypatch.setenv("BATCHMMU_MAX_BYTES", str(64 * MiB))
    e = refused(lambda: h.set_memslot(vm, 1, 1 << 40, 4 << 40), "size", errno.ENOMEM)
    assert "64 MiB" in str(e)
    refused(lambda: h.create_vms(1, memory="1TiB"), "count", errno.ENOMEM)
    refused(lambda: h.reserve_tables(1 << 20), "rows", errno.ENOMEM)
    assert [m["slot"] for m in h.memslots(vm)] == [0] and h.nvm == 1
    refused(lambda: h.set_memslot(vm, 1, 0, 1 << 43), "size", errno.EINVAL)  # > KVM_MEM_MAX_NR_PAGES


# ---------------------------------------------------------------- item 16: only BatchMMUError escapes
@pytest.mark.parametrize("call,field", [
    (lambda h: h.age_hva_range(0, "0", 1 << 41), "start"),
    (lambda h: h.age_hva_range(0, 1 << 40, 1.5e12), "end"),
    (lambda h: h.test_young(0, None, 1 << 41), "start"),
    (lambda h: h.test_young(0, 1 << 40, 2 ** 64), "end"),
    (lambda h: h.invlpg(3, 0, 1.0), "gva"),
    (lambda h: h.invlpg(3, 0, "0"), "gva"),
    (lambda h: h.invlpg(3, 0, None), "gva"),
    (lambda h: h.invlpg(3, 0, 2 ** 63), "gva"),
    (lambda h: h.invlpg(3, 0, -4096), "gva"),
    (lambda h: h.emulated_access(3, 0, 2.0), "addr"),
    (lambda h: h.emulated_access(3, 0, -8), "addr"),
    (lambda h: h.emulated_access(3, 0, 2 ** 63), "addr"),
    (lambda h: h.emulated_access(3, 0, 0x1000, value=-2 ** 64), "value"),
    (lambda h: h.read_guest_memory(0, 1 << 60, 1), "gpa"),
    (lambda h: h.read_guest_memory(0, 0, 2 ** 62), "n"),
    (lambda h: h.reserve_tables(2 ** 40), "rows"),
    (lambda h: h.set_nr_mmu_pages(3, 2 ** 63), "n"),
    (lambda h: h.shrink(2 ** 63), "nr_to_scan"),
    (lambda h: h.create_vms(count=10 ** 12), "count"),
    (lambda h: h.set_memslot(0, 5, np.int32(1 << 30), 4096, flags=np.uint64(1 << 63)), "flags"),
    (lambda h: h.access(0, 0, [[0, 4096], [8192]]), "addr"),
    (lambda h: h.access(0, 0, [0, float("nan")]), "addr"),
    (lambda h: h.access(0, 0, float("inf")), "addr"),
    (lambda h: h.host_pages(0, [0]), "slot"),
    (lambda h: h.clear_dirty_log(1, 1, 0, 64, [1.5]), "bitmap"),
    (lambda h: h.get_dirty_log(0, 1.0), "slot"),
])
def test_only_batchmmu_errors_escape(host, call, field):
    before = snapshot(host)
    refused(lambda: call(host), field)
    assert same(before, snapshot(host))


# ---------------------------------------------------------------- item 17: no nonsense accepted silently
def test_nonsense_refused(host):
    before = snapshot(host)
    refused(lambda: host.store(0, 0, 0x1000, 1.5), "value")
    refused(lambda: host.store(0, 0, 0x1000, "12"), "value")
    refused(lambda: host.write_guest_memory(0, 0x1000, ["12"]), "words")
    refused(lambda: host.enable_manual_dirty_log_protect(0, initially_set="no"), "initially_set")
    refused(lambda: host.create_vms(1, memory="4MiB", ept_ad="no"), "ept_ad")
    refused(lambda: host.reserve_tables(np.uint64(2 ** 64 - 1)), "rows")
    refused(lambda: host.access(0, 0, 4096.0), "addr")
    assert same(before, snapshot(host))


def test_non_canonical_gvas_refused(host):
    """A non-canonical address is a #GP, not a page fault: refused naming the address; INVLPG of one is
    a NOP (the SDM; kvm_mmu_invalidate_addr), counted as an INVLPG on the shadow MMU.  gvas are given in
    their 48-bit form (bit 47 set: the upper half), so any bit above 47 makes one non-canonical."""
    before = snapshot(host)
    for vm, vcpu in ((3, 0), (0, 1)):                       # shadow, and a 2D-walking TDP vCPU
        for gva in (1 << 48, (1 << 48) + 0x1000, 1 << 62):
            e = refused(lambda vm=vm, vcpu=vcpu, gva=gva: host.access(vm, vcpu, gva), "addr")
            assert "#GP" in str(e)
            refused(lambda vm=vm, vcpu=vcpu, gva=gva: host.store(vm, vcpu, gva, 1), "addr")
    refused(lambda: host.access([3, 3], 0, [0x1000, 1 << 48]), "addr")
    refused(lambda: host.emulated_access(3, 0, 1 << 48), "addr")
    assert same(before, snapshot(host))
    # the same 4 KiB page through its canonical address works
    assert host.access(3, 0, 0x1000).outcome[0] in (bm.HIT, bm.FIXED)
    n = host.stats(3)["invlpg"]
    host.invlpg(3, 0, 1 << 48)
    assert host.stats(3)["invlpg"] == n + 1


# ---------------------------------------------------------------- item 18: KVM_SET_SREGS validity
@pytest.mark.nojit
@pytest.mark.parametrize("regs,field", [
    (dict(cr0=0x80000000), "cr0"),                         # PG without PE
    (dict(cr0=(1 << 32) | 0x11), "cr0"),                   # bits 63:32
    (dict(cr0=0x20000011), "cr0"),                         # NW without CD
    (dict(cr4=1 << 14), "cr4"),                            # SMXE: reserved for guests
    (dict(cr4=1 << 15), "cr4"),
    (dict(cr4=1 << 40), "cr4"),
    (dict(cr0=CR0, cr4=CR4, efer=EFER, cr3=1 << 46), "cr3"),       # beyond MAXPHYADDR in long mode
    (dict(cr0=CR0, cr4=0, efer=EFER, cr3=0x10000), "cr4"),        # long mode without PAE
    (dict(cr0=CR0, cr4=CR4, efer=0x100, cr3=0x10000), "efer"),    # LME+PG without LMA
    (dict(efer=0x400), "efer"),                                    # LMA outside long mode
    (dict(pkru=1 << 32), "pkru"),
])
def test_set_sregs_einval(regs, field):
    h = bm.Host(memory="1GiB")
    vm = int(h.create_vms(1, memory="4MiB", maxphyaddr=46)[0])
    old = h.vcpu_regs(vm, 0)
    refused(lambda: h.set_vcpu_regs(vm, 0, **regs), field, errno.EINVAL if field != "pkru" else None)
    assert h.vcpu_regs(vm, 0) == old
    h.set_vcpu_regs(vm, 0, cr0=CR0, cr4=CR4, efer=EFER, cr3=(1 << 46) - 4096)   # the legal edge


# ---------------------------------------------------------------- item 13: per-VM calls see one VM's slots
@pytest.mark.nojit
def test_slot_index_per_vm():
    h = bm.Host(memory="1GiB")
    h.create_vms(3, memory="4MiB")
    h.set_memslot(1, 7, 1 << 30, 4096)
    h.set_memslot(1, 3, 2 << 30, 4096)
    assert [s for s, _ in h._slot_rec.of_vm(1)] == [0, 3, 7]
    assert [s for s, _ in h._slot_rec.of_vm(2)] == [0]
    h.set_memslot(1, 3, 2 << 30, 0)
    assert [m["slot"] for m in h.memslots(1)] == [0, 7]
    assert sorted(h._slot_rec) == [(0, 0), (1, 0), (1, 7), (2, 0)]


# ---------------------------------------------------------------- debug mode: kernels with bounds checks
def test_boundscheck_mode_catches_out_of_bounds():
    code = (
        "import numpy as np, numba, batchmmu.kernels as K\n"
        "from batchmmu.kernels.events import validate_events\n"
        "assert numba.config.BOUNDSCHECK == 1 and K.CACHE_DIR.name.endswith('-boundscheck'), K.CACHE_DIR\n"
        "z = np.zeros(1, np.int64)\n"
        "try:\n"
        "    validate_events(z, z, z, z, 5, np.zeros(0, np.int64), z, 0, 0, 0)\n"   # vcpus[0] past the end
        "except IndexError:\n"
        "    print('IndexError')\n")
    env = dict(os.environ, BATCHMMU_BOUNDSCHECK="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "IndexError"
