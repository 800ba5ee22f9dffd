"""A process that ran the threaded kernels forks safely, and its children run the kernels
with the parent's results.

On Numba's default ``omp`` layer (GNU OpenMP, torch's runtime) a forked child has no
thread team (and Numba kills a direct child that launches on it), so children run the
serial kernels: same results up to the summation order. On ``workqueue``
(``NUMBA_THREADING_LAYER=workqueue``), which is fork-safe, they run the threaded kernels:
identical results. Both layers are tested.

Every scenario runs in a fresh interpreter, in its own session, with a timeout that kills
the whole session (a hang fails the test instead of blocking the suite, and leaves no
forked child behind); a forked child also ends itself after ``CHILD_TIMEOUT`` seconds.

Why fresh interpreters: GNU OpenMP's thread team does not survive a fork (GCC bug 60035),
so once a process has run a multi-threaded *torch* op, a forked child's next
multi-threaded torch op hangs, whatever normlab does (torch's DataLoader sets one thread
in its workers for this reason). The pytest process may have started torch's team
already; the scenarios make their data with numpy and keep torch's own ops on small
tensors, so that what is tested is normlab's threads, not torch's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import normlab

TIMEOUT = 300  # seconds per scenario: a cold Numba cache compiles for ~30 s
CHILD_TIMEOUT = 120
SRC = str(Path(normlab.__file__).resolve().parents[1])

# Shared by the scenarios: a training BN + ReLU forward/backward on the threaded kernels,
# returned as numpy arrays.
PRELUDE = """
import faulthandler, json, os, pickle, sys, threading
import numpy as np
import torch
torch.set_num_threads(2)
os.environ["NORMLAB_KERNELS"] = "numba"
import normlab.nn as nln
from normlab import kernels

SHAPE = (8, 64, 56, 56)  # 1.6M elements, 6.4 MB: threaded kernels, pooled outputs


def data(seed):  # numpy: no multi-threaded torch op before the fork
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * 2 + 1
    return torch.from_numpy(x), torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))


def step(seed, threads=2):
    x, dy = data(seed)
    assert kernels._threads(x.numel()) == threads, (kernels._threads(x.numel()), threads)
    bn = nln.BatchNorm2d(64, activation="relu")
    x.requires_grad_()
    y = bn(x)
    gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)
    out = [t.detach().numpy().copy() for t in (y, gx, gw, gb, bn.running_mean, bn.running_var)]
    return out


def in_child(fn):
    # fn() in a forked child; its pickled result through a pipe (or the child's error)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(CHILD_TIMEOUT, exit=True)
        os.close(r)
        try:
            payload = pickle.dumps(("ok", fn()))
        except BaseException as e:
            payload = pickle.dumps(("error", repr(e)))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        status, value = pickle.loads(f.read())
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0, f"child exit {code}"
    assert status == "ok", value
    return value


def same(a, b, exact):
    for u, v in zip(a, b):
        if exact:
            assert np.array_equal(u, v), np.abs(u - v).max()
        else:
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
"""


def _run(body: str, **env) -> dict:
    code = f"CHILD_TIMEOUT = {CHILD_TIMEOUT}\n" + PRELUDE + textwrap.dedent(body)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING")}
    environ.update(PYTHONPATH=SRC, **env)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its forked children too: killed together on a hang
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"hung for {TIMEOUT} s:\n{stdout[-2000:]}{stderr[-4000:]}")
    finally:
        try:  # a forked child left behind by a failure
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


LAYERS = [
    pytest.param({}, "omp", 1, id="omp (default): serial children"),
    pytest.param({"NUMBA_THREADING_LAYER": "workqueue"}, "workqueue", 2, id="workqueue"),
]


@pytest.fixture(scope="module", autouse=True)
def _omp_layer_present():
    # Numba's omp layer needs an OpenMP runtime; this machine has one, so nothing skips.
    pytest.importorskip("numba.np.ufunc.omppool")


@pytest.mark.slow
@pytest.mark.parametrize("env, layer, child_threads", LAYERS)
def test_a_forked_child_runs_the_kernels_with_the_parents_results(env, layer, child_threads):
    result = _run(
        f"""
        parent = step(0)
        import numba

        mine = in_child(lambda: step(0, {child_threads}))
        same(parent, mine, {child_threads} == 2)  # same threads, same partition: identical
        same(parent, step(0), exact=True)  # and the parent's kernels still work
        print(json.dumps({{"layer": numba.threading_layer()}}))
        """,
        **env,
    )
    assert result == {"layer": layer}


@pytest.mark.slow
def test_a_fork_pool_maps_batch_norm_over_inputs():
    result = _run(
        """
        import multiprocessing as mp
        from functools import partial

        parent = [step(seed) for seed in range(4)]
        with mp.get_context("fork").Pool(2) as pool:
            children = pool.map(partial(step, threads=1), range(4), chunksize=1)
        for p, c in zip(parent, children):
            same(p, c, exact=False)
        print(json.dumps({"n": len(children)}))
        """
    )
    assert result == {"n": 4}


@pytest.mark.slow
@pytest.mark.parametrize("env, layer, child_threads", LAYERS)
def test_a_fork_waits_for_a_launch_in_another_thread(env, layer, child_threads):
    # A thread runs kernels in a loop while the main thread forks: a fork in the middle
    # of a launch would leave the child with normlab's launch lock (and the threading
    # layer's state) held by a thread that does not exist there.
    result = _run(
        f"""
        parent = step(1)
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                step(2)

        t = threading.Thread(target=busy)
        t.start()
        try:
            for _ in range(3):
                same(parent, in_child(lambda: step(1, {child_threads})), {child_threads} == 2)
        finally:
            stop.set()
            t.join()
        print(json.dumps({{"ok": True}}))
        """,
        **env,
    )
    assert result == {"ok": True}


@pytest.mark.slow
@pytest.mark.parametrize("lock", ["launch", "pool"])
def test_a_lock_held_by_another_thread_at_fork_time_is_free_in_the_child(lock):
    # Deterministic: another thread holds the lock for a while; fork() waits for it.
    result = _run(
        f"""
        from normlab.kernels import _launch, _memory
        parent = step(3)
        held = _launch._LAUNCH if "{lock}" == "launch" else _memory._POOL.lock
        taken = threading.Event()

        def hold():
            with held:
                taken.set()
                threading.Event().wait(0.5)

        t = threading.Thread(target=hold)
        t.start()
        taken.wait()
        child = in_child(lambda: step(3, 1))
        t.join()
        same(parent, child, exact=False)
        print(json.dumps({{"ok": True}}))
        """
    )
    assert result == {"ok": True}
