"""The engine under tracers and transforms: torch.compile, torch.export, torch.jit.trace,
torch.func, fake and meta tensors.

The eager path (:mod:`normlab.functional.engine`) is built for speed on real memory: a
custom ``autograd.Function`` that calls the Numba kernels by data pointer and folds the
batch into the running statistics inside the kernel call, with Python branches on the
data (the non-finite policy). None of that can be traced. Here the same math is written
so that every tracer sees ordinary operators:

* **Training, BatchNorm case** (statistics per channel over every other dim, this batch's
  own): two ``torch.library`` custom ops, ``normlab::batch_norm_train`` →
  ``(y, stats)`` and ``normlab::batch_norm_train_backward`` → ``(dx, dγ, dβ)``, joined by
  ``register_autograd``. A compiled or exported graph holds them as opaque calls, so the
  fused kernels still run (when the input is one they take; otherwise the op runs the
  torch-op reference math). ``stats`` is the float64 ``(4, C)`` array
  ``[shift, delta, var, invstd]`` with mean = shift + delta (see ``kernels._numba``).
* **Everything else under a tracer, and every torch.func transform**: the reference math
  as plain differentiable torch ops (:func:`composite`), which vmap, jvp, grad, export and
  meta tensors all understand; double backward included.
* **Running statistics** (:func:`update_running`): branch-free tensor code. A non-finite
  batch under ``nonfinite='skip'`` masks the update — buffers and ``num_batches_tracked``
  keep their values — instead of a Python ``if``; ``'raise'`` becomes
  ``torch._assert_async`` before anything changes; the "skipped" warning is eager-only
  (a graph cannot warn on data). ``momentum=None`` divides by the counter as a tensor.

Nothing here is on the eager hot path: :func:`normlab.kernels.traced` decides, per call,
whether a tensor has real memory outside every tracer and transform.
"""

from __future__ import annotations

import torch

from normlab import _private, kernels
from normlab.functional.activations import get_activation
from normlab.functional.stats import centered_moments, reduce_count, work_dtype

_OP_NAMESPACE = "normlab"


def _reference_forward(x, weight, bias, channel_dim, eps, activation, negative_slope):
    """The torch-op math of :func:`batch_norm_train` (any device or dtype)."""
    from normlab.functional.engine import _affine_act, view_params

    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    keep = _keep(x, channel_dim)
    wd = work_dtype(x.dtype)
    stats, e = centered_moments(x, dims)
    invstd = torch.rsqrt(stats.var + eps).to(wd)
    w, b = view_params(weight, keep), view_params(bias, keep)
    y = _affine_act(
        e.mul_(invstd),
        None if w is None else w.to(wd),
        None if b is None else b.to(wd),
        activation,
        negative_slope,
        True,
    )
    packed = torch.stack(
        [t.reshape(-1).to(torch.float64) for t in (stats.shift, stats.delta, stats.var, invstd)]
    )
    return y.to(x.dtype), packed


@torch.library.custom_op(f"{_OP_NAMESPACE}::batch_norm_train", mutates_args=())
def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    channel_dim: int,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode batch norm with this batch's statistics over every dim but
    ``channel_dim``: ``(y, stats)``, ``y = act(γ·(x − mean)/sqrt(var + ε) + β)`` like ``x``
    (same strides as ``torch.empty_like(x)``), ``stats`` float64 ``(4, C)``
    [shift, delta, biased var, invstd]. Runs the fused kernels where they apply."""
    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    plan = kernels.plan_batch(x, dims, weight, bias, True, flat=True)
    if plan is None:
        return _reference_forward(x, weight, bias, channel_dim, eps, activation, negative_slope)
    y, _, stats, _ = kernels.batch_forward(plan, x, weight, bias, eps, activation, negative_slope)
    return _like_empty(y, x), torch.from_numpy(stats)


@batch_norm_train.register_fake
def _(x, weight, bias, channel_dim, eps, activation, negative_slope):
    return torch.empty_like(x), x.new_empty((4, x.shape[channel_dim]), dtype=torch.float64)


def _like_empty(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides ``torch.empty_like(x)`` has (what the fake impl promises a
    compiler): the kernels make a contiguous output for inputs in neither of their
    layouts."""
    want = torch.empty_like(x, device="meta").stride()
    return t if t.stride() == want else torch.empty_like(x).copy_(t)


