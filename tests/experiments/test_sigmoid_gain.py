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


def _synthetic(point_gain=14.0, s_star=0.74, error=0.01):
    """A Measurement with one spread whose measured values are off by ``error``."""
    from normlab.experiments.sigmoid_gain import Measurement, SpreadPoint

    point = SpreadPoint(
        s=1.0,
        plain=0.02 * (1 + error),
        bn_centre=0.2,
        bn_unit=0.2,
        analytic_plain=0.02,
        analytic_centre=0.2,
    )
    return Measurement(
        grid=[0.0, 1.0],
        analytic_gain=[point_gain, 8.0],
        analytic_gain_unit=[point_gain, 8.0],
        point_gain=point_gain,
        gain_at_1=8.0,
        s_star=s_star,
        s_unit_star=None,
        g0_unit=0.2,
        points=[point],
    )


@pytest.mark.parametrize(
    ("synthetic", "verdict"),
    [
        (_synthetic(), "holds"),
        (_synthetic(error=-0.049), "holds"),  # within the 5% tolerance
        (_synthetic(error=0.06), "fails"),  # the layer does not match the analytic values
        (_synthetic(point_gain=9.0, s_star=None), "fails"),  # not > 10x even for a point mass
        (_synthetic(point_gain=12.0, s_star=None), "fails"),  # no crossing found in (0, 10]
    ],
)
def test_verdict_rule(synthetic, verdict):
    from normlab.experiments import get

    exp = get("sigmoid-gain")
    assert exp.judge(exp.Config(), synthetic) == verdict


@pytest.mark.parametrize(
    ("synthetic", "says"),
    [
        (_synthetic(), "holds for narrow inputs"),
        (_synthetic(error=0.06), "not confirmed"),
        (_synthetic(point_gain=9.0, s_star=None), "does not hold even for narrow inputs"),
    ],
)
def test_notes_follow_the_verdict(synthetic, says):
    from normlab.experiments import get

    exp = get("sigmoid-gain")
    config = exp.Config()
    r = exp.present(config, synthetic, exp.judge(config, synthetic))
    assert says in r.notes
    assert ("holds" in r.notes) == (r.verdict == "holds")
