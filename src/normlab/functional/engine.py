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
from typing import NamedTuple

import torch

from normlab import _private, kernels
from normlab.functional.activations import get_activation
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


class BatchConfig(NamedTuple):
    """The non-tensor arguments of a training autograd Function (:class:`_NormalizeBatch`
    and its residual and save-output siblings), passed as one argument: every argument of
    a custom Function costs autograd work on each call.

    Attributes:
        dims: the reduction dims, canonical (non-negative, ascending).
        eps: added to the variance.
        activation, negative_slope: the fused activation.
        running: the running estimates to fold this batch into, or None.
        param_shape: None, or the keepdim shape of the one channel dim when weight and bias
            come as (C,) tensors (a layer's parameters): the kernels take them as they are,
            and the torch ops view them, so the caller's graph has no view nodes.
        center: subtract the mean (False for RMSNorm; plain Function only).
        source: statistics from elsewhere (:class:`StatsSource`; plain Function only).
        save_output: residual Function only: keep y and r, not x (save="output").
    """

    dims: tuple[int, ...]
    eps: float
    activation: str | None
    negative_slope: float
    running: RunningUpdate | None = None
    param_shape: list[int] | None = None
    center: bool = True
    source: StatsSource | None = None
    save_output: bool = False


class BatchStats:
    """Where a training Function leaves this batch's statistics (not outputs of the
    Function: they are not differentiable, and every output costs autograd work): the
    kernel plan and its (2, C) moments array on the kernel path, or keepdim ``mean`` and
    biased ``var`` tensors on the torch-op path. :meth:`tensors` gives the tensors either
    way; a caller that needs only y passes no BatchStats and no tensor is made."""

    __slots__ = ("mean", "moments", "plan", "var")

    def __init__(self) -> None:
        self.plan = self.moments = self.mean = self.var = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var): keepdim, in the working dtype, detached."""
        if self.mean is None:
            self.mean, self.var = kernels.stats_tensors(self.plan, self.moments)
        return self.mean, self.var


class Centering(NamedTuple):
    """What the closed-form backward needs to rebuild x̂ = ((x − shift) − delta)·invstd:
    the saved per-slice statistics (keepdim). ``shift + delta`` is the mean (an
    unevaluated sum, see :class:`normlab.functional.stats.Moments`); ``invstd`` is
    1/sqrt(var + eps)."""

    shift: torch.Tensor
    delta: torch.Tensor
    invstd: torch.Tensor


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
    norm: Centering,
    dims: tuple[int, ...],
    center: bool,
    activation: str | None,
    negative_slope: float,
    needs: tuple[bool, bool, bool],
    count: int,
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dx, dweight, dbias of y = act(weight·x̂ + bias) by the closed form of the module
    docstring; ``needs``: which of the three to compute; ``count`` values per statistic;
    ``reduce_sums``: see :class:`StatsSource`."""
    wd = work_dtype(x.dtype)
    xw = x.to(wd)
    invstd = norm.invstd
    x_hat = ((xw - norm.shift) - norm.delta) * invstd if center else xw * invstd
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


def _finish_kernel_forward(plan, moments, config: BatchConfig, x, folded, out) -> None:
    """After a kernel forward: fold the running statistics the kernel did not take, and
    hand the statistics to ``out``."""
    running = config.running
    if running is not None and not folded:  # buffers the kernel does not take
        mean, var = kernels.stats_tensors(plan, moments)
        _update_running(running, mean, var, reduce_count(x.shape, config.dims))
    if out is not None:
        out.plan, out.moments = plan, moments


def _kernel_forward(ctx, plan, x, weight, bias, config: BatchConfig, out) -> torch.Tensor:
    """y of the fused training kernel for ``plan``; its saved statistics go to ctx, the
    running update and ``out`` as :func:`_finish_kernel_forward`."""
    y, moments, ctx.kernel_stats, folded = kernels.batch_forward(
        plan, x, weight, bias, config.eps, config.activation, config.negative_slope,
        config.running,
    )  # fmt: skip
    _finish_kernel_forward(plan, moments, config, x, folded, out)
    return y


def _finish_torch_forward(stats: Moments, wd, count: int, config: BatchConfig, out) -> None:
    """After a torch-op forward: the same, from ``stats`` (biased var)."""
    mean, var = stats.mean.to(wd), stats.var.to(wd)
    if config.running is not None:
        _update_running(config.running, mean, var, count)
    if out is not None:
        out.mean, out.var = mean, var


def _normalize_torch(x, config: BatchConfig, activation, negative_slope, weight, bias, out):
    """The torch-op forward of the residual and save-output Functions: this batch's
    statistics over ``config.dims`` (centred), then act(weight·x̂ + bias) with
    ``weight``/``bias`` (C,) or keepdim; the running update folded in and the statistics
    handed to ``out``. Returns y in the working dtype and the :class:`Centering`."""
    wd = work_dtype(x.dtype)
    param_shape = config.param_shape
    weight, bias = view_params(weight, param_shape), view_params(bias, param_shape)
    stats, e = centered_moments(x, config.dims)
    norm = Centering(stats.shift, stats.delta, torch.rsqrt(stats.var + config.eps).to(wd))
    y = _affine_act(
        e.mul_(norm.invstd), _to(weight, wd), _to(bias, wd), activation, negative_slope, True
    )
    _finish_torch_forward(stats, wd, reduce_count(x.shape, config.dims), config, out)
    return y, norm