def _keep(x: torch.Tensor, channel_dim: int) -> list[int]:
    """The keepdim shape of a per-channel statistic of ``x``."""
    keep = [1] * x.dim()
    keep[channel_dim] = x.shape[channel_dim]
    return keep


def _centering(stats: torch.Tensor, x: torch.Tensor, channel_dim: int):
    """The ops' packed ``stats`` (4, C) as the engine's keepdim ``Centering`` of ``x``, in
    its working dtype (what the torch-op backward takes)."""
    from normlab.functional.engine import Centering

    keep, wd = _keep(x, channel_dim), work_dtype(x.dtype)
    shift, delta, _, invstd = (stats[i].to(wd).reshape(keep) for i in range(4))
    return Centering(shift, delta, invstd)


def _mean_var(stats: torch.Tensor, x: torch.Tensor, channel_dim: int):
    """Keepdim ``(mean, biased var)`` of ``x`` in its working dtype from the packed stats."""
    keep, wd = _keep(x, channel_dim), work_dtype(x.dtype)
    return (stats[0] + stats[1]).to(wd).reshape(keep), stats[2].to(wd).reshape(keep)


@torch.library.custom_op(f"{_OP_NAMESPACE}::batch_norm_train_backward", mutates_args=())
def batch_norm_train_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    channel_dim: int,
    activation: str,
    negative_slope: float,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The closed-form backward of :func:`batch_norm_train`: ``(dx, dγ, dβ)``; a gradient
    that is not needed (or has no parameter) is an empty tensor."""
    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    needs = (
        need_input_grad,
        need_weight_grad and weight is not None,
        need_bias_grad and bias is not None,
    )
    plan = kernels.plan_batch(x, dims, weight, bias, True, flat=True)
    if plan is not None:
        stats_np = stats.contiguous().numpy()
        dx, dw, db = kernels.batch_backward(
            plan, dy, x, weight, bias, stats_np, activation, negative_slope, needs
        )
        if dx is not None:
            dx = _like_empty(dx, x)
    else:
        from normlab.functional.engine import _closed_form_backward, _flat_grads, view_params

        keep = _keep(x, channel_dim)
        dx, dw, db = _closed_form_backward(
            dy, x, view_params(weight, keep), view_params(bias, keep),
            _centering(stats, x, channel_dim), dims, True, activation, negative_slope, needs,
            reduce_count(x.shape, dims),
        )  # fmt: skip
        dw, db = _flat_grads(dw, db, keep)
    return (
        dx if dx is not None else x.new_empty(0),
        dw if dw is not None else x.new_empty(0),
        db if db is not None else x.new_empty(0),
    )


@batch_norm_train_backward.register_fake
def _(dy, x, weight, bias, stats, channel_dim, activation, negative_slope, nx, nw, nb):
    dx = torch.empty_like(x) if nx else x.new_empty(0)
    dw = torch.empty_like(weight) if nw and weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if nb and bias is not None else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, channel_dim, _, activation, negative_slope = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, weight, bias, stats)
    ctx.config = (channel_dim, activation, negative_slope)


def _backward(ctx, dy, _dstats):
    if dy is None:
        return None, None, None, None, None, None, None
    x, weight, bias, stats = ctx.saved_tensors
    channel_dim, activation, negative_slope = ctx.config
    nx, nw, nb = ctx.needs_input_grad[:3]
    dx, dw, db = batch_norm_train_backward(
        dy, x, weight, bias, stats, channel_dim, activation, negative_slope, nx, nw, nb
    )
    return (
        dx if nx else None,
        dw if nw and weight is not None else None,
        db if nb and bias is not None else None,
        None,
        None,
        None,
        None,
    )


batch_norm_train.register_autograd(_backward, setup_context=_setup_context)


# -- BN → add(residual) → activation: a second op pair -----------------------------------
def _from_y(activation: str, negative_slope: float) -> bool:
    from normlab.functional.activations import derivative_from_output

    return derivative_from_output(get_activation(activation), negative_slope) is not None


@torch.library.custom_op(f"{_OP_NAMESPACE}::batch_norm_residual_train", mutates_args=())
def batch_norm_residual_train(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    channel_dim: int,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`batch_norm_train` with a residual added before the activation:
    ``y = act(γ·x̂ + β + r)``, one fused kernel call where the kernels apply (else BN, add
    and activation as torch ops)."""
    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    plan = kernels.plan_batch(x, dims, weight, bias, True, flat=True)
    if plan is None:
        z, stats = _reference_forward(x, weight, bias, channel_dim, eps, None, 0.0)
        act = get_activation(activation)
        z = z + residual
        return (z if act.name == "identity" else act.forward(z, negative_slope)), stats
    y, _, stats, _ = kernels.batch_forward_residual(
        plan, x, residual, weight, bias, eps, activation, negative_slope
    )
    return _like_empty(y, x), torch.from_numpy(stats)


