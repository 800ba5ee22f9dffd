"""The dense Jacobian of training-mode batch normalization (docs/sources.md#seed-002).

Within one channel of m values, with x_hat the normalised values and σ² the biased
batch variance,

    ∂y_i/∂x_j = γ / sqrt(σ² + ε) · (δ_ij − 1/m − x_hat_i · x_hat_j / m)

with x_hat = (x − μ)/sqrt(σ² + ε), exactly as the layer computes it (this holds for any
ε ≥ 0, so it matches autograd to rounding). Every output depends on every input of the
channel, unlike eval mode, where the Jacobian is diagonal: γ/sqrt(running_var + ε)·δ_ij.
Channels do not interact, so the full Jacobian is block diagonal with these C blocks.
"""

from __future__ import annotations

import torch

from normlab.functional import _checks


def batch_norm_jacobian(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    channel_dim: int = 1,
) -> torch.Tensor:
    """Per-channel dense Jacobian of training-mode BN, shape ``(C, m, m)``.

    Args:
        x: input ``(N, C, *)`` (channel at ``channel_dim``); m = numel / C.
        weight: γ of shape ``(C,)`` or None (γ = 1).
        eps: the layer's ε.
        channel_dim: the channel dimension.

    Element ``[c, i, j]`` is ∂y_i/∂x_j for the i-th and j-th values of channel c in the order
    of ``x.movedim(channel_dim, 0).reshape(C, m)``. Computed in float64, returned in
    x's dtype. Memory is C·m², so this is for analysis of small batches.
    """
    where = "batch_norm_jacobian"
    _checks.check_floating(x, "x", where)
    _checks.check_eps(eps, where)
    c = _checks.canonical_dim(channel_dim, x.dim(), "channel_dim", where)
    num_channels = x.shape[c]
    _checks.check_param(weight, "weight", num_channels, where)
    xc = x.detach().movedim(c, 0).reshape(num_channels, -1).double()  # (C, m)
    m = xc.shape[1]
    if m < 2:
        raise _checks.one_value_per_channel_error(tuple(x.shape), where)
    mean = xc.mean(1, keepdim=True)
    var = (xc - mean).pow(2).mean(1, keepdim=True)  # (C, 1)
    invstd = torch.rsqrt(var + eps)
    x_hat = (xc - mean) * invstd  # (C, m)
    gamma = torch.ones_like(invstd) if weight is None else weight.detach().double().view(-1, 1)
    eye = torch.eye(m, dtype=torch.float64, device=x.device)
    outer = x_hat.unsqueeze(2) * x_hat.unsqueeze(1) / m  # (C, m, m)
    jac = (gamma * invstd).unsqueeze(2) * (eye - 1.0 / m - outer)
    return jac.to(x.dtype)
