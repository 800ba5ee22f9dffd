"""The loss landscape along the gradient (Santurkar et al. 2018, §3.1 and Fig. 4).

At parameters θ with gradient g = ∇L(θ) on one batch, step to θ − s·g for step sizes
s = lr · m over multipliers m (the paper: [1/2, 4] × the learning rate) and measure

- loss range:                 max_s L(θ − s·g) − min_s L(θ − s·g)
- gradient predictiveness:    max_s ‖∇L(θ − s·g) − ∇L(θ)‖          (ℓ2 change; smaller = the
                              gradient is more predictive of the gradient after the step)
- effective β-smoothness:     max_s ‖∇L(θ − s·g) − ∇L(θ)‖ / ‖s·g‖

all on the same batch. Parameters, buffers (BatchNorm running statistics) and modes are
restored exactly; ``.grad`` is not touched.

Reference: Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help
Optimization?", NeurIPS 2018.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from normlab.diagnostics._batch import LossFn, batch_loss, trainable_params
from normlab.diagnostics._state import preserved


@dataclass(frozen=True)
class LandscapeProbe:
    """Loss and gradient along the gradient direction at one point of training.

    Attributes:
        loss: L(θ); grad_norm: ‖∇L(θ)‖.
        step_sizes: s = lr · multiplier, ascending.
        losses: L(θ − s·g) per step size.
        grad_changes: ‖∇L(θ − s·g) − ∇L(θ)‖ per step size.
        loss_range: max − min of ``losses``.
        gradient_predictiveness: max of ``grad_changes``.
        beta_smoothness: max of grad_changes / (s·‖g‖) (0 when g = 0).
    """

    loss: float
    grad_norm: float
    step_sizes: list[float]
    losses: list[float]
    grad_changes: list[float]
    loss_range: float
    gradient_predictiveness: float
    beta_smoothness: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loss_and_grad(model, batch, loss_fn, params) -> tuple[float, torch.Tensor]:
    loss = batch_loss(model, batch, loss_fn, "landscape_along_gradient")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1).double()
            for p, g in zip(params, grads)
        ]
    )
    return float(loss.detach()), flat


def landscape_along_gradient(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    *,
    lr: float,
    multipliers: Sequence[float] = (0.5, 1.0, 2.0, 3.0, 4.0),
    params: Sequence[torch.Tensor] | None = None,
) -> LandscapeProbe:
    """Probe L and ∇L at θ − lr·m·∇L(θ) for each multiplier m (see the module docstring).

    Args:
        model: probed in its current mode(s) (training mode: batch statistics).
        loss_fn, batch: as :func:`normlab.diagnostics.hessian_eigenvalues`.
        lr: the learning rate the step sizes are multiples of.
        multipliers: positive multiples of ``lr``.
        params: parameters to move (default: all with ``requires_grad``).
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"landscape_along_gradient: lr must be a positive number, got {lr}")
    mult = sorted(float(m) for m in multipliers)
    if not mult or mult[0] <= 0:
        raise ValueError(
            f"landscape_along_gradient: multipliers must be positive, got {list(multipliers)}"
        )
    params = trainable_params(model) if params is None else list(params)
    with preserved(model, params):
        loss0, g0 = _loss_and_grad(model, batch, loss_fn, params)
        origin = [p.detach().clone() for p in params]
        direction = []
        start = 0
        for p in params:
            direction.append(g0[start : start + p.numel()].view(p.shape).to(p.dtype))
            start += p.numel()
        gnorm = float(g0.norm())
        steps, losses, changes = [], [], []
        for m in mult:
            s = lr * m
            with torch.no_grad():
                for p, p0, d in zip(params, origin, direction):
                    p.copy_(p0 - s * d)
            loss, g = _loss_and_grad(model, batch, loss_fn, params)
            steps.append(s)
            losses.append(loss)
            changes.append(float((g - g0).norm()))
    beta = max((c / (s * gnorm) for s, c in zip(steps, changes)), default=0.0) if gnorm else 0.0
    return LandscapeProbe(
        loss=loss0,
        grad_norm=gnorm,
        step_sizes=steps,
        losses=losses,
        grad_changes=changes,
        loss_range=max(losses) - min(losses),
        gradient_predictiveness=max(changes),
        beta_smoothness=beta,
    )