@batch_norm_residual_train.register_fake
def _(x, residual, weight, bias, channel_dim, eps, activation, negative_slope):
    return torch.empty_like(x), x.new_empty((4, x.shape[channel_dim]), dtype=torch.float64)


@torch.library.custom_op(f"{_OP_NAMESPACE}::batch_norm_residual_train_backward", mutates_args=())
def batch_norm_residual_train_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    src: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    channel_dim: int,
    activation: str,
    negative_slope: float,
    need_input_grad: bool,
    need_residual_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`batch_norm_residual_train`: ``(dx, dr, dγ, dβ)`` (empty where
    not needed). ``src``: the output y where y determines act'(z) (see
    ``activations.derivative_from_output``), else the residual r."""
    from normlab.functional.activations import derivative_from_output
    from normlab.functional.engine import _closed_form_backward, _flat_grads, view_params

    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    from_y = _from_y(activation, negative_slope)
    needs = (
        need_input_grad,
        need_residual_grad,
        need_weight_grad and weight is not None,
        need_bias_grad and bias is not None,
    )
    plan = kernels.plan_batch(x, dims, weight, bias, True, flat=True)
    if plan is not None:
        dx, dr, dw, db = kernels.batch_backward_residual(
            plan, dy, x, src, from_y, weight, bias, stats.contiguous().numpy(), activation,
            negative_slope, needs,
        )  # fmt: skip
        dx = None if dx is None else _like_empty(dx, x)
        dr = None if dr is None else _like_empty(dr, x)
    else:
        keep, wd = _keep(x, channel_dim), work_dtype(x.dtype)
        norm = _centering(stats, x, channel_dim)
        w, b = view_params(weight, keep), view_params(bias, keep)
        act = get_activation(activation)
        if from_y:
            dz = dy.to(wd) * derivative_from_output(act, negative_slope)(src.to(wd))
        else:
            z = ((x.to(wd) - norm.shift) - norm.delta) * norm.invstd
            z = z if w is None else z * w.to(wd)
            z = z if b is None else z + b.to(wd)
            dz = dy.to(wd) * act.derivative(z + src.to(wd), negative_slope)
        dr = dz.to(x.dtype) if needs[1] else None
        dx, dw, db = _closed_form_backward(
            dz, x, w, b, norm, dims, True, None, 0.0, (needs[0], needs[2], needs[3]),
            reduce_count(x.shape, dims),
        )  # fmt: skip
        dw, db = _flat_grads(dw, db, keep)
    empty = x.new_empty(0)
    return tuple(t if t is not None else empty for t in (dx, dr, dw, db))


@batch_norm_residual_train_backward.register_fake
def _(dy, x, src, weight, bias, stats, channel_dim, activation, negative_slope, nx, nr, nw, nb):
    dx = torch.empty_like(x) if nx else x.new_empty(0)
    dr = torch.empty_like(x) if nr else x.new_empty(0)
    dw = torch.empty_like(weight) if nw and weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if nb and bias is not None else x.new_empty(0)
    return dx, dr, dw, db


def _setup_context_residual(ctx, inputs, output):
    x, residual, weight, bias, channel_dim, _, activation, negative_slope = inputs
    y, stats = output
    ctx.mark_non_differentiable(stats)
    src = y if _from_y(activation, negative_slope) else residual  # r is not kept if y will do
    ctx.save_for_backward(x, src, weight, bias, stats)
    ctx.config = (channel_dim, activation, negative_slope)


def _backward_residual(ctx, dy, _dstats):
    if dy is None:
        return (None,) * 8
    x, src, weight, bias, stats = ctx.saved_tensors
    channel_dim, activation, negative_slope = ctx.config
    nx, nr, nw, nb = ctx.needs_input_grad[:4]
    dx, dr, dw, db = batch_norm_residual_train_backward(
        dy, x, src, weight, bias, stats, channel_dim, activation, negative_slope, nx, nr, nw, nb
    )
    return (
        dx if nx else None,
        dr if nr else None,
        dw if nw and weight is not None else None,
        db if nb and bias is not None else None,
        None,
        None,
        None,
        None,
    )


batch_norm_residual_train.register_autograd(
    _backward_residual, setup_context=_setup_context_residual
)


def normalize_batch_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    channel_dim: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)`` of training BN → add(r) → act with (C,) weight/bias, traceable:
    the residual op pair (one op per layer in a compiled graph)."""
    name = "identity" if activation is None else str(activation)  # with its parameters
    y, stats = batch_norm_residual_train(
        x, residual, weight, bias, channel_dim, float(eps), name, float(negative_slope)
    )
    return (y, *_mean_var(stats, x, channel_dim))


