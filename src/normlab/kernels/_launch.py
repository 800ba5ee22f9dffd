"""Launching the kernels: serial or threaded, one threaded launch at a time.

:func:`_entry` picks a by-address kernel entry for a tensor's size: the serial one on
the calling thread below ``normlab.kernels.PARALLEL_MIN_NUMEL`` elements (or on one
thread), else the threaded one under :data:`_LAUNCH`. Also: the thread count
(:func:`_threads`, following torch's), the lazy import of the compiled kernels
(:func:`_kernels`) and the fork handlers that keep the lock and Numba's threads usable
in a forked child.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

# The package, whose PARALLEL_MIN_NUMEL is read at each call (tests lower it there).
_package = sys.modules["normlab.kernels"]

# Every wrapper below runs once per layer call: at (64, 100) the kernels take ~5 µs, so
# each torch op, view or numpy conversion here is a measurable share of the call.
_numba_module = None


def _kernels():
    global _numba_module
    if _numba_module is None:
        from normlab.kernels import _numba  # first use compiles or loads the cache

        _numba_module = _numba
    return _numba_module


def _threads(numel: int) -> int:
    """Threads for a kernel over ``numel`` elements: torch's count (1: the serial
    kernels, no thread team at all; also in a child forked from a process whose Numba
    threads are not fork-safe: GNU OpenMP's, whose team the child does not have)."""
    want = torch.get_num_threads()
    if want == 1 or _SERIAL_AFTER_FORK:
        return 1
    _kernels()  # first: importing it picks the threading layer before Numba's threads start
    import numba

    n = min(want, numba.config.NUMBA_NUM_THREADS)
    if n == 1:
        return 1
    numba.set_num_threads(n)
    # Numba's 'omp' layer sets the OpenMP thread count on its first launch, in torch's
    # runtime (see _numba._choose_threading_layer): put torch's back, or one big batch
    # norm would change how many threads every later torch op uses.
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return n


# One threaded launch at a time: Numba's 'workqueue' threading layer (the fallback, or a
# user's choice) aborts the process on concurrent launches, and on 'omp' concurrent
# launches would share torch's one team; callers from several Python threads queue here,
# each launch using every thread anyway.
_LAUNCH = threading.Lock()
_SERIAL_AFTER_FORK = False  # set in a forked child unless Numba's layer is fork-safe
_FORK_SAFE_LAYERS = ("workqueue", "tbb")


def _numba_threading_layer() -> str | None:
    """The threading layer Numba's threads run on, or None before they started."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return None if parallel is None else getattr(parallel, "_threading_layer", None)


# fork(): the child gets a copy of memory and only the forking thread. A lock another
# thread held at that moment would stay locked in the child forever, so the fork waits
# for a running launch to end (the kernels release the GIL: another thread may be in
# one) and the child starts with a free lock. GNU OpenMP's thread team does not exist in
# the child (Numba kills a direct child that launches on its 'omp' layer; a grandchild
# would hang), so the child runs the serial kernels, unless Numba's layer is fork-safe:
# 'workqueue' rebuilds its pool in the child on its first launch; 'tbb' is fork-safe too.
# Before Numba's threads have started the layer is not known yet (and torch's own OpenMP
# team usually ran in the parent), so the child stays serial.
def _before_fork() -> None:
    _LAUNCH.acquire()


def _after_fork_in_parent() -> None:
    _LAUNCH.release()


def _after_fork_in_child() -> None:
    global _LAUNCH, _SERIAL_AFTER_FORK
    _LAUNCH = threading.Lock()
    if _numba_threading_layer() not in _FORK_SAFE_LAYERS:
        _SERIAL_AFTER_FORK = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _entry(name: str, numel: int, rows: int):
    """``(entry, nblocks)``: the by-address kernel entry ``name`` for a tensor of
    ``numel`` elements and ``rows`` rows, serial below :data:`PARALLEL_MIN_NUMEL`
    elements or on one thread, else threaded (serialised by a lock), with the
    channels-last kernels' row-block count."""
    threads = 1 if numel < _package.PARALLEL_MIN_NUMEL else _threads(numel)
    if threads == 1:
        return getattr(_kernels(), name), 1
    kernel = getattr(_kernels(), name + "_threaded")

    def launch(*args):
        with _LAUNCH:
            return kernel(*args)

    return launch, max(1, min(threads, rows))
