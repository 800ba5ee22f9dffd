"""Functional batch normalization with torch's semantics, on normlab's engine."""

from __future__ import annotations

from collections.abc import Callable

import torch

from normlab import _private, kernels
from normlab.functional._bn_checks import (  # noqa: F401  (re-exported: BN's validation)
    BatchNormLayout,
    NonFiniteStatisticsWarning,
    _check_batch_norm,
    _check_running,
    _nonfinite_error,
    _param_shape,
    channel_layout,
    running_update,
    skipped_outcome,
    traced_running_update,
    warn_if_skipped,
)
from normlab.functional.ema import fold_running_
from normlab.functional.engine import (
    BatchConfig,
    StatsSource,
    _normalize_batch,
    normalize_batch,
    normalize_with_stats,
    view_params,
)
from normlab.functional.options import BNOptions
from normlab.functional.residual import batch_norm_residual
from normlab.functional.save_output import batch_norm_save_output
from normlab.functional.stats import work_dtype


def update_running_stats_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    unbiased_var: torch.Tensor,
    momentum: float | None,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    nonfinite: str = "propagate",
    where: str = "batch_norm",
) -> bool:
    """Fold one batch's statistics into the running estimates, in place.

    ``running ← (1 − f)·running + f·batch`` with ``f = momentum``, or ``f = 1/t`` at the
    t-th update when ``momentum`` is None (cumulative average; ``num_batches_tracked``
    counts the updates and is incremented first). ``mean`` and ``unbiased_var`` have the
    running buffers' number of elements; the caller decides what "the batch's" statistics
    are (BN: the batch's mean and n/(n−1)-corrected variance; ghost BN and InstanceNorm:
    their own pooling, documented there). :func:`batch_norm` itself folds its statistics
    in inside the engine's forward (``engine.RunningUpdate``), with the same rule.

    Non-finite statistics follow ``nonfinite``: 'propagate' (torch) updates anyway,
    'skip' changes nothing (counter included) and returns True, 'raise' raises
    ``FloatingPointError`` before any change. Returns whether the update was skipped.
    """
    if kernels.traced(mean):  # no branch on the data: the masked update
        from normlab.functional import traced

        traced.update_running(
            running_mean, running_var, num_batches_tracked, mean, unbiased_var, momentum,
            nonfinite, where,
        )  # fmt: skip
        return False
    if nonfinite != "propagate":
        finite = bool(torch.isfinite(mean).all()) and bool(torch.isfinite(unbiased_var).all())
        if not finite:
            if nonfinite == "raise":
                raise _nonfinite_error(where)
            return True
    fold_running_(running_mean, running_var, mean, unbiased_var, momentum, num_batches_tracked)
    return False