# -- the composite path ------------------------------------------------------------------
def composite(
    x: torch.Tensor,
    dims: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    activation: str | None,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)`` of the engine's training normalisation as plain differentiable
    torch ops (weight/bias already shaped to broadcast). The mean square is taken in
    float64 so that no branch on the data is needed for the overflow guard of
    :func:`normlab.functional.stats.centered_moments`."""
    from normlab.functional.engine import _affine_act

    wd = work_dtype(x.dtype)
    stats, e = centered_moments(x, dims, center=center, mean_square_dtype=torch.float64)
    invstd = torch.rsqrt(stats.var + eps).to(wd)
    y = _affine_act(
        e * invstd,
        None if weight is None else weight.to(wd),
        None if bias is None else bias.to(wd),
        activation,
        negative_slope,
        False,
    )
    return y.to(x.dtype), stats.mean.to(wd), stats.var.to(wd)


def use_custom_op(x: torch.Tensor, dims: tuple[int, ...], center: bool) -> bool:
    """Whether a traced training normalisation goes through the custom ops: the BatchNorm
    case (one channel dim kept) of a real or fake tensor outside torch.func transforms."""
    return (
        center
        and len(dims) == x.dim() - 1
        and x.dim() >= 2
        and not _private.functorch_active()
        and not x.is_meta
        and not torch.jit.is_tracing()
    )


def normalize_batch(
    x: torch.Tensor,
    dims: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    center: bool,
    activation: str | None,
    negative_slope: float,
    param_shape=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)`` like :func:`normlab.functional.engine.normalize_batch`, traceable.
    ``param_shape``: weight/bias are (C,) tensors to view as this keepdim shape (None:
    already shaped)."""
    from normlab.functional.engine import view_params

    c = next((d for d in range(x.dim()) if d not in dims), -1)
    per_channel = param_shape is not None or (
        kernels._per_channel(weight, x.shape, c) and kernels._per_channel(bias, x.shape, c)
    )
    if per_channel and use_custom_op(x, dims, center):
        w, b = weight, bias
        if param_shape is None:  # shaped to broadcast: the op takes (C,) tensors
            w = None if w is None else w.reshape(-1)
            b = None if b is None else b.reshape(-1)
        get_activation(activation)  # validates; the parameters travel in the name
        name = "identity" if activation is None else str(activation)
        y, stats = batch_norm_train(x, w, b, c, float(eps), name, float(negative_slope))
        return (y, *_mean_var(stats, x, c))
    w, b = view_params(weight, param_shape), view_params(bias, param_shape)
    return composite(x, dims, w, b, eps, center, activation, negative_slope)


