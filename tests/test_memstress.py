"""The memstress guest workload: the selftests' LCG, page order, write decisions and region placement."""

import time

import numpy as np
import pytest

import batchmmu as bm
from batchmmu import memstress as ms
from batchmmu.scenario import load_scenario, resolve
from batchmmu.shard import Shard

# selftests.md section 1: seed 1 -> ..., seed 0x6b8b4567 -> ...  [derived there from the LCG rule]
VECTORS = {
    1: [48271, 182605794, 1291394886, 1914720637, 2078669041],
    0x6B8B4567: [1506019061, 429675287, 458716051],
}

# selftests.md section 2.1: 1 vCPU x 262144 pages, seed 1, after the populate pass:
# (write_percent, random_access) -> [(writes, distinct pages) for iterations 1, 2, 3]
TABLE = {
    (100, False): [(262144, 262144)] * 3,
    (100, True): [(262144, 165728), (262144, 166001), (262144, 165569)],
    (50, False): [(130514, 130514), (131384, 131384), (130775, 130775)],
    (50, True): [(130837, 102898), (131049, 103349), (131561, 103232)],
    (10, False): [(25959, 25959), (26190, 26190), (26096, 26096)],
    (10, True): [(26137, 24904), (26024, 24876), (26499, 25205)],
}


@pytest.mark.nojit
@pytest.mark.parametrize("seed", sorted(VECTORS))
def test_lcg_test_vectors(seed):
    want = VECTORS[seed]
    assert ms.lcg_scalar(seed, len(want))[0] == want
    assert ms.lcg_draws([seed], 0, len(want))[0].tolist() == want
    # any stretch of the stream, and the state after it
    assert ms.lcg_draws([seed], 2, len(want) - 2)[0].tolist() == want[2:]
    assert int(ms.lcg_advance([seed], len(want))[0]) == want[-1]


@pytest.mark.nojit
def test_lcg_vectorised_matches_scalar_over_blocks():
    seeds = [1, 2, 0x6B8B4567, 0xFFFFFFFF, 2**31 - 2, 12345]
    got = ms.lcg_draws(seeds, 70000, 70001)          # crosses the generator's 65536-draw blocks
    for i, s in enumerate(seeds):
        _, st = ms.lcg_scalar(s, 70000)
        ref, _ = ms.lcg_scalar(st, 70001)
        assert got[i].tolist() == ref
    assert ms.lcg_draws([1], 0, 0).shape == (1, 0)


@pytest.mark.parametrize("wp,ra", sorted(TABLE))
def test_dirty_log_perf_page_sets_table(wp, ra):
    assert ms.page_sets(262144, 1, 3, wp, ra) == TABLE[(wp, ra)]


def _reference_pass(state, pages, wp, ra):
    """memstress_guest_code's loop, one access at a time."""
    out = []
    for i in range(pages):
        if ra:
            (d,), state = ms.lcg_scalar(state)
            page = d % pages
        else:
            page = i
        (d,), state = ms.lcg_scalar(state)
        out.append((page, d % 100 < wp))
    return out, state


@pytest.mark.nojit
@pytest.mark.parametrize("wp,ra", [(100, False), (37, False), (50, True), (0, True)])
def test_memstress_pass_matches_the_guest_loop(wp, ra):
    states = np.array([7, 8, 9], np.int64)
    for _ in range(3):   # state persists across passes
        page, write = ms.memstress_pass(states, 300, wp, ra)
        for c, s in enumerate(states):
            ref, _ = _reference_pass(int(s), 300, wp, ra)
            assert list(zip(page[c].tolist(), write[c].tolist(), strict=True)) == ref
        # pieces of a pass are the same as the whole pass
        p2, w2 = ms.memstress_pass(states, 300, wp, ra, 100, 250)
        assert (p2 == page[:, 100:250]).all() and (w2 == write[:, 100:250]).all()
        states = ms.lcg_advance(states, ms.draws_per_pass(300, ra))


def test_one_gib_per_vcpu_pass_is_fast():
    ms.memstress_pass([1], 1024, 50, True)
    t = time.perf_counter()
    page, write = ms.memstress_pass(np.arange(1, 5), 262144, 50, True)
    dt = time.perf_counter() - t
    assert page.shape == (4, 262144) and write.shape == (4, 262144)
    assert dt < 1.0, f"4 vCPUs x 1 GiB took {dt:.3f} s"


@pytest.mark.nojit
def test_random_writer_matches_u64_draws():
    pages = 2**18 + 3
    got = ms.random_writer([0x6B8B4567], pages, 5)[0].tolist()
    draws, _ = ms.lcg_scalar(0x6B8B4567, 10)
    want = [((draws[2 * k] << 32) | draws[2 * k + 1]) % pages for k in range(5)]
    assert got == want
    assert ms.random_writer([0x6B8B4567], pages, 3, first=2)[0].tolist() == want[2:]


@pytest.mark.nojit
def test_region_gpa_is_memstress_placement():
    max_gfn = (1 << 34) - 1              # 46-bit guest physical addresses
    n = 262144
    assert ms.region_gpa(max_gfn, n) == (max_gfn + 1 - n - 1) * 4096
    assert ms.region_gpa(max_gfn, n, 2 << 20) == ((max_gfn - n) * 4096) & ~((2 << 20) - 1)
    assert ms.region_gpa(max_gfn, n, 1 << 30) % (1 << 30) == 0
    assert ms.vcpu_pages(4, 1 << 30, overlap=False) == 262144
    assert ms.vcpu_pages(4, 1 << 30, overlap=True) == 4 * 262144


def _shard(sets, seed=0):
    data, text, origin = load_scenario("dirty_log_perf")
    from batchmmu.scenario import apply_overrides
    spec = resolve(apply_overrides(data, sets), text, origin)
    return spec, Shard(spec, seed, [0])


@pytest.mark.parametrize("overlap", [False, True])
def test_shard_events_are_memstress_per_vcpu_interleaved(overlap):
    sets = ["vcpus=3", "bytes_per_vcpu=64KiB", "random_access=true", "write_percent=60", "seed=5",
            f"overlap={str(overlap).lower()}", "slots=3"]
    spec, sh = _shard(sets)
    pages = 16 * (3 if overlap else 1)
    gpa = ms.region_gpa((1 << 34) - 1, 48)
    assert int(sh.test_base[0]) == gpa
    assert [m["gpa"] for m in sh.host.memslots(0) if m["slot"]] == [gpa, gpa + 16 * 4096, gpa + 32 * 4096]
    states = [5, 6, 7]
    for _ in range(2):
        vm, vc, addr, kind = (np.concatenate(x) for x in zip(*sh.memstress_events(60, True), strict=True))
        assert (vm == 0).all()
        for c in range(3):
            ref, states[c] = _reference_pass(states[c], pages, 60, True)
            base = gpa if overlap else gpa + c * 16 * 4096
            mine = vc == c
            assert addr[mine].tolist() == [base + p * 4096 for p, _ in ref]
            assert (kind[mine] == bm.ACC_WRITE).tolist() == [w for _, w in ref]
        assert vc[:6].tolist() == [0, 1, 2, 0, 1, 2]       # vCPUs round-robin