def _batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    options: BNOptions,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    source_fn: Callable[[torch.Tensor, tuple[int, ...]], tuple[StatsSource, int]] | None = None,
    layout: BatchNormLayout | None = None,
    residual: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eager: bool = False,
) -> tuple[torch.Tensor, bool]:
    """:func:`batch_norm`, also returning whether a non-finite batch was skipped; its
    non-tensor arguments (momentum, eps, channel_dim, activation, …) as one ``options``.

    ``eager``: the caller has established that ``input`` is not traced
    (:func:`normlab.kernels.traced`), so the check is not repeated on the hot path.

    ``source_fn(input, dims) -> (StatsSource, count)``: where training statistics come from
    when they are not this tensor's alone (SyncBatchNorm: the global batch); the running
    statistics are then updated from those statistics and their count.

    ``layout``: the result of :func:`_check_batch_norm` for arguments of the same types,
    shapes and flags, which skips the checks (a layer validates once per input
    signature, see ``normlab.nn.batchnorm``); None checks everything.

    ``mask``, ``options.degenerate``: see :func:`batch_norm`. With a mask, ``source_fn`` is
    instead ``source_fn(x, m, dims) -> (count, mean, var)``, the masked global moments
    (:func:`normlab.distributed.global_masked_moments`).
    """
    if layout is None:
        layout = _check_batch_norm(
            input, running_mean, running_var, weight, bias, training, options,
            num_batches_tracked, source_fn is None,
        )  # fmt: skip
    if mask is not None:
        return _masked_batch_norm(
            input, mask, running_mean, running_var, weight, bias, training, options,
            num_batches_tracked, source_fn, layout,
        )  # fmt: skip
    # (C,) tensors broadcast against x only when C is the last dim (layout.view False);
    # the engine's main entry takes them as they are (param_shape), the others viewed.
    shape = layout.shape if layout.view else None
    if residual is not None:
        return batch_norm_residual(
            input, residual, running_mean, running_var, weight, bias, training, options,
            num_batches_tracked, layout, source_fn, shape,
        )  # fmt: skip
    eps, activation, negative_slope = options.eps, options.activation, options.negative_slope
    if options.save != "input" and training and source_fn is None and not kernels.traced(input):
        return batch_norm_save_output(
            input, running_mean, running_var, weight, bias, options, num_batches_tracked,
            layout, shape,
        )  # fmt: skip

    if not training:
        y = kernels.affine_channels(
            input, layout.channel, running_mean, running_var, weight, bias, eps, activation,
            negative_slope, eager,
        )  # fmt: skip
        if y is not None:
            return y, False
        y = normalize_with_stats(
            input,
            view_params(running_mean, shape),
            view_params(running_var, shape),
            view_params(weight, shape),
            view_params(bias, shape),
            eps=eps,
            activation=activation,
            negative_slope=negative_slope,
        )
        return y, False

    source = None
    n = layout.n
    degenerate, where = options.degenerate, options.where
    if source_fn is not None:
        source, n = source_fn(input, layout.dims)  # every rank gets the same n: all raise or none
        if n == 1 and degenerate == "error":  # the GLOBAL count: every rank decides alike
            raise ValueError(
                f"{where}: expected more than 1 value per channel when training, but the "
                f"global batch across all ranks has only one (this rank's input: "
                f"{list(input.shape)}). Use larger per-rank batches, or eval mode to use the "
                f"running statistics, or degenerate='eval'/'skip'."
            )
    # a static shape (or the global count, the same on every rank): a Python branch traces
    if n == 1 and degenerate != "error":
        y = _degenerate_output(input, running_mean, running_var, weight, bias, options, layout)
        return y, False
    if not eager and kernels.traced(input):  # compile, export, jit.trace, torch.func, meta
        return _traced_batch_norm(
            input, running_mean, running_var, weight, bias, options, num_batches_tracked,
            layout, source, n,
        ), False  # fmt: skip
    # An empty batch has no statistics: the running ones stay untouched.
    nonfinite = options.nonfinite
    momentum = options.momentum
    running = running_update(running_mean, running_var, momentum, num_batches_tracked, nonfinite, n)
    if input.numel() == 0 and source is None:
        y, mean, var = normalize_batch(
            input, layout.dims, view_params(weight, shape), view_params(bias, shape),
            eps=eps, activation=activation, negative_slope=negative_slope,
        )  # fmt: skip
        if running is not None:  # no channels (C = 0) but n > 0: only the counter moves
            fold_running_(running_mean, running_var, mean, var, momentum, num_batches_tracked)
    else:  # the engine's entry without statistics tensors: running folds them in
        config = BatchConfig(
            layout.dims, eps, activation, negative_slope, running, shape, True, source
        )
        y = _normalize_batch(input, weight, bias, config)
    return skipped_outcome(y, running, nonfinite, where)


