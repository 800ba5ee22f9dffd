"""Per-sample normalization over trailing dims: LayerNorm and RMSNorm, on the engine.

Both reduce over the last ``len(normalized_shape)`` dims of each sample, so training and
eval are the same computation and there are no running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normlab.functional import _checks
from normlab.functional.engine import normalize_batch
from normlab.functional.stats import work_dtype


def normalized_dims(
    input: torch.Tensor, normalized_shape: int | Sequence[int], where: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(normalized_shape, dims)`` for a reduction over the input's trailing dims.

    Raises a ValueError naming both shapes when the input's trailing dims differ from
    ``normalized_shape`` (reliability case 3).
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise ValueError(
            f"{where}: normalized_shape={list(shape)} must equal the last {k} dim(s) of the "
            f"input, got input of shape {list(input.shape)}. Construct the layer with "
            f"normalized_shape=input.shape[-{max(k, 1)}:] (e.g. (C, H, W) for images, (D,) for "
            f"tokens), or move the normalized dims to the end."
        )
    return shape, tuple(range(input.dim() - k, input.dim()))


def _check_affine(p: torch.Tensor | None, name: str, shape: tuple[int, ...], where: str) -> None:
    if p is not None and tuple(p.shape) != shape:
        raise ValueError(
            f"{where}: {name} must have shape {shape} (= normalized_shape), got {tuple(p.shape)}"
        )


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Layer normalization: ``y = act(γ ⊙ (x − μ) / sqrt(σ² + ε) + β)``, with μ and the
    biased σ² over the trailing ``normalized_shape`` dims of each sample.

    Drop-in for :func:`torch.nn.functional.layer_norm` (same positional arguments).

    Args:
        input: ``(*, *normalized_shape)``, floating point.
        normalized_shape: the trailing shape reduced over (an int for the last dim).
        weight, bias: elementwise γ, β of shape ``normalized_shape``, or None.
        eps: added to the variance (≥ 0).
        activation, negative_slope: fused activation after the affine (keyword-only).

    Numerics: the engine's shifted two-pass statistics (float32 for half inputs),
    closed-form backward.

    Reference: Ba, Kiros & Hinton, "Layer Normalization", 2016, eq. (4).
    """
    where = "layer_norm"
    _checks.check_floating(input, "input", where)
    _checks.check_eps(eps, where)
    shape, dims = normalized_dims(input, normalized_shape, where)
    _check_affine(weight, "weight", shape, where)
    _check_affine(bias, "bias", shape, where)
    y, _, _ = normalize_batch(
        input, dims, weight, bias, eps=eps, activation=activation, negative_slope=negative_slope
    )
    return y


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Root-mean-square normalization: ``y = act(γ ⊙ x / sqrt(mean(x²) + ε))``, the mean
    over the trailing ``normalized_shape`` dims; no centring, no bias.

    Drop-in for :func:`torch.nn.functional.rms_norm`. ``eps=None`` is the machine epsilon
    of the computation dtype, as torch: ``torch.finfo(float32).eps`` for float16/bfloat16/
    float32 input, ``torch.finfo(float64).eps`` for float64.

    Backward (engine, ``center=False``): dx = (g − x̂·mean(g·x̂)) / rms with g = dy·γ.

    Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019,
    eq. (4).
    """
    where = "rms_norm"
    _checks.check_floating(input, "input", where)
    if eps is None:
        eps = torch.finfo(work_dtype(input.dtype)).eps
    _checks.check_eps(eps, where)
    shape, dims = normalized_dims(input, normalized_shape, where)
    _check_affine(weight, "weight", shape, where)
    y, _, _ = normalize_batch(
        input,
        dims,
        weight,
        None,
        eps=eps,
        center=False,
        activation=activation,
        negative_slope=negative_slope,
    )
    return y
