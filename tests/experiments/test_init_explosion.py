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
