"""Landscape along the gradient: exact on a quadratic loss, state restored with BN."""

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import diagnostics as D
from tests.reference import exact_hessian, state_snapshot


def test_quadratic_loss_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    mse = nn.functional.mse_loss
    h = exact_hessian(model, (x, y), mse)
    loss = mse(model(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    before = state_snapshot(model)
    probe = D.landscape_along_gradient(model, mse, (x, y), lr=0.2, multipliers=(4, 0.5, 1))
    assert state_snapshot(model) == before
    assert probe.step_sizes == pytest.approx([0.1, 0.2, 0.8])
    # L(θ − s g) = L − s‖g‖² + s²/2 gᵀHg and ∇L(θ − s g) − ∇L(θ) = −s H g, exactly
    gg, ghg, hg = float(g @ g), float(g @ h @ g), float((h @ g).norm())
    expected = [float(loss.detach()) - s * gg + s * s / 2 * ghg for s in probe.step_sizes]
    assert probe.losses == pytest.approx(expected, rel=1e-10)
    assert probe.grad_changes == pytest.approx([s * hg for s in probe.step_sizes], rel=1e-10)
    assert probe.loss_range == pytest.approx(max(expected) - min(expected), rel=1e-8)
    assert probe.gradient_predictiveness == pytest.approx(0.8 * hg, rel=1e-10)
    assert probe.beta_smoothness == pytest.approx(hg / g.norm().item(), rel=1e-10)
    assert probe.grad_norm == pytest.approx(g.norm().item())


def test_bn_training_mode_state_restored():
    model = nn.Sequential(nn.Linear(4, 8), nl.nn.BatchNorm1d(8), nn.Sigmoid(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model(x)
    before = state_snapshot(model)
    probe = D.landscape_along_gradient(model, None, (x, y), lr=0.5)
    assert state_snapshot(model) == before
    assert len(probe.losses) == 5 and probe.beta_smoothness > 0
    assert set(probe.to_dict()) >= {"loss_range", "gradient_predictiveness", "beta_smoothness"}


def test_bad_arguments():
    model = nn.Linear(2, 1)
    batch = (torch.randn(4, 2), torch.randn(4, 1))
    with pytest.raises(ValueError, match="lr must be"):
        D.landscape_along_gradient(model, None, batch, lr=0)
    with pytest.raises(ValueError, match="multipliers must be positive"):
        D.landscape_along_gradient(model, None, batch, lr=0.1, multipliers=(-1, 1))
