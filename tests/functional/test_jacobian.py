import torch

import normlab.functional as NF


def test_jacobian_matches_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)  # m = 6 values per channel
    w = torch.tensor([1.5, -0.5], dtype=torch.float64)
    jac = NF.batch_norm_jacobian(x, w, eps=1e-3)
    full = torch.autograd.functional.jacobian(
        lambda t: NF.batch_norm(t, None, None, w, training=True, eps=1e-3), x
    )  # (N, C, L, N, C, L)
    blocks = torch.stack([full[:, c, :, :, c, :].reshape(6, 6) for c in range(2)])
    assert full[:, 0, :, :, 1, :].abs().max() == 0  # channels do not interact
    full = blocks
    torch.testing.assert_close(jac, full, rtol=1e-10, atol=1e-12)


def test_jacobian_formula_and_eval_is_diagonal():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    jac = NF.batch_norm_jacobian(x, eps=0.0)[0]
    x_hat = (x.flatten() - 2.5) / 1.25**0.5
    expected = (
        torch.eye(4, dtype=torch.float64) - 0.25 - torch.outer(x_hat, x_hat) / 4
    ) / 1.25**0.5
    torch.testing.assert_close(jac, expected)
    assert jac.sum(1).abs().max() < 1e-12  # rows sum to 0: a shift of x changes nothing
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.full((1,), 2.0, dtype=torch.float64)
    eval_jac = torch.autograd.functional.jacobian(
        lambda t: NF.batch_norm(t, rm, rv, training=False, eps=0.0), x
    ).reshape(4, 4)
    torch.testing.assert_close(eval_jac, torch.eye(4, dtype=torch.float64) / 2.0**0.5)
