"""SPTE layout against KVM's spte.h / spte.c / vmx.h (x86-64, EPT with exec-only, NPT).

Expected values are written out bit by bit from KVM, not computed with the module's
own masks: EPT R0 W1 X2 MT3-5 IPAT6 PS7 A8 D9 UX10, NPT P0 W1 U2 PWT3 PCD4 A5 D6 PS7
G8, KVM software bits MMU-present 11, A/D type 52-53, EPT saved R/X 54/56, EPT
host-/MMU-writable 57/58 (NPT 9/10), EPT suppress-#VE 63 / NPT NX 63, PFN 12-51.
"""

import numpy as np
import pytest
from batchmmu.kernels import spte as S
from conftest import GiB, MiB, bit_range, bits, leaf, one, s64, u64

import batchmmu as bm

ACC_ALL = 7
MT_WB_IPAT = (6 << 3) | bits(6)          # vmx_get_mt_mask: WB << 3 | IPAT (guest PAT ignored)
EPT_SVE = bits(63)                       # shadow_present_mask = SUPPRESS_VE (exec-only supported)
EPT_MMIO_VALUE = 0b110                   # VMX_EPT_MISCONFIG_WX_VALUE
EPT_MMIO_MASK = 0b111 | bits(63)         # VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT
NPT_MMIO_VALUE = bits(51, 0)             # BIT(51) | PT_PRESENT_MASK (host MAXPHYADDR < 52)
NPT_MMIO_ACCESS = bits(1, 2)             # ACC_WRITE_MASK | ACC_USER_MASK
SPTE_MMIO_ALLOWED_MASK = bits(63) | bit_range(12, 51) | bit_range(0, 2)
FROZEN_SPTE = bits(63) | 0x5A0           # SHADOW_NONPRESENT_VALUE | 0x5a0
MMIO_GEN_LOW = bit_range(3, 10)
MMIO_GEN_HIGH = bit_range(52, 62)

EPT_LAYOUT = {
    "R": bits(0), "W": bits(1), "X": bits(2), "MT": bit_range(3, 5), "IPAT": bits(6), "PS": bits(7),
    "A": bits(8), "D": bits(9), "UX": bits(10), "MMU_PRESENT": bits(11), "PFN": bit_range(12, 51),
    "AD_TYPE": bit_range(52, 53), "SAVED_R": bits(54), "SAVED_X": bits(56), "HOST_WRITABLE": bits(57),
    "MMU_WRITABLE": bits(58), "SUPPRESS_VE": bits(63),
}
NPT_LAYOUT = {
    "P": bits(0), "W": bits(1), "U": bits(2), "PWT": bits(3), "PCD": bits(4), "A": bits(5), "D": bits(6),
    "PS": bits(7), "G": bits(8), "HOST_WRITABLE": bits(9), "MMU_WRITABLE": bits(10), "MMU_PRESENT": bits(11),
    "PFN": bit_range(12, 51), "AD_TYPE": bit_range(52, 53), "NX": bits(63),
}


# ----------------------------------------------------------------------------- masks
@pytest.mark.nojit
@pytest.mark.parametrize("masks,layout", [(S.EPT_HW_MASKS, EPT_LAYOUT), (S.NPT_HW_MASKS, NPT_LAYOUT)],
                         ids=["ept", "npt"])
def test_hw_masks_are_kvms_layout_and_disjoint(masks, layout):
    got = {k: u64(v) for k, v in masks.items()}
    assert got == layout
    names = list(got)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert got[a] & got[b] == 0, f"{a} overlaps {b}"


