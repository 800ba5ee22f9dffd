"""SyncBatchNorm with masks and degenerate global batches over 2 gloo ranks.

Reference: torch's own ``BatchNorm1d`` in float64 in one process, on the valid positions of
every rank concatenated (padding dropped, not masked).
"""

from __future__ import annotations

import pytest
import torch

import normlab as nl

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

C, L = 3, 5
LENGTHS = [[4, 2], [1, 5], [3, 3]]  # per step: rank 0's and rank 1's one sequence


def _data(step: int):
    g = torch.Generator().manual_seed(step)
    x = 1.0 + 2.0 * torch.randn(2, L, C, generator=g, dtype=torch.float64)  # one per rank
    dy = torch.randn(2, L, C, generator=g, dtype=torch.float64)
    m = torch.arange(L)[None, :] < torch.tensor(LENGTHS[step])[:, None]
    x[~m] = float("nan")
    return x, dy, m


def _masked_rank(rank: int, world: int, momentum):
    layer = nl.nn.SyncBatchNorm(C, momentum=momentum, channel_dim=-1).double()
    out = []
    for step in range(len(LENGTHS)):
        x, dy, m = _data(step)
        xr = x[rank : rank + 1].clone().requires_grad_()
        y = layer(xr, mask=m[rank : rank + 1])
        (y * torch.where(m[rank : rank + 1, :, None], dy[rank : rank + 1], 0.0)).sum().backward()
        out.append((y.detach(), xr.grad.clone()))
    grads = (layer.weight.grad.clone(), layer.bias.grad.clone())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    return out, grads, state


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_one_sample_per_rank_equals_one_process_on_the_valid_positions(gloo_pools, momentum):
    results = gloo_pools.get(2).run(_masked_rank, momentum)
    ref = torch.nn.BatchNorm1d(C, momentum=momentum).double()
    for step in range(len(LENGTHS)):
        x, dy, m = _data(step)
        v = x[m].clone().requires_grad_()
        y = ref(v)
        (y * dy[m]).sum().backward()
        offset = 0
        for rank in range(2):
            yr, gr = results[rank][0][step]
            mr = m[rank : rank + 1]
            k = int(mr.sum())
            torch.testing.assert_close(yr[mr], y[offset : offset + k].detach())
            torch.testing.assert_close(gr[mr], v.grad[offset : offset + k])
            assert (gr[~mr] == 0).all()
            offset += k
    for rank in range(2):
        state = results[rank][2]
        torch.testing.assert_close(state["running_mean"], ref.running_mean)
        torch.testing.assert_close(state["running_var"], ref.running_var)
        assert int(state["num_batches_tracked"]) == len(LENGTHS)
    # each rank's dγ, dβ are its own share: their sum is the one-process gradient
    torch.testing.assert_close(results[0][1][0] + results[1][1][0], ref.weight.grad)
    torch.testing.assert_close(results[0][1][1] + results[1][1][1], ref.bias.grad)


def _degenerate_rank(rank: int, world: int, degenerate: str, masked: bool):
    torch.manual_seed(0)
    layer = nl.nn.SyncBatchNorm(C, degenerate=degenerate).double()
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
        layer.running_var.fill_(2.0)
        layer.weight.fill_(1.5)
        layer.bias.fill_(-0.25)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    if masked:  # rank 0: one counted position, rank 1: none; one value in total
        x = torch.randn(1, C, 4, dtype=torch.float64, requires_grad=True)
        m = torch.tensor([[rank == 0, False, False, False]])
        y = layer(x, mask=m)
    else:  # rank 0 holds the only sample, rank 1 an empty batch
        x = torch.randn(1 - rank, C, dtype=torch.float64, requires_grad=True)
        m = None
        y = layer(x)
    y.sum().backward()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    unchanged = all(torch.equal(state[k], before[k]) for k in state)
    return x.detach(), y.detach(), x.grad, layer.weight.grad, unchanged


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("degenerate", ["eval", "skip"])
def test_one_value_in_total_over_two_ranks(gloo_pools, degenerate, masked):
    results = gloo_pools.get(2).run(_degenerate_rank, degenerate, masked)
    scale = 1.5 / (2.0 + 1e-5) ** 0.5
    for rank, (x, y, gx, gw, unchanged) in enumerate(results):
        assert unchanged  # running statistics and num_batches_tracked
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
        if degenerate == "skip":
            assert torch.equal(y, x) and (gw == 0).all()
            expect = torch.ones_like(x)
        else:  # eval mode: torch's eval BatchNorm output and gradient
            torch.testing.assert_close(y, (x - 0.5) * scale - 0.25)
            expect = torch.full_like(x, scale)
        if masked:  # padded positions get no gradient
            expect[..., 1:] = 0
            expect[..., 0] *= float(rank == 0)
        torch.testing.assert_close(gx, expect)


def test_error_is_raised_on_every_rank(gloo_pools):
    outcomes = gloo_pools.get(2).run_raw(_degenerate_rank, "error", True)
    assert all(not o.ok and "more than 1 value per channel" in o.message for o in outcomes)
