"""Ghost batch normalization against a loop-over-chunks reference."""

from __future__ import annotations

import pytest
import torch

import normlab as nl
import normlab.functional as NF
import normlab.functional.ghost as ghost_module
from tests import reference as ref


@pytest.mark.parametrize(
    "shape, vbs",
    [
        ((12, 3), 4),  # exact chunks
        ((10, 3), 4),  # remainder of 2 rows
        ((9, 3), 4),  # remainder of 1 row, 1 value per channel: merged into the last chunk
        ((9, 3, 2), 4),  # remainder of 1 row but 2 values per channel: its own chunk
        ((5, 2, 3, 3), 1),  # one sample per ghost batch (spatial statistics)
        ((3, 3), 8),  # virtual batch larger than the batch: plain BatchNorm
        ((7, 5, 2), -1),  # channel last, (N, L, C), vbs 3 with a 1-row remainder of 5 values
    ],
)
def test_matches_loop_over_chunks_reference(shape, vbs):
    channel_dim = 1
    if vbs == -1:
        vbs, channel_dim = 3, -1
    c = shape[channel_dim]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.linspace(0.5, 1.5, c, dtype=torch.float64).requires_grad_()
    b = torch.linspace(-1, 1, c, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y = NF.ghost_batch_norm(
        x, rm, rv, w, b, True, 0.25, 1e-5, virtual_batch_size=vbs, channel_dim=channel_dim
    )
    # reference: move channels to dim 1 and loop over torch.split chunks
    xr = x.detach().movedim(channel_dim, 1).clone().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y_ref, mean, within = ref.ghost_batch_norm_loop(xr, vbs, wr, br, 1e-5)
    torch.testing.assert_close(y, y_ref.movedim(1, channel_dim))
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    y.backward(dy)
    y_ref.backward(dy.movedim(channel_dim, 1))
    torch.testing.assert_close(x.grad, xr.grad.movedim(1, channel_dim))
    torch.testing.assert_close(w.grad, wr.grad)
    torch.testing.assert_close(b.grad, br.grad)
    torch.testing.assert_close(rm, 0.25 * mean)
    torch.testing.assert_close(rv, 0.75 + 0.25 * within)


def test_chunk_sizes_and_merge_rule():
    assert ghost_module.ghost_chunks(10, 4, 1) == (2, 2)
    assert ghost_module.ghost_chunks(9, 4, 1) == (1, 5)  # 4 + 5: the lone row merged
    assert ghost_module.ghost_chunks(9, 4, 3) == (2, 1)  # 1 row of 3 values is fine
    assert ghost_module.ghost_chunks(3, 8, 1) == (0, 3)
    assert ref.ghost_chunk_sizes(9, 4) == [4, 5]


@pytest.mark.parametrize("rows", [64, 66, 65])
def test_vectorised_at_most_two_engine_calls(monkeypatch, rows):
    calls = []
    real = ghost_module.normalize_batch

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ghost_module, "normalize_batch", counting)
    nl.nn.GhostBatchNorm1d(3, virtual_batch_size=4)(torch.randn(rows, 3))
    assert len(calls) == (1 if rows % 4 == 0 else 2)
    assert calls[0][:2] == (rows // 4 - (rows % 4 == 1), 4)  # all full ghosts in one view


def test_running_statistics_update_once_per_call_with_pooled_within_variance():
    # Two ghost batches with very different means: the pooled within-ghost variance is
    # what each ghost was normalised by, far below the whole-batch variance.
    x = torch.cat([torch.randn(8, 2) * 0.5, torch.randn(8, 2) * 0.5 + 10]).double()
    m = nl.nn.GhostBatchNorm1d(2, virtual_batch_size=8, momentum=1.0, dtype=torch.float64)
    m(x)
    assert int(m.num_batches_tracked) == 1
    _, mean, within = ref.ghost_batch_norm_loop(x, 8)
    torch.testing.assert_close(m.running_mean, mean)
    torch.testing.assert_close(m.running_var, within)
    assert (m.running_var < 1.0).all() and (x.var(0) > 20).all()


def test_virtual_batch_at_least_the_batch_equals_torch_batch_norm():
    ours, theirs = nl.nn.GhostBatchNorm2d(3, virtual_batch_size=32), torch.nn.BatchNorm2d(3)
    for step in range(4):
        x = torch.randn(6, 3, 2, 2) * 2 + step
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))


def test_eval_uses_running_statistics_and_untracked_eval_uses_ghosts():
    x = torch.randn(8, 3) * 3 + 1
    m = nl.nn.GhostBatchNorm1d(3, virtual_batch_size=4)
    m(x)
    m.eval()
    torch.testing.assert_close(
        m(x), ref.batch_norm_eval(x, m.running_mean, m.running_var, m.weight, m.bias).float()
    )
    u = nl.nn.GhostBatchNorm1d(3, virtual_batch_size=4, track_running_stats=False)
    y_train = u(x)
    torch.testing.assert_close(u.eval()(x), y_train)
    torch.testing.assert_close(y_train, ref.ghost_batch_norm_loop(x, 4)[0].float())


def test_errors():
    with pytest.raises(ValueError, match="virtual_batch_size=1 gives every ghost batch one value"):
        nl.nn.GhostBatchNorm1d(3, virtual_batch_size=1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nl.nn.GhostBatchNorm1d(3, virtual_batch_size=4)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        nl.nn.GhostBatchNorm2d(3, virtual_batch_size=0)
    with pytest.raises(TypeError, match="virtual_batch_size"):
        nl.nn.GhostBatchNorm2d(3)  # required: the ghost size changes results
    with pytest.raises(ValueError, match="channel_dim=0 is the batch dim"):
        NF.ghost_batch_norm(
            torch.randn(4, 3), None, None, training=True, virtual_batch_size=2, channel_dim=0
        )


def test_nonfinite_policy_shared_with_batch_norm():
    bad = torch.randn(8, 2)
    bad[5, 1] = float("nan")
    m = nl.nn.GhostBatchNorm1d(2, virtual_batch_size=4, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        m(bad)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_var, torch.ones(2))
    s = nl.nn.GhostBatchNorm1d(2, virtual_batch_size=4)
    with pytest.warns(NF.NonFiniteStatisticsWarning):
        s(bad)
    assert int(s.num_batches_tracked) == 0 and torch.isfinite(s.running_mean).all()