@pytest.mark.nojit
def test_mmio_generation_masks_do_not_collide():
    low, high = u64(S.MMIO_SPTE_GEN_LOW_MASK), u64(S.MMIO_SPTE_GEN_HIGH_MASK)
    assert low == MMIO_GEN_LOW and high == MMIO_GEN_HIGH
    assert {k: u64(v) for k, v in S.MMIO_GEN_MASKS.items()} == {"GEN_LOW": low, "GEN_HIGH": high}
    gen = low | high
    assert bin(gen).count("1") == 19 == bin(u64(S.MMIO_SPTE_GEN_MASK)).count("1")
    # static_assert(!(SPTE_MMIO_ALLOWED_MASK & (SPTE_MMU_PRESENT_MASK | MMIO_SPTE_GEN_LOW_MASK |
    #                                           MMIO_SPTE_GEN_HIGH_MASK)))
    assert SPTE_MMIO_ALLOWED_MASK & (bits(11) | gen) == 0
    assert gen & bits(11) == 0, "an MMIO SPTE must never look shadow-present"
    for fmt, value, mask, access in ((S.FMT_EPT, EPT_MMIO_VALUE, EPT_MMIO_MASK, 0),
                                     (S.FMT_NPT, NPT_MMIO_VALUE, NPT_MMIO_VALUE, NPT_MMIO_ACCESS)):
        assert u64(S.shadow_mmio_value(fmt)) == value
        assert u64(S.shadow_mmio_mask(fmt)) == mask
        assert u64(S.shadow_mmio_access_mask(fmt)) == access
        assert mask & ~SPTE_MMIO_ALLOWED_MASK == 0        # kvm_mmu_set_mmio_spte_mask WARN
        assert value & mask == value                        # "must obviously match itself"
        assert (value | mask | access) & gen == 0
        assert access & mask == 0
        # the gfn field of an MMIO SPTE (bits 12..50) is clear of generation and value bits
        assert bit_range(12, 50) & (gen | mask) == 0


@pytest.mark.nojit
@pytest.mark.parametrize("fmt", [S.FMT_EPT, S.FMT_NPT], ids=["ept", "npt"])
def test_frozen_and_nonpresent_values_are_neither_present_nor_mmio(fmt):
    assert u64(S.FROZEN_SPTE) == FROZEN_SPTE
    assert u64(S.SHADOW_NONPRESENT_VALUE) == bits(63)
    for v in (S.FROZEN_SPTE, S.SHADOW_NONPRESENT_VALUE):
        assert not S.is_shadow_present_pte(v)
        # WARN_ON(mmio_value && (FROZEN_SPTE & mmio_mask) == mmio_value) must not fire
        assert (u64(v) & u64(S.shadow_mmio_mask(fmt))) != u64(S.shadow_mmio_value(fmt))
        assert not S.is_mmio_spte(fmt, v, True)


# ----------------------------------------------------------------------------- MMIO generation
@pytest.mark.nojit
@pytest.mark.parametrize("bit", range(19))
def test_mmio_generation_round_trip_each_bit(bit):
    gen = 1 << bit
    m = u64(S.generation_mmio_spte_mask(np.int64(gen)))
    # gen bits 0-7 -> spte bits 3-10, gen bits 8-18 -> spte bits 52-62
    assert m == bits(3 + bit if bit < 8 else 52 + bit - 8)
    assert int(S.get_mmio_spte_generation(s64(m))) == gen


@pytest.mark.nojit
def test_mmio_generation_round_trip_all_bits_and_others_ignored():
    full = (1 << 19) - 1
    m = u64(S.generation_mmio_spte_mask(np.int64(full)))
    assert m == MMIO_GEN_LOW | MMIO_GEN_HIGH
    assert int(S.get_mmio_spte_generation(s64(m))) == full
    rng = np.random.default_rng(7)
    for gen in rng.integers(0, 1 << 19, 64):
        m = u64(S.generation_mmio_spte_mask(np.int64(gen)))
        # value, access and gfn bits around it do not leak into the generation
        spte = m | EPT_MMIO_VALUE | NPT_MMIO_VALUE | NPT_MMIO_ACCESS | (0x7FFFFFFFF << 12)
        assert int(S.get_mmio_spte_generation(s64(spte))) == int(gen)


