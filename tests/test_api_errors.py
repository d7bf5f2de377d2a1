"""Bad inputs raise BatchMMUError (a ValueError) that names the argument at fault."""

import time

import numpy as np
import pytest

import batchmmu as bm


def _check(ei, field):
    e = ei.value
    assert isinstance(e, bm.BatchMMUError) and isinstance(e, ValueError)
    assert e.field == field
    assert field in str(e)


@pytest.mark.nojit
@pytest.mark.parametrize("kw,field", [
    (dict(memory="lots"), "memory"),
    (dict(memory="12 parsecs"), "memory"),
    (dict(memory=-1), "memory"),
    (dict(memory=0), "memory"),
    (dict(backing="x"), "backing"),
    (dict(tdp_huge_page_level=4), "tdp_huge_page_level"),
])
def test_host_bad_arguments(kw, field):
    with pytest.raises(bm.BatchMMUError) as ei:
        bm.Host(**kw)
    _check(ei, field)


@pytest.mark.nojit
@pytest.mark.parametrize("args,kw,field", [
    ((0,), {}, "count"),
    ((-3,), {}, "count"),
    ((1.5,), {}, "count"),
    ((True,), {}, "count"),
    ((1,), dict(tdp_levels=3), "tdp_levels"),
    ((1,), dict(tdp_format="x"), "tdp_format"),
    ((1,), dict(mmu="foo"), "mmu"),
    ((1,), dict(backing="x"), "backing"),
    ((1,), dict(memory="lots"), "memory"),
    ((1,), dict(memory=4097), "memory"),
    ((1,), dict(vcpus=0), "vcpus"),
    ((1,), dict(maxphyaddr=60), "maxphyaddr"),
    ((1,), dict(tdp_format="npt", ept_ad=False), "ept_ad"),
])
def test_create_vms_bad_arguments(args, kw, field):
    h = bm.Host(memory="1GiB")
    with pytest.raises(bm.BatchMMUError) as ei:
        h.create_vms(*args, **kw)
    _check(ei, field)
    assert h.stats()["pf_taken"].shape == (0,)                # no VM was half-created


@pytest.fixture
def host_vm():
    h = bm.Host(memory="1GiB", backing="4k")
    vms = h.create_vms(2, memory="16MiB", vcpus=2, maxphyaddr=40)
    return h, int(vms[0])


@pytest.mark.nojit
@pytest.mark.parametrize("vm,vcpu,addr,kind,field", [
    (2, 0, 0, 0, "vm"),
    (-1, 0, 0, 0, "vm"),
    ([0, 1, 5], 0, 0, 0, "vm"),
    (0, 2, 0, 0, "vcpu"),
    (0, -1, 0, 0, "vcpu"),
    (0, [0, 1, 7], 0, 0, "vcpu"),
    (0, 0, 1 << 40, 0, "addr"),                 # maxphyaddr 40: gpa bits 40+ do not exist
    (0, 0, -4096, 0, "addr"),
    (0, 0, [0, 4096, (1 << 40) + 4096], 0, "addr"),
    (0, 0, 0, 0x1, "kind"),                      # PFERR_PRESENT is not an access kind
    (0, 0, 0, 0x8, "kind"),
    (0, 0, 0, 0x20, "kind"),
    (0, 0, 0, bm.ACC_WRITE | bm.ACC_FETCH, "kind"),
    (0, 0, [0, 4096, 8192], [0, 0], "kind"),     # mismatched lengths
    (0, [0, 1], [0, 4096, 8192], 0, "vcpu"),
    (0, 0, 0.5, 0, "addr"),
    (0, 0, "0x1000", 0, "addr"),
])
def test_access_bad_arguments(host_vm, vm, vcpu, addr, kind, field):
    h, _ = host_vm
    before = h.stats()
    with pytest.raises(bm.BatchMMUError) as ei:
        h.access(vm, vcpu, addr, kind)
    _check(ei, field)
    after = h.stats()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])    # nothing was applied


@pytest.mark.nojit
def test_access_edges_accepted(host_vm):
    h, vm = host_vm
    r = h.access(vm, 1, (1 << 40) - 8, bm.ACC_WRITE | bm.ACC_USER)
    assert r.outcome[0] == bm.MMIO
    e = np.zeros(0, np.int64)
    r = h.access(e, e, e, e)
    assert r.outcome.shape == (0,) and r.error_code.shape == (0,)


@pytest.mark.nojit
@pytest.mark.parametrize("kw,field", [
    (dict(slot="1", gpa=0, size=4096), "slot"),
    (dict(slot=1, gpa=None, size=4096), "gpa"),
    (dict(slot=1, gpa=1 << 30, size="lots"), "size"),
    (dict(slot=1, gpa=1 << 30, size=4096, flags=1.0), "flags"),
    (dict(slot=1, gpa=1 << 30, size=4096, hva="x"), "hva"),
    (dict(slot=1, gpa=1 << 30, size=4096, backing="x"), "backing"),
])
def test_set_memslot_bad_types(host_vm, kw, field):
    h, vm = host_vm
    with pytest.raises(bm.BatchMMUError) as ei:
        h.set_memslot(vm, **kw)
    _check(ei, field)


@pytest.mark.nojit
def test_vm_argument_checked_everywhere(host_vm):
    h, _ = host_vm
    for call in (lambda: h.set_memslot(9, 1, 0, 4096), lambda: h.stats(9), lambda: h.get_dirty_log(9, 0),
                 lambda: h.memslots(9), lambda: h.memslots_generation(9), lambda: h.spte_dump(9)):
        with pytest.raises(bm.BatchMMUError) as ei:
            call()
        _check(ei, "vm")


def test_ten_thousand_vms_in_one_call():
    h = bm.Host(memory="64GiB", backing="thp")
    t = time.perf_counter()
    vms = h.create_vms(10_000, memory="16MiB")
    assert time.perf_counter() - t < 5.0
    assert len(vms) == 10_000 and list(vms[:3]) == [0, 1, 2] and int(vms[-1]) == 9_999
    s = h.stats()
    assert all(a.shape == (10_000,) for a in s.values())
    assert set(s) >= {"pages_4k", "pages_2m", "pf_taken", "pf_fixed", "walk_refs", "mmu_pages"}
    # they work: one access in a few of them, at both ends of the id range
    r = h.access([0, 5_000, 9_999], 0, 0x1000, 0)
    assert list(r.outcome) == [bm.FIXED] * 3
    assert int(h.stats()["pf_fixed"].sum()) == 3


@pytest.mark.nojit
def test_empty_batches_are_fine():
    h = bm.Host(memory="1GiB")
    h.create_vms(1, memory="4MiB")
    for r in (h.access([], [], [], []), h.store([], [], [], [])):
        assert r.outcome.size == 0 and r.error_code.size == 0
    assert h.stats(0)["accesses"] == 0
