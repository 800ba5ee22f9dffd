import contextlib
import functools
import io

import pytest

from normlab.experiments import runner


@functools.cache
def _quick(claim_id: str, seed: int):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = runner.run_one(claim_id, quick=True, seed=seed)
    return result, out.getvalue() + err.getvalue()


@pytest.fixture(scope="session")
def quick_result():
    """quick_result(id, seed=0): the experiment's quick Result, run once per session (the
    generic test and the claim-specific tests share it)."""
    return lambda claim_id, seed=0: _quick(claim_id, seed)[0]


@pytest.fixture(scope="session")
def quick_output():
    """What the quick run of an experiment printed (to Python's stdout/stderr)."""
    return lambda claim_id, seed=0: _quick(claim_id, seed)[1]
