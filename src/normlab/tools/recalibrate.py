"""Precise BN: replace the running statistics by population statistics of data.

The EMA BN keeps during training lags the weights (each batch was normalised by older
weights) and is noisy; after fine-tuning, weight averaging (SWA) or pruning it can be far
off. Recalibration recomputes each layer's statistics over many batches
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3 "Precise BatchNorm").

Statistics are count-weighted: every value gets the same weight, so the result is the
mean and variance of all the data, whatever the batch sizes. torch's
``torch.optim.swa_utils.update_bn`` instead averages per-batch estimates with equal
weight per *batch* (momentum=None), so a batch of 2 counts as much as one of 200, and its
variance is the mean of the batch variances (the spread of the batch means is dropped).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from normlab.tools._common import (
    Moments64,
    all_reduce_moments,
    batch_norm_layers,
    channel_dim,
    check_num_batches,
    default_input,
    iter_limited,
    running_stats_untouched,
    tracks_stats,
)
from normlab.tools.freeze import stats_frozen

_WHERE = "recalibrate"


class _StopForward(Exception):
    """Raised by a hook once the layer being recalibrated has seen its input: the rest of
    the forward cannot change that layer's statistics, so it is skipped."""


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    *,
    sequential: bool = False,
    input_fn: Callable | None = None,
    process_group=None,
) -> nn.Module:
    """Recompute the running statistics of every BN layer of ``model`` from ``batches``,
    **in place**; returns ``model``.

    Each layer gets ``running_mean`` = the mean and ``running_var`` = the unbiased variance
    (M2 / (n − 1), BN's convention) of all n values per channel it saw over the batches,
    merged across batches (and ranks) by Chan et al.'s parallel formula in float64.

    Args:
        model: any module containing torch or normlab BatchNorm layers.
        batches: an iterable of batches: tensors, tuples/lists (the first element is the
            input, like ``(x, y)``), dicts or anything ``input_fn`` understands.
        num_batches: use at most this many batches (all if None).
        sequential: how deeper layers see their input while statistics are gathered.

            - False (default, standard precise BN): one pass; every BN layer is in training
              mode (normalising with the current batch's statistics, buffers untouched), so
              layer k's input is computed as during training.
            - True: one pass per layer, in forward order; the layers before layer k are
              already recalibrated and in eval mode, so layer k's statistics are those of
              the inputs it will receive at inference. Afterwards each layer's statistics
              equal the population statistics of its eval-mode input (a fixed point the
              default does not reach in deep nets: its deeper layers are calibrated to
              training-mode inputs). Costs about (layers + 1)/2 passes; ``batches`` must
              be re-iterable (a one-shot iterator is read once into memory).

        input_fn: ``batch -> model input``; default: the tensor, or element 0 of a tuple or
            list. Required for dicts (``input_fn=lambda b: b['image']``).
        process_group: with an initialised ``torch.distributed`` group of size > 1, the
            statistics are those of every rank's batches together (the counts, sums and
            re-centred M2 are all-reduced: two collectives for all layers, or per layer
            when ``sequential``). Every rank must call recalibrate; with SyncBatchNorm
            layers and the default mode, every rank must also pass the same number of
            batches (their training forward is itself a collective).

    Everything else about the model is put back in ``finally``: the ``training`` flag of
    every module (non-BN modules such as dropout run in eval mode while gathering, as at
    inference), ``track_running_stats`` and hooks. Batch renorm layers gather in their own
    training mode (r, d against the current running statistics), which they need. On any error no statistics change.
    ``num_batches_tracked`` and momentum are left as they are; layers frozen with
    :func:`normlab.freeze` keep their statistics (they run in eval mode), and layers the
    batches never reach keep theirs with a warning. normlab layers with ``ema_debias=True``
    have it switched off: their buffers now hold population statistics, not a biased EMA.
    """
    check_num_batches(num_batches, _WHERE)
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"{_WHERE}: input_fn must be callable, got {type(input_fn).__name__}")
    get_input = input_fn or (lambda b: default_input(b, _WHERE))
    layers = [
        (name, m) for name, m in batch_norm_layers(model) if tracks_stats(m) and not stats_frozen(m)
    ]
    if not layers:
        return model

    modes = {m: m.training for m in model.modules()}
    backup = {m: (m.running_mean.clone(), m.running_var.clone()) for _, m in layers}
    handles: list = []
    try:
        model.eval()
        if sequential:
            _sequential(model, layers, batches, num_batches, get_input, process_group, handles)
        else:
            accs = {m: Moments64(m.num_features, m.running_mean.device) for _, m in layers}
            for _, m in layers:
                m.train()
                handles.append(m.register_forward_pre_hook(_collector(accs[m])))
            with torch.no_grad(), running_stats_untouched(m for _, m in layers):
                for batch in iter_limited(batches, num_batches):
                    model(get_input(batch))
            for h in handles:
                h.remove()
            all_reduce_moments([accs[m] for _, m in layers], process_group)
            _write(layers, accs)
    except BaseException:
        for m, (mean, var) in backup.items():
            with torch.no_grad():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes.items():
            m.training = flag
    return model


