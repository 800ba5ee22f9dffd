"""recalibrate across 2 gloo ranks with uneven data equals one process on all the data."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normlab as nl
from tests.tools.helpers import images, small_resnet

pytestmark = pytest.mark.distributed

SIZES = (3, 8, 5)
SHARDS = {0: [0, 1], 1: [2]}  # rank 0 holds 11 samples in 2 batches, rank 1 holds 5 in 1


def _batches(indices):
    return [images(SIZES[i], seed=20 + i, shift=0.5) for i in indices]


def _recalibrated(batches, sequential):
    model = small_resnet("normlab")
    nl.recalibrate(model, batches, sequential=sequential)
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=__import__("datetime").timedelta(seconds=60),
    )
    try:
        result = {s: _recalibrated(_batches(SHARDS[rank]), s) for s in (False, True)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_uneven_shards_equal_one_process_on_everything():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker,
            args=(2, os.path.join(tmp, "store"), tmp),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for sequential in (False, True):
        expected = _recalibrated(_batches([0, 1, 2]), sequential)
        for result in results:
            for key, value in expected.items():
                torch.testing.assert_close(
                    result[sequential][key], value, rtol=2e-5, atol=2e-6, msg=key
                )
