"""Curvature probes against the exact Hessian from torch.autograd.functional.hessian."""

import copy
import math

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import diagnostics as D
from tests.reference import exact_hessian, state_snapshot


def tiny(bn: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4)]
    if bn:
        layers.append(nl.nn.BatchNorm1d(4))
    layers += [nn.Tanh(), nn.Linear(4, 2)]
    model = nn.Sequential(*layers).double()
    if bn:  # non-trivial affine and running statistics
        with torch.no_grad():
            layers[1].weight.uniform_(0.5, 1.5)
            layers[1].bias.uniform_(-0.5, 0.5)
            layers[1].running_mean.uniform_(-1, 1)
            layers[1].running_var.uniform_(0.5, 2)
            layers[1].num_batches_tracked.fill_(7)
    return model


def tiny_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (8,), generator=g
    )


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn-train"])
def test_lanczos_and_power_match_exact_eigenvalues(bn):
    model, batch = tiny(bn), tiny_batch()
    model.train()
    before = state_snapshot(model)
    h = exact_hessian(model, batch)
    exact = torch.linalg.eigvalsh(h)  # ascending
    n = h.shape[0]
    lan = D.hessian_eigenvalues(model, None, batch, k=3, max_iter=n, tol=1e-12)
    torch.testing.assert_close(
        torch.tensor(lan.eigenvalues, dtype=torch.float64), exact.flip(0)[:3], rtol=1e-7, atol=1e-9
    )
    assert max(lan.residuals) < 1e-6
    mag = D.hessian_eigenvalues(model, None, batch, k=2, which="magnitude", max_iter=n, tol=1e-12)
    by_mag = exact[exact.abs().argsort(descending=True)][:2]
    torch.testing.assert_close(
        torch.tensor(mag.eigenvalues, dtype=torch.float64), by_mag, rtol=1e-7, atol=1e-9
    )
    power = D.hessian_eigenvalues(model, None, batch, k=2, method="power", max_iter=5000, tol=1e-13)
    torch.testing.assert_close(
        torch.tensor(power.eigenvalues, dtype=torch.float64), by_mag, rtol=1e-4, atol=1e-6
    )
    assert state_snapshot(model) == before  # running stats, num_batches_tracked, modes


def test_bn_hessian_is_the_batch_statistics_one_not_evals():
    """PyHessian switches to eval; the training-mode Hessian is a different matrix."""
    model, batch = tiny(True), tiny_batch()
    train_h = exact_hessian(model.train(), batch)
    eval_h = exact_hessian(copy.deepcopy(model).eval(), batch)
    assert (train_h - eval_h).abs().max() > 1e-2
    top = D.hessian_eigenvalues(model.train(), None, batch, k=1, max_iter=200, tol=1e-12)
    assert math.isclose(top.eigenvalues[0], float(torch.linalg.eigvalsh(train_h)[-1]), rel_tol=1e-7)
    assert model.training and model[1].training


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn-train"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_within_its_error(bn, distribution):
    model, batch = tiny(bn), tiny_batch()
    before = state_snapshot(model)
    h = exact_hessian(model, batch)
    est = D.hessian_trace(model, None, batch, samples=400, distribution=distribution, seed=3)
    off = (h - torch.diag(torch.diag(h))).pow(2).sum()
    var = 2 * off + (2 * torch.diag(h).pow(2).sum() if distribution == "gaussian" else 0)
    bound = 4 * math.sqrt(float(var) / 400)  # 4 exact standard errors
    assert abs(est.trace - float(torch.trace(h))) < bound
    assert 0.5 < est.stderr / math.sqrt(float(var) / 400) < 2  # reported error is honest
    assert state_snapshot(model) == before


def test_hvp_matches_exact_and_leaves_grad_alone():
    model, batch = tiny(False), tiny_batch()
    params = list(model.parameters())
    h = exact_hessian(model, batch)
    v = [torch.randn_like(p) for p in params]
    hv = D.hvp(lambda: nn.functional.cross_entropy(model(batch[0]), batch[1]), params, v)
    flat = torch.cat([t.reshape(-1) for t in hv])
    torch.testing.assert_close(flat, h @ torch.cat([t.reshape(-1) for t in v]))
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="shapes of params"):
        D.hvp(lambda: model(batch[0]).sum(), params, v[:-1])


def test_unused_parameters_have_zero_curvature():
    model, batch = tiny(False), tiny_batch()
    model.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=torch.float64)))
    op = D.HessianOperator(
        nn.functional.cross_entropy(model(batch[0]), batch[1]), list(model.parameters())
    )
    hv = op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    assert next(model.named_parameters())[0] == "unused"  # a container's own come first
    assert torch.equal(hv[:3], torch.zeros(3, dtype=torch.float64))
    assert hv[3:].abs().max() > 0


def test_bad_arguments_say_what_to_pass():
    model, batch = tiny(False), tiny_batch()
    with pytest.raises(ValueError, match="k must be a positive int"):
        D.hessian_eigenvalues(model, None, batch, k=0)
    with pytest.raises(ValueError, match="method must be"):
        D.hessian_eigenvalues(model, None, batch, method="arnoldi")
    with pytest.raises(ValueError, match="pass loss_fn"):
        D.hessian_trace(model, None, batch[0])
    with pytest.raises(TypeError, match="inputs, target"):
        D.hessian_trace(model, None, (batch[0], batch[1], batch[1]))


def test_default_lanczos_converges_well_before_n_products():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nl.nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4)
    ).double()
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(32, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (32,), generator=g),
    )
    exact = torch.linalg.eigvalsh(exact_hessian(model, batch)).flip(0)
    est = D.hessian_eigenvalues(model, None, batch, k=2)  # defaults: tol 1e-4, ≤ 100 products
    assert est.num_params == 244 and est.iterations < 100
    torch.testing.assert_close(
        torch.tensor(est.eigenvalues, dtype=torch.float64), exact[:2], rtol=1e-3, atol=0
    )
    assert est.to_dict()["method"] == "lanczos" and "eigenvectors" not in est.to_dict()
