"""Host-integration scenarios: nx_huge_pages and access_tracking_perf."""

import pytest

import batchmmu as bm


@pytest.mark.parametrize("nx,expect", [
    # x86/nx_huge_pages_test's asserted (pages_2m, nx_lpage_splits) after each step, NX on / disabled
    ("true", [(1, 0), (2, 0), (1, 1), (1, 2), (1, 2), (1, 0), (2, 0)]),
    ("false", [(1, 0), (2, 0), (2, 0), (3, 0), (3, 0), (3, 0), (3, 0)]),
])
def test_nx_huge_pages_scenario_reproduces_the_selftest(nx, expect):
    rep = bm.run_scenario("nx_huge_pages", sets=[f"nx_huge_pages={nx}"])
    assert [(p["stats"]["pages_2m"], p["stats"]["nx_lpage_splits"]) for p in rep.phases] == expect
    assert rep.phases[5]["nx_recovery_passes"] == (5 if nx == "true" else 0)


@pytest.mark.parametrize("ept_ad", [True, False])
def test_access_tracking_perf(ept_ad):
    rep = bm.run_scenario("access_tracking_perf", workers=2,
                          sets=["vms=2", "bytes_per_vcpu=4MiB", f"ept_ad={str(ept_ad).lower()}"])
    pages = 2 * 1024
    by = {p["name"].strip(): p for p in rep.phases}
    assert by["Mark memory idle"]["young_pages"] == pages       # everything was accessed
    # after an access pass no page is still idle (the test asserts < 10 %)
    assert by["Pages still idle"]["idle_pages"] == 0
    refaults = by["Writing to idle memory"]["stats"]["pf_fast"] - by["Mark memory idle"]["stats"]["pf_fast"]
    # hardware A/D: aging clears A, the CPU sets it again; without A/D every idle page refaults
    assert refaults == (0 if ept_ad else pages)
    assert rep.totals == bm.run_scenario("access_tracking_perf", sets=[
        "vms=2", "bytes_per_vcpu=4MiB", f"ept_ad={str(ept_ad).lower()}"]).totals
