"""One quick run of each experiment per test session, shared by every test in this folder."""

import contextlib
import functools
import io
from dataclasses import dataclass

import pytest
import torch

from normlab.experiments import runner
from normlab.experiments.base import Result


@dataclass(frozen=True)
class QuickRun:
    result: Result
    printed: str  # what the run wrote to Python's stdout/stderr
    rng_untouched: bool  # torch's global RNG state is the same after the run as before


@functools.cache
def _quick(claim_id: str, seed: int) -> QuickRun:  # always call with both, one cache key
    printed = io.StringIO()
    rng = torch.get_rng_state()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        result = runner.run_one(claim_id, quick=True, seed=seed)
    return QuickRun(result, printed.getvalue(), torch.equal(rng, torch.get_rng_state()))


@pytest.fixture(scope="session")
def quick_result():
    """quick_result(id, seed=0): the experiment's quick Result (run once per session; the
    generic tests and the claim-specific tests share it)."""
    return lambda claim_id, seed=0: _quick(claim_id, seed).result


@pytest.fixture(scope="session")
def quick_run():
    """quick_run(id, seed=0): the same run with what it printed and what it did to the RNG."""
    return lambda claim_id, seed=0: _quick(claim_id, seed)
