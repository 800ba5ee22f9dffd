"""BN → add(residual) → activation as one training layer (ResNet's ``relu(bn(x) + r)``):
the autograd Function, its engine entry and the functional wrapper that
:func:`normlab.functional.batch_norm` dispatches to for ``residual=``."""

from __future__ import annotations

import torch

from normlab import kernels
from normlab.functional._bn_checks import running_update, skipped_outcome, traced_running_update
from normlab.functional.activations import derivative_from_output, get_activation
from normlab.functional.engine import (
    BatchConfig,
    BatchStats,
    Centering,
    _batch_centering,
    _closed_form_backward,
    _finish_kernel_forward,
    _flat_grads,
    _normalize_torch,
    _to,
    _unwrap,
    view_params,
)
from normlab.functional.options import BNOptions
from normlab.functional.save_output import centred_from_output, check_save_output, zero_shift
from normlab.functional.stats import reduce_count, work_dtype


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
    and the activation as torch ops) is the reference. ``config``: a
    :class:`~normlab.functional.engine.BatchConfig`. Double backward recomputes y with
    differentiable ops (:func:`normlab.functional.traced.composite`) and differentiates it.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, config: BatchConfig, out: BatchStats | None):
        activation, negative_slope = config.activation, config.negative_slope
        ctx.set_materialize_grads(False)
        ctx.config = config
        act = get_activation(activation)
        ctx.from_y = derivative_from_output(act, negative_slope) is not None
        # save="output" (invertible act, so from_y too): r and y instead of x and y
        first = residual if config.save_output else x
        plan = kernels.plan_batch(
            x, config.dims, weight, bias, True, flat=config.param_shape is not None
        )
        ctx.kernel_plan = plan
        if plan is not None:  # one kernel: statistics, then y = act(γ·x̂ + β + r)
            y, moments, ctx.kernel_stats, folded = kernels.batch_forward_residual(
                plan, x, residual, weight, bias, config.eps, activation, negative_slope,
                config.running,
            )  # fmt: skip
            _finish_kernel_forward(plan, moments, config, x, folded, out)
            ctx.save_for_backward(first, weight, bias, y if ctx.from_y else residual)
            return y
        # the torch-op reference: BN, then the add and the activation as torch ops
        z, norm = _normalize_torch(x, config, None, 0.0, weight, bias, out)
        z = z.add_(residual)
        if act.name == "relu":
            y = z.relu_()
        elif act.name == "identity":
            y = z
        else:
            y = act.forward(z, negative_slope)
        y = y.to(x.dtype)
        # what recovers act'(z): the output itself, or r to recompute z
        keep = y if ctx.from_y else residual
        ctx.save_for_backward(first, weight, bias, keep, *norm)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None, None
        config: BatchConfig = ctx.config
        dims, param_shape = config.dims, config.param_shape
        activation, negative_slope = config.activation, config.negative_slope
        nx, nr, nw, nb = ctx.needs_input_grad[:4]
        plan = ctx.kernel_plan
        x, weight, bias, keep, *saved = ctx.saved_tensors
        if config.save_output:  # x is the residual r here, keep is y
            return _residual_backward_from_output(
                ctx, dy, x, keep, weight, bias, saved, (nx, nr, nw, nb)
            )
        act = get_activation(activation)
        wd = work_dtype(x.dtype)
        if torch.is_grad_enabled():
            # create_graph=True: statistics as differentiable functions of x (the saved y,
            # if that is what was kept, is connected to this node's graph already)
            norm = _batch_centering(x, dims, config.eps)
        elif plan is None:
            norm = Centering(*saved)
        else:  # one kernel: dx and dr = dz together
            dx, dr, dw, db = kernels.batch_backward_residual(
                plan, dy, x, keep, ctx.from_y, weight, bias, ctx.kernel_stats, activation,
                negative_slope, (nx, nr, nw, nb),
            )  # fmt: skip
            return dx, dr, dw, db, None, None
        w, b = view_params(weight, param_shape), view_params(bias, param_shape)
        if ctx.from_y:
            dz = dy.to(wd) * derivative_from_output(act, negative_slope)(keep.to(wd))
        else:  # z = γ·x̂ + β + r recomputed from x and the saved r (hardswish, silu)
            z = ((x.to(wd) - norm.shift) - norm.delta) * norm.invstd
            z = z if w is None else z * w.to(wd)
            z = z if b is None else z + b.to(wd)
            dz = dy.to(wd) * act.derivative(z + keep.to(wd), negative_slope)
        dr = dz.to(x.dtype) if nr else None
        dx, dw, db = _closed_form_backward(
            dz, x, w, b, norm, dims, True, None, 0.0, (nx, nw, nb), reduce_count(x.shape, dims),
        )  # fmt: skip
        return (dx, dr, *_flat_grads(dw, db, param_shape), None, None)


