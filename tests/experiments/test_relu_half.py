import pytest
import torch

from normlab.experiments.relu_half import activation_probability, normal_cdf


def test_normal_cdf():
    assert normal_cdf(0.0) == 0.5
    assert normal_cdf(1.0) == pytest.approx(0.8413447460685429, abs=1e-15)


def test_activation_probability_by_hand():
    # two units over a batch of 4; after BN (γ = 1, β = 0) a unit is active where x > mean
    pre = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [10.0, 5.0]], dtype=torch.float64)
    p = activation_probability(pre, 1.0, 0.0)
    assert p.tolist() == [0.25, 0.25]  # skewed units: the mean, not the median, is centred
    p = activation_probability(pre, 1.0, 100.0)
    assert p.tolist() == [1.0, 1.0]


def test_holds_in_quick_mode(quick_result):
    r = quick_result("relu-half")
    assert r.verdict == "holds", r.measured
    assert abs(r.metrics["half_gaussian"] - 0.5) <= 0.02
    assert abs(r.metrics["half_digits"] - 0.5) <= 0.03
    assert r.metrics["max_abs_error_gaussian"] <= 0.02
