"""Batch renormalization (Ioffe 2017) on the engine.

Training output, per channel:

    x̂ = (x − μ_B)/σ_B · r + d,        y = act(γ·x̂ + β)
    r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((μ_B − μ)/σ, −d_max, d_max)
    σ_B = sqrt(var_B + ε),  σ = sqrt(running_var + ε),  μ = running_mean

with r and d treated as constants in backward (stop_gradient). Since
γ·x̂ + β = (γ·r)·(x − μ_B)/σ_B + (γ·d + β), this is the engine's batch normalization with
weight γ·r and bias γ·d + β for detached r, d: the closed-form BN backward with γ·r is
exactly the paper's gradient (§3, "treated as constants"), and autograd through the
products gives ∂L/∂γ = Σ dy·((x − μ_B)/σ_B·r + d), ∂L/∂β = Σ dy. The batch statistics
are computed once (``StatsSource``) and reused for r, d and the normalisation. In eval
mode the layer is BatchNorm with the running statistics, y = γ·(x − μ)/σ + β, which is
what training output approaches when r, d are not clipped.

Where this differs from the paper (Algorithm 1):
- the paper keeps a moving average of σ (std, ε included); normlab keeps torch's
  ``running_var`` (EMA of the n/(n−1)-corrected variance), so σ = sqrt(running_var + ε),
  and a BatchRenorm state_dict is a BatchNorm state_dict;
- the paper says the limits are "gradually relaxed" after 5000 steps to r_max = 3 at 40k
  and d_max = 5 at 25k steps (§5.1); it does not give the curve. normlab ramps linearly
  (:func:`renorm_clip_limits`).
"""

from __future__ import annotations

import math

import torch

from normlab.functional._bn_checks import warn_if_skipped
from normlab.functional.batch_norm import _batch_norm, _check_batch_norm, update_running_stats_
from normlab.functional.engine import StatsSource, normalize_batch, view_params
from normlab.functional.options import BNOptions
from normlab.functional.stats import centered_moments


def check_clip_limits(r_max: float, d_max: float, where: str) -> None:
    for name, v, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < low:
            raise ValueError(
                f"{where}: {name} must be a number >= {low:g}, got {v!r}; r is clipped to "
                f"[1/r_max, r_max] and d to [-d_max, d_max], so r_max=1, d_max=0 is plain "
                f"BatchNorm and larger values allow more correction (paper: r_max=3, d_max=5)."
            )


def renorm_clip_limits(
    step: int | torch.Tensor,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_steps: int = 40000,
    d_max_steps: int = 25000,
) -> tuple[float, float]:
    """The clip limits ``(r_max_t, d_max_t)`` at training step ``step`` (0-based: the
    number of updates already made, i.e. ``num_batches_tracked`` before this batch).

    Schedule (Ioffe 2017, §5.1): r_max_t = 1 and d_max_t = 0 while ``step <
    warmup_steps``; then each rises linearly, reaching its final value ``r_max`` at
    ``r_max_steps`` and ``d_max`` at ``d_max_steps``, and stays there. A limit whose
    final step is ≤ ``warmup_steps`` jumps to its final value at ``warmup_steps``; with
    all three steps 0 the final limits apply from the first step.

    Examples (defaults): step 0 → (1, 0); 5000 → (1, 0); 25000 → (2.142857…, 5);
    40000 → (3, 5). A tensor ``step`` (traced code) gives 0-d float64 tensors.
    """

    if isinstance(step, torch.Tensor):  # traced code: the same schedule without branches
        t = step.to(torch.float64)

        def ramp_tensor(start: float, final: float, final_step: int) -> torch.Tensor:
            if final_step <= warmup_steps:
                frac = torch.ones_like(t)
            else:
                frac = ((t - warmup_steps) / (final_step - warmup_steps)).clamp(0.0, 1.0)
            return torch.where(t < warmup_steps, start, start + (final - start) * frac)

        return ramp_tensor(1.0, r_max, r_max_steps), ramp_tensor(0.0, d_max, d_max_steps)

    def ramp(start: float, final: float, final_step: int) -> float:
        if step < warmup_steps:
            return start
        if step >= final_step:
            return float(final)
        return start + (final - start) * (step - warmup_steps) / (final_step - warmup_steps)

    return ramp(1.0, r_max, r_max_steps), ramp(0.0, d_max, d_max_steps)