def _collector(acc: Moments64):
    def hook(module, args):
        acc.add(args[0], channel_dim(module))

    return hook


def _stop_after(acc: Moments64):
    def hook(module, args):
        acc.add(args[0], channel_dim(module))
        raise _StopForward

    return hook


def _sequential(model, layers, batches, num_batches, get_input, process_group, handles):
    if iter(batches) is batches:  # one-shot iterator: we need several passes
        batches = list(iter_limited(batches, num_batches))
    order = _forward_order(model, layers, batches, get_input)
    for m in order:
        acc = Moments64(m.num_features, m.running_mean.device)
        handle = m.register_forward_pre_hook(_stop_after(acc))
        handles.append(handle)
        with torch.no_grad():
            for batch in iter_limited(batches, num_batches):
                try:
                    model(get_input(batch))
                except _StopForward:
                    pass
        handle.remove()
        all_reduce_moments([acc], process_group)
        _write([(_name_of(layers, m), m)], {m: acc})
    unreached = [(name, m) for name, m in layers if m not in order]
    _write(unreached, {m: Moments64(m.num_features) for _, m in unreached})  # warns


def _forward_order(model, layers, batches, get_input) -> list[nn.Module]:
    """The order in which the BN layers run, from one eval-mode forward of the first batch."""
    order: list[nn.Module] = []
    members = {m for _, m in layers}

    def record(module, args):
        if module in members and module not in order:
            order.append(module)

    hs = [m.register_forward_pre_hook(record) for _, m in layers]
    try:
        with torch.no_grad():
            for batch in iter_limited(batches, 1):
                model(get_input(batch))
    finally:
        for h in hs:
            h.remove()
    return order


def _name_of(layers, module) -> str:
    return next(name for name, m in layers if m is module)


def _write(layers, accs: dict) -> None:
    """Store the gathered statistics, after checking all of them (so an error changes
    nothing); layers that saw no data keep their statistics and are named in a warning."""
    unseen = [name for name, m in layers if accs[m].count == 0]
    for name, m in layers:
        acc = accs[m]
        if acc.count and not (
            bool(torch.isfinite(acc.mean).all()) and bool(torch.isfinite(acc.m2).all())
        ):
            raise FloatingPointError(
                f"{_WHERE}: the statistics gathered for layer {name!r} are not finite (NaN/Inf "
                f"in the data or the activations); no running statistics were changed. Check "
                f"the batches, or skip the bad ones."
            )
    with torch.no_grad():
        for _, m in layers:
            acc = accs[m]
            if acc.count == 0:
                continue
            m.running_mean.copy_(acc.mean)
            var = acc.unbiased_var if acc.count > 1 else acc.biased_var
            m.running_var.copy_(var)
            if getattr(m, "ema_debias", False):
                m.ema_debias = False
    if unseen:
        warnings.warn(
            f"{_WHERE}: layers {unseen} received no input from the batches; their running "
            f"statistics were left unchanged.",
            RuntimeWarning,
            stacklevel=3,
        )
