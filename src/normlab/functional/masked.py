"""Masked (variable-length) statistics: normalization where only some positions count.

A ``mask`` is a bool tensor, True where a position counts (a real token or pixel) and
False where it is padding. For a BatchNorm-type layer it is broadcastable to the input
*without* its channel dim (a ``(N, L)`` mask for ``(N, L, C)`` or ``(N, C, L)`` input); it
is viewed with a size-1 channel dim so that every channel sees the same positions. Then

    n      = Σ m                                  (counted values per statistic)
    mean   = Σ m·x / n
    var    = Σ m·(x − mean)² / n                   (biased; two passes, as the engine)
    y      = act(γ·(x − mean)/sqrt(var + ε) + β)   at EVERY position

Padded positions neither enter the statistics (nor, therefore, running statistics or
SyncBatchNorm's all-gathered counts) nor receive gradient: their outputs are held
constant for autograd (``where(m, y, y.detach())``), so dx = 0 there and they add
nothing to dγ, dβ. Padding may hold anything, NaN included: it is replaced by 0 before
any sum (``where``, not a multiplication by the mask, which would turn NaN·0 into NaN).

Outputs at padded positions are the *normalised value* (the same per-channel map as the
counted positions), not zero. This is what Keras 3 (``BatchNormalization._moments`` with
``mask``: masked moments, then ``batch_normalization`` of the whole input) and Flax
(``nn.BatchNorm/LayerNorm/GroupNorm(mask=...)``: "the positions for which the mean and
the variance should be computed", the whole input normalised) both do, and it keeps
eval mode independent of the mask: at inference BatchNorm stays one per-channel affine
map (foldable into a convolution, exportable without a mask input); the mask in eval
only stops gradients at padded positions. A caller that wants zeros there multiplies by
the mask, which is what a padded sequence's next layer usually does anyway.

Numerics: plain differentiable torch ops in the working dtype (float32 for half
inputs), not the fused Numba kernels; autograd differentiates them (double backward,
torch.func and torch.compile included). Everything is branch-free in the data, so the
same code traces; the count of a statistic is data here (not a static shape), see
:func:`normlab.functional.batch_norm.batch_norm` (``degenerate``) for what happens when it
is ≤ 1. Slices of the per-sample norms (GroupNorm, InstanceNorm, LayerNorm) with no
counted value normalise with mean 0 and variance 1 (their outputs are all padding).

References: Ioffe & Szegedy, ICML 2015 (batch normalization); Keras 3
``keras.layers.BatchNormalization`` and Flax ``flax.linen.BatchNorm`` (the ``mask``
argument, same semantics for the statistics).
"""

from __future__ import annotations

import torch

from normlab.functional import _checks
from normlab.functional.stats import work_dtype


