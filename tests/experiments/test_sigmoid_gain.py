import math

import pytest
import torch

from normlab.experiments.sigmoid_gain import crossing, expected_sigmoid_grad, gain


def _sigmoid_grad(z):
    s = 1 / (1 + math.exp(-z))
    return s * (1 - s)


def test_quadrature_against_point_mass_and_monte_carlo():
    # s = 0: a point mass, E[σ'(z)] = σ'(μ) exactly
    assert expected_sigmoid_grad(4.0, 0.0) == pytest.approx(_sigmoid_grad(4.0), rel=1e-13)
    assert gain(4.0, 0.0) == pytest.approx(_sigmoid_grad(0) / _sigmoid_grad(4), rel=1e-13)
    # independent reference: Monte Carlo with 4M float64 samples (std error ~1e-4 relative)
    g = torch.Generator().manual_seed(0)
    z = 4.0 + 1.5 * torch.randn(4_000_000, generator=g, dtype=torch.float64)
    mc = float((torch.sigmoid(z) * (1 - torch.sigmoid(z))).mean())
    assert expected_sigmoid_grad(4.0, 1.5) == pytest.approx(mc, rel=2e-3)


def test_crossing_and_its_range():
    s_star = crossing(lambda s: gain(4.0, s), 10.0)
    assert s_star == pytest.approx(0.740, abs=2e-3)
    assert gain(4.0, s_star) == pytest.approx(10.0, rel=1e-9)
    assert crossing(lambda s: gain(4.0, s), 100.0) is None  # never that large


def test_verdict_holds_only_for_narrow_inputs(quick_result):
    r = quick_result("sigmoid-gain")
    assert r.verdict == "holds", r.measured
    m = r.metrics
    assert m["gain_point_mass"] == pytest.approx(14.154, abs=1e-3)
    assert m["gain_at_s1"] == pytest.approx(7.857, abs=1e-3)  # below the claimed 10x
    assert m["max_rel_error_measured_vs_analytic"] <= 0.05
    assert "only for s < 0.74" in r.measured