def _gen_bits(gen):
    return ((gen & 0xFF) << 3) | (((gen >> 8) & 0x7FF) << 52)


@pytest.mark.nojit
def test_make_mmio_spte_ept():
    gen, gfn = 0x5A5A5, 0xABCDE
    spte = u64(S.make_mmio_spte(S.FMT_EPT, np.int64(gfn), ACC_ALL, np.int64(gen)))
    # EPT: W|X without R (misconfiguration), access not stored (shadow_mmio_access_mask = 0)
    assert spte == _gen_bits(gen) | 0b110 | (gfn << 12)
    assert S.is_mmio_spte(S.FMT_EPT, s64(spte), True)
    assert not S.is_mmio_spte(S.FMT_EPT, s64(spte), False)
    assert not S.is_shadow_present_pte(s64(spte))
    assert S.hw_rsvd_fault(S.FMT_EPT, s64(spte))
    assert int(S.get_mmio_spte_generation(s64(spte))) == gen


@pytest.mark.nojit
def test_make_mmio_spte_npt():
    gen, gfn = 0x7FFFF, 0x12345
    spte = u64(S.make_mmio_spte(S.FMT_NPT, np.int64(gfn), ACC_ALL, np.int64(gen)))
    # NPT: P + reserved PA bit 51, and the access (W|U of ACC_ALL) kept in bits 1-2
    assert spte == _gen_bits(gen) | bits(51, 0) | bits(1, 2) | (gfn << 12)
    assert S.is_mmio_spte(S.FMT_NPT, s64(spte), True)
    assert not S.is_shadow_present_pte(s64(spte))
    assert S.hw_rsvd_fault(S.FMT_NPT, s64(spte))
    # read-only access: only U is kept
    spte_ro = u64(S.make_mmio_spte(S.FMT_NPT, np.int64(gfn), 5, np.int64(gen)))
    assert spte_ro == _gen_bits(gen) | bits(51, 0) | bits(2) | (gfn << 12)


@pytest.mark.nojit
@pytest.mark.parametrize("fmt", [S.FMT_EPT, S.FMT_NPT], ids=["ept", "npt"])
def test_get_mmio_spte_gfn_recovers_gfn(fmt):
    # get_mmio_spte_gfn: (spte & lower_gfn_mask) >> PAGE_SHIFT (no L1TF relocation here)
    for gfn in (0, 1, 0xABCDE, (1 << 34) - 1):
        spte = S.make_mmio_spte(fmt, np.int64(gfn), ACC_ALL, np.int64(0x7FFFF))
        assert int(S.get_mmio_spte_gfn(spte)) == gfn


@pytest.mark.nojit
def test_make_mmio_spte_keeps_only_19_generation_bits():
    # memslots->generation & MMIO_SPTE_GEN_MASK: the update-in-progress bit 63 and bits >= 19 drop out
    gen = 0x2B3C5
    noisy = s64(gen | (1 << 63) | (1 << 40) | (1 << 19))
    for fmt in (S.FMT_EPT, S.FMT_NPT):
        a = u64(S.make_mmio_spte(fmt, np.int64(0x42), ACC_ALL, noisy))
        b = u64(S.make_mmio_spte(fmt, np.int64(0x42), ACC_ALL, np.int64(gen)))
        assert a == b
        assert int(S.get_mmio_spte_generation(s64(a))) == gen


# ----------------------------------------------------------------------------- leaf SPTEs
PFN_4K = 0x12345
PFN_2M = 0x12200


def _leaf(fmt, level, pfn, host_writable=True, ad_disabled=False, nx=False, access=ACC_ALL):
    return u64(S.make_leaf_spte(fmt, level, access, np.int64(pfn), host_writable, ad_disabled, nx))