def _batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    options: BNOptions,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    num_batches_tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """:func:`batch_renorm`, also returning whether a non-finite batch was skipped;
    ``options``: as :func:`normlab.functional.batch_norm._batch_norm` (``degenerate`` and
    ``save`` do not apply)."""
    where = options.where
    if not isinstance(r_max, torch.Tensor):  # tensors: the schedule of a traced layer
        check_clip_limits(r_max, d_max, where)
    if running_mean is None and running_var is None:
        raise ValueError(
            f"{where}: batch renormalization needs running_mean and running_var (r and d "
            f"compare the batch's statistics with them); got None. A layer built with "
            f"track_running_stats=False cannot renormalise: use BatchNorm instead."
        )
    layout = _check_batch_norm(
        input, running_mean, running_var, weight, bias, training, options, num_batches_tracked,
        True,
    )  # fmt: skip
    if not training:  # BatchNorm's eval: r and d only exist in training
        return _batch_norm(
            input, running_mean, running_var, weight, bias, False, options, layout=layout
        )
    eps, activation, negative_slope = options.eps, options.activation, options.negative_slope
    dims, shape, n = layout.dims, layout.shape, layout.n
    w, b = view_params(weight, shape), view_params(bias, shape)
    mu, var = running_mean.view(shape), running_var.view(shape)
    if n == 0:  # empty batch: empty output, statistics untouched
        y, _, _ = normalize_batch(
            input, dims, w, b, eps=eps, activation=activation, negative_slope=negative_slope
        )
        return y, False
    with torch.no_grad():  # r, d are constants in backward: no graph through them
        stats, _ = centered_moments(input.detach(), dims)
        wd = stats.shift.dtype
        sigma = torch.sqrt(var.to(wd) + eps)
        r = (torch.sqrt(stats.var.to(wd) + eps) / sigma).clamp(1.0 / r_max, r_max)
        d = ((stats.mean - mu.to(wd)) / sigma).clamp(-d_max, d_max)
    # γ·x̂ + β with x̂ = x̂_B·r + d  ==  (γ·r)·x̂_B + (γ·d + β)
    w_eff = r if w is None else w * r
    b_eff = d if w is None else w * d
    if b is not None:
        b_eff = b_eff + b
    y, mean, bvar = normalize_batch(
        input,
        dims,
        w_eff,
        b_eff,
        eps=eps,
        activation=activation,
        negative_slope=negative_slope,
        source=StatsSource(stats, n),
    )
    skipped = update_running_stats_(
        running_mean, running_var, mean, bvar * (n / (n - 1)), options.momentum,
        num_batches_tracked=num_batches_tracked, nonfinite=options.nonfinite, where=where,
    )  # fmt: skip
    return y, skipped


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    channel_dim: int = 1,
    activation: str | None = None,
    negative_slope: float = 0.01,
    nonfinite: str = "propagate",
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch renormalization (module docstring for the formula and how it differs from
    the paper).

    Args:
        input: ``(N, C, *)`` (channel at ``channel_dim``), floating point.
        running_mean, running_var: ``(C,)`` buffers (required: r and d are defined by
            them); updated in place in training exactly as BatchNorm's.
        weight, bias: ``(C,)`` γ and β, or None.
        training: renormalised batch statistics if True; the running statistics if False.
        momentum: as BatchNorm (None: cumulative average, needs ``num_batches_tracked``).
        eps: added to both variances.
        r_max, d_max: the clip limits *for this step* (see :func:`renorm_clip_limits` for
            the paper's schedule; the modules apply it). r_max=1, d_max=0 is BatchNorm.
        channel_dim, activation, negative_slope, nonfinite, num_batches_tracked: as
            :func:`normlab.functional.batch_norm`.

    Shapes: y like input. Half inputs: statistics, r and d in float32.

    Reference: Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", NeurIPS 2017, Algorithm 1.
    """
    options = BNOptions(
        momentum, eps, channel_dim, activation, negative_slope, nonfinite, where="batch_renorm"
    )
    result = _batch_renorm(
        input, running_mean, running_var, weight, bias, training, options, r_max=r_max,
        d_max=d_max, num_batches_tracked=num_batches_tracked,
    )  # fmt: skip
    return warn_if_skipped(result, "batch_renorm")
