"""Running (moving-average) statistics, as BatchNorm keeps them.

torch's convention: ``running = (1 − momentum) · running + momentum · batch``; with
``momentum=None`` the factor is 1/t at the t-th batch, a cumulative average.

A zero-started EMA is biased toward its initial value early on (docs/sources.md#seed-002):
with a true mean m, E[r_t] = m·(1 − (1 − μ)^t) when r_0 = 0. :func:`ema_debias` removes the
initial value's weight exactly: (r_t − (1 − μ)^t · r_0) / (1 − (1 − μ)^t). For the running
mean (r_0 = 0) this is the seed's r_t / (1 − (1 − μ)^t); for the running variance torch
starts at r_0 = 1, which the general form handles. Kingma & Ba (2015, Adam, §3) use the
same correction.
"""

from __future__ import annotations

import torch


def _ema_update_(running: torch.Tensor, batch_value: torch.Tensor, factor: float) -> torch.Tensor:
    return running.mul_(1.0 - factor).add_(batch_value.to(running.dtype), alpha=factor)


def ema_update_(running: torch.Tensor, batch_value: torch.Tensor, factor: float) -> torch.Tensor:
    """In place: running ← (1 − factor)·running + factor·batch_value. Returns ``running``."""
    with torch.no_grad():
        return _ema_update_(running, batch_value, factor)


def fold_running_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    unbiased_var: torch.Tensor,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None = None,
) -> None:
    """One BatchNorm running-statistics step, in place: ``num_batches_tracked`` (if given)
    is incremented first, then both buffers move by :func:`ema_update_` with factor
    ``momentum``, or ``1/t`` at the t-th update when ``momentum`` is None (torch's rule).
    ``mean``/``unbiased_var`` have the buffers' number of elements."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        factor = momentum if momentum is not None else cumulative_factor(int(num_batches_tracked))
        _ema_update_(running_mean, mean.reshape(running_mean.shape), factor)
        _ema_update_(running_var, unbiased_var.reshape(running_var.shape), factor)


def cumulative_factor(num_batches_tracked: int) -> float:
    """torch's ``momentum=None``: the t-th batch gets weight 1/t (equal weights)."""
    return 1.0 / float(num_batches_tracked)


def ema_debias(
    running: torch.Tensor, initial: float, momentum: float | None, steps: int | torch.Tensor
) -> torch.Tensor:
    """The running statistic with the weight of its initial value removed.

    Args:
        running: the EMA after ``steps`` updates.
        initial: its value before the first update (0 for a mean, 1 for torch's variance).
        momentum: the EMA's factor; ``None`` (cumulative average) has no bias.
        steps: number of updates so far (``num_batches_tracked``): an int, or a 0-d
            tensor (traced code: the result is then computed without branching on it).

    Returns ``running`` itself when there is nothing to correct (``steps == 0``,
    ``momentum`` None, 0 or 1). Assumes a constant momentum since the last reset.
    """
    if momentum is None or momentum in (0.0, 1.0):
        return running
    if isinstance(steps, torch.Tensor):  # traced code: no branch on the counter's value
        decay = (1.0 - momentum) ** steps.to(running.dtype)
        debiased = (running - decay * initial) / (1.0 - decay)
        return torch.where(steps > 0, debiased, running)
    if steps <= 0:
        return running
    decay = (1.0 - momentum) ** steps
    return (running - decay * initial) / (1.0 - decay)