def _batch_centering(x: torch.Tensor, dims, eps: float, center: bool = True):
    """The :class:`Centering` of x over ``dims`` as differentiable functions of x: what
    double backward (``create_graph=True``) differentiates."""
    xw = x.to(work_dtype(x.dtype))
    if center:
        mean = xw.mean(dims, keepdim=True)
        var = (xw - mean).pow(2).mean(dims, keepdim=True)
    else:
        var = xw.pow(2).mean(dims, keepdim=True)
        mean = torch.zeros_like(var)
    return Centering(mean, torch.zeros_like(mean), torch.rsqrt(var + eps))


def _flat_grads(dw, db, param_shape):
    """The gradients of (C,) parameters from keepdim ones (as they are if not flat)."""
    if param_shape is None:
        return dw, db
    return (None if dw is None else dw.reshape(-1)), (None if db is None else db.reshape(-1))


class _NormalizeBatch(torch.autograd.Function):
    """y from x, weight, bias; ``config``: a :class:`BatchConfig`; the statistics go to
    ``out`` (a :class:`BatchStats`, or None when the caller needs only y)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config: BatchConfig, out: BatchStats | None):
        ctx.set_materialize_grads(False)
        source, param_shape = config.source, config.param_shape
        plan = (
            None
            if source is not None
            else kernels.plan_batch(
                x, config.dims, weight, bias, config.center, flat=param_shape is not None
            )
        )
        ctx.kernel_plan = plan
        ctx.config = config
        if plan is not None:  # fused kernel: same outputs, same saved tensors (x + stats)
            y = _kernel_forward(ctx, plan, x, weight, bias, config, out)
            ctx.save_for_backward(x, weight, bias)
            return y
        center = config.center
        saved_params = (weight, bias)  # the inputs themselves: double backward needs them
        weight, bias = view_params(weight, param_shape), view_params(bias, param_shape)
        wd = work_dtype(x.dtype)
        if source is None:
            stats, e = centered_moments(x, config.dims, center=center)
            count = reduce_count(x.shape, config.dims)
        else:
            stats, count = source.stats, source.count
            xw = x.to(wd)
            e = (xw - stats.shift.to(wd)) - stats.delta.to(wd) if center else xw.clone()
        invstd = torch.rsqrt(stats.var + config.eps).to(wd)  # var may be float64 (overflow)
        y = _affine_act(
            e.mul_(invstd), _to(weight, wd), _to(bias, wd), config.activation,
            config.negative_slope, True,
        )  # fmt: skip
        ctx.save_for_backward(x, *saved_params, stats.shift, stats.delta, invstd)
        ctx.count = count
        _finish_torch_forward(stats, wd, count, config, out)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        if dy is None:  # y took no part in the loss
            return None, None, None, None, None
        config: BatchConfig = ctx.config
        dims, source, param_shape = config.dims, config.source, config.param_shape
        needs = ctx.needs_input_grad[:3]
        plan = ctx.kernel_plan
        if plan is not None:
            x, weight, bias = ctx.saved_tensors
            if not torch.is_grad_enabled():
                dx, dw, db = kernels.batch_backward(
                    plan, dy, x, weight, bias, ctx.kernel_stats, config.activation,
                    config.negative_slope, needs,
                )  # fmt: skip
                return dx, dw, db, None, None
            count = reduce_count(x.shape, dims)
        else:
            x, weight, bias, shift, delta, invstd = ctx.saved_tensors
            count = ctx.count
        weight, bias = view_params(weight, param_shape), view_params(bias, param_shape)
        if torch.is_grad_enabled():
            # create_graph=True: the statistics must be functions of x for the second
            # derivative, so recompute them with differentiable ops.
            if source is not None:
                raise RuntimeError(
                    "double backward (create_graph=True) through normalization with external "
                    "statistics (SyncBatchNorm, ghost or renorm sources) is not supported"
                )
            norm = _batch_centering(x, dims, config.eps, config.center)
        else:
            norm = Centering(shift, delta, invstd)
        dx, dw, db = _closed_form_backward(
            dy, x, weight, bias, norm, dims, config.center, config.activation,
            config.negative_slope, needs, count, None if source is None else source.reduce_sums,
        )  # fmt: skip
        return (dx, *_flat_grads(dw, db, param_shape), None, None)


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
    out = BatchStats()
    config = BatchConfig(dims, eps, activation, negative_slope, running, None, center, source)
    y = _normalize_batch(x, weight, bias, config, out)
    return (y, *out.tensors())


def _normalize_batch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: BatchConfig,
    out: BatchStats | None = None,
) -> torch.Tensor:
    """y of :func:`normalize_batch` for canonical ``config.dims`` and an ``x`` that is not
    empty or has a ``config.source`` (see :class:`_NormalizeBatch`); the statistics go to
    ``out``. For callers that only need y (``functional.batch_norm``, whose running
    statistics are folded in by ``config.running``) ``out`` is None: the kernel path then
    makes no tensors of the statistics at all."""
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
