"""The kernels' threads: Numba's threading layer, and layers called from several Python
threads at once (normlab.kernels._launch._LAUNCH serialises the threaded launches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numba
import pytest
import torch

import normlab
import normlab.nn as nln
from normlab import kernels
from normlab.kernels import _memory

MIB = 1 << 20
SRC = str(Path(normlab.__file__).resolve().parents[1])


@pytest.fixture
def two_threads(monkeypatch):
    """NORMLAB_KERNELS=numba, two torch threads (the kernels follow them) and a fresh
    256 MiB pool."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    monkeypatch.setattr(_memory, "_POOL", _memory._Pool(256 * MIB))
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    torch.set_num_threads(before)


# (shape, channels_last, seed): threaded and pooled; threaded, not pooled (512 KB);
# serial (below PARALLEL_MIN_NUMEL); channels-last threaded
CASES = [
    ((6, 64, 56, 56), False, 0),  # 4.8 MB
    ((64, 8, 16, 16), False, 1),
    ((32, 16, 4, 4), False, 2),
    ((8, 32, 28, 28), True, 3),
]


def _case(shape, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 1
    dy = torch.randn(shape, generator=g)
    if channels_last:
        x, dy = (t.to(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy


def _train_and_eval(shape, channels_last, seed):
    """A layer's training forward/backward and its eval forward: outputs to compare, and
    the tensors whose memory may come from the pool (kept alive by the caller)."""
    x, dy = _case(shape, channels_last, seed)
    c = shape[1]
    bn = nln.BatchNorm2d(c, activation="relu")
    with torch.no_grad():  # not from torch's global generator, which the threads share
        bn.weight.copy_(torch.linspace(0.5, 1.5, c))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, c))
    xg = x.requires_grad_()
    y = bn(xg)
    gx, gw, gb = torch.autograd.grad(y, (xg, bn.weight, bn.bias), dy)
    bn.eval()
    with torch.no_grad():
        y_eval = bn(x)
    outs = (y.detach(), gx, gw, gb, bn.running_mean, bn.running_var, y_eval)
    return outs, (y, gx, y_eval)


def test_layers_called_from_several_threads_at_once_match_a_single_thread_run(two_threads):
    # The same thread count gives the same partition of every sum: results must be
    # identical to a run on one Python thread, not merely close.
    want = [_train_and_eval(*case)[0] for case in CASES]
    assert kernels._threads(6 * 64 * 56 * 56) == 2  # the threaded kernels ran
    mismatches, kept, errors = [], [], []
    start = threading.Barrier(3)

    def work(k):
        try:
            start.wait()
            for rep in range(2):
                for i in range(len(CASES)):
                    j = (i + k + rep) % len(CASES)  # the threads interleave cases
                    outs, pooled = _train_and_eval(*CASES[j])
                    if not all(torch.equal(a, b) for a, b in zip(outs, want[j])):
                        mismatches.append(CASES[j])
                    kept.append((j, pooled[0]))  # y stays alive; gx, y_eval are freed
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert not mismatches, mismatches
    assert len(kept) == 3 * 2 * len(CASES)
    # Buffers freed by one thread were reused by others meanwhile, and none that was
    # still in use: every kept output has memory of its own and still holds its values.
    assert _memory.pool_info()["hits"] > 0
    pointers = [y.data_ptr() for _, y in kept]
    assert len(set(pointers)) == len(pointers)
    for j, y in kept:
        torch.testing.assert_close(y.detach(), want[j][0], rtol=0, atol=0)


def test_concurrent_results_are_torchs_too(two_threads):
    x, dy = _case(*CASES[0][:2], 5)
    ref = torch.nn.BatchNorm2d(64)
    ours = nln.BatchNorm2d(64, activation="relu")
    xg = x.clone().requires_grad_()
    y_ref = torch.relu(ref(xg))
    (gx_ref,) = torch.autograd.grad(y_ref, xg, dy)
    results = []

    def work():
        xt = x.clone().requires_grad_()
        y = ours(xt)
        results.append((y.detach(), torch.autograd.grad(y, xt, dy)[0]))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == 3
    for y, gx in results:
        torch.testing.assert_close(y, y_ref.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)


# -- the threading layer (fresh interpreters: Numba picks its layer once per process) -----
PROBE = """
import json, os, re
import torch
torch.set_num_threads(2)
os.environ["NORMLAB_KERNELS"] = "numba"
import numba
import normlab.nn as nln
from normlab import kernels
{setup}
x = torch.randn(8, 64, 56, 56, requires_grad=True)
torch.relu(x).sum()  # torch's own thread team starts
after_torch = len(os.listdir("/proc/self/task"))
y = nln.BatchNorm2d(64)(x)
y.backward(torch.ones_like(y))
maps = open("/proc/self/maps").read()
print(json.dumps({{
    "layer": numba.threading_layer(),
    "openmp": sorted(set(re.findall(r"[^ /]*gomp[^ /]*\\.so[.0-9]*", maps))),
    "torch_threads": torch.get_num_threads(),
    "threads": kernels._threads(x.numel()),
    "new_threads": len(os.listdir("/proc/self/task")) - after_torch,
}}))
"""


def _probe(setup: str = "", **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING")}
    environ.update(PYTHONPATH=SRC, **env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(setup=setup)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_kernels_run_on_omp_in_torchs_own_thread_team():
    # Numba's omp extension links the system libgomp, but its OpenMP calls bind to the
    # runtime torch loaded first: the kernels' parallel regions run on torch's team, so
    # no second team of threads (workqueue adds one per thread) competes for the cores.
    got = _probe()
    assert got["layer"] == "omp" and got["threads"] == 2 and got["torch_threads"] == 2
    assert "libgomp.so.1" in got["openmp"], got  # torch's
    assert got["new_threads"] <= 1, got


@pytest.mark.slow
@pytest.mark.parametrize(
    "how", ["env", "config"], ids=["NUMBA_THREADING_LAYER", "numba.config.THREADING_LAYER"]
)
def test_a_users_choice_of_threading_layer_is_kept(how):
    if how == "env":
        got = _probe(NUMBA_THREADING_LAYER="workqueue")
    else:
        got = _probe(setup="numba.config.THREADING_LAYER = 'workqueue'")
    assert got["layer"] == "workqueue" and got["threads"] == 2 and got["torch_threads"] == 2
    assert got["new_threads"] >= 2, got  # workqueue's own pool: what omp avoids
