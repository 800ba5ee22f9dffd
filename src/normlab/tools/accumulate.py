"""Running statistics that are gradient-accumulation aware.

With gradient accumulation, one optimizer step sees k micro-batches of size b, and the
gradient is that of one batch of k·b (up to BN's per-micro-batch normalisation). The
running statistics, however, are updated k times with momentum μ, so the last
micro-batch weighs μ and the first μ(1−μ)^(k−1): the EMA forgets k times faster per
optimizer step than with real batches of k·b, each update uses a noisier small-batch
variance, and ``num_batches_tracked`` counts micro-batches. :func:`accumulate_stats`
gathers the sufficient statistics (count, mean, M2) of all k micro-batches and applies
one update per step — the update one batch of k·b would have made:

    running_mean ← (1 − μ) · running_mean + μ · mean(all k·b)
    running_var  ← (1 − μ) · running_var  + μ · M2(all k·b) / (n − 1)
    num_batches_tracked ← num_batches_tracked + 1

(μ = 1/num_batches_tracked for ``momentum=None``). The forward pass is not changed:
each micro-batch is still normalised with its own statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from normlab.functional.batch_norm import NonFiniteStatisticsWarning
from normlab.functional.ema import cumulative_factor, ema_update_
from normlab.tools._common import (
    Moments64,
    all_reduce_moments,
    batch_norm_layers,
    channel_dim,
    running_stats_untouched,
    tracks_stats,
)
from normlab.tools.freeze import stats_frozen


def _is_sync(module: nn.Module) -> bool:
    # torch.nn.SyncBatchNorm and normlab's drop-in both carry a process_group.
    return hasattr(module, "process_group")


@contextmanager
def accumulate_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Defer every BN running-statistics update inside the block to one update at its end,
    from all the micro-batches together. **Mutates** the model's statistics on exit.

    Use one block per optimizer step::

        for step_batches in loader_of_k_microbatches:
            with nl.accumulate_stats(model):
                for x, y in step_batches:
                    (loss_fn(model(x), y) / k).backward()
            optimizer.step(); optimizer.zero_grad()

    Only layers in training mode with running statistics take part (layers frozen with
    :func:`normlab.freeze` or in eval mode are untouched). SyncBatchNorm layers pool the
    accumulated statistics over their process group at exit (two collectives for all of
    them), as their per-step updates would. If the block raises, the gathered statistics
    are dropped and no running statistic changes. A combined batch with NaN/Inf statistics
    follows the layer's ``nonfinite`` policy (normlab layers; torch layers propagate, as
    torch does). Batch renorm layers see the step's starting running statistics in every
    micro-batch, and their schedule advances once per step.
    """
    layers = [(n, m) for n, m in batch_norm_layers(model) if tracks_stats(m)]
    accs = {m: Moments64(m.num_features, m.running_mean.device) for _, m in layers}
    handles = []

    def collect(module, args):
        if module.training and not stats_frozen(module):
            accs[module].add(args[0], channel_dim(module))

    try:
        for _, m in layers:
            handles.append(m.register_forward_pre_hook(collect))
        # Training forwards normalise as usual and update nothing until the end.
        with running_stats_untouched(m for _, m in layers):
            yield model
    finally:
        for h in handles:
            h.remove()
    # Reached only when the block finished without an exception.
    groups: dict[int, tuple] = {}
    for _, m in layers:
        if _is_sync(m):
            key = id(m.process_group)
            groups.setdefault(key, (m.process_group, []))[1].append(accs[m])
    for group, group_accs in groups.values():
        all_reduce_moments(group_accs, group)
    # Decide every layer first, so a 'raise' leaves all statistics unchanged.
    updates = [(name, m, *_combined(name, m, accs[m])) for name, m in layers]
    for _, m, mean, var in updates:
        if mean is not None:
            _ema(m, mean, var)


def _combined(name: str, m: nn.Module, acc: Moments64):
    """(mean, unbiased var) to update ``m`` with, or (None, None) to leave it."""
    if acc.count == 0:
        return None, None
    mean = acc.mean
    var = acc.unbiased_var if acc.count > 1 else acc.biased_var
    policy = getattr(m, "nonfinite", "propagate")
    if policy == "propagate" or (
        bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())
    ):
        return mean, var
    if policy == "raise":
        raise FloatingPointError(
            f"accumulate_stats: layer {name!r} gathered non-finite statistics (NaN/Inf in "
            f"its inputs); no running statistics were changed."
        )
    warnings.warn(
        f"accumulate_stats: layer {name!r} gathered non-finite statistics; its running "
        f"statistics were left unchanged (nonfinite='skip').",
        NonFiniteStatisticsWarning,
        stacklevel=4,
    )
    return None, None


def _ema(m: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    with torch.no_grad():
        nbt = m.num_batches_tracked
        if nbt is not None:
            nbt.add_(1)
        if m.momentum is None:
            factor = cumulative_factor(int(nbt)) if nbt is not None else 1.0
        else:
            factor = m.momentum
        ema_update_(m.running_mean, mean, factor)
        ema_update_(m.running_var, var, factor)
