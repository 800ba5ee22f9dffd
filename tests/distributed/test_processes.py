"""normlab.distributed.processes: launch (k local gloo workers) and process-group lifetime."""

from __future__ import annotations

import os
import time

import pytest
import torch

from normlab import distributed as D

# -- launch: the library's own multi-process runner (normlab train, experiments) ----------


def _launched_sum(rank: int, world: int, scale: float) -> float:
    import torch.distributed as dist

    D.report(f"hello from {rank}")
    t = torch.tensor([scale * (rank + 1)])
    dist.all_reduce(t)
    return float(t)


def _launched_one_fails(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise KeyError("rank 1 is broken")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that is gone


def test_launch_returns_every_rank_value_and_streams_reports():
    reports = []
    got = D.launch(
        _launched_sum, 2, 10.0, timeout=60, on_report=lambda r, o: reports.append((r, o))
    )
    assert got == [30.0, 30.0]
    assert sorted(reports) == [(0, "hello from 0"), (1, "hello from 1")]


def test_launch_reports_the_failing_rank_and_does_not_wait_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(D.WorkerError) as info:
        D.launch(_launched_one_fails, 2, timeout=600)  # a blocked rank 0 would wait 10 min
    message = str(info.value)
    assert "--- rank 1 ---" in message and "KeyError: 'rank 1 is broken'" in message
    assert time.monotonic() - start < 120  # a deadline for the test, not a timing claim


# -- process_group: a group normlab creates is freed, threads and all --------------------


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: /proc/self/task/*/comm)."""
    import os

    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # a thread that ended while we listed them
    return sorted(n for n in names if "gloo" in n)


def _group_that_gets_pinned(rank: int, world: int, store: str, q) -> None:
    import importlib
    import sys

    import torch.distributed as dist

    try:
        # The trap only springs in a process that has not imported torch.distributed.nn.
        assert "torch.distributed.nn" not in sys.modules, "the forkserver imported it"
        with D.process_group(
            "gloo", timeout=30, store=dist.FileStore(store, world), rank=rank, world_size=world
        ):
            # What DDP's first constructor does (via torch._dynamo, 2 s of imports): import
            # torch.distributed.nn, whose default arguments capture the live group.
            importlib.import_module("torch.distributed.nn")
            dist.all_reduce(torch.ones(2))  # a last collective on a Python tensor
            during = _gloo_threads()
        q.put((rank, during, _gloo_threads(), ""))
    except BaseException as e:
        q.put((rank, [], [], f"{type(e).__name__}: {e}"))


@pytest.mark.distributed
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_process_group_frees_the_group_and_its_threads(tmp_path):
    # A group left alive after destroy_process_group keeps its gloo worker threads running
    # into interpreter shutdown, where one can abort the process (SIGABRT) after a
    # successful run: `normlab train` under torchrun did, under CPU load (rank 1, idle
    # after its last collective). The DDP path itself: test_runs_unchanged_under_torchrun.
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    q = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [
        ctx.Process(target=_group_that_gets_pinned, args=(r, 2, store, q), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        got = sorted(q.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, during, after, error in got:
        assert not error, f"rank {rank}: {error}"
        assert during, "the probe must see the group's threads while it is alive"
        assert after == [], f"rank {rank}: gloo threads outlive the group: {after}"
