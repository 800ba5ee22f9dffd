"""Batch renormalization against a step-by-step float64 NumPy reference (Ioffe 2017,
Algorithm 1 and the §3 gradients with r, d constant), its schedule, and its reduction to
BatchNorm."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import normlab as nl
import normlab.functional as NF
from tests import reference as ref

TOL = {"rtol": 1e-10, "atol": 1e-10}


def _layer(c, **kw):
    m = nl.nn.BatchRenorm1d(c, dtype=torch.float64, **kw)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=torch.float64))
        m.bias.copy_(torch.linspace(-1.0, 1.0, c, dtype=torch.float64))
    return m


def _step_and_compare(m, x, dy, r_max, d_max):
    """One training step of the layer vs the NumPy reference; returns (r, d)."""
    mu, var = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
    gamma, beta = m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()
    y_ref, dx_ref, dg_ref, db_ref, mu_ref, var_ref, r, d = ref.batch_renorm_step_numpy(
        x.numpy(), dy.numpy(), mu, var, gamma, beta, m.eps, m.momentum, r_max, d_max
    )
    m.zero_grad()
    xg = x.clone().requires_grad_()
    y = m(xg)
    y.backward(dy)
    torch.testing.assert_close(y.detach().numpy(), y_ref, **TOL)
    torch.testing.assert_close(xg.grad.numpy(), dx_ref, **TOL)
    torch.testing.assert_close(m.weight.grad.numpy(), dg_ref, **TOL)  # ∂L/∂γ
    torch.testing.assert_close(m.bias.grad.numpy(), db_ref, **TOL)
    torch.testing.assert_close(m.running_mean.numpy(), mu_ref, **TOL)
    torch.testing.assert_close(m.running_var.numpy(), var_ref, **TOL)
    return r, d


def test_matches_numpy_reference_step_by_step_with_clipping_engaged():
    # Final limits from step 0 (r_max 1.1, d_max 0.1); data far from the initial running
    # statistics (mean 0, var 1), so r and d start clipped and unclip as the running
    # statistics catch up. Both regimes must be seen for the test to mean anything.
    m = _layer(3, r_max=1.1, d_max=0.1, warmup_steps=0, r_max_steps=0, d_max_steps=0, momentum=0.3)
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    shift = torch.tensor([1.0, 0.05, -0.5], dtype=torch.float64)
    r_clipped = d_clipped = r_free = d_free = 0
    for _ in range(25):
        x = torch.randn(8, 3, generator=g, dtype=torch.float64) * scale + shift
        dy = torch.randn(8, 3, generator=g, dtype=torch.float64)
        r, d = _step_and_compare(m, x, dy, 1.1, 0.1)
        on_r = np.isclose(r, 1.1) | np.isclose(r, 1 / 1.1)
        on_d = np.isclose(np.abs(d), 0.1)
        r_clipped, r_free = r_clipped + on_r.sum(), r_free + (~on_r).sum()
        d_clipped, d_free = d_clipped + on_d.sum(), d_free + (~on_d).sum()
    assert min(r_clipped, d_clipped, r_free, d_free) > 5, (r_clipped, r_free, d_clipped, d_free)
    assert int(m.num_batches_tracked) == 25


@pytest.mark.parametrize(
    "step, limits",
    [
        (0, (1.0, 0.0)),
        (4999, (1.0, 0.0)),
        (5000, (1.0, 0.0)),
        (15000, (1.0 + 0.1 * 10000 / 35000, 0.1 * 10000 / 20000)),
        (25000, (1.0 + 0.1 * 20000 / 35000, 0.1)),
        (40000, (1.1, 0.1)),
        (10**6, (1.1, 0.1)),
    ],
)
def test_schedule_at_paper_steps_against_numpy(step, limits):
    # The paper's schedule (warm-up 5000, r_max at 40k, d_max at 25k) with small final
    # limits so that the clipping is engaged at every step checked.
    m = _layer(3, r_max=1.1, d_max=0.1, momentum=0.2)
    m.num_batches_tracked.fill_(step)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -0.5, 0.0]))
        m.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
    assert m.clip_limits() == pytest.approx(limits, rel=1e-12)
    assert ref.renorm_limits(step, 1.1, 0.1, 5000, 40000, 25000) == pytest.approx(limits)
    g = torch.Generator().manual_seed(step)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64) * 1.5 + 0.3
    dy = torch.randn(6, 3, generator=g, dtype=torch.float64)
    r, d = _step_and_compare(m, x, dy, *limits)
    if step < 5000 or step == 5000:
        assert np.all(r == 1.0) and np.all(d == 0.0)  # plain BatchNorm
    assert int(m.num_batches_tracked) == step + 1


def test_default_schedule_values():
    f = NF.renorm_clip_limits
    assert f(0) == (1.0, 0.0) and f(5000) == (1.0, 0.0)
    assert f(25000) == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert f(40000) == (3.0, 5.0) and f(39999) < (3.0, 5.0)
    assert f(0, warmup_steps=0, r_max_steps=0, d_max_steps=0) == (3.0, 5.0)
    # a final step before the warm-up ends: a jump at the end of the warm-up
    assert f(99, warmup_steps=100, r_max_steps=10) == (1.0, 0.0)
    assert f(100, warmup_steps=100, r_max_steps=10, d_max_steps=10) == (3.0, 5.0)


@pytest.mark.parametrize(
    "cls, torch_cls, shape",
    [
        (nl.nn.BatchRenorm1d, torch.nn.BatchNorm1d, (6, 3)),
        (nl.nn.BatchRenorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 3)),
    ],
)
def test_r_max_1_d_max_0_is_batch_norm_exactly(cls, torch_cls, shape):
    ours = cls(3, r_max=1.0, d_max=0.0, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    theirs = torch_cls(3)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        x = torch.randn(shape, generator=g) * 3 + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb)
        dy = torch.randn(shape, generator=g)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, generator=g)
    torch.testing.assert_close(ours(x), theirs(x))


def test_default_layer_is_batch_norm_during_warmup_and_not_after():
    x = torch.randn(16, 3) * 4 + 2  # far from the initial running statistics
    bn = torch.nn.BatchNorm1d(3)
    brn = nl.nn.BatchRenorm1d(3)
    torch.testing.assert_close(brn(x), bn(x))
    brn.num_batches_tracked.fill_(40000)
    assert not torch.allclose(brn(x), bn(x), atol=1e-3)


def test_state_dict_is_batch_norms_and_carries_the_step():
    src = torch.nn.BatchNorm2d(3)
    for _ in range(3):
        src(torch.randn(4, 3, 2, 2))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    brn = nl.nn.BatchRenorm2d(3)
    brn.load_state_dict(torch.load(buf, weights_only=True))
    assert list(brn.state_dict()) == list(src.state_dict())
    assert int(brn.num_batches_tracked) == 3 and brn.clip_limits() == (1.0, 0.0)
    brn.num_batches_tracked.fill_(30000)
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict(brn.state_dict())
    assert int(back.num_batches_tracked) == 30000
    assert isinstance(brn, torch.nn.BatchNorm2d) and not isinstance(brn, nl.nn.BatchNorm2d)


def test_nonfinite_batch_does_not_advance_the_schedule():
    m = nl.nn.BatchRenorm1d(2, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    bad = torch.randn(4, 2)
    bad[0, 0] = float("nan")
    with pytest.warns(NF.NonFiniteStatisticsWarning):
        m(bad)
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_mean, torch.zeros(2))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"r_max": 0.5}, r"r_max must be a number >= 1"),
        ({"d_max": -1.0}, r"d_max must be a number >= 0"),
        ({"warmup_steps": -1}, r"warmup_steps must be an int >= 0"),
        ({"r_max_steps": 1.5}, r"r_max_steps must be an int"),
    ],
)
def test_constructor_rejects_bad_schedule(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        nl.nn.BatchRenorm2d(3, **kwargs)


def test_functional_needs_running_statistics():
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        NF.batch_renorm(torch.randn(4, 3), None, None, training=True)
    m = nl.nn.BatchRenorm1d(3)
    m.track_running_stats = False
    with pytest.raises(ValueError, match="needs running_mean"):
        m(torch.randn(4, 3))
