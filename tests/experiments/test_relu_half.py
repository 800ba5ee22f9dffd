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
    assert r.metrics["monotone_in_beta"]  # β > 0 raises the share: the claim's direction


def _synthetic(gauss_error=0.0, digits_half=0.5, digits_top=0.8):
    """Shares at β = −1, 0, 1 for γ = 1 and 2; Gaussian ones off Φ(β/γ) by gauss_error."""
    from normlab.experiments.relu_half import Measurement, Share

    def share(gamma, beta, mean):
        return Share(gamma, beta, mean, mean - 0.05, mean + 0.05)

    gaussian = [
        share(g, b, normal_cdf(b / g) + gauss_error) for g in (1.0, 2.0) for b in (-1.0, 0.0, 1.0)
    ]
    digits = [share(1.0, -1.0, 0.2), share(1.0, 0.0, digits_half), share(1.0, 1.0, digits_top)]
    return Measurement(
        n_digits=10,
        gaussian=gaussian,
        digits=digits,
        half_gaussian=gaussian[1],
        half_digits=digits[1],
    )


@pytest.mark.parametrize(
    ("synthetic", "verdict", "says"),
    [
        (_synthetic(), "holds", "the measured share follows Φ(β/γ)"),
        (_synthetic(gauss_error=0.019, digits_half=0.525), "holds", "stays near 50%"),
        (_synthetic(gauss_error=0.03), "fails", "up to 0.030 from Φ(β/γ)"),
        (_synthetic(digits_half=0.45), "fails", "the average is 45.0%, not 50%"),
        (_synthetic(digits_top=0.5), "fails", "does not rise strictly"),  # flat in β
    ],
)
def test_verdict_rule_and_notes(synthetic, verdict, says):
    from normlab.experiments import get

    exp = get("relu-half")
    config = exp.Config()
    assert exp.judge(config, synthetic) == verdict
    assert says in exp.present(config, synthetic, verdict).notes
