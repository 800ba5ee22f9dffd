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


def exact_hessian(model, batch, loss_fn=None):
    """The dense Hessian of the loss w.r.t. all parameters (flattened in ``parameters()``
    order), from ``torch.autograd.functional.hessian`` on a copy of the model in its own
    mode(s): for BatchNorm in training mode, the batch-statistics loss."""
    import copy

    from torch.func import functional_call

    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    x, y = batch
    loss_fn = loss_fn or torch.nn.functional.cross_entropy

    def loss_of(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            n = shape.numel()
            params[name] = flat[start : start + n].view(shape)
            start += n
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat0)


def state_snapshot(model):
    """Every buffer, parameter value, ``.grad`` presence and mode, as comparable values."""
    return (
        [(n, b.tolist()) for n, b in model.named_buffers()],
        [(n, p.detach().tolist(), p.grad is None) for n, p in model.named_parameters()],
        [(n, m.training) for n, m in model.named_modules()],
    )