@pytest.mark.nojit
def test_leaf_ept_4k_writable():
    # MMU-present | SVE | A | X | R(user) | WB|IPAT | host-writable | W | MMU-writable | D (pre-set)
    expect = bits(11, 63, 8, 2, 0) | MT_WB_IPAT | bits(57) | bits(1, 58, 9) | (PFN_4K << 12)
    assert _leaf(S.FMT_EPT, 1, PFN_4K) == expect
    assert expect & 0xFFF == 0xB77


@pytest.mark.nojit
def test_leaf_npt_2m_writable():
    # MMU-present | P | A | U | PS | host-writable | W | MMU-writable | D; no NX (exec allowed)
    expect = bits(11, 0, 5, 2, 7, 9, 1, 10, 6) | (PFN_2M << 12)
    assert _leaf(S.FMT_NPT, 2, PFN_2M) == expect
    assert expect & 0xFFF == 0xEE7


@pytest.mark.nojit
def test_leaf_huge_is_nx_with_nx_huge_pages():
    # make_spte strips ACC_EXEC at level > 4K when the iTLB multihit mitigation is on
    npt = _leaf(S.FMT_NPT, 2, PFN_2M, nx=True)
    assert npt == bits(11, 0, 5, 2, 7, 9, 1, 10, 6, 63) | (PFN_2M << 12)
    ept = _leaf(S.FMT_EPT, 2, PFN_2M, nx=True)
    assert ept == bits(11, 63, 8, 0, 7) | MT_WB_IPAT | bits(57, 1, 58, 9) | (PFN_2M << 12)
    # 4K pages keep exec even with the mitigation
    assert _leaf(S.FMT_EPT, 1, PFN_4K, nx=True) == _leaf(S.FMT_EPT, 1, PFN_4K)


@pytest.mark.nojit
def test_leaf_readonly_slot_has_no_write_bits():
    # host_writable = false (READONLY slot): no host-writable, no W, no MMU-writable, no D
    ept = _leaf(S.FMT_EPT, 1, PFN_4K, host_writable=False)
    assert ept == bits(11, 63, 8, 2, 0) | MT_WB_IPAT | (PFN_4K << 12)
    assert ept & 0xFFF == 0x975
    npt = _leaf(S.FMT_NPT, 1, PFN_4K, host_writable=False)
    assert npt == bits(11, 0, 5, 2) | (PFN_4K << 12)


@pytest.mark.nojit
def test_leaf_ept_ad_disabled_type_and_permissions():
    spte = _leaf(S.FMT_EPT, 1, PFN_4K, ad_disabled=True)
    assert (spte >> 52) & 3 == 1                       # SPTE_TDP_AD_DISABLED
    assert spte & 0b111 == 0b111                       # R W X
    assert spte & bits(57, 58, 63, 11) == bits(57, 58, 63, 11)
    assert spte & bits(54, 56) == 0                    # not access-tracked
    assert spte & bit_range(3, 6) == MT_WB_IPAT
    assert spte & bit_range(12, 51) == PFN_4K << 12
    assert not S.is_access_track_spte(S.FMT_EPT, s64(spte))


def test_leaf_ept_ad_disabled_exact_v6_18():
    # Recent kernels (the 6.18 oracle kernel; older ones set the masks to 0): kvm_mmu_set_ept_masks
    # sets shadow_accessed_mask = bit 8 and shadow_dirty_mask = bit 9 even without EPT A/D
    # (kvm_ad_enabled = false), and make_spte ORs them in unconditionally: "if (!prefetch ||
    # synchronizing) spte |= shadow_accessed_mask"; a writable SPTE gets "PT_WRITABLE_MASK |
    # shadow_mmu_writable_mask | shadow_dirty_mask".  The CPU ignores bits 8/9 when EPTP A/D is off;
    # the AD type field (bits 52-53 = 01) marks the SPTE.
    expect = bits(11, 52, 63, 8, 2, 0) | MT_WB_IPAT | bits(57, 1, 58, 9) | (PFN_4K << 12)
    assert _leaf(S.FMT_EPT, 1, PFN_4K, ad_disabled=True) == expect