# -- running statistics ------------------------------------------------------------------
_VMAP_RUNNING_ERROR = (
    "{where}: training mode under torch.func.vmap updates running_mean/running_var in "
    "place, but the batch statistics differ per vmapped sample while the buffers are "
    "shared, so there is no single update (torch's BatchNorm refuses this too). Construct "
    "the layer with track_running_stats=False, call model.eval() to use the running "
    "statistics, or pass per-sample buffers through torch.func.functional_call."
)


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    mean: torch.Tensor,
    unbiased_var: torch.Tensor,
    momentum: float | None,
    nonfinite: str,
    where: str,
    gate: torch.Tensor | None = None,
) -> None:
    """One running-statistics step as branch-free tensor code (torch's rule, the policy of
    :func:`normlab.functional.batch_norm.update_running_stats_`):

        ok       = finite(mean) ∧ finite(var)        ('propagate': always true)
        t       += ok                                 (num_batches_tracked)
        f        = momentum, or 1/t when momentum is None
        running  = ok ? (1 − f)·running + f·batch : running

    'raise' asserts ``ok`` (``torch._assert_async``) before any buffer changes.

    Under torch.func transforms the statistics are wrapped tensors while the buffers are
    plain ones the transform captured, and functorch refuses in-place ops on captures. A
    buffer update is not part of what is differentiated (torch's own kernels do it below
    the transform), so the statistics are unwrapped to their values and the update runs
    with functorch disabled. Under vmap the statistics differ per sample: an error, as
    torch's BatchNorm gives.

    ``gate``: an optional 0-d bool; False leaves everything (counter included) unchanged
    whatever the statistics, and a non-finite batch is then no error (masked statistics
    of <= 1 counted value under ``degenerate='eval'/'skip'``).
    """
    if _functorch_active():
        values = [_value(t) for t in (mean, unbiased_var)]
        values.append(None if gate is None else _value(gate))
        if values[0] is None or values[1] is None or (gate is not None and values[2] is None):
            raise RuntimeError(_VMAP_RUNNING_ERROR.format(where=where))
        with _private.DisableFuncTorch():
            _update_running(
                running_mean, running_var, num_batches_tracked, *values[:2], momentum,
                nonfinite, where, values[2],
            )  # fmt: skip
        return
    _update_running(
        running_mean, running_var, num_batches_tracked, mean, unbiased_var, momentum,
        nonfinite, where, gate,
    )  # fmt: skip


_functorch_active = _private.functorch_active


_value = _private.functorch_value


def _update_running(
    running_mean, running_var, num_batches_tracked, mean, unbiased_var, momentum, nonfinite,
    where, gate,
) -> None:  # fmt: skip
    try:
        with torch.no_grad():
            m = mean.reshape(running_mean.shape).to(running_mean.dtype)
            v = unbiased_var.reshape(running_var.shape).to(running_var.dtype)
            if nonfinite == "propagate":
                ok = None
            else:
                ok = torch.isfinite(m).all() & torch.isfinite(v).all()
                if nonfinite == "raise":
                    torch._assert_async(
                        ok if gate is None else ok | ~gate,
                        f"{where}: the batch statistics are not finite (the input holds "
                        f"NaN or Inf); running statistics were left unchanged",
                    )
                    ok = None
            if gate is not None:
                ok = gate if ok is None else ok & gate
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1 if ok is None else ok.to(num_batches_tracked.dtype))
            if momentum is None:
                factor = 1.0 / num_batches_tracked.to(running_mean.dtype).clamp(min=1)
            else:
                factor = momentum
            new_m = running_mean * (1.0 - factor) + m * factor
            new_v = running_var * (1.0 - factor) + v * factor
            if ok is not None:
                new_m = torch.where(ok, new_m, running_mean)
                new_v = torch.where(ok, new_v, running_var)
            running_mean.copy_(new_m)
            running_var.copy_(new_v)
    except RuntimeError as e:
        # a buffer that vmap batched (per-sample buffers passed in) meets shared ones
        if _functorch_active():
            raise RuntimeError(_VMAP_RUNNING_ERROR.format(where=where)) from e
        raise
