"""Per-sample normalization: LayerNorm, RMSNorm, GroupNorm and InstanceNorm, on the engine.

Each normalises every sample with its own statistics over a set of its dims — trailing
``normalized_shape`` dims (LayerNorm, RMSNorm), groups of channels × positions
(GroupNorm), positions of one channel (InstanceNorm) — so training and eval are the same
computation, except for InstanceNorm's optional running statistics (torch's semantics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normlab import kernels
from normlab.functional import _checks
from normlab.functional._bn_checks import _param_shape, warn_if_skipped
from normlab.functional.batch_norm import update_running_stats_
from normlab.functional.engine import normalize_batch, normalize_with_stats, view_params
from normlab.functional.options import BNOptions, check_options
from normlab.functional.stats import reduce_count, work_dtype


def normalized_dims(
    input: torch.Tensor, normalized_shape: int | Sequence[int], where: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(normalized_shape, dims)`` for a reduction over the input's trailing dims.

    Raises a ValueError naming both shapes when the input's trailing dims differ from
    ``normalized_shape`` (docs/reliability.md case 3).
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
    mask: torch.Tensor | None = None,
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
        mask: optional bool tensor, True where an element counts (keyword-only):
            broadcastable to the input (e.g. ``(N, 1, H, W)`` for LayerNorm over
            ``(C, H, W)``), or of the input's leading shape ``input.shape[:-k]`` (a token
            mask, which leaves each counted token's output as without a mask and only stops
            gradients at padded tokens). Padded elements enter no statistic and get no
            gradient; their outputs are the normalised value (see
            :mod:`normlab.functional.masked`; torch ops, not the engine's kernels).

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
    if mask is not None:
        from normlab.functional import masked

        lead = input.dim() - len(shape)
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(input.shape[:lead]):
            # whole tokens: no counted token's statistics change, padded ones keep theirs
            m = masked.check_mask(
                mask.reshape(*mask.shape, *([1] * len(shape))), input, None, where
            )
            y = layer_norm(input, normalized_shape, weight, bias, eps, activation=activation,
                           negative_slope=negative_slope)  # fmt: skip
            return masked.stop_padded_grad(y, m)
        m = masked.check_mask(mask, input, None, where)
        if kernels.traced(input) or not bool(mask.all()):
            return masked.normalize_sample_masked(
                input, m, dims, weight, bias, eps, activation, negative_slope
            )[0]
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


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_groups(num_groups: int, num_channels: int, where: str) -> None:
    for name, v in (("num_groups", num_groups), ("num_channels", num_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    if num_channels % num_groups:
        raise ValueError(
            f"{where}: num_channels={num_channels} is not divisible by num_groups={num_groups}; "
            f"each group must hold the same number of channels. Choose num_groups from "
            f"{divisors(num_channels)} (1 is LayerNorm over (C, *), {num_channels} is "
            f"InstanceNorm)."
        )


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group normalization: the C channels of each sample split into ``num_groups`` groups
    of C/G; each group normalised with its own mean and biased variance over its C/G·S
    values; then a per-channel affine ``γ_c·x̂ + β_c`` and optional activation.

    Drop-in for :func:`torch.nn.functional.group_norm` (same positional arguments).

    Shapes: input ``(N, C, *S)``; weight, bias ``(C,)``. The input is viewed as
    ``(N, G, C/G, *S)`` (splitting one dim is a view for any strides, so channels-last
    input is not copied) and reduced over every dim after G. The output keeps the input's
    memory format. G = 1 is LayerNorm over ``(C, *S)`` with per-channel affine; G = C is
    InstanceNorm.

    ``mask`` (keyword-only): bool, broadcastable to ``(N, *S)`` (the input without its
    channel dim), True where a position counts; each group's statistics are then over
    its C/G channels at the counted positions only. Padded positions get no gradient and
    the normalised value as output; a group with no counted position normalises with
    mean 0, variance 1 (see :mod:`normlab.functional.masked`; torch ops).

    Reference: Wu & He, "Group Normalization", ECCV 2018, eq. (1)-(2), §3.1.
    """
    where = "group_norm"
    _checks.check_floating(input, "input", where)
    _checks.check_eps(eps, where)
    if input.dim() < 2:
        raise ValueError(
            f"{where}: expected an input of shape (N, C, *), got shape {list(input.shape)}; "
            f"for one sample use input.unsqueeze(0)."
        )
    n, c = input.shape[0], input.shape[1]
    check_groups(num_groups, c, where)
    for name, p in (("weight", weight), ("bias", bias)):
        _checks.check_param(p, name, c, where, " (one per channel)")
    spatial = tuple(input.shape[2:])
    grouped = input.view(n, num_groups, c // num_groups, *spatial)  # splitting a dim: a view
    pshape = (1, num_groups, c // num_groups) + (1,) * len(spatial)
    w, b = view_params(weight, pshape), view_params(bias, pshape)
    dims = tuple(range(2, grouped.dim()))
    if mask is not None:
        from normlab.functional import masked

        m = masked.check_mask(mask, input, 1, where)  # (N, 1, *S)
        if kernels.traced(input) or not bool(mask.all()):
            y = masked.normalize_sample_masked(
                grouped, m.unsqueeze(1), dims, w, b, eps, activation, negative_slope
            )[0]
            return y.reshape(input.shape)
    y, _, _ = normalize_batch(
        grouped, dims, w, b, eps=eps, activation=activation, negative_slope=negative_slope
    )
    return y.reshape(input.shape)


def _instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    use_input_stats: bool,
    options: BNOptions,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """:func:`instance_norm`, also returning whether a non-finite update was skipped;
    ``options``: momentum, eps, activation, negative_slope, nonfinite and where (the
    channel dim is 1; ``degenerate`` and ``save`` do not apply)."""
    where = options.where
    _checks.check_floating(input, "input", where)
    if options.momentum is None:
        raise ValueError(
            f"{where}: momentum must be a number in [0, 1], got None; the InstanceNorm layers "
            f"map momentum=None to 0 (running statistics never updated), as torch does."
        )
    check_options(options)
    if input.dim() < 3:
        raise ValueError(
            f"{where}: expected an input of shape (N, C, *S) with at least one spatial dim, got "
            f"shape {list(input.shape)}. InstanceNorm normalises each sample's channel over its "
            f"spatial positions; for (N, C) features use LayerNorm or BatchNorm1d."
        )
    c = input.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        _checks.check_param(t, name, c, where)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{where}: running_mean and running_var must both be tensors or both be None"
        )
    shape = _param_shape(input.dim(), 1, c)
    w, b = view_params(weight, shape), view_params(bias, shape)
    if mask is not None:
        from normlab.functional import masked

        m = masked.check_mask(mask, input, 1, where)
        if kernels.traced(input) or not bool(mask.all()) or not use_input_stats:
            return _masked_instance_norm(
                input, m, running_mean, running_var, w, b, use_input_stats, options
            )
    if not use_input_stats:
        if running_mean is None:
            raise ValueError(
                f"{where}: use_input_stats=False normalises with running statistics, but "
                f"running_mean/running_var are None. Construct the layer with "
                f"track_running_stats=True, or use the input's own statistics."
            )
        y = _with_running_stats(input, running_mean, running_var, w, b, options)
        return y, False
    dims = tuple(range(2, input.dim()))
    n = reduce_count(input.shape, dims)
    if n == 1:
        raise ValueError(
            f"{where}: expected more than 1 spatial element when training, got input of size "
            f"{list(input.shape)}. Instance statistics of a single value are undefined (the "
            f"output would be all beta). Use a larger spatial size, BatchNorm (statistics over "
            f"the batch), or eval mode with track_running_stats=True."
        )
    y, mean, var = normalize_batch(
        input, dims, w, b, eps=options.eps, activation=options.activation,
        negative_slope=options.negative_slope,
    )  # fmt: skip
    if running_mean is None or input.numel() == 0:
        return y, False
    # torch's rule (ATen instance_norm): every (sample, channel) pair updates a copy of
    # the running statistics with its own mean and unbiased variance, and the copies are
    # averaged over the batch, i.e. one EMA step with the batch-average of the instance
    # statistics. torch does not increment num_batches_tracked here; neither do we.
    mean = mean.reshape(input.shape[0], c).mean(0)
    unbiased = (var * (n / (n - 1))).reshape(input.shape[0], c).mean(0)
    return y, _update_running(running_mean, running_var, mean, unbiased, options)


def _with_running_stats(input, running_mean, running_var, w, b, options: BNOptions):
    """Instance norm's eval: normalise with the running statistics."""
    shape = _param_shape(input.dim(), 1, input.shape[1])
    return normalize_with_stats(
        input, running_mean.view(shape), running_var.view(shape), w, b, eps=options.eps,
        activation=options.activation, negative_slope=options.negative_slope,
    )  # fmt: skip


def _update_running(running_mean, running_var, mean, unbiased, options: BNOptions) -> bool:
    """One EMA step of the running statistics (no counter), under the nonfinite policy."""
    return update_running_stats_(
        running_mean, running_var, mean, unbiased, options.momentum,
        nonfinite=options.nonfinite, where=options.where,
    )  # fmt: skip


def _masked_instance_norm(
    input, m, running_mean, running_var, w, b, use_input_stats, options: BNOptions
) -> tuple[torch.Tensor, bool]:
    """:func:`_instance_norm` with a validated mask ``m`` (N, 1, *S). Running statistics:
    torch's rule restricted to the instances with at least 2 counted positions (the batch
    average of their means and unbiased variances); none such: no update."""
    from normlab.functional import masked

    if not use_input_stats:
        y = _with_running_stats(input, running_mean, running_var, w, b, options)
        return masked.stop_padded_grad(y, m), False
    dims = tuple(range(2, input.dim()))
    y, count, mean, var = masked.normalize_sample_masked(
        input, m, dims, w, b, options.eps, options.activation, options.negative_slope
    )
    if running_mean is None or input.numel() == 0:
        return y, False
    n_inst = input.shape[0]
    count = count.detach().reshape(n_inst, 1)
    ok = count > 1  # (N, 1): instances with a variance
    k = ok.sum(0).to(mean.dtype)  # (1,)
    mean = torch.where(ok, mean.detach().reshape(n_inst, -1), 0.0).sum(0) / k.clamp(min=1)
    unbiased = var.detach().reshape(n_inst, -1) * (count / (count - 1).clamp(min=1))
    unbiased = torch.where(ok, unbiased, 0.0).sum(0) / k.clamp(min=1)
    if kernels.traced(input):
        from normlab.functional import traced

        traced.update_running(
            running_mean, running_var, None, mean, unbiased, options.momentum,
            options.nonfinite, options.where, gate=(k > 0).reshape(()),
        )  # fmt: skip
        return y, False
    if int(k) == 0:
        return y, False
    return y, _update_running(running_mean, running_var, mean, unbiased, options)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
    nonfinite: str = "propagate",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Instance normalization: each (sample, channel) slice ``x[n, c]`` normalised by its
    own mean and biased variance over the spatial dims; per-channel affine; activation.

    Drop-in for :func:`torch.nn.functional.instance_norm` (same positional arguments).

    Args:
        input: ``(N, C, *S)`` with at least one spatial dim, floating point.
        running_mean, running_var: optional ``(C,)`` buffers. With ``use_input_stats`` they
            are updated (torch's rule): one EMA step toward the batch average of the
            instance means and of the instance *unbiased* variances. Without, they are the
            statistics normalised with.
        weight, bias: ``(C,)`` affine parameters or None.
        use_input_stats: normalise with instance statistics (training, or a layer that
            does not track); False uses the running statistics.
        momentum: EMA weight of the new statistics, in [0, 1] (no None here: the module
            maps None to 0, as torch's does).
        eps: added to the variance.
        activation, negative_slope: fused activation (keyword-only).
        nonfinite: running-statistics policy for NaN/Inf batches ('propagate' is torch;
            see :func:`normlab.functional.batch_norm`).
        mask: optional bool, broadcastable to ``(N, *S)``, True where a position counts
            (keyword-only): each instance's statistics over its counted positions only
            (no error for <= 1 of them: such an instance normalises with variance 0, or
            mean 0 / variance 1 when empty); padded positions get no gradient and the
            normalised value. Running statistics average the instances with >= 2
            counted positions. See :mod:`normlab.functional.masked`.

    Raises ValueError for one spatial element with ``use_input_stats`` (docs/reliability.md
    case 3).

    Reference: Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing
    Ingredient for Fast Stylization", 2016, eq. (2).
    """
    options = BNOptions(
        momentum, eps, activation=activation, negative_slope=negative_slope, nonfinite=nonfinite,
        where="instance_norm",
    )  # fmt: skip
    return warn_if_skipped(
        _instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, options, mask=mask
        ),
        "instance_norm",
        "statistics",
    )
