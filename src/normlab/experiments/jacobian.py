"""jacobian: the training-mode BN Jacobian is dense, the eval-mode one diagonal
(docs/sources.md#seed-002).

J_ij = ∂y_i/∂x_j = γ/sqrt(σ² + ε) · (δ_ij − 1/m − x̂_i x̂_j / m) within one channel of m
values. We compare normlab's closed form (:func:`normlab.functional.batch_norm_jacobian`)
with the Jacobian autograd computes through normlab's layer and through torch's
``F.batch_norm``, in float64, over several batch sizes, and measure how much of the
Jacobian lies off the diagonal in training and in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from normlab.experiments.base import AllChecks, Line, Plot, Progress, Result, Verdict, notify
from normlab.experiments.registry import register


@dataclass(frozen=True)
class Config:
    seed: int = 0
    batch_sizes: tuple[int, ...] = (3, 4, 8, 16, 32, 64, 128)
    channels: int = 3
    eps: float = 1e-5
    tolerance: float = 1e-10  # float64 closed form vs autograd


def _offdiag_share(jac: torch.Tensor) -> float:
    """‖J − diag(J)‖_F / ‖J‖_F over the per-channel blocks (C, m, m)."""
    diag = torch.diagonal(jac, dim1=-2, dim2=-1)
    total = jac.pow(2).sum()
    return float(((total - diag.pow(2).sum()).clamp_min(0) / total).sqrt())


def _blocks(full: torch.Tensor, m: int, c: int) -> tuple[torch.Tensor, float]:
    """Autograd's (m, C, m, C) Jacobian → per-channel blocks (C, m, m), and the largest
    entry coupling two different channels (0 for batch norm)."""
    idx = torch.arange(c)
    blocks = full[:, idx, :, idx]  # (C, m, m)
    cross = full.clone()
    cross[:, idx, :, idx] = 0
    return blocks, float(cross.abs().max())


@dataclass
class BatchSize:
    """What was measured at one batch size m (float64, max over channels)."""

    m: int
    closed_vs_normlab: float  # max |closed form − autograd through normlab|
    closed_vs_torch: float  # max |closed form − autograd through torch|
    cross_channel: float  # largest entry coupling two channels (either autograd Jacobian)
    offdiag_share_train: float  # ‖J − diag J‖_F / ‖J‖_F of the closed form
    offdiag_share_eval: float  # the same, autograd through normlab in eval mode
    min_abs_offdiagonal_train: float  # smallest |J_ij|, i ≠ j, of the closed form
    max_abs_offdiagonal_eval: float  # largest |J_ij|, i ≠ j, in eval mode


@dataclass
class Measurement:
    """What :class:`Jacobian` measured: one :class:`BatchSize` per m of the config, in order."""

    batch_sizes: list[BatchSize]

    @property
    def worst(self) -> dict[str, float]:
        """Largest disagreement with the closed form, and largest cross-channel entry."""
        bs = self.batch_sizes
        return {
            "closed_vs_normlab": max([0.0] + [b.closed_vs_normlab for b in bs]),
            "closed_vs_torch": max([0.0] + [b.closed_vs_torch for b in bs]),
            "cross_channel": max([0.0] + [b.cross_channel for b in bs]),
        }

    @property
    def min_abs_offdiagonal_train(self) -> float:
        """Over m > 2 (with m = 2 the off-diagonal entries vanish up to ε; inf if no m > 2)."""
        return min(
            [float("inf")] + [b.min_abs_offdiagonal_train for b in self.batch_sizes if b.m > 2]
        )

    @property
    def max_abs_offdiagonal_eval(self) -> float:
        return max([0.0] + [b.max_abs_offdiagonal_eval for b in self.batch_sizes])


def measure_batch_size(m: int, c: Config, g: torch.Generator) -> BatchSize:
    """Draw a batch of m (channels with different offsets and scales, γ away from 0) and
    compare the closed-form Jacobian with autograd's through normlab and torch, in training
    and (normlab) eval mode."""
    import normlab as nl

    x = torch.randn(m, c.channels, generator=g, dtype=torch.float64)
    x = x * torch.rand(c.channels, generator=g, dtype=torch.float64).add(0.5) * 3
    x = x + torch.randn(c.channels, generator=g, dtype=torch.float64) * 10
    gamma = torch.rand(c.channels, generator=g, dtype=torch.float64).add(0.5)
    beta = torch.randn(c.channels, generator=g, dtype=torch.float64)
    closed = nl.functional.batch_norm_jacobian(x, gamma, c.eps)  # (C, m, m)

    def ours(inp):
        return nl.functional.batch_norm(inp, None, None, gamma, beta, True, 0.1, c.eps)

    def theirs(inp):
        return F.batch_norm(inp, None, None, gamma, beta, True, 0.1, c.eps)

    # eval mode: running statistics = this batch's, so only the mode differs
    rm, rv = x.mean(0), x.var(0, unbiased=False)

    def ours_eval(inp):
        return nl.functional.batch_norm(inp, rm, rv, gamma, beta, False, 0.1, c.eps)

    j_ours, cross_ours = _blocks(torch.autograd.functional.jacobian(ours, x), m, c.channels)
    j_theirs, cross_theirs = _blocks(torch.autograd.functional.jacobian(theirs, x), m, c.channels)
    j_eval, _ = _blocks(torch.autograd.functional.jacobian(ours_eval, x), m, c.channels)
    off = ~torch.eye(m, dtype=torch.bool)
    return BatchSize(
        m=m,
        closed_vs_normlab=float((closed - j_ours).abs().max()),
        closed_vs_torch=float((closed - j_theirs).abs().max()),
        cross_channel=max(cross_ours, cross_theirs),
        offdiag_share_train=_offdiag_share(closed),
        offdiag_share_eval=_offdiag_share(j_eval),
        min_abs_offdiagonal_train=float(closed[:, off].abs().min()),
        max_abs_offdiagonal_eval=float(j_eval[:, off].abs().max()),
    )


# what the notes say the measurement shows when the rule holds (else: the failed checks)
DENSE = (
    "The off-diagonal share shrinks like ~1/sqrt(m) but each entry stays nonzero: every "
    "sample's gradient depends on the whole batch."
)


@register
class Jacobian(AllChecks):
    id = "jacobian"
    claim = (
        "The training-mode BN Jacobian is dense: J_ij = γ/sqrt(σ²+ε)·(δ_ij − 1/m − x̂_i x̂_j/m); "
        "in eval it is diagonal"
    )
    source = "docs/sources.md#seed-002 (effect on backpropagation)"
    reference = "formula (exact)"
    seed_says = (
        "At test time BN is a per-feature affine map, so its Jacobian is diagonal. In training "
        "every y_i depends on all x_1..x_m of the mini-batch through μ_B and σ_B², so J is "
        "dense: J_ij = γ/sqrt(σ_B²+ε)·(δ_ij − 1/m − (x_i−μ_B)(x_j−μ_B)/(m(σ_B²+ε)))."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {"batch_sizes": (3, 4, 16), "channels": 2}

    def rule(self, config: Config) -> str:
        return (
            f"holds if, in float64 for every batch size m in {list(config.batch_sizes)}, the "
            f"closed form matches autograd through normlab and through torch to "
            f"≤ {config.tolerance:g} (max abs), every off-diagonal entry of the training-mode "
            "Jacobian is nonzero (m > 2), the eval-mode Jacobian has exactly zero "
            "off-diagonal entries, and no entry couples two channels."
        )

    def checks(self, config: Config, m: Measurement) -> dict[str, bool]:
        """The parts of :meth:`rule`, each named, and whether it passed."""
        worst = m.worst
        agree = max(worst["closed_vs_normlab"], worst["closed_vs_torch"])
        return {
            f"closed form = autograd to ≤ {config.tolerance:g}": agree <= config.tolerance,
            "training-mode Jacobian dense (m > 2)": m.min_abs_offdiagonal_train > 0,
            "eval-mode Jacobian diagonal": m.max_abs_offdiagonal_eval == 0.0,
            "no entry couples two channels": worst["cross_channel"] == 0.0,
        }

    def measure(self, config: Config, progress: Progress | None = None) -> Measurement:
        g = torch.Generator().manual_seed(config.seed)
        points = []
        for k, m in enumerate(config.batch_sizes):
            points.append(measure_batch_size(m, config, g))
            notify(progress, (k + 1) / len(config.batch_sizes), f"m = {m}")
        return Measurement(points)

    def present(self, config: Config, m: Measurement, verdict: Verdict) -> Result:
        bs = m.batch_sizes
        ms = [float(b.m) for b in bs]
        train_share = [b.offdiag_share_train for b in bs]
        eval_share = [b.offdiag_share_eval for b in bs]
        diffs = [max(b.closed_vs_normlab, b.closed_vs_torch) for b in bs]
        return self.verdict_result(
            config,
            verdict,
            measured=(
                f"max |closed − autograd| = {max(diffs):.1e}; off-diagonal share of ‖J‖_F: "
                f"train {train_share[0]:.2f} (m={bs[0].m}) → "
                f"{train_share[-1]:.2f} (m={bs[-1].m}), eval {max(eval_share):.0f}"
            ),
            setup=(
                f"x of shape (m, {config.channels}) in float64 with per-channel offsets up to "
                f"~±10 and scales 1.5–4.5, random γ ∈ [0.5, 1.5] and β, ε = {config.eps:g}. "
                "Jacobians by torch.autograd.functional.jacobian through "
                "normlab.functional.batch_norm and torch.nn.functional.batch_norm (training "
                "mode), and through normlab in eval mode with the batch's own statistics as "
                "running statistics, so only the mode differs. Exact: nothing scaled down."
            ),
            metrics={
                **m.worst,
                "min_abs_offdiagonal_train": m.min_abs_offdiagonal_train,
                "max_abs_offdiagonal_eval": m.max_abs_offdiagonal_eval,
                "offdiag_share_train": {str(b.m): b.offdiag_share_train for b in bs},
                "offdiag_share_eval": {str(b.m): b.offdiag_share_eval for b in bs},
            },
            tables={
                "Per batch size": {
                    "header": [
                        "m",
                        "max |closed − autograd(normlab)|",
                        "max |closed − autograd(torch)|",
                        "off-diag share (train)",
                        "off-diag share (eval)",
                        "min |J_ij|, i≠j (train)",
                    ],
                    "rows": [
                        [
                            b.m,
                            b.closed_vs_normlab,
                            b.closed_vs_torch,
                            b.offdiag_share_train,
                            b.offdiag_share_eval,
                            b.min_abs_offdiagonal_train,
                        ]
                        for b in bs
                    ],
                }
            },
            plots=[
                Plot(
                    title="Share of the Jacobian off the diagonal (‖offdiag‖_F / ‖J‖_F)",
                    xlabel="batch size m",
                    ylabel="share",
                    logx=True,
                    lines=[
                        Line("training mode", ms, train_share, "o-"),
                        Line("eval mode", ms, eval_share, "s--"),
                    ],
                ),
                Plot(
                    title="Closed form vs autograd (float64)",
                    xlabel="batch size m",
                    ylabel="max abs difference",
                    logx=True,
                    logy=True,
                    lines=[
                        Line("closed form vs autograd", ms, [max(d, 1e-18) for d in diffs], "o-")
                    ],
                ),
            ],
            notes=(
                "Within a channel the training Jacobian is γ/σ times the projection "
                "I − 11ᵀ/m − x̂x̂ᵀ/m (rank m − 2), so its rows sum to 0 and the gradient "
                f"reaching x has zero mean and is orthogonal to x̂. {self.failures(config, m) or DENSE} "
                "With "
                "m = 2, x̂ = ±1 and the off-diagonal entries −1/2 − x̂_i x̂_j/2 vanish up to ε "
                "(the 2×2 projection is 0: y does not depend on x at all beyond ε), so density "
                "is checked for m > 2."
            ),
        )
