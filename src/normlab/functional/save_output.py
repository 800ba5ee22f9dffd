"""save="output": training batch norm that keeps its output, not its input, for backward
(In-Place ABN). The autograd Function, its engine entry and the functional wrapper that
:func:`normlab.functional.batch_norm` dispatches to."""

from __future__ import annotations

import torch

from normlab import kernels
from normlab.functional._bn_checks import running_update, skipped_outcome
from normlab.functional.activations import check_save, get_activation, inverse_of
from normlab.functional.engine import (
    BatchConfig,
    BatchStats,
    Centering,
    _closed_form_backward,
    _flat_grads,
    _kernel_forward,
    _normalize_torch,
    _to,
    _unwrap,
    view_params,
)
from normlab.functional.options import BNOptions
from normlab.functional.stats import reduce_count, work_dtype

_SAVE_OUTPUT_DOUBLE_BACKWARD = (
    "batch norm with save='output' keeps only its output, from which the statistics "
    "cannot be rebuilt as functions of x: double backward (create_graph=True) is not "
    "supported. Use save='input' (the default) for this layer."
)


def centred_from_output(ctx, y, weight, bias, saved_invstd, residual=None):
    """Backward of a save="output" Function: x − mean = (act⁻¹(y) [− r] − β)/(γ·invstd)
    rebuilt from the output (one elementwise pass; magnitude σ, so no cancellation against
    a large mean), in the working dtype: a half input's rebuilt x − mean is not rounded to
    half. ``saved_invstd``: the torch-op path's; the kernel path's is in ``ctx.kernel_stats``.
    Returns ``(centred, invstd, w, b)`` with w, b viewed to broadcast."""
    if torch.is_grad_enabled():
        raise RuntimeError(_SAVE_OUTPUT_DOUBLE_BACKWARD)
    config: BatchConfig = ctx.config
    plan = ctx.kernel_plan
    wd = work_dtype(y.dtype)
    if plan is not None:
        invstd = torch.from_numpy(ctx.kernel_stats[3]).to(wd).reshape(plan.keep)
    else:
        invstd = saved_invstd
    w, b = view_params(weight, config.param_shape), view_params(bias, config.param_shape)
    act = get_activation(config.activation)
    centred = inverse_of(act, config.negative_slope)(y.to(wd))
    if residual is not None:
        centred = centred.sub_(residual.to(wd))
    if b is not None:
        centred = centred.sub_(b.to(wd))
    return centred.div_(invstd if w is None else w.to(wd) * invstd), invstd, w, b


def zero_shift(kernel_stats):
    """The kernel's saved statistics with shift k and delta zeroed: for an input that is
    already centred."""
    stats0 = kernel_stats.copy()
    stats0[0] = 0.0
    stats0[1] = 0.0
    return stats0


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
    dz ≈ 0. ``config``: a :class:`~normlab.functional.engine.BatchConfig`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, config: BatchConfig, out: BatchStats | None):
        ctx.set_materialize_grads(False)
        ctx.config = config
        plan = kernels.plan_batch(
            x, config.dims, weight, bias, True, flat=config.param_shape is not None
        )
        ctx.kernel_plan = plan
        if plan is not None:
            y = _kernel_forward(ctx, plan, x, weight, bias, config, out)
            ctx.save_for_backward(y, weight, bias)
            return y
        y, norm = _normalize_torch(
            x, config, config.activation, config.negative_slope, weight, bias, out
        )
        y = y.to(x.dtype)
        ctx.save_for_backward(y, weight, bias, norm.invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None
        config: BatchConfig = ctx.config
        needs = ctx.needs_input_grad[:3]
        y, weight, bias, *rest = ctx.saved_tensors
        centred, invstd, w, b = centred_from_output(ctx, y, weight, bias, rest[0] if rest else None)
        plan = ctx.kernel_plan
        if plan is not None:
            dx, dw, db = kernels.batch_backward(
                plan, dy, centred, weight, bias, zero_shift(ctx.kernel_stats), config.activation,
                config.negative_slope, needs,
            )  # fmt: skip
            return _to(dx, y.dtype), dw, db, None, None
        zero = torch.zeros_like(invstd)
        dx, dw, db = _closed_form_backward(
            dy, centred, w, b, Centering(zero, zero, invstd), config.dims, True,
            config.activation, config.negative_slope, needs, reduce_count(y.shape, config.dims),
        )  # fmt: skip
        return (_to(dx, y.dtype), *_flat_grads(dw, db, config.param_shape), None, None)


# the Function's C++ apply, as engine._apply_normalize_batch (x not empty, not traced)
_apply_save_output = super(torch.autograd.Function, _NormalizeBatchSaveOutput).apply


def check_save_output(save, activation, negative_slope, weight, where) -> bool:
    """Validate ``save`` (True for 'output'); γ must have no zero (x̂ = (z − β)/γ)."""
    check_save(save, activation, negative_slope, where)
    if save == "output" and weight is not None and not bool(torch.all(weight)):
        raise ValueError(
            f"{where}: save='output' recovers x̂ = (act⁻¹(y) − β)/γ in backward, but weight "
            f"(γ) has a zero entry, so x̂ is lost there. Use save='input' for this layer, or "
            f"keep γ away from 0 (e.g. initialise it to 1, or clamp |γ| ≥ ε after each step)."
        )
    return save == "output"


def batch_norm_save_output(
    input, running_mean, running_var, weight, bias, options: BNOptions, num_batches_tracked,
    layout, shape,
) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """Training :func:`~normlab.functional.batch_norm._batch_norm` with ``save='output'``:
    keep y, not x, for backward (:class:`_NormalizeBatchSaveOutput`)."""
    activation, negative_slope = options.activation, options.negative_slope
    check_save_output(options.save, activation, negative_slope, weight, options.where)
    if input.numel() == 0:  # nothing to save either way
        from normlab.functional.batch_norm import _batch_norm

        return _batch_norm(
            input, running_mean, running_var, weight, bias, True,
            options._replace(degenerate="error", save="input"),
            num_batches_tracked=num_batches_tracked, layout=layout,
        )  # fmt: skip
    running = running_update(
        running_mean, running_var, options.momentum, num_batches_tracked, options.nonfinite,
        layout.n,
    )  # fmt: skip
    config = BatchConfig(layout.dims, options.eps, activation, negative_slope, running, shape)
    y = _apply_save_output(_unwrap(input), _unwrap(weight), _unwrap(bias), config, None)
    return skipped_outcome(y, running, options.nonfinite, options.where)