def _residual_backward_from_output(ctx, dy, residual, y, weight, bias, saved, needs):
    """Backward of :class:`_NormalizeBatchResidual` under save="output": x − mean =
    (act⁻¹(y) − r − β)/(γ·invstd) rebuilt from y and r (see
    :class:`~normlab.functional.save_output._NormalizeBatchSaveOutput`), then the same
    kernel (or closed form) with zero shift. Keeping r rather than x costs nothing in a
    ResNet block, where r is the block input that its first conv keeps anyway."""
    config: BatchConfig = ctx.config
    activation, negative_slope = config.activation, config.negative_slope
    centred, invstd, w, b = centred_from_output(
        ctx, y, weight, bias, saved[2] if saved else None, residual
    )
    wd = work_dtype(y.dtype)
    plan = ctx.kernel_plan
    if plan is not None:
        dx, dr, dw, db = kernels.batch_backward_residual(
            plan, dy, centred, y.to(wd), True, weight, bias, zero_shift(ctx.kernel_stats),
            activation, negative_slope, needs,
        )  # fmt: skip
        return _to(dx, y.dtype), _to(dr, y.dtype), dw, db, None, None
    dz = dy.to(wd) * derivative_from_output(get_activation(activation), negative_slope)(y.to(wd))
    zero = torch.zeros_like(invstd)
    dx, dw, db = _closed_form_backward(
        dz, centred, w, b, Centering(zero, zero, invstd), config.dims, True, None, 0.0,
        (needs[0], needs[2], needs[3]), reduce_count(y.shape, config.dims),
    )  # fmt: skip
    dr = dz.to(y.dtype) if needs[1] else None
    return (_to(dx, y.dtype), dr, *_flat_grads(dw, db, config.param_shape), None, None)


_apply_residual = super(torch.autograd.Function, _NormalizeBatchResidual).apply


def normalize_batch_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: BatchConfig,
    out: BatchStats | None = None,
) -> torch.Tensor:
    """y = act(γ·x̂ + β + r) in training mode (see :class:`_NormalizeBatchResidual`);
    x not empty, not traced; the statistics go to ``out``."""
    return _apply_residual(
        _unwrap(x), _unwrap(residual), _unwrap(weight), _unwrap(bias), config, out
    )


def check_residual(input: torch.Tensor, residual: torch.Tensor, where: str) -> None:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{where}: residual must be a tensor or None, got {type(residual)!r}")
    if residual.shape != input.shape or residual.dtype != input.dtype:
        raise ValueError(
            f"{where}: residual must have the input's shape and dtype ({tuple(input.shape)}, "
            f"{input.dtype}), got {tuple(residual.shape)}, {residual.dtype}. It is added to "
            f"the normalised input before the activation; project it first (a 1x1 conv and "
            f"BN, as a ResNet downsample does) or cast it with residual.to(input.dtype)."
        )
    if residual.device != input.device:
        raise ValueError(
            f"{where}: residual is on {residual.device}, the input on {input.device}; move it "
            f"with residual.to(input.device)."
        )


