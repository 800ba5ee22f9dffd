import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Two cores are shared by the pytest workers; keep torch from oversubscribing them.
torch.set_num_threads(int(os.environ.get("NORMLAB_TEST_THREADS", "1")))

settings.register_profile(
    "normlab",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "normlab"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def threaded_kernels(monkeypatch):
    """normlab's threaded kernels (numpy arrays) even for small inputs: no size threshold
    and two torch threads, which the kernels follow (on one they run serially, by
    address; a one-core machine has only that path)."""
    import numba

    from normlab import kernels

    monkeypatch.setattr(kernels, "PARALLEL_MIN_NUMEL", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gloo_pools():
    """Persistent gloo worker pools by world size: ``gloo_pools.get(2).run(fn, ...)``
    (tests/distributed_helpers.py). Started on first use, shared by the session."""
    from tests.distributed_helpers import PoolCache

    cache = PoolCache()
    yield cache
    cache.close()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``normlab demo --steps 30 --out DIR --json``, run once per session through the CLI's
    entry point (in-process: the suite has already paid for importing torch and
    scikit-learn). Returns (exit code, output directory, parsed stdout)."""
    import contextlib
    import io
    import json

    from normlab.cli import main

    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout):
        try:
            main(["demo", "--steps", "30", "--out", str(out), "--json"])
        except SystemExit as e:  # main() exits only on failure
            code = e.code
    return code, out, json.loads(stdout.getvalue()) if code == 0 else None
