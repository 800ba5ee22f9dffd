import functools

import pytest

from normlab.experiments import runner


@functools.cache
def _quick(claim_id: str, seed: int):
    return runner.run_one(claim_id, quick=True, seed=seed)


@pytest.fixture(scope="session")
def quick_result():
    """quick_result(id, seed=0): the experiment's quick Result, run once per session (the
    generic test and the claim-specific tests share it)."""
    return lambda claim_id, seed=0: _quick(claim_id, seed)
