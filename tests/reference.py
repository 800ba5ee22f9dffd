"""Independent float64 references, written once and shared by every test.

These are the textbook formulas composed from plain torch ops (autograd differentiates
them), with no code from normlab.
"""

from __future__ import annotations

import torch


def reduce_dims(ndim: int, channel_dim: int = 1) -> tuple[int, ...]:
    c = channel_dim % ndim
    return tuple(d for d in range(ndim) if d != c)


def bcast(p: torch.Tensor | None, ndim: int, channel_dim: int = 1) -> torch.Tensor | None:
    if p is None:
        return None
    shape = [1] * ndim
    shape[channel_dim % ndim] = -1
    return p.reshape(shape)


def batch_norm_train(x, weight=None, bias=None, eps=1e-5, channel_dim=1):
    """Training-mode BN in float64: two-pass mean and biased variance per channel."""
    x = x.double()
    dims = reduce_dims(x.dim(), channel_dim)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * bcast(weight.double(), x.dim(), channel_dim)
    if bias is not None:
        y = y + bcast(bias.double(), x.dim(), channel_dim)
    return y


def batch_norm_eval(x, mean, var, weight=None, bias=None, eps=1e-5, channel_dim=1):
    x = x.double()
    nd = x.dim()
    y = (x - bcast(mean.double(), nd, channel_dim)) / torch.sqrt(
        bcast(var.double(), nd, channel_dim) + eps
    )
    if weight is not None:
        y = y * bcast(weight.double(), nd, channel_dim)
    if bias is not None:
        y = y + bcast(bias.double(), nd, channel_dim)
    return y


def batch_stats(x, channel_dim=1):
    """(mean, biased var, unbiased var, count) per channel, float64."""
    x = x.double()
    dims = reduce_dims(x.dim(), channel_dim)
    n = x.numel() // x.shape[channel_dim]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    return mean, var, var * n / (n - 1), n


ACTIVATIONS = {
    None: lambda z: z,
    "identity": lambda z: z,
    "relu": torch.relu,
    "leaky_relu": lambda z: torch.where(z > 0, z, 0.01 * z),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": lambda z: z * torch.sigmoid(z),
}