@pytest.mark.nojit
@pytest.mark.parametrize("fmt,ad_disabled,expect_low", [
    (S.FMT_EPT, False, bits(11, 63, 1, 0, 2, 8)),          # present(SVE)|W|R(user)|X|A
    (S.FMT_EPT, True, bits(11, 63, 1, 0, 2, 52)),          # AD_DISABLED instead of A
    (S.FMT_NPT, False, bits(11, 0, 1, 2, 5)),              # P|W|U|A, no NX
], ids=["ept", "ept-ad-disabled", "npt"])
def test_nonleaf_spte_grants_everything(fmt, ad_disabled, expect_low):
    row = 5
    spte = u64(S.make_nonleaf_spte(fmt, row, ad_disabled))
    assert spte & ~bit_range(12, 51) == expect_low
    assert int(S.spte_to_child_row(s64(spte))) == row
    assert not S.is_large_pte(s64(spte))


# ----------------------------------------------------------------------------- end to end
def _slot_pfn(host, vm, slot, gfn):
    s = next(m for m in host.memslots(vm) if m["slot"] == slot)
    return (s["hva"] + ((gfn << 12) - s["gpa"])) >> 12


@pytest.mark.nojit
def test_fault_installs_ept_4k_writable_spte():
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="16MiB")[0])
    assert one(h, vm, 0x5000, bm.ACC_WRITE)[0] == bm.FIXED
    level, spte = leaf(h, vm, 5)
    assert level == 1
    assert spte & ~bit_range(12, 51) == bits(11, 63, 8, 2, 0) | MT_WB_IPAT | bits(57, 1, 58, 9)
    assert (spte >> 12) & ((1 << 40) - 1) == _slot_pfn(h, vm, 0, 5)


@pytest.mark.nojit
def test_fault_installs_npt_2m_spte():
    h = bm.Host(memory="1GiB", backing="thp")
    vm = int(h.create_vms(1, memory="8MiB", tdp_format="npt")[0])
    assert one(h, vm, 0x203000)[0] == bm.FIXED          # a read inside the second 2M page
    level, spte = leaf(h, vm, 0x203)
    assert level == 2
    assert spte & ~bit_range(12, 51) == bits(11, 0, 5, 2, 7, 9, 1, 10, 6)
    pfn = (spte >> 12) & ((1 << 40) - 1)
    assert pfn % 512 == 0                              # huge PFN aligned (pfn &= ~(pages - 1))
    assert pfn == _slot_pfn(h, vm, 0, 0x200)


@pytest.mark.parametrize("fmt,expect", [
    ("ept", bits(11, 63, 8, 2, 0) | MT_WB_IPAT),
    ("npt", bits(11, 0, 5, 2)),
])
def test_fault_installs_readonly_slot_spte(fmt, expect):
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="16MiB", tdp_format=fmt)[0])
    h.set_memslot(vm, 1, GiB, 2 * MiB, flags=bm.MEM_READONLY)
    assert one(h, vm, GiB + 0x1000)[0] == bm.FIXED
    level, spte = leaf(h, vm, (GiB >> 12) + 1)
    assert level == 1
    assert spte & ~bit_range(12, 51) == expect


def test_fault_installs_ept_ad_disabled_spte_type():
    h = bm.Host(memory="1GiB", backing="4k")
    vm = int(h.create_vms(1, memory="16MiB", ept_ad=False)[0])
    assert one(h, vm, 0x5000, bm.ACC_WRITE)[0] == bm.FIXED
    _, spte = leaf(h, vm, 5)
    assert (spte >> 52) & 3 == 1
    assert spte & bits(0, 1, 2, 57, 58) == bits(0, 1, 2, 57, 58)
    # the same write again does not exit: no A/D assist is needed with A/D disabled
    assert one(h, vm, 0x5000, bm.ACC_WRITE)[0] == bm.HIT
    assert leaf(h, vm, 5)[1] == spte
