"""Run a function on k gloo ranks and collect every rank's result or exception.

    with GlooPool(2) as pool:
        results = pool.run(fn, arg)            # [fn(0, 2, arg), fn(1, 2, arg)]; raises if any rank failed
        outcomes = pool.run_raw(fn, arg)       # [Outcome(rank, ok, value, error, ...)] per rank

``fn(rank, world_size, *args)`` must be a module-level (picklable) function; it runs in a
long-lived worker that has already joined a gloo process group over a ``FileStore`` in a
temporary directory (no ports at all). Workers are forked from a forkserver that has torch
and normlab imported, so a pool starts in ~1 s instead of ~3 s per spawned process, and
one pool serves every case of a test module. Every call has a hard deadline: if a rank
does not report in time the pool is killed and the call raises :class:`RankTimeout`
naming the silent ranks. A pool whose process group may be broken (a collective timed
out) should not be reused: use a sub-group with a short timeout for such cases
(:func:`short_timeout_group`), or a fresh pool.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "normlab"])


@dataclass
class Outcome:
    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    seconds: float = 0.0


class RankFailures(AssertionError):
    """Some ranks raised; the message lists every rank's error."""

    def __init__(self, outcomes: list[Outcome]):
        self.outcomes = outcomes
        lines = [
            f"rank {o.rank}: {o.error_type}: {o.message}\n{o.traceback}"
            for o in outcomes
            if not o.ok
        ]
        super().__init__("failures on ranks:\n" + "\n".join(lines))


class RankTimeout(AssertionError):
    """Some ranks did not report within the deadline (the pool has been killed)."""


def _worker(rank: int, world: int, store_path: str, timeout_s: float, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    while True:
        job = inbox.get()
        if job is None:
            break
        job_id, payload = job
        fn, args = pickle.loads(payload)
        start = time.perf_counter()
        try:
            value = fn(rank, world, *args)
            out = Outcome(rank, True, value, seconds=time.perf_counter() - start)
        except BaseException as e:  # report everything, the parent decides
            out = Outcome(
                rank,
                False,
                error_type=type(e).__name__,
                message=str(e),
                traceback=traceback.format_exc(),
                seconds=time.perf_counter() - start,
            )
        outbox.put((job_id, pickle.dumps(out)))
    dist.destroy_process_group()


class GlooPool:
    """k worker processes joined in one gloo process group (see the module docstring).

    Args:
        world_size: number of ranks.
        timeout: the process group's timeout in seconds (bounds every blocked collective).
    """

    def __init__(self, world_size: int, *, timeout: float = 30.0) -> None:
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="normlab-gloo-")
        store = os.path.join(self._dir, "store")
        self._outbox = _CTX.Queue()
        self._inboxes = [_CTX.Queue() for _ in range(world_size)]
        self._procs = [
            _CTX.Process(
                target=_worker,
                args=(r, world_size, store, timeout, self._inboxes[r], self._outbox),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._job = 0
        self.broken = False

    def run_raw(self, fn, *args, timeout: float = 60.0) -> list[Outcome]:
        """Run ``fn(rank, world_size, *args)`` on every rank; one Outcome per rank."""
        if self.broken:
            raise RuntimeError("this GlooPool was killed after a timeout; start a new one")
        self._job += 1
        payload = pickle.dumps((fn, args))
        for box in self._inboxes:
            box.put((self._job, payload))
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.world_size:
            remaining = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            try:
                job_id, data = self._outbox.get(timeout=max(0.05, min(remaining, 0.5)))
            except queue.Empty:
                if remaining <= 0 or dead:
                    silent = sorted(set(range(self.world_size)) - set(outcomes))
                    self.close(kill=True)
                    what = (
                        f"died (exit codes {[self._procs[r].exitcode for r in dead]})"
                        if dead
                        else f"did not report within {timeout} s"
                    )
                    raise RankTimeout(
                        f"ranks {silent} {what}; reported: "
                        f"{[(o.rank, o.ok, o.error_type, o.message) for o in outcomes.values()]}"
                    ) from None
                continue
            if job_id == self._job:
                out = pickle.loads(data)
                outcomes[out.rank] = out
        return [outcomes[r] for r in range(self.world_size)]

    def run(self, fn, *args, timeout: float = 60.0) -> list[Any]:
        """Like :meth:`run_raw`, but returns the values and raises :class:`RankFailures`
        (listing every failing rank's error and traceback) if any rank raised."""
        outcomes = self.run_raw(fn, *args, timeout=timeout)
        if not all(o.ok for o in outcomes):
            raise RankFailures(outcomes)
        return [o.value for o in outcomes]

    def close(self, kill: bool = False) -> None:
        if kill:
            self.broken = True
            for p in self._procs:
                if p.is_alive():
                    p.kill()
        else:
            for box in self._inboxes:
                box.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> GlooPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close(kill=self.broken)


def short_timeout_group(seconds: float):
    """Inside a worker: a new group of all ranks whose collectives time out after
    ``seconds`` (every rank must call this, like ``new_group``)."""
    import torch.distributed as dist

    return dist.new_group(timeout=datetime.timedelta(seconds=seconds))
