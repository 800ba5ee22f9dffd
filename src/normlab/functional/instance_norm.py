"""Instance normalization on the engine, with torch's running-statistics semantics."""

from __future__ import annotations

import warnings

import torch

from normlab.functional import _checks
from normlab.functional.batch_norm import (
    NonFiniteStatisticsWarning,
    _param_shape,
    update_running_stats_,
)
from normlab.functional.engine import normalize_batch, normalize_with_stats
from normlab.functional.stats import reduce_count


def _instance_norm(
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
    where: str = "instance_norm",
) -> tuple[torch.Tensor, bool]:
    """:func:`instance_norm`, also returning whether a non-finite update was skipped."""
    _checks.check_floating(input, "input", where)
    _checks.check_eps(eps, where)
    _checks.check_momentum(momentum, where, allow_none=False)
    _checks.check_nonfinite(nonfinite, where)
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
    w = None if weight is None else weight.view(shape)
    b = None if bias is None else bias.view(shape)
    if not use_input_stats:
        if running_mean is None:
            raise ValueError(
                f"{where}: use_input_stats=False normalises with running statistics, but "
                f"running_mean/running_var are None. Construct the layer with "
                f"track_running_stats=True, or use the input's own statistics."
            )
        y = normalize_with_stats(
            input,
            running_mean.view(shape),
            running_var.view(shape),
            w,
            b,
            eps=eps,
            activation=activation,
            negative_slope=negative_slope,
        )
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
        input, dims, w, b, eps=eps, activation=activation, negative_slope=negative_slope
    )
    if running_mean is None or input.numel() == 0:
        return y, False
    # torch's rule (ATen instance_norm): every (sample, channel) pair updates a copy of
    # the running statistics with its own mean and unbiased variance, and the copies are
    # averaged over the batch, i.e. one EMA step with the batch-average of the instance
    # statistics. torch does not increment num_batches_tracked here; neither do we.
    mean = mean.reshape(input.shape[0], c).mean(0)
    unbiased = (var * (n / (n - 1))).reshape(input.shape[0], c).mean(0)
    skipped = update_running_stats_(
        running_mean, running_var, mean, unbiased, momentum, nonfinite=nonfinite, where=where
    )
    return y, skipped


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

    Raises ValueError for one spatial element with ``use_input_stats`` (reliability 3).

    Reference: Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing
    Ingredient for Fast Stylization", 2016, eq. (2).
    """
    y, skipped = _instance_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        use_input_stats,
        momentum,
        eps,
        activation=activation,
        negative_slope=negative_slope,
        nonfinite=nonfinite,
    )
    if skipped:
        warnings.warn(
            "instance_norm: non-finite statistics; running statistics not updated",
            NonFiniteStatisticsWarning,
            stacklevel=2,
        )
    return y