def _traced_batch_norm(
    input, running_mean, running_var, weight, bias, options: BNOptions, num_batches_tracked,
    layout, source, n,
) -> torch.Tensor:  # fmt: skip
    """The training branch of :func:`_batch_norm` as traceable code
    (:mod:`normlab.functional.traced`): the kernels as custom ops where they apply, the
    running statistics updated without branches on the data (a non-finite batch under
    'skip' masks the update; no warning, which only eager code can give)."""
    from normlab.functional import traced
    from normlab.functional.engine import _TRACED_SOURCE_ERROR

    if source is not None and source.reduce_sums is not None:
        raise RuntimeError(f"{options.where}: {_TRACED_SOURCE_ERROR}")
    shape = layout.shape if layout.view else None
    y, mean, var = traced.normalize_batch(
        input, layout.dims, weight, bias, eps=options.eps, center=True,
        activation=options.activation, negative_slope=options.negative_slope,
        param_shape=shape,
    )  # fmt: skip
    traced_running_update(running_mean, running_var, num_batches_tracked, mean, var, n, options)
    return y


def _degenerate_output(
    input, running_mean, running_var, weight, bias, options: BNOptions, layout
) -> torch.Tensor:
    """The training output for <= 1 value per channel under ``options.degenerate`` 'eval'
    or 'skip' (see :func:`batch_norm`); the running statistics are not touched.

    'eval': eval mode's computation with the running statistics (so its gradients are
    torch's eval-mode BatchNorm gradients). 'skip': the raw input itself (no statistics,
    affine or activation), connected to the learnable parameters by an exact ``0·p`` so
    that they get zero gradients rather than none (DDP expects every parameter to get one).
    """
    if options.degenerate == "eval":
        y, _ = _batch_norm(
            input, running_mean, running_var, weight, bias, False, options, layout=layout
        )
        return y
    zero = None
    for p in (weight, bias):
        if p is not None and p.requires_grad:
            t = (p * 0).sum()
            zero = t if zero is None else zero + t
    return input if zero is None else input + zero.to(input.dtype)


def _one_counted_value_error(input: torch.Tensor, count: int, where: str) -> ValueError:
    return ValueError(
        f"{where}: expected more than 1 value per channel when training, but the mask leaves "
        f"{count} of the input of size {list(input.shape)} (all ranks together for "
        f"SyncBatchNorm). Batch statistics of <= 1 value are undefined. Use a mask with more "
        f"True positions, eval mode, or degenerate='eval' (running statistics) / 'skip' "
        f"(pass the batch through) for such batches."
    )