def batch_norm_residual(
    input, residual, running_mean, running_var, weight, bias, training, options: BNOptions,
    num_batches_tracked, layout, source_fn, shape,
) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """:func:`~normlab.functional.batch_norm._batch_norm` with a residual:
    ``y = act(γ·x̂ + β + r)``. Training, eager: one fused autograd function
    (:func:`normalize_batch_residual`); eval and traced code: the layer without
    activation, then ``act(· + r)`` as torch ops (a compiler fuses those; autograd
    differentiates them)."""
    from normlab.functional.batch_norm import _batch_norm

    where, activation, negative_slope = options.where, options.activation, options.negative_slope
    check_residual(input, residual, where)
    if source_fn is not None:
        raise NotImplementedError(
            f"{where}: residual= is not supported with statistics gathered elsewhere "
            f"(SyncBatchNorm across ranks): add the residual and apply the activation after "
            f"the layer."
        )
    act = get_activation(activation, where)
    if training and not kernels.traced(input) and input.numel() > 0:
        running = running_update(
            running_mean, running_var, options.momentum, num_batches_tracked, options.nonfinite,
            layout.n,
        )  # fmt: skip
        save_output = options.save != "input" and check_save_output(
            options.save, activation, negative_slope, weight, where
        )
        config = BatchConfig(
            layout.dims, options.eps, activation, negative_slope, running, shape,
            save_output=save_output,
        )  # fmt: skip
        y = normalize_batch_residual(input, residual, weight, bias, config)
        return skipped_outcome(y, running, options.nonfinite, where)
    if training and kernels.traced(input) and _residual_op_applies(input, layout, weight, bias):
        from normlab.functional import traced

        # torch.compile / export: one custom op for BN + add + act (the fused kernels)
        y, mean, var = traced.normalize_batch_residual(
            input, residual, layout.channel, weight, bias, eps=options.eps,
            activation=activation, negative_slope=negative_slope,
        )  # fmt: skip
        traced_running_update(
            running_mean, running_var, num_batches_tracked, mean, var, layout.n, options
        )
        return y, False
    # BN without activation (nor a degenerate policy or save='output' of its own), then
    # the add and the activation
    plain = options._replace(activation=None, degenerate="error", save="input")
    z, skipped = _batch_norm(
        input, running_mean, running_var, weight, bias, training, plain,
        num_batches_tracked=num_batches_tracked, layout=layout,
    )  # fmt: skip
    if _eager_inference(z, input, residual, weight, bias):
        # z is this call's own new tensor and autograd records nothing, so add and
        # activate in place, as torchvision's block does (`out += identity; relu_(out)`):
        # no new tensors (3x faster at (32, 64, 28, 28) in eval)
        return act.apply_(z.add_(residual), negative_slope), skipped
    z = z + residual
    return (z if act.name == "identity" else act.forward(z, negative_slope)), skipped


def _eager_inference(z, input, residual, weight, bias) -> bool:
    """Whether ``z`` (the layer's output before the add) may be written in place: a new
    tensor, plain eager tensors (no tracer or torch.func transform, whose in-place rules
    differ), and nothing for autograd to record (grad mode off or nothing requires grad)."""
    if z is input or kernels.traced(input) or kernels.traced(residual):
        return False
    tensors = (input, residual, weight, bias)
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _residual_op_applies(input, layout, weight, bias) -> bool:
    """Whether traced training BN → add → act goes through the residual custom ops: the
    custom-op conditions of the plain layer (no torch.func transform, not meta, not
    jit.trace) with (C,) parameters."""
    from normlab.functional import traced

    c = input.shape[layout.channel]
    return traced.use_custom_op(input, layout.dims, True) and all(
        p is None or (p.dim() == 1 and p.shape[0] == c) for p in (weight, bias)
    )
