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

from normlab.experiments.base import Experiment, Line, Plot, Result, notify
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


@register
class Jacobian(Experiment):
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

    def run(self, config: Config, progress=None) -> Result:
        import normlab as nl

        c = config
        g = torch.Generator().manual_seed(c.seed)
        rows, train_share, eval_share, diffs = [], [], [], []
        worst = {"closed_vs_normlab": 0.0, "closed_vs_torch": 0.0, "cross_channel": 0.0}
        min_offdiag, max_eval_offdiag = float("inf"), 0.0
        for k, m in enumerate(c.batch_sizes):
            # channels with different offsets and scales; γ away from 0
            x = torch.randn(m, c.channels, generator=g, dtype=torch.float64)
            x = x * torch.rand(c.channels, generator=g, dtype=torch.float64).add(0.5) * 3
            x = x + torch.randn(c.channels, generator=g, dtype=torch.float64) * 10
            gamma = torch.rand(c.channels, generator=g, dtype=torch.float64).add(0.5)
            beta = torch.randn(c.channels, generator=g, dtype=torch.float64)
            closed = nl.functional.batch_norm_jacobian(x, gamma, c.eps)  # (C, m, m)

            def ours(inp, gamma=gamma, beta=beta):
                return nl.functional.batch_norm(inp, None, None, gamma, beta, True, 0.1, c.eps)

            def theirs(inp, gamma=gamma, beta=beta):
                return F.batch_norm(inp, None, None, gamma, beta, True, 0.1, c.eps)

            j_ours, cross_ours = _blocks(torch.autograd.functional.jacobian(ours, x), m, c.channels)
            j_theirs, cross_theirs = _blocks(
                torch.autograd.functional.jacobian(theirs, x), m, c.channels
            )
            # eval mode: running statistics = this batch's, so only the mode differs
            rm, rv = x.mean(0), x.var(0, unbiased=False)

            def ours_eval(inp, rm=rm, rv=rv, gamma=gamma, beta=beta):
                return nl.functional.batch_norm(inp, rm, rv, gamma, beta, False, 0.1, c.eps)

            j_eval, _ = _blocks(torch.autograd.functional.jacobian(ours_eval, x), m, c.channels)
            d_ours = float((closed - j_ours).abs().max())
            d_theirs = float((closed - j_theirs).abs().max())
            worst["closed_vs_normlab"] = max(worst["closed_vs_normlab"], d_ours)
            worst["closed_vs_torch"] = max(worst["closed_vs_torch"], d_theirs)
            worst["cross_channel"] = max(worst["cross_channel"], cross_ours, cross_theirs)
            eye = torch.eye(m, dtype=torch.bool)
            off = closed[:, ~eye]
            if m > 2:  # with m = 2 the off-diagonal entries can be exactly 0 (see notes)
                min_offdiag = min(min_offdiag, float(off.abs().min()))
            max_eval_offdiag = max(max_eval_offdiag, float(j_eval[:, ~eye].abs().max()))
            ts, es = _offdiag_share(closed), _offdiag_share(j_eval)
            train_share.append(ts)
            eval_share.append(es)
            diffs.append(max(d_ours, d_theirs))
            rows.append([m, d_ours, d_theirs, ts, es, float(off.abs().min())])
            notify(progress, (k + 1) / len(c.batch_sizes), f"m = {m}")

        agree = max(worst["closed_vs_normlab"], worst["closed_vs_torch"]) <= c.tolerance
        dense = min_offdiag > 0
        diagonal_eval = max_eval_offdiag == 0.0
        no_cross = worst["cross_channel"] == 0.0
        holds = agree and dense and diagonal_eval and no_cross
        ms = [float(m) for m in c.batch_sizes]
        return self.result(
            config,
            verdict="holds" if holds else "fails",
            rule=(
                f"holds if, in float64 for every batch size m in {list(c.batch_sizes)}, the "
                f"closed form matches autograd through normlab and through torch to "
                f"≤ {c.tolerance:g} (max abs), every off-diagonal entry of the training-mode "
                "Jacobian is nonzero (m > 2), the eval-mode Jacobian has exactly zero "
                "off-diagonal entries, and no entry couples two channels."
            ),
            measured=(
                f"max |closed − autograd| = {max(diffs):.1e}; off-diagonal share of ‖J‖_F: "
                f"train {train_share[0]:.2f} (m={c.batch_sizes[0]}) → "
                f"{train_share[-1]:.2f} (m={c.batch_sizes[-1]}), eval {max(eval_share):.0f}"
            ),
            setup=(
                f"x of shape (m, {c.channels}) in float64 with per-channel offsets up to ~±10 "
                f"and scales 1.5–4.5, random γ ∈ [0.5, 1.5] and β, ε = {c.eps:g}. Jacobians by "
                "torch.autograd.functional.jacobian through normlab.functional.batch_norm "
                "and torch.nn.functional.batch_norm (training mode), and through normlab in "
                "eval mode with the batch's own statistics as running statistics, so only "
                "the mode differs. Exact: nothing scaled down."
            ),
            metrics={
                **worst,
                "min_abs_offdiagonal_train": min_offdiag,
                "max_abs_offdiagonal_eval": max_eval_offdiag,
                "offdiag_share_train": dict(zip(map(str, c.batch_sizes), train_share)),
                "offdiag_share_eval": dict(zip(map(str, c.batch_sizes), eval_share)),
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
                    "rows": rows,
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
                "reaching x has zero mean and is orthogonal to x̂. The off-diagonal share "
                "shrinks like ~1/sqrt(m) but each entry stays nonzero: every sample's gradient "
                "depends on the whole batch. With m = 2, x̂ = ±1 and the off-diagonal entries "
                "−1/2 − x̂_i x̂_j/2 vanish up to ε (the 2×2 projection is 0: y does not depend "
                "on x at all beyond ε), so density is checked for m > 2."
            ),
        )