def _masked_batch_norm(
    input, mask, running_mean, running_var, weight, bias, training, options: BNOptions,
    num_batches_tracked, source_fn, layout,
) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """:func:`_batch_norm` with a ``mask`` (semantics: :mod:`normlab.functional.masked`).
    Torch ops, not the kernels. Eager code branches on the counted number (a host sync,
    which the unmasked path never pays); traced code cannot, so there the degenerate
    policy is branch-free: 'eval' and 'skip' select with ``torch.where`` between the batch
    result and the running statistics / the input, the running update is masked by
    ``count > 1``, and 'error' becomes ``torch._assert_async``. ``options.save`` does not
    apply (the masked statistics are torch ops that keep their own tensors)."""
    from normlab.functional import masked

    where, degenerate = options.where, options.degenerate
    m = masked.check_mask(mask, input, layout.channel, where)
    if not training:  # running statistics: the mask only stops gradients at padding
        y, _ = _batch_norm(
            input, running_mean, running_var, weight, bias, False, options, layout=layout
        )
        return masked.stop_padded_grad(y, m), False
    if source_fn is None and not kernels.traced(input) and bool(mask.all()):
        # nothing is padded: the unmasked path, bit for bit (kernels included)
        return _batch_norm(
            input, running_mean, running_var, weight, bias, training,
            options._replace(save="input"), num_batches_tracked=num_batches_tracked,
            layout=layout,
        )  # fmt: skip
    shape = layout.shape
    w, b = view_params(weight, shape), view_params(bias, shape)
    affine = (options.eps, options.activation, options.negative_slope)
    wd = work_dtype(input.dtype)
    x = input.to(wd)
    if source_fn is None:
        count, mean, var = masked.masked_moments(x, m, layout.dims)
    else:  # SyncBatchNorm: the global batch's (differentiable through the collectives)
        count, mean, var = source_fn(x, m, layout.dims)
    count = count.reshape(())  # the same for every channel: the mask has no channel dim
    if not kernels.traced(input):
        n = int(count)
        if n <= 1:
            if degenerate == "error":
                raise _one_counted_value_error(input, n, where)
            y = _degenerate_output(input, running_mean, running_var, weight, bias, options, layout)
            return masked.stop_padded_grad(y, m), False
        y = masked.normalize_masked(input, m, mean, var, w, b, *affine)
        skipped = False
        if running_mean is not None:
            skipped = update_running_stats_(
                running_mean, running_var, mean.detach().reshape(-1),
                (var.detach() * (n / (n - 1))).reshape(-1), options.momentum,
                num_batches_tracked=num_batches_tracked, nonfinite=options.nonfinite,
                where=where,
            )  # fmt: skip
            if skipped and options.nonfinite == "raise":  # pragma: no cover - raised inside
                raise _nonfinite_error(where)
        return y, skipped
    from normlab.functional import traced

    ok = count > 1
    if degenerate == "error" and _private.functorch_active():
        # vmap has no batching rule for asserts: the undefined statistics become NaN
        nan = float("nan")
        mean_n, var_n = torch.where(ok, mean, nan), torch.where(ok, var, nan)
    elif degenerate == "error":
        torch._assert_async(
            ok,
            f"{where}: expected more than 1 value per channel when training, but the "
            f"mask leaves <= 1 (degenerate='error')",
        )
        mean_n, var_n = mean, var
    elif degenerate == "eval":
        mean_n = torch.where(ok, mean, view_params(running_mean, shape).to(wd))
        var_n = torch.where(ok, var, view_params(running_var, shape).to(wd))
    else:
        mean_n, var_n = torch.where(ok, mean, 0.0), torch.where(ok, var, 1.0)
    y = masked.normalize_masked(input, m, mean_n, var_n, w, b, *affine)
    if degenerate == "skip":
        y = torch.where(ok, y, _degenerate_output(
            masked.stop_padded_grad(input, m), None, None, weight, bias, options, layout
        ))  # fmt: skip
    if running_mean is not None:
        unbiased = var * (count / (count - 1))  # NaN/Inf for count <= 1: masked out by ok
        traced.update_running(
            running_mean, running_var, num_batches_tracked, mean.detach(), unbiased.detach(),
            options.momentum, options.nonfinite, where, gate=ok,
        )  # fmt: skip
    return y, False


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    channel_dim: int = 1,
    activation: str | None = None,
    negative_slope: float = 0.01,
    nonfinite: str = "propagate",
    num_batches_tracked: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    degenerate: str = "error",
    save: str = "input",
) -> torch.Tensor:
    """Batch normalization: ``y = act(γ · (x − μ) / sqrt(σ² + ε) + β [+ r])`` per channel.

    Drop-in for :func:`torch.nn.functional.batch_norm` (same positional arguments and
    semantics), on normlab's engine: stable statistics, closed-form backward, any rank.

    Args:
        input: ``(N, C, *)`` (or the channel at ``channel_dim``), floating point.
        running_mean, running_var: ``(C,)`` buffers, updated in place when ``training``;
            ``running_var`` holds the unbiased variance (n/(n−1) correction).
        weight, bias: ``(C,)`` affine parameters γ, β, or None.
        training: normalise with batch statistics (and update running ones) if True;
            with the running statistics if False.
        momentum: ``running = (1 − momentum)·running + momentum·batch``; ``None`` is a
            cumulative average and needs ``num_batches_tracked``.
        eps: added to the variance (≥ 0).
        channel_dim: the channel dimension (1 for channels-first; -1 for (N, L, C)).
        activation: fuse an activation after the affine ('relu', 'leaky_relu', 'relu6',
            'hardtanh', 'hardtanh(min_val, max_val)', 'hardswish', 'elu', 'elu(alpha)',
            'sigmoid', 'tanh', 'silu', 'identity' or None).
        negative_slope: slope of 'leaky_relu'.
        residual: optional tensor like ``input`` (same shape and dtype, any strides) added
            after the affine and before the activation: ResNet's ``relu(bn(x) + identity)``
            as one layer. Its gradient is dy·act'(z). In training the layer saves x and its
            output y (not r) when y determines act'(z) (every activation but hardswish and
            silu; see ``normlab.functional.residual._NormalizeBatchResidual``).
        save: what training mode keeps for backward: 'input' (default; x, and the
            activation is recomputed) or 'output' (only y: In-Place ABN, Rota Bulò et al.,
            CVPR 2018 §3; x̂ = (act⁻¹(y) − β)/γ is rebuilt in backward). 'output' needs an
            invertible activation ('identity', 'leaky_relu' with slope > 0, 'elu' with
            α > 0) and a weight without zeros (ValueError otherwise); no double backward.
            With ``residual``, y and r are kept instead (x − mean = (act⁻¹(y) − r − β)/
            (γ·invstd)): in a ResNet block r is the block input, kept anyway by its first
            conv. Ignored in eval and under tracers (torch.compile).
        nonfinite: when the batch statistics are NaN/Inf: 'propagate' (torch) updates the
            running statistics anyway; 'skip' leaves them (and ``num_batches_tracked``)
            unchanged and warns; 'raise' raises ``FloatingPointError`` before any change.
        num_batches_tracked: optional 0-d counter, incremented with each update.
        mask: optional bool tensor broadcastable to the input without its channel dim
            (``(N, L)`` for ``(N, L, C)`` or ``(N, C, L)``), True where a position counts.
            Padded positions enter no statistic (batch or running) and get no gradient;
            their outputs are the normalised value (Keras 3 and Flax do the same), held
            constant for autograd. In eval the output does not depend on the mask (running
            statistics); it only stops gradients at padding. Masked statistics use torch
            ops, not the Numba kernels; ``mask=None`` is the unchanged fast path. Details:
            :mod:`normlab.functional.masked`.
        degenerate: what training does with <= 1 value per channel (batch 1 without
            spatial dims, or a mask leaving <= 1 position): 'error' (default) raises;
            'eval' normalises with the running statistics (eval mode's output and
            gradients) and leaves them and ``num_batches_tracked`` untouched, and needs
            running statistics; 'skip' returns the raw input unchanged ("pass the batch
            through untouched": no affine, no activation; dx = dy, zero gradients for γ, β)
            and touches no statistics. A count of 0 with an empty input is not degenerate
            (the output is empty). Without a mask the count is a shape, so compiled code
            branches on it like eager code; with a mask it is data: eager code branches on
            it (a host sync), traced code selects with ``torch.where`` and masks the
            running update, and 'error' becomes an asynchronous assert (under
            torch.func.vmap, which cannot assert, NaN outputs for such an example).

    Shapes: y has the shape, dtype and memory format of ``input``. Statistics are reduced
    over every dim but ``channel_dim`` (N·H·W values per channel for images). Float16 and
    bfloat16 inputs are computed in float32 (on the fused kernels: read and written in
    their own format, statistics in float64), with float32 parameters and buffers (as
    under ``torch.autocast``) or ones of the input's dtype; y has the input's dtype, each
    parameter's gradient the parameter's, the running statistics keep theirs.

    Reference: Ioffe & Szegedy, "Batch Normalization", ICML 2015, Algorithm 1.
    """
    options = BNOptions(
        momentum, eps, channel_dim, activation, negative_slope, nonfinite, degenerate, save
    )
    result = _batch_norm(
        input, running_mean, running_var, weight, bias, training, options,
        num_batches_tracked=num_batches_tracked, residual=residual, mask=mask,
    )  # fmt: skip
    return warn_if_skipped(result, "batch_norm")
