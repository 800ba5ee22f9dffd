"""Processes and process groups normlab owns: :func:`process_group` (join, then free, the
default group) and :func:`launch` (run a function on k local gloo processes: ``normlab
train``, experiments, with :func:`report` for progress from the workers).

Lifetime. A process group normlab creates (:func:`process_group`: ``normlab train`` under
torchrun, :func:`launch`) is freed when it is destroyed, so its gloo worker threads are
joined while the interpreter is alive. Otherwise a worker thread can still be releasing the
last collective's work object when the interpreter finalises; that release drops a
tensor whose Python object needs the GIL, CPython ends the thread, and the process aborts
("terminate called without an active exception", SIGABRT) after a run that succeeded.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import warnings
import weakref

import torch
import torch.distributed as dist


@contextlib.contextmanager
def process_group(backend: str, *, timeout: float, **kwargs):
    """Join the default process group for the ``with`` block, and free it on the way out.

    ``torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout),
    **kwargs)`` on entry (``kwargs``: ``init_method``, or ``store``, ``rank`` and
    ``world_size``); ``destroy_process_group()`` on exit, after which the group is
    actually freed, so its backend's threads (gloo: two workers and a socket loop) end
    before the interpreter does (module docstring, "Lifetime").

    Two things keep a destroyed group alive. DDP's constructor imports
    ``torch.distributed.nn`` on first use, and that module's functions take
    ``group=group.WORLD`` as a default argument, evaluated at import (torch 2.13): imported
    while a group is live, it holds that group forever. It is imported here before the
    group exists, which binds those defaults to None. And a model in a reference cycle
    holds its DDP wrapper, and so the group, until a garbage collection, run here after
    the destroy. If the group still survives (someone else holds it), a RuntimeWarning says
    so; nothing is checked when the block raises, since the traceback's frames still hold
    the caller's DDP model.
    """
    import torch.distributed.nn  # noqa: F401  (before the group exists: see above)

    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    _destroy_and_free()


def _destroy_and_free() -> bool:
    """Destroy the default group and collect it; True if it was freed (else warn)."""
    alive = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()  # a model in a reference cycle would still hold DDP, and DDP the group
    if alive() is None:
        return True
    warnings.warn(
        "normlab: the default process group is still referenced after "
        "destroy_process_group(), so its worker threads outlive it and may abort the "
        "process at exit (SIGABRT). Drop every DDP module and work handle that uses it; "
        "import torch.distributed.nn before init_process_group, not after.",
        RuntimeWarning,
        stacklevel=4,  # the caller's with statement
    )
    return False


# -- local multi-process runs -----------------------------------------------------------

_REPORTS = None  # in a launched worker: the queue to the parent


class WorkerError(RuntimeError):
    """One or more launched ranks failed; the message holds every failing rank's error."""


def report(obj) -> None:
    """In a worker started by :func:`launch`: send ``obj`` (picklable) to the parent's
    ``on_report(rank, obj)`` as it happens (progress, logs). A no-op elsewhere."""
    if _REPORTS is not None:
        _REPORTS.put((dist.get_rank(), "report", obj))


def _launched(fn, rank: int, world: int, args: tuple, store: str, timeout: float, q) -> None:
    import os
    import pickle
    import traceback

    global _REPORTS
    _REPORTS = q
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        file_store = dist.FileStore(store, world)
        with process_group("gloo", timeout=timeout, store=file_store, rank=rank, world_size=world):
            value = fn(rank, world, *args)
        q.put((rank, "ok", pickle.dumps(value)))
    except BaseException as e:
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def launch(
    fn,
    world_size: int,
    *args,
    timeout: float = 300.0,
    on_report=None,
    preload: tuple[str, ...] = ("normlab",),
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes joined in a
    gloo process group; return their return values, rank by rank.

    The group meets over a ``FileStore`` in a temporary directory (no port to pick) and
    has ``timeout`` seconds as its collective timeout. Each worker uses
    cpu_count // world_size threads. ``fn`` must be importable (a module-level function);
    return values must pickle. Workers are forked from a forkserver that imports
    ``preload`` once (about 1 s to start instead of about 3 s per spawned interpreter);
    spawn where there is no forkserver.

    Faults: if any rank raises (or dies), the others are given 2 s to report their own
    errors — they are usually blocked in a collective — then killed, and
    :class:`WorkerError` lists every failing rank's exception and traceback. A run never
    outlives its process group's timeout by more than that.

    ``on_report(rank, obj)`` receives, in this process, whatever a worker passes to
    :func:`report`.
    """
    import multiprocessing as mp
    import os
    import pickle
    import queue
    import shutil
    import tempfile
    import time

    if world_size < 1:
        raise ValueError(f"launch: world_size must be at least 1, got {world_size}")
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Takes effect only if this process has not started its forkserver yet.
        ctx.set_forkserver_preload(list(preload))
    else:
        ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="normlab-launch-")
    q = ctx.Queue()
    store = os.path.join(tmp, "store")
    procs = [
        ctx.Process(
            target=_launched, args=(fn, r, world_size, args, store, timeout, q), daemon=True
        )
        for r in range(world_size)
    ]
    done: dict[int, tuple[str, object]] = {}
    failed = True
    try:
        for p in procs:
            p.start()
        first_error_at = None
        while len(done) < world_size:
            try:
                rank, kind, payload = q.get(timeout=0.5)
                if kind == "report":
                    if on_report is not None:
                        on_report(rank, payload)
                    continue
                done[rank] = (kind, payload)
                if kind == "error" and first_error_at is None:
                    first_error_at = time.monotonic()
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode is not None]
            if dead and q.empty():
                for r in dead:
                    done[r] = ("error", f"exited with code {procs[r].exitcode} without a report")
                first_error_at = first_error_at or time.monotonic()
            # After a failure the healthy ranks are blocked in a collective until the
            # group's timeout; give them a moment to report their own errors, then stop.
            if first_error_at is not None and time.monotonic() - first_error_at > 2.0:
                break
        errors = {r: msg for r, (kind, msg) in sorted(done.items()) if kind == "error"}
        if errors:
            lines = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in errors.items())
            raise WorkerError(f"{len(errors)} of {world_size} ranks failed:\n{lines.rstrip()}")
        failed = False
        return [pickle.loads(done[r][1]) for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive() and not failed:
                p.join(timeout=10)  # reported already; only interpreter shutdown is left
            if p.is_alive():
                p.kill()  # a failed run: the healthy ranks would wait out the timeout
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)
