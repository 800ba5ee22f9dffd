"""One quick run of each experiment per test session, shared by every test in this folder."""

import contextlib
import functools
import io
from dataclasses import dataclass

import pytest
import torch

from normlab.experiments import registry, runner
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


# Quick runs too long for `make test-fast` (seconds measured on the loaded 2-core box, warm
# Numba cache), and the one that spawns gloo processes. A test that asks for one of these
# runs carries its marker (the fixtures below check); quick_ids() marks the generic tests.
QUICK_RUN_MARKS = {
    "family-batch-size": "slow",  # 8 s
    "renorm": "slow",  # 7 s
    "landscape": "slow",  # 6 s
    "sync": "distributed",
}


def quick_ids() -> list:
    """Every registered experiment id as a pytest parameter, with its QUICK_RUN_MARKS mark."""
    return [
        pytest.param(i, id=i, marks=[getattr(pytest.mark, QUICK_RUN_MARKS[i])])
        if i in QUICK_RUN_MARKS
        else pytest.param(i, id=i)
        for i in registry.all_ids()
    ]


def _checked(node, claim_id: str) -> str:
    mark = QUICK_RUN_MARKS.get(claim_id)
    if mark and node.get_closest_marker(mark) is None:
        pytest.fail(
            f"{node.nodeid} runs the {claim_id!r} quick run: mark the test "
            f"@pytest.mark.{mark} (tests/experiments/conftest.py QUICK_RUN_MARKS), so that "
            f"`make test-fast` stays fast",
            pytrace=False,
        )
    return claim_id


@pytest.fixture
def quick_result(request):
    """quick_result(id, seed=0): the experiment's quick Result (run once per session; the
    generic tests and the claim-specific tests share it)."""
    return lambda claim_id, seed=0: _quick(_checked(request.node, claim_id), seed).result


@pytest.fixture
def quick_run(request):
    """quick_run(id, seed=0): the same run with what it printed and what it did to the RNG."""
    return lambda claim_id, seed=0: _quick(_checked(request.node, claim_id), seed)
