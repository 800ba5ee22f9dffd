"""The normalization engine: one code path for BatchNorm, LayerNorm, GroupNorm,
InstanceNorm and RMSNorm.

Every layer of the family computes

    x_hat = (x − mean) / sqrt(var + eps)         statistics over ``dims`` (or given)
    y     = act(weight · x_hat + bias)           affine broadcast over x, then activation

and differs only in the reduction dims and in where the statistics come from. Callers
reshape x so that the statistics are a plain reduction over ``dims`` (GroupNorm views
(N, C, *S) as (N, G, C/G, *S)) and pass ``weight``/``bias`` already shaped to broadcast
against x (BatchNorm: (1, C, 1, 1); LayerNorm: normalized_shape).

Training mode (:func:`normalize_batch`) is a custom autograd function whose backward is
the closed form (the O(m) contraction of the dense Jacobian, Ioffe & Szegedy 2015, §3):

    g  = dz · weight,   dz = dy · act'(z),   z = weight · x_hat + bias
    dx = invstd · (g − mean(g) − x_hat · mean(g · x_hat))          (center=True)
    dx = invstd · (g − x_hat · mean(g · x_hat))                     (center=False, RMSNorm)

It saves only the input x (plus per-slice statistics) and recomputes x_hat and z in
backward, so a fused norm+activation layer keeps one activation-sized tensor alive where
torch's BatchNorm + ReLU keep two. Double backward (``create_graph=True``) recomputes the
statistics differentiably and differentiates the same closed form, so ``gradgradcheck``
holds.

Half-precision inputs are computed in float32 and returned in their own dtype.

Fast path: for the BatchNorm case (statistics per channel over every other dim,
per-channel weight/bias, this batch's own statistics; or eval with per-channel
statistics and no gradients) on CPU float32/float64/bfloat16/float16 tensors (half
precision read and written in its own format: float32 arithmetic, float64 statistics,
float32 parameters), the same math runs in fused
Numba kernels (:mod:`normlab.kernels`): one pass to read the statistics and one to write
the output, same saved tensors, same bounds. Everything else, double backward included,
uses the torch ops below, which stay the reference. ``NORMLAB_KERNELS=torch`` forces
the torch ops everywhere; ``NORMLAB_KERNELS=numba`` uses the kernels whatever the size.

Running statistics: ``normalize_batch(..., running=RunningUpdate(...))`` folds the
batch's statistics into BatchNorm's buffers inside the same forward (torch's EMA rule,
the non-finite check included): in the kernel call itself on the fast path, with
:func:`normlab.functional.ema.fold_running_` otherwise. At small sizes every torch op
and Python layer costs about as much as the kernels, so the module validates once per
input signature (``normlab.nn.batchnorm``) and the engine calls the kernels by address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from normlab import _private, kernels
from normlab.functional.activations import derivative_from_output, get_activation, inverse_of
from normlab.functional.ema import fold_running_
from normlab.functional.stats import Moments, centered_moments, reduce_count, work_dtype


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _affine_act(
    x_hat: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
    negative_slope: float,
    inplace: bool,
) -> torch.Tensor:
    z = x_hat
    if weight is not None:
        z = z.mul_(weight) if inplace else z * weight
        inplace = True
    if bias is not None:
        z = z.add_(bias) if inplace else z + bias
    act = get_activation(activation)
    return z if act.name == "identity" else act.forward(z, negative_slope)


@dataclass(frozen=True)
class StatsSource:
    """Training-mode statistics that are not this tensor's alone (SyncBatchNorm, renorm
    with precomputed moments, ghost batches...).

    Attributes:
        stats: keepdim ``Moments`` to normalise with, computed over ``count`` elements per
            statistic (possibly on several ranks).
        count: the number of elements behind each statistic.
        reduce_sums: applied in backward to the stacked local sums
            ``[sum(g), sum(g · x_hat)]`` (shape ``(2, *stats_shape)``) before they are divided
            by ``count``; an all-reduce for SyncBatchNorm. None: the local sums are global.

    The statistics are still treated as functions of the batch in backward (the dense
    training-mode Jacobian over all ``count`` elements). Double backward through an
    external source is not supported.
    """

    stats: Moments
    count: int
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class RunningUpdate:
    """Running estimates (BatchNorm's buffers) to fold this batch's statistics into, in
    place, as part of the training forward:

        running ← (1 − f)·running + f·batch,   batch = (mean, var · n/(n − 1))

    (unbiased variance, n values per statistic; n ≥ 2), with ``f = momentum``, or
    ``f = 1/t`` at the t-th update when ``momentum`` is None (a cumulative average;
    ``num_batches_tracked`` counts the updates and is incremented first). Torch's rule
    (``torch.nn.BatchNorm*``); the torch-op path is :func:`normlab.functional.ema.fold_running_`.

    Attributes:
        mean, var: the running buffers, C elements each (any shape).
        momentum: f, or None for the cumulative average (needs ``num_batches_tracked``).
        num_batches_tracked: 0-d integer counter, or None.
        skip_nonfinite: when a batch statistic is NaN/Inf, change nothing (counter
            included) and set ``skipped``; False updates anyway (torch's behaviour).
        skipped: set by the engine.
    """

    mean: torch.Tensor
    var: torch.Tensor
    momentum: float | None
    num_batches_tracked: torch.Tensor | None = None
    skip_nonfinite: bool = False
    skipped: bool = False


def _update_running(running: RunningUpdate, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """The torch-op path of :class:`RunningUpdate` (mean, var: this batch's, biased)."""
    unbiased = var * (n / (n - 1))
    if running.skip_nonfinite and not (
        bool(torch.isfinite(mean).all()) and bool(torch.isfinite(unbiased).all())
    ):
        running.skipped = True
        return
    fold_running_(
        running.mean, running.var, mean, unbiased, running.momentum, running.num_batches_tracked
    )


def _closed_form_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: Moments,
    invstd: torch.Tensor,
    dims: tuple[int, ...],
    center: bool,
    activation: str | None,
    negative_slope: float,
    needs: tuple[bool, bool, bool],
    count: int,
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    wd = work_dtype(x.dtype)
    xw = x.to(wd)
    x_hat = ((xw - stats.shift) - stats.delta) * invstd if center else xw * invstd
    w = _to(weight, wd)
    dz = dy.to(wd)
    act = get_activation(activation)
    if act.name != "identity":
        z = x_hat if w is None else x_hat * w
        if bias is not None:
            z = z + bias.to(wd)
        dz = dz * act.derivative(z, negative_slope)
    dx = dw = db = None
    if needs[0] or reduce_sums is not None:  # every rank joins the collective
        g = dz if w is None else dz * w
        sums = torch.stack(
            [g.sum(dims, keepdim=True), (g * x_hat).sum(dims, keepdim=True)]
        )  # (2, *stats_shape)
        if reduce_sums is not None:
            sums = reduce_sums(sums)
        mean_g, proj = sums[0] / count, sums[1] / count
        if center:
            dx = (g - mean_g - x_hat * proj) * invstd
        else:
            dx = (g - x_hat * proj) * invstd
        dx = dx.to(x.dtype) if needs[0] else None
    if weight is not None and needs[1]:
        dw = (dz * x_hat).sum_to_size(weight.shape).to(weight.dtype)
    if bias is not None and needs[2]:
        db = dz.sum_to_size(bias.shape).to(bias.dtype)
    return dx, dw, db


class _NormalizeBatch(torch.autograd.Function):
    """y from x, weight, bias; the statistics go to ``out`` (a list: ``(mean, var)``
    tensors, or the kernel plan and its (2, C) moments array) rather than being outputs:
    they are not differentiable, and every output of a custom Function costs autograd
    work on each call. ``config``: (dims, eps, center, activation,
    negative_slope, source, running, param_shape), one argument for the same reason.
    ``param_shape``: None, or the keepdim shape of the one channel dim when weight and
    bias come as (C,) tensors (a layer's parameters): the kernels take them as they are,
    and the torch ops view them here, so the caller's graph has no view nodes."""

    @staticmethod
    def forward(ctx, x, weight, bias, config, out):
        dims, eps, center, activation, negative_slope, source, running, param_shape = config
        ctx.set_materialize_grads(False)
        plan = (
            None
            if source is not None
            else kernels.plan_batch(x, dims, weight, bias, center, flat=param_shape is not None)
        )
        ctx.kernel_plan = plan
        ctx.config = config
        if plan is not None:  # fused kernel: same outputs, same saved tensors (x + stats)
            y, moments, ctx.kernel_stats, folded = kernels.batch_forward(
                plan, x, weight, bias, eps, activation, negative_slope, running
            )
            if running is not None and not folded:  # buffers the kernel does not take
                mean, var = kernels.stats_tensors(plan, moments)
                _update_running(running, mean, var, reduce_count(x.shape, dims))
            ctx.save_for_backward(x, weight, bias)
            out.append((plan, moments))
            return y
        saved_params = (weight, bias)  # the inputs themselves: double backward needs them
        if param_shape is not None:
            weight, bias = view_params(weight, param_shape), view_params(bias, param_shape)
        wd = work_dtype(x.dtype)
        if source is None:
            stats, e = centered_moments(x, dims, center=center)
            count = reduce_count(x.shape, dims)
        else:
            stats, count = source.stats, source.count
            xw = x.to(wd)
            e = (xw - stats.shift.to(wd)) - stats.delta.to(wd) if center else xw.clone()
        invstd = torch.rsqrt(stats.var + eps).to(wd)  # var may be float64 (overflow guard)
        y = _affine_act(
            e.mul_(invstd), _to(weight, wd), _to(bias, wd), activation, negative_slope, True
        )
        ctx.save_for_backward(x, *saved_params, stats.shift, stats.delta, invstd)
        ctx.count = count
        mean, var = stats.mean.to(wd), stats.var.to(wd)
        if running is not None:
            _update_running(running, mean, var, count)
        out.append((mean, var))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        if dy is None:  # y took no part in the loss
            return None, None, None, None, None
        dims, eps, center, activation, negative_slope, source, _, param_shape = ctx.config
        needs = ctx.needs_input_grad[:3]
        plan = ctx.kernel_plan
        if plan is not None:
            x, weight, bias = ctx.saved_tensors
            if not torch.is_grad_enabled():
                dx, dw, db = kernels.batch_backward(
                    plan, dy, x, weight, bias, ctx.kernel_stats, activation, negative_slope, needs
                )
                return dx, dw, db, None, None
            count = reduce_count(x.shape, dims)
            shift = delta = invstd = None  # recomputed below, differentiably
        else:
            x, weight, bias, shift, delta, invstd = ctx.saved_tensors
            count = ctx.count
        if param_shape is not None:
            weight, bias = view_params(weight, param_shape), view_params(bias, param_shape)
        if torch.is_grad_enabled():
            # create_graph=True: the statistics must be functions of x for the second
            # derivative, so recompute them with differentiable ops.
            if source is not None:
                raise RuntimeError(
                    "double backward (create_graph=True) through normalization with external "
                    "statistics (SyncBatchNorm, ghost or renorm sources) is not supported"
                )
            xw = x.to(work_dtype(x.dtype))
            if center:
                mean = xw.mean(dims, keepdim=True)
                var = (xw - mean).pow(2).mean(dims, keepdim=True)
            else:
                mean = torch.zeros_like(invstd)
                var = xw.pow(2).mean(dims, keepdim=True)
            stats = Moments(mean, torch.zeros_like(mean), var)
            invstd = torch.rsqrt(var + eps)
        else:
            stats = Moments(shift, delta, invstd)  # var unused by the backward
        dx, dw, db = _closed_form_backward(
            dy,
            x,
            weight,
            bias,
            stats,
            invstd,
            dims,
            center,
            activation,
            negative_slope,
            needs,
            count,
            None if source is None else source.reduce_sums,
        )
        if param_shape is not None:  # the gradients of (C,) parameters
            dw = None if dw is None else dw.reshape(-1)
            db = None if db is None else db.reshape(-1)
        return dx, dw, db, None, None


_TRACED_SOURCE_ERROR = (
    "normalization with statistics gathered across ranks (SyncBatchNorm in a process "
    "group) cannot run under torch.compile, torch.export, torch.jit.trace or torch.func: "
    "its backward all-reduces gradient sums. Run the layer eagerly (torch.compiler."
    "disable), or use SyncBatchNorm without a process group (plain BatchNorm)."
)


def view_params(p: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A (C,) parameter viewed as the keepdim ``shape`` (as it is if either is None)."""
    return p if p is None or shape is None else p.view(shape)


# Function.apply is a Python wrapper that, outside functorch transforms, unwraps dead
# functorch wrappers and calls the C++ apply: ~2 µs, a tenth of a small layer's forward.
# The same two steps, directly (under transforms the engine takes the traceable path,
# normlab.functional.traced, and never reaches this Function):
_apply_normalize_batch = super(torch.autograd.Function, _NormalizeBatch).apply
_unwrap_if_dead = _private.unwrap_if_dead


def _unwrap(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _unwrap_if_dead(t)


def normalize_batch(
    x: torch.Tensor,
    dims: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    center: bool = True,
    activation: str | None = None,
    negative_slope: float = 0.01,
    source: StatsSource | None = None,
    running: RunningUpdate | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise ``x`` with batch statistics over ``dims``; affine; activation.

    Args:
        x: input of any shape and floating dtype.
        dims: reduction dims (non-empty; each slice must be non-empty unless x is empty).
        weight, bias: optional, broadcastable to ``x`` (already shaped by the caller).
        eps: added to the variance.
        center: subtract the mean (False for RMSNorm, where ``var`` is the mean square).
        activation, negative_slope: fused activation (see ``normlab.functional.activations``).
        source: statistics computed elsewhere (all ranks, see :class:`StatsSource`);
            default: this tensor's own, computed here.
        running: running estimates to update from this batch's statistics (see
            :class:`RunningUpdate`), in the same call: the kernels fold them in without a
            torch op per buffer. Ignored for an empty ``x`` (no statistics).

    Returns:
        ``(y, mean, var)``: ``y`` like ``x``; keepdim ``mean`` and biased ``var`` in the
        working dtype, detached (they feed running statistics, not the loss).
    """
    ndim = x.dim()
    dims = tuple(sorted([d % ndim for d in dims]))
    if x.numel() == 0 and source is None:
        # Nothing to normalise: an empty output still connected to weight and bias, so
        # their gradients are zeros rather than None; statistics are NaN (no data).
        wd = work_dtype(x.dtype)
        y = _affine_act(x.to(wd), _to(weight, wd), _to(bias, wd), activation, negative_slope, False)
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
        nan = torch.full(shape, float("nan"), dtype=wd, device=x.device)
        return y.to(x.dtype), nan, nan.clone()
    if kernels.traced(x):
        from normlab.functional import traced

        if source is not None and source.reduce_sums is not None:
            raise RuntimeError(_TRACED_SOURCE_ERROR)
        y, mean, var = traced.normalize_batch(
            x, dims, weight, bias, eps=eps, center=center, activation=activation,
            negative_slope=negative_slope,
        )  # fmt: skip
        if running is not None:
            n = count(x, dims)
            traced.update_running(
                running.mean, running.var, running.num_batches_tracked, mean,
                var * (n / (n - 1)), running.momentum,
                "skip" if running.skip_nonfinite else "propagate", "normalize_batch",
            )  # fmt: skip
        return y, mean, var
    out: list = []
    y = _normalize_batch(
        x, weight, bias, (dims, eps, center, activation, negative_slope, source, running, None), out
    )
    stats = out[0]
    if isinstance(stats[0], torch.Tensor):  # the torch-op path: (mean, var)
        return y, stats[0], stats[1]
    plan, moments = stats  # the kernel path
    return (y, *kernels.stats_tensors(plan, moments))


def _normalize_batch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: tuple,
    out: list,
) -> torch.Tensor:
    """y of :func:`normalize_batch` for canonical ``dims`` and an ``x`` that is not empty
    or has a ``source`` (config: dims, eps, center, activation, negative_slope, source,
    running, param_shape; see :class:`_NormalizeBatch`); the statistics go to ``out``. For callers that only need y (``functional.batch_norm``, whose running
    statistics are folded in by ``running``): the kernel path then makes no tensors of
    the statistics at all."""
    return _apply_normalize_batch(_unwrap(x), _unwrap(weight), _unwrap(bias), config, out)


def normalize_with_stats(
    x: torch.Tensor,
    mean: torch.Tensor | None,
    var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Normalise ``x`` with given statistics (eval mode, frozen BN, AdaBN, renorm).

    ``mean``/``var`` and ``weight``/``bias`` broadcast against ``x``; ``mean=None`` skips
    centring (RMSNorm). The result is the per-channel affine map
    act((x − mean) · weight/sqrt(var + eps) + bias), computed in the working dtype;
    ordinary autograd differentiates it (the statistics are constants here).
    """
    plan = kernels.plan_affine(x, mean, var, weight, bias)
    if plan is not None:
        return kernels.affine_forward(
            plan, x, mean, var, weight, bias, eps, activation, negative_slope
        )
    wd = work_dtype(x.dtype)
    xw = x.to(wd)
    scale = torch.rsqrt(var.to(wd) + eps)
    if weight is not None:
        scale = scale * weight.to(wd)
    centred = xw if mean is None else xw - mean.to(wd)
    y = _affine_act(centred * scale, None, _to(bias, wd), activation, negative_slope, True)
    return y.to(x.dtype)


def count(x: torch.Tensor, dims: Sequence[int]) -> int:
    """Elements per statistic for a reduction of ``x`` over ``dims``."""
    return reduce_count(x.shape, dims)


# -- BN → add(residual) → activation ----------------------------------------------------
class _NormalizeBatchResidual(torch.autograd.Function):
    """Training batch norm with a residual added before the activation (ResNet's
    ``relu(bn(x) + identity)``, MobileNetV2's ``bn(x) + identity``):

        z = γ·x̂ + β + r,   y = act(z)
        dz = dy·act'(z),   dr = dz,   (dx, dγ, dβ) = BN's closed form applied to dz

    (the residual enters z with unit weight, so its gradient is dz itself and BN's
    backward sees dz as if the activation were the identity).

    Saved for backward: x (BN's statistics are recomputed from it, as in
    :class:`_NormalizeBatch`) and, to get act'(z), the output y where y determines it
    (:func:`~normlab.functional.activations.derivative_from_output`: identity, relu,
    leaky_relu, relu6, hardtanh, elu, sigmoid, tanh), so r is not kept by this layer —
    the next layer saves y anyway, so the fused block keeps no tensor of its own beyond
    x. For hardswish and silu, r is saved and z recomputed from x and r.

    Kernel path (:func:`normlab.kernels.batch_forward_residual`): one kernel call reads
    the statistics, folds the running ones and writes y = act(γ·x̂ + β + r) in its write
    pass; backward is one two-pass kernel call producing dx and dr = dz together, dz read
    from the saved y (or z recomputed from x and r). The torch-op path (BN, then the add
    and the activation as torch ops) is the reference. ``config``: (dims, eps, activation,
    negative_slope, running, param_shape). Double backward recomputes y with
    differentiable ops (:func:`normlab.functional.traced.composite`) and differentiates it.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, config, out):
        dims, eps, activation, negative_slope, running, param_shape, save_output = config
        ctx.set_materialize_grads(False)
        ctx.config = config
        act = get_activation(activation)
        from_y = derivative_from_output(act, negative_slope)
        # save="output" (invertible act, so from_y too): r and y instead of x and y
        first = residual if save_output else x
        plan = kernels.plan_batch(x, dims, weight, bias, True, flat=param_shape is not None)
        ctx.kernel_plan = plan
        if plan is not None:  # one kernel: statistics, then y = act(γ·x̂ + β + r)
            y, moments, ctx.kernel_stats, folded = kernels.batch_forward_residual(
                plan, x, residual, weight, bias, eps, activation, negative_slope, running
            )
            if running is not None and not folded:
                mean, var = kernels.stats_tensors(plan, moments)
                _update_running(running, mean, var, reduce_count(x.shape, dims))
            out.append((plan, moments))
            ctx.from_y = from_y is not None
            ctx.save_for_backward(first, weight, bias, y if ctx.from_y else residual)
            return y
        # the torch-op reference: BN, then the add and the activation as torch ops
        w, b = view_params(weight, param_shape), view_params(bias, param_shape)
        wd = work_dtype(x.dtype)
        stats, e = centered_moments(x, dims)
        invstd = torch.rsqrt(stats.var + eps).to(wd)
        z = _affine_act(e.mul_(invstd), _to(w, wd), _to(b, wd), None, 0.0, True)
        count = reduce_count(x.shape, dims)
        mean, var = stats.mean.to(wd), stats.var.to(wd)
        if running is not None:
            _update_running(running, mean, var, count)
        stats_saved = (stats.shift, stats.delta, invstd)
        out.append((mean, var))
        z = z.add_(residual)
        if act.name == "relu":
            y = z.relu_()
        elif act.name == "identity":
            y = z
        else:
            y = act.forward(z, negative_slope)
        y = y.to(x.dtype)
        ctx.from_y = from_y is not None
        # what recovers act'(z): the output itself, or r to recompute z
        keep = y if from_y is not None else residual
        ctx.save_for_backward(first, weight, bias, keep, *stats_saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None, None
        dims, eps, activation, negative_slope, _, param_shape, save_output = ctx.config
        nx, nr, nw, nb = ctx.needs_input_grad[:4]
        plan = ctx.kernel_plan
        x, weight, bias, keep, *stats_saved = ctx.saved_tensors
        act = get_activation(activation)
        wd = work_dtype(x.dtype)
        double = torch.is_grad_enabled()
        if save_output:  # x is the residual r here, keep is y
            return _residual_backward_from_output(
                ctx, dy, x, keep, weight, bias, stats_saved, (nx, nr, nw, nb)
            )
        if double:
            # create_graph=True: statistics as differentiable functions of x (the saved y,
            # if that is what was kept, is connected to this node's graph already)
            xw = x.to(wd)
            mean = xw.mean(dims, keepdim=True)
            var = (xw - mean).pow(2).mean(dims, keepdim=True)
            invstd = torch.rsqrt(var + eps)
            stats = Moments(mean, torch.zeros_like(mean), var)
        elif plan is None:
            shift, delta, invstd = stats_saved
            stats = Moments(shift, delta, invstd)
        else:  # one kernel: dx and dr = dz together
            dx, dr, dw, db = kernels.batch_backward_residual(
                plan, dy, x, keep, ctx.from_y, weight, bias, ctx.kernel_stats, activation,
                negative_slope, (nx, nr, nw, nb),
            )  # fmt: skip
            return dx, dr, dw, db, None, None
        if ctx.from_y:
            dz = dy.to(wd) * derivative_from_output(act, negative_slope)(keep.to(wd))
        else:  # z = γ·x̂ + β + r recomputed from x and the saved r (hardswish, silu)
            k, delta, inv = stats.shift, stats.delta, invstd
            w, b = view_params(weight, param_shape), view_params(bias, param_shape)
            z = ((x.to(wd) - k) - delta) * inv
            z = z if w is None else z * w.to(wd)
            z = z if b is None else z + b.to(wd)
            dz = dy.to(wd) * act.derivative(z + keep.to(wd), negative_slope)
        dr = dz.to(x.dtype) if nr else None
        dx, dw, db = _closed_form_backward(
            dz, x, view_params(weight, param_shape), view_params(bias, param_shape),
            stats, invstd, dims, True, None, 0.0, (nx, nw, nb), reduce_count(x.shape, dims),
        )  # fmt: skip
        if param_shape is not None:
            dw = None if dw is None else dw.reshape(-1)
            db = None if db is None else db.reshape(-1)
        return dx, dr, dw, db, None, None


def _residual_backward_from_output(ctx, dy, residual, y, weight, bias, stats_saved, needs):
    """Backward of :class:`_NormalizeBatchResidual` under save="output": x − mean =
    (act⁻¹(y) − r − β)/(γ·invstd) rebuilt from y and r (see
    :class:`_NormalizeBatchSaveOutput`), then the same kernel (or closed form) with zero
    shift. Keeping r rather than x costs nothing in a ResNet block, where r is the block
    input that its first conv keeps anyway."""
    if torch.is_grad_enabled():
        raise RuntimeError(_SAVE_OUTPUT_DOUBLE_BACKWARD)
    dims, _, activation, negative_slope, _, param_shape, _ = ctx.config
    plan = ctx.kernel_plan
    wd = work_dtype(y.dtype)
    if plan is not None:
        invstd = torch.from_numpy(ctx.kernel_stats[3]).to(wd).reshape(plan.keep)
    else:
        invstd = stats_saved[2]
    w, b = view_params(weight, param_shape), view_params(bias, param_shape)
    act = get_activation(activation)
    centred = inverse_of(act, negative_slope)(y.to(wd)).sub_(residual.to(wd))
    if b is not None:
        centred = centred.sub_(b.to(wd))
    centred = centred.div_(invstd if w is None else w.to(wd) * invstd)
    if plan is not None:
        stats0 = ctx.kernel_stats.copy()
        stats0[0] = 0.0
        stats0[1] = 0.0
        # in the working dtype: a half input's rebuilt x − mean is not rounded to half
        dx, dr, dw, db = kernels.batch_backward_residual(
            plan, dy, centred, y.to(wd), True, weight, bias, stats0, activation,
            negative_slope, needs,
        )  # fmt: skip
        return _to(dx, y.dtype), _to(dr, y.dtype), dw, db, None, None
    dz = dy.to(wd) * derivative_from_output(act, negative_slope)(y.to(wd))
    zero = torch.zeros_like(invstd)
    dx, dw, db = _closed_form_backward(
        dz, centred, w, b, Moments(zero, zero, invstd), invstd, dims, True, None, 0.0,
        (needs[0], needs[2], needs[3]), reduce_count(y.shape, dims),
    )  # fmt: skip
    if param_shape is not None:
        dw = None if dw is None else dw.reshape(-1)
        db = None if db is None else db.reshape(-1)
    dx = None if dx is None else dx.to(y.dtype)
    dr = dz.to(y.dtype) if needs[1] else None
    return dx, dr, dw, db, None, None


_apply_residual = super(torch.autograd.Function, _NormalizeBatchResidual).apply


def normalize_batch_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: tuple,
    out: list,
) -> torch.Tensor:
    """y = act(γ·x̂ + β + r) in training mode (see :class:`_NormalizeBatchResidual`;
    ``config``: dims, eps, activation, negative_slope, running, param_shape, save_output);
    x not empty,
    not traced; the statistics go to ``out``."""
    return _apply_residual(
        _unwrap(x), _unwrap(residual), _unwrap(weight), _unwrap(bias), config, out
    )


# -- save="output": keep y, not x (In-Place ABN) ------------------------------------------
_SAVE_OUTPUT_DOUBLE_BACKWARD = (
    "batch norm with save='output' keeps only its output, from which the statistics "
    "cannot be rebuilt as functions of x: double backward (create_graph=True) is not "
    "supported. Use save='input' (the default) for this layer."
)


class _NormalizeBatchSaveOutput(torch.autograd.Function):
    """Training batch norm + invertible activation that keeps only its output y for
    backward (Rota Bulò, Porzi & Kontschieder, "In-Place Activated BatchNorm for
    Memory-Optimized Training of DNNs", CVPR 2018, §3):

        z = act⁻¹(y),   x̂ = (z − β)/γ,   dz = dy·act'(z) (read from y)
        dx = γ·invstd·(dz − mean(dz) − x̂·mean(dz·x̂)),   dγ = Σdz·x̂,   dβ = Σdz

    Backward rebuilds x − mean = (z − β)/(γ·invstd) (one elementwise pass; magnitude σ,
    so no cancellation against a large mean) and runs the ordinary closed form on it
    with zero shift: the fused kernel on the kernel path, torch ops otherwise. Saved:
    y, γ, β and the per-channel invstd; x is not kept, so the layer and the next
    (which keeps y anyway) share one activation-sized tensor.

    γ must be nonzero (checked by the caller; the paper's |γ| + ε would change the
    function). Precision: x̂ carries the rounding of y amplified by 1/|γ|; elu's saturated
    tail (y ≈ −α) is recovered only coarsely (see ``activations.inverse_of``), where
    dz ≈ 0. ``config``: (dims, eps, activation, negative_slope, running, param_shape).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, config, out):
        dims, eps, activation, negative_slope, running, param_shape = config
        ctx.set_materialize_grads(False)
        ctx.config = config
        plan = kernels.plan_batch(x, dims, weight, bias, True, flat=param_shape is not None)
        ctx.kernel_plan = plan
        if plan is not None:
            y, moments, ctx.kernel_stats, folded = kernels.batch_forward(
                plan, x, weight, bias, eps, activation, negative_slope, running
            )
            if running is not None and not folded:
                mean, var = kernels.stats_tensors(plan, moments)
                _update_running(running, mean, var, reduce_count(x.shape, dims))
            out.append((plan, moments))
            ctx.save_for_backward(y, weight, bias)
            return y
        w, b = view_params(weight, param_shape), view_params(bias, param_shape)
        wd = work_dtype(x.dtype)
        stats, e = centered_moments(x, dims)
        invstd = torch.rsqrt(stats.var + eps).to(wd)
        y = _affine_act(
            e.mul_(invstd), _to(w, wd), _to(b, wd), activation, negative_slope, True
        ).to(x.dtype)
        mean, var = stats.mean.to(wd), stats.var.to(wd)
        if running is not None:
            _update_running(running, mean, var, reduce_count(x.shape, dims))
        out.append((mean, var))
        ctx.save_for_backward(y, weight, bias, invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():
            raise RuntimeError(_SAVE_OUTPUT_DOUBLE_BACKWARD)
        dims, _, activation, negative_slope, _, param_shape = ctx.config
        needs = ctx.needs_input_grad[:3]
        plan = ctx.kernel_plan
        y, weight, bias, *rest = ctx.saved_tensors
        wd = work_dtype(y.dtype)
        if plan is not None:
            invstd = torch.from_numpy(ctx.kernel_stats[3]).to(wd).reshape(plan.keep)
        else:
            invstd = rest[0]
        w, b = view_params(weight, param_shape), view_params(bias, param_shape)
        act = get_activation(activation)
        # x − mean = (act⁻¹(y) − β)/(γ·invstd)
        centred = inverse_of(act, negative_slope)(y.to(wd))
        if b is not None:
            centred = centred.sub_(b.to(wd))
        centred = centred.div_(invstd if w is None else w.to(wd) * invstd)
        if plan is not None:
            stats0 = ctx.kernel_stats.copy()
            stats0[0] = 0.0  # shift k and delta: the rebuilt input is already centred
            stats0[1] = 0.0
            # in the working dtype: a half input's rebuilt x − mean is not rounded to half
            dx, dw, db = kernels.batch_backward(
                plan, dy, centred, weight, bias, stats0, activation, negative_slope, needs,
            )  # fmt: skip
            return _to(dx, y.dtype), dw, db, None, None
        zero = torch.zeros_like(invstd)
        dx, dw, db = _closed_form_backward(
            dy, centred, w, b, Moments(zero, zero, invstd), invstd, dims, True, activation,
            negative_slope, needs, reduce_count(y.shape, dims),
        )  # fmt: skip
        if dx is not None:
            dx = dx.to(y.dtype)
        if param_shape is not None:
            dw = None if dw is None else dw.reshape(-1)
            db = None if db is None else db.reshape(-1)
        return dx, dw, db, None, None


_apply_save_output = super(torch.autograd.Function, _NormalizeBatchSaveOutput).apply


def normalize_batch_save_output(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: tuple,
    out: list,
) -> torch.Tensor:
    """y = act(γ·x̂ + β) in training mode keeping only y for backward (see
    :class:`_NormalizeBatchSaveOutput`); x not empty, not traced."""
    return _apply_save_output(_unwrap(x), _unwrap(weight), _unwrap(bias), config, out)