def check_mask(
    mask: torch.Tensor, input: torch.Tensor, channel_dim: int | None, where: str
) -> torch.Tensor:
    """Validate ``mask`` and return it viewed to broadcast against ``input``.

    ``channel_dim``: the input dim the mask does not have (it gets size 1 there); None:
    the mask is broadcastable to the whole input (LayerNorm). Raises TypeError for a
    non-bool mask and ValueError naming the expected shape for one that does not fit.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{where}: mask must have dtype torch.bool (True where a position counts), got "
            f"{mask.dtype}; convert it with mask.bool() or build it as e.g. "
            f"torch.arange(L) < lengths[:, None]."
        )
    if mask.device != input.device:
        raise ValueError(
            f"{where}: mask is on {mask.device} but the input is on {input.device}; move it "
            f"with mask.to(input.device)."
        )
    if channel_dim is None:
        expected = tuple(input.shape)
    else:
        c = channel_dim % input.dim()
        expected = tuple(s for d, s in enumerate(input.shape) if d != c)
    try:
        ok = torch.broadcast_shapes(tuple(mask.shape), expected) == torch.Size(expected)
    except RuntimeError:
        ok = False
    if not ok or mask.dim() > len(expected):
        what = "the input's shape" if channel_dim is None else "the input's shape without "
        what += "" if channel_dim is None else f"its channel dim {channel_dim}"
        raise ValueError(
            f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to {what}: "
            f"expected {expected} (or a shape broadcastable to it, e.g. with 1s) for input of "
            f"shape {tuple(input.shape)}. For (N, L, C) or (N, C, L) sequences that is an "
            f"(N, L) mask, True at real positions."
        )
    m = mask.expand(expected)
    if channel_dim is not None:
        m = m.unsqueeze(channel_dim % input.dim())
    return m


def masked_moments(
    x: torch.Tensor, m: torch.Tensor, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, mean, var)`` over ``dims`` of the positions where ``m`` is True, keepdim,
    differentiable and branch-free: ``count = Σ m`` (x's dtype), ``mean = Σ m·x / n``,
    ``var = Σ m·(x − mean)² / n`` (biased, two passes) with ``n = max(count, 1)`` so that
    a slice with no counted value has mean 0 and variance 0 (finite, for gradients)."""
    mb = m.expand([x.shape[d] if d in dims else m.shape[d] for d in range(x.dim())])
    count = mb.sum(dims, keepdim=True, dtype=x.dtype)
    n = count.clamp(min=1)
    zero = x.new_zeros(())
    mean = torch.where(m, x, zero).sum(dims, keepdim=True) / n
    d = torch.where(m, x - mean, zero)
    var = (d * d).sum(dims, keepdim=True) / n
    return count, mean, var


def normalize_masked(
    input: torch.Tensor,
    m: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> torch.Tensor:
    """y of a masked normalization, ``act(γ·(x − mean)/sqrt(var + ε) + β)`` with plain ops
    (everything broadcast): counted positions differentiable (computed from the input with
    padding replaced by 0, so a NaN in the padding cannot reach a gradient), padded
    positions the same map of the raw input, held constant for autograd."""
    from normlab.functional.engine import _affine_act

    wd = work_dtype(input.dtype)
    x = input.to(wd)
    w = None if weight is None else weight.to(wd)
    b = None if bias is None else bias.to(wd)

    def affine_act(v: torch.Tensor) -> torch.Tensor:
        x_hat = (v - mean) * torch.rsqrt(var + eps)
        return _affine_act(x_hat, w, b, activation, negative_slope, False)

    y = affine_act(torch.where(m, x, x.new_zeros(())))
    with torch.no_grad():
        y_pad = affine_act(x)
    return torch.where(m, y, y_pad).to(input.dtype)


def stop_padded_grad(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``y`` with its padded positions held constant for autograd (values unchanged)."""
    return torch.where(m, y, y.detach())


def empty_slices_safe(
    count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) with slices that counted no value set to (0, 1): their outputs are all
    padding, and variance 1 keeps them the plain affine map γ·x + β of the raw input."""
    empty = count < 1
    return torch.where(empty, 0.0, mean), torch.where(empty, 1.0, var)


def check_sample_mask(mask, input, channel_dim, where):
    """:func:`check_mask` for the per-sample norms (same rules), the floating check first."""
    _checks.check_floating(input, "input", where)
    return check_mask(mask, input, channel_dim, where)


def normalize_sample_masked(
    input: torch.Tensor,
    m: torch.Tensor,
    dims: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A per-sample norm's masked training computation: ``(y, count, mean, var)`` with
    statistics over ``dims`` of the counted positions (keepdim, working dtype; the
    returned statistics are the raw ones, before empty slices are made (0, 1))."""
    x = input.to(work_dtype(input.dtype))
    count, mean, var = masked_moments(x, m, dims)
    safe_mean, safe_var = empty_slices_safe(count, mean, var)
    y = normalize_masked(
        input, m, safe_mean, safe_var, weight, bias, eps, activation, negative_slope
    )
    return y, count, mean, var
