"""Model tools across 2 gloo ranks with uneven data ≡ one process on all the data:
recalibrate (both modes), accumulate_stats on SyncBatchNorm layers, and a torch
SyncBatchNorm model that runs on CPU ranks once converted."""

import pytest
import torch
from torch import nn

import normlab as nl
from tests.distributed_helpers import GlooPool
from tests.tools.helpers import images, small_resnet

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

SIZES = (3, 8, 5, 2)
SHARDS = {0: [0, 1], 1: [2]}  # rank 0 holds 11 samples in 2 batches, rank 1 holds 5 in 1
# SyncBatchNorm needs the same number of forward calls on every rank: 2 micro-batches each
MICRO = {0: [0, 1], 1: [2, 3]}
TOL = {"rtol": 2e-5, "atol": 2e-6}


@pytest.fixture(scope="module")
def pool():
    with GlooPool(2) as p:
        yield p


def _batches(indices):
    return [images(SIZES[i], seed=20 + i, shift=0.5) for i in indices]


def _running(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _recalibrated(batches, sequential):
    model = small_resnet("normlab")
    nl.recalibrate(model, batches, sequential=sequential)
    return _running(model)


def _recalibrate_on_rank(rank, world):
    return {s: _recalibrated(_batches(SHARDS[rank]), s) for s in (False, True)}


def test_recalibrate_on_uneven_shards_equals_one_process_on_everything(pool):
    results = pool.run(_recalibrate_on_rank)
    for sequential in (False, True):
        expected = _recalibrated(_batches([0, 1, 2]), sequential)
        for result in results:
            for key, value in expected.items():
                torch.testing.assert_close(result[sequential][key], value, **TOL, msg=key)


def _sync_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))  # torch's class


def _torch_syncbn_on_rank(rank, world):
    model = _sync_layer().train()
    try:
        model(images(4))
        torch_refused = False
    except ValueError:  # "SyncBatchNorm expected input tensor to be on GPU ..."
        torch_refused = True  # (after counting the batch it refused in num_batches_tracked)
    model[1].num_batches_tracked.zero_()
    ours = nl.convert(model, to="normlab")
    with nl.accumulate_stats(ours):
        for x in _batches(MICRO[rank]):
            ours(x)
    return torch_refused, _running(ours), ours[1].num_batches_tracked.item()


def test_converted_torch_syncbn_runs_on_cpu_ranks_and_accumulates_global_stats(pool):
    results = pool.run(_torch_syncbn_on_rank)
    # one process: the single update one batch of all 18 samples would make
    expected = _sync_layer().train()
    expected(torch.cat(_batches([0, 1, 2, 3])))
    for refused, running, nbt in results:
        assert refused  # torch's own SyncBatchNorm cannot run on CPU tensors
        assert nbt == 1
        for key, value in _running(expected).items():
            torch.testing.assert_close(running[key], value, **TOL, msg=key)


def _moments_on_rank(rank, world):
    from normlab.tools._common import Moments64, all_reduce_moments

    accs = [Moments64(3), Moments64(2)]
    for a, x in zip(accs, _moment_data(rank)):
        if x is not None:
            a.add(x)
    all_reduce_moments(accs)
    return [(a.count, a.mean, a.m2) for a in accs]


def _moment_data(rank):
    g = torch.Generator().manual_seed(rank)
    big = 1e6 + 1e-2 * torch.randn(7 + 5 * rank, 3, 4, generator=g, dtype=torch.float64)
    small = torch.randn(2, 2, generator=g, dtype=torch.float64) if rank == 0 else None
    return big, small  # the second accumulator is empty on rank 1


def test_all_reduce_moments_equals_the_moments_of_every_ranks_data(pool):
    results = pool.run(_moments_on_rank)
    data = [_moment_data(r) for r in range(2)]
    big = torch.cat([d[0] for d in data]).transpose(0, 1).reshape(3, -1)
    small = data[0][1].transpose(0, 1)
    for result in results:
        for (count, mean, m2), x in zip(result, (big, small)):
            assert count == x.shape[1]
            torch.testing.assert_close(mean, x.mean(1), rtol=1e-15, atol=1e-9)
            ref_m2 = ((x - x.mean(1, keepdim=True)) ** 2).sum(1)
            # data at 1e6 with spread 1e-2: ulp(1e6) / 1e-2 ≈ 1e-8 is all the data holds
            torch.testing.assert_close(m2, ref_m2, rtol=1e-7, atol=0)
