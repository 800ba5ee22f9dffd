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


# The unit roundoff u of the half formats (half an ulp at 1): a correctly rounded result
# is within u·|value| of the exact one.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_half_close(got, want, *, ulps=2.0, channel_dim=1, msg=""):
    """``got`` (bfloat16/float16) against the float64 ``want``: within the rounding of the
    result (u·|want|, u = :data:`UNIT_ROUNDOFF`; subnormals: half their spacing) plus
    ``ulps`` ulps (2u each) at the scale of ``want``'s channel (its largest magnitude over
    the channel), the arithmetic's error beyond that rounding. The channel's scale, not
    the element's: an output near 0 is a difference of terms of the channel's size."""
    u = UNIT_ROUNDOFF[got.dtype]
    want = want.double()
    dims = reduce_dims(want.dim(), channel_dim) if want.dim() > 1 else ()
    scale = want.abs().amax(dims, keepdim=True) if dims else want.abs()
    bound = u * want.abs() + ulps * 2 * u * scale + u * torch.finfo(got.dtype).tiny
    err = (got.double() - want).abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        raise AssertionError(
            f"{msg}: {int((err > bound).sum())} of {err.numel()} elements beyond "
            f"u|want| + {ulps} ulps of the channel's scale; worst at {worst}: got "
            f"{float(got.reshape(-1)[worst])}, want {float(want.reshape(-1)[worst])}"
        )


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
    "relu6": lambda z: torch.clamp(z, 0.0, 6.0),
    "hardtanh(-0.5, 2.0)": lambda z: torch.clamp(z, -0.5, 2.0),
    "hardswish": lambda z: z * torch.clamp(z + 3.0, 0.0, 6.0) / 6.0,
    "elu(0.5)": lambda z: torch.where(z > 0, z, 0.5 * (torch.exp(torch.clamp(z, max=0.0)) - 1)),
}


# -- batch renormalization (Ioffe 2017, Algorithm 1 and §3), step by step in NumPy -------


def renorm_limits(step, r_max, d_max, warmup, r_steps, d_steps):
    """The schedule read off the issue text, written independently of normlab's."""

    def lim(start, final, end):
        if step < warmup:
            return start
        if step >= end:
            return final
        return start + (final - start) * (step - warmup) / (end - warmup)

    return lim(1.0, r_max, r_steps), lim(0.0, d_max, d_steps)


def batch_renorm_step_numpy(x, dy, mu, var, gamma, beta, eps, momentum, r_max, d_max):
    """One training step of batch renorm for (N, C) input in float64 NumPy.

    Returns ``(y, dx, dgamma, dbeta, mu_new, var_new, r, d)``. Forward is Algorithm 1; the
    backward is the chain rule of §3 with r and d held constant:
        dx̂ = dy·γ;  dσ_B = Σ dx̂·(x − μ_B)·(−r/σ_B²);  dμ_B = Σ dx̂·(−r/σ_B)
        dx = dx̂·r/σ_B + dσ_B·(x − μ_B)/(m·σ_B) + dμ_B/m
    Running statistics: torch's EMA of the mean and of the unbiased variance.
    """
    import numpy as np

    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    m = x.shape[0]
    mu_b = x.mean(0)
    sigma_b = np.sqrt(((x - mu_b) ** 2).mean(0) + eps)
    sigma = np.sqrt(var + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
    x_hat = (x - mu_b) / sigma_b * r + d
    y = gamma * x_hat + beta
    dx_hat = dy * gamma
    dsigma_b = (dx_hat * (x - mu_b) * (-r / sigma_b**2)).sum(0)
    dmu_b = (dx_hat * (-r / sigma_b)).sum(0)
    dx = dx_hat * r / sigma_b + dsigma_b * (x - mu_b) / (m * sigma_b) + dmu_b / m
    dgamma = (dy * x_hat).sum(0)
    dbeta = dy.sum(0)
    unbiased = ((x - mu_b) ** 2).sum(0) / (m - 1)
    mu_new = (1 - momentum) * mu + momentum * mu_b
    var_new = (1 - momentum) * var + momentum * unbiased
    return y, dx, dgamma, dbeta, mu_new, var_new, r, d


# -- ghost batch normalization: a loop over chunks -------------------------------------


def ghost_chunk_sizes(n, vbs, values_per_row=1):
    """torch.split(vbs) sizes, with a one-value remainder merged into its neighbour."""
    sizes = [vbs] * (n // vbs) + ([n % vbs] if n % vbs else [])
    if len(sizes) > 1 and sizes[-1] * values_per_row == 1:
        sizes = [*sizes[:-2], sizes[-2] + 1]
    return sizes


def ghost_batch_norm_loop(x, vbs, weight=None, bias=None, eps=1e-5):
    """Training-mode ghost BN by looping over chunks, each through ``batch_norm_train``.

    Returns ``(y, mean, pooled_within_var)``: the per-channel statistics a once-per-call
    running update should use (batch mean; Σ_g Σ (x − μ_g)² / (m − G))."""
    per_row = x[0].numel() // x.shape[1]
    sizes = ghost_chunk_sizes(x.shape[0], vbs, per_row)
    outs, ss = [], 0.0
    for chunk in x.split(sizes):
        outs.append(batch_norm_train(chunk, weight, bias, eps))
        c = chunk.double()
        dims = reduce_dims(c.dim())
        ss = ss + (c - c.mean(dims, keepdim=True)).pow(2).sum(dims)
    total = x.numel() // x.shape[1]
    mean = x.double().mean(reduce_dims(x.dim()))
    return torch.cat(outs), mean, ss / (total - len(sizes))


# -- per-sample norms in float64 --------------------------------------------------------


def group_norm(x, groups, weight=None, bias=None, eps=1e-5):
    x = x.double()
    g = x.reshape(x.shape[0], groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = (g - mean).pow(2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * bcast(weight.double(), x.dim())
    if bias is not None:
        y = y + bcast(bias.double(), x.dim())
    return y


def layer_norm(x, k, weight=None, bias=None, eps=1e-5):
    """Over the last ``k`` dims."""
    x = x.double()
    dims = tuple(range(x.dim() - k, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def rms_norm(x, k, weight=None, eps=1e-6):
    x = x.double()
    dims = tuple(range(x.dim() - k, x.dim()))
    y = x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def batch_renorm_train(
    x, running_mean, running_var, weight, bias, eps, r_max, d_max, channel_dim=1
):
    """Training-mode batch renorm in float64 torch ops, r and d detached (autograd then
    gives the paper's gradient)."""
    x = x.double()
    nd = x.dim()
    dims = reduce_dims(nd, channel_dim)
    mu_b = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt((x - mu_b).pow(2).mean(dims, keepdim=True) + eps)
    mu = bcast(running_mean.double(), nd, channel_dim)
    sigma = torch.sqrt(bcast(running_var.double(), nd, channel_dim) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - mu) / sigma).clamp(-d_max, d_max).detach()
    y = (x - mu_b) / sigma_b * r + d
    if weight is not None:
        y = y * bcast(weight.double(), nd, channel_dim)
    if bias is not None:
        y = y + bcast(bias.double(), nd, channel_dim)
    return y


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
