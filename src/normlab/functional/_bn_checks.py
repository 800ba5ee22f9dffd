"""Validation of a batch-norm call and what it establishes (:class:`BatchNormLayout`), and
the bookkeeping every training path of :func:`normlab.functional.batch_norm` shares: the
running update to fold in and what a skipped (non-finite) batch does."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from normlab.functional import _checks
from normlab.functional.engine import RunningUpdate
from normlab.functional.options import BNOptions, check_options
from normlab.functional.stats import reduce_count


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had NaN/Inf statistics; the running statistics were not updated."""


def _param_shape(ndim: int, channel_dim: int, num_channels: int) -> list[int]:
    shape = [1] * ndim
    shape[channel_dim] = num_channels
    return shape


def _check_running(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float | None,
    training: bool,
    num_batches_tracked: torch.Tensor | None,
    where: str,
) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{where}: running_mean and running_var must both be tensors or both be None"
        )
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            f"{where}: momentum=None (cumulative average) needs num_batches_tracked, a 0-d int64 "
            f"tensor counting the batches seen; or pass a float momentum such as 0.1."
        )


def channel_layout(
    input: torch.Tensor,
    channel_dim: int,
    params: dict[str, torch.Tensor | None],
    where: str,
) -> tuple[int, tuple[int, ...], list[int]]:
    """Validate a per-channel normalization call and return its layout.

    Checks the input (floating, at least (N, C)) and every per-channel tensor in
    ``params`` (shape ``(C,)``). Returns ``(c, dims, shape)``: the canonical channel dim,
    the reduction dims (all others) and the broadcast shape of a per-channel tensor.
    """
    _checks.check_floating(input, "input", where)
    if input.dim() < 2:
        raise ValueError(
            f"{where}: input must have a batch dimension and a channel dimension, got shape "
            f"{tuple(input.shape)}; for a single sample of C features use input.unsqueeze(0) "
            f"(and eval mode)."
        )
    c = _checks.canonical_dim(channel_dim, input.dim(), "channel_dim", where)
    num_channels = input.shape[c]
    for name, t in params.items():
        _checks.check_param(t, name, num_channels, where, f" (channel_dim={channel_dim})")
    dims = tuple(d for d in range(input.dim()) if d != c)
    return c, dims, _param_shape(input.dim(), c, num_channels)


def _nonfinite_error(where: str) -> FloatingPointError:
    return FloatingPointError(
        f"{where}: the batch statistics are not finite (the input holds NaN or Inf, "
        f"or overflows); running statistics were left unchanged. Find the source "
        f"(learning rate, data, loss scale), or construct the layer with "
        f"nonfinite='skip' to skip such batches."
    )


@dataclass(frozen=True)
class BatchNormLayout:
    """What validation of a :func:`batch_norm` call establishes about its shapes:
    ``dims`` (the reduction dims, ascending), ``shape`` (the broadcast shape of a
    per-channel tensor), ``n`` (values per channel), ``view`` (whether a (C,) tensor
    needs viewing as ``shape`` to broadcast: not when the channel dim is the last one,
    as for (N, C) input, which saves a view and its autograd node per parameter) and
    ``channel`` (the channel dim, non-negative)."""

    dims: tuple[int, ...]
    shape: list[int]
    n: int
    view: bool
    channel: int


def _check_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    options: BNOptions,
    num_batches_tracked: torch.Tensor | None,
    local_stats: bool,
) -> BatchNormLayout:
    """Every check of a :func:`batch_norm` call, raising the documented errors; the
    result depends only on the arguments' types, shapes and flags. ``local_stats``: the
    training statistics are this input's (no ``source_fn``), so one value per channel is
    an error here rather than after the collective. ``options.degenerate``: see
    :func:`batch_norm`; only 'error' raises for one value per channel here."""
    check_options(options)
    where, degenerate, momentum = options.where, options.degenerate, options.momentum
    c, dims, shape = channel_layout(
        input,
        options.channel_dim,
        {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var},
        where,
    )
    _check_running(running_mean, running_var, momentum, training, num_batches_tracked, where)
    if not training and running_mean is None:
        raise ValueError(
            f"{where}: training=False normalises with running statistics, but "
            f"running_mean/running_var are None. Pass them, or training=True to use the "
            f"batch's own statistics."
        )
    if training and degenerate == "eval" and running_mean is None:
        raise ValueError(
            f"{where}: degenerate='eval' normalises a batch of <= 1 value per channel with the "
            f"running statistics, but there are none (running_mean/running_var are None, "
            f"track_running_stats=False). Pass them, or use degenerate='skip' or 'error'."
        )
    n = reduce_count(input.shape, dims)
    if training and local_stats and n == 1 and degenerate == "error":
        raise _checks.one_value_per_channel_error(tuple(input.shape), where)
    return BatchNormLayout(dims, shape, n, c != input.dim() - 1, c)


def running_update(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None,
    nonfinite: str,
    n: int,
) -> RunningUpdate | None:
    """The engine's :class:`~normlab.functional.engine.RunningUpdate` for these buffers, or
    None when there are none or the batch is empty (no statistics to fold in)."""
    if running_mean is None or n <= 0:
        return None
    return RunningUpdate(
        running_mean, running_var, momentum, num_batches_tracked, nonfinite != "propagate"
    )


def skipped_outcome(
    y: torch.Tensor, running: RunningUpdate | None, nonfinite: str, where: str
) -> tuple[torch.Tensor, bool]:
    """``(y, skipped)`` after a training forward that folded ``running`` in: a batch
    skipped for non-finite statistics raises under nonfinite='raise' (nothing was changed)."""
    if running is not None and running.skipped:
        if nonfinite == "raise":
            raise _nonfinite_error(where)
        return y, True
    return y, False


def warn_if_skipped(
    result: tuple[torch.Tensor, bool], where: str, what: str = "batch statistics"
) -> torch.Tensor:
    """The output of a functional call's private ``(y, skipped)`` result, warning (at the
    caller of the public function) when a non-finite batch left the running statistics."""
    y, skipped = result
    if skipped:
        warnings.warn(
            f"{where}: non-finite {what}; running statistics not updated",
            NonFiniteStatisticsWarning,
            stacklevel=3,
        )
    return y


def traced_running_update(
    running_mean, running_var, num_batches_tracked, mean, var, n, options: BNOptions
) -> None:
    """Fold traced batch statistics (biased ``var`` over ``n`` values) into the running
    buffers without branching on the data (:func:`normlab.functional.traced.update_running`);
    n = 1 gives a NaN unbiased variance, which 'skip' masks out."""
    if running_mean is None or n <= 0:
        return
    from normlab.functional import traced

    unbiased = var * (n / (n - 1)) if n > 1 else var * float("nan")
    traced.update_running(
        running_mean, running_var, num_batches_tracked, mean, unbiased, options.momentum,
        options.nonfinite, options.where,
    )  # fmt: skip
