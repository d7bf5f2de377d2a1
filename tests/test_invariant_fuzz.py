"""The security-invariant fuzzer (tests/invariant_fuzz.py) on a few seeds; bench/fuzz_invariants.py runs
many more (``python bench/fuzz_invariants.py --cases 500``)."""

import pytest
from invariant_fuzz import run_case


@pytest.mark.parametrize("seed", range(3))
def test_security_invariants_hold(seed):
    assert run_case(seed, steps=25) > 0
