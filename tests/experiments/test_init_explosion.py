import math

import pytest
import torch

from normlab.experiments.init_explosion import (
    RELU_LIMIT,
    explosion_rate,
    linear_lambda,
    per_layer_grad_sq,
)


def test_formulas():
    assert linear_lambda(5) == 1.5 and linear_lambda(8) == 1.2
    assert RELU_LIMIT == pytest.approx(1.4669422, abs=1e-7)


def test_explosion_rate_recovers_a_known_geometric_profile():
    lam = 1.3
    sq = torch.tensor([lam ** (20 - layer) for layer in range(20)], dtype=torch.float64)
    assert explosion_rate(sq, skip=3) == pytest.approx(lam, rel=1e-12)


def test_one_layer_gradient_matches_autograd_by_hand():
    # depth 1, linear: ∇W = (J_BNᵀ r)ᵀ x summed over the batch; compare with an explicit
    # float64 computation through the closed-form Jacobian
    import normlab as nl

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    readout = torch.randn(3, generator=g, dtype=torch.float64)
    sq = per_layer_grad_sq([w], x, readout, relu=False)
    jac = nl.functional.batch_norm_jacobian(x @ w.t(), None, 1e-5)  # (C, m, m)
    dz = torch.einsum("cij,c->jc", jac, readout)  # ∂L/∂z_jc = Σ_i J[c, i, j]·r_c
    assert float(sq[0]) == pytest.approx(float((dz.t() @ x).pow(2).sum()), rel=1e-10)


def test_quick_run_measures_explosion(quick_result):
    r = quick_result("init-explosion")
    lam = r.metrics["lambda_relu"]
    assert all(v > 1.3 for v in lam.values())  # gradients grow toward the input
    for b, v in r.metrics["lambda_linear"].items():
        assert math.log(v) == pytest.approx(math.log(linear_lambda(int(b))), rel=0.3)


def _synthetic(linear_6=None, relu=(1.52, 1.49)):
    """A Measurement on the quick config's batch sizes (linear 6, 8; ReLU 16, 32): the linear
    rates are the formula's unless ``linear_6`` is given, the ReLU rates are ``relu``."""
    from normlab.experiments.init_explosion import Measurement

    rates = {
        "linear": {6: [linear_6 or linear_lambda(6)], 8: [linear_lambda(8)]},
        "relu": {16: [relu[0]], 32: [relu[1]]},
    }
    profiles = {act: {b: [4.0, 2.0, 1.0] for b in rs} for act, rs in rates.items()}
    return Measurement(rates, profiles)


@pytest.mark.parametrize(
    ("args", "verdict", "failed"),
    [
        ({}, "holds", ""),
        ({"relu": (1.48, 1.49)}, "holds", ""),  # within the 1% slack for "not increasing"
        ({"linear_6": linear_lambda(6) ** 1.3}, "fails", "(1) linear λ̂ near (B−2)/(B−3)"),
        ({"relu": (1.44, 1.49)}, "fails", "(2) ReLU λ̂ not increasing with B"),
        ({"relu": (1.7, 1.6)}, "fails", "(2) ReLU λ̂ near π/(π−1) at B = 32"),
        ({"relu": (0.9, 0.9)}, "fails", "(2) ReLU λ̂ > 1; (2) ReLU λ̂ near π/(π−1) at B = 32"),
    ],
)
def test_verdict_rule(args, verdict, failed):
    from normlab.experiments import get

    exp = get("init-explosion")
    m = _synthetic(**args)
    assert exp.judge(exp.quick_config(), m) == verdict
    says = f"Measured, the rule fails on: {failed}." if failed else ""
    assert exp.failures(exp.quick_config(), m) == says


def test_rate_is_the_geometric_mean_over_initialisations():
    m = _synthetic()
    m.rates["relu"][16] = [1.2, 1.5]
    assert m.rate("relu", 16) == pytest.approx(math.sqrt(1.2 * 1.5), rel=1e-14)
    m.rates["linear"][8] = [linear_lambda(8) ** 1.1]
    assert m.linear_log_error(8) == pytest.approx(0.1, rel=1e-12)


def test_notes_follow_the_verdict():
    from normlab.experiments import get

    exp = get("init-explosion")
    cfg = exp.quick_config()
    holds = exp.present(cfg, _synthetic(), "holds")
    assert "approaches it from above" in holds.notes
    assert holds.plots[0].lines[0].y == [2.0, math.sqrt(2.0), 1.0]  # ‖∇W^l‖ / ‖∇W^L‖
    bad = _synthetic(relu=(1.44, 1.49))
    fails = exp.present(cfg, bad, exp.judge(cfg, bad))
    assert fails.verdict == "fails" and "from above" not in fails.notes
    assert "fails on: (2) ReLU λ̂ not increasing with B" in fails.notes
