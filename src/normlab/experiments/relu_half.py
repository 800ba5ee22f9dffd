"""relu-half: with β = 0, BN keeps about half of the ReLU units active; β > 0 raises it.

A unit's output before the ReLU is y = γ·x̂ + β with x̂ of batch mean 0 and variance 1. If
x̂ is standard normal (the simplifying assumption of docs/sources.md#seed-002),
P(y > 0) = Φ(β/γ) for γ > 0: exactly 1/2 at β = 0, increasing in β. We measure the activation
probability — the share of the batch for which a unit is active, averaged over units —
through a Linear → BN → ReLU layer in training mode, on Gaussian inputs (where the
assumption holds) and on the digits (where the pre-activations are not normal, so only the
mean, not the median, is centred).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from normlab.data import load_digits
from normlab.experiments import _training as T
from normlab.experiments.base import Experiment, Line, Plot, Result, notify
from normlab.experiments.registry import register


@dataclass(frozen=True)
class Config:
    seed: int = 0
    betas: tuple[float, ...] = (-2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
    gammas: tuple[float, ...] = (0.5, 1.0, 2.0)
    batch: int = 1024
    in_features: int = 64
    units: int = 256
    tolerance: float = 0.02  # |measured − Φ(β/γ)|, Gaussian inputs
    digits_tolerance: float = 0.03  # |measured − 1/2| at β = 0 on the digits


def normal_cdf(v: float) -> float:
    return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))


def activation_probability(pre: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """Per-unit share of the batch with ReLU(BN(pre)) > 0, BN in training mode (normlab)."""
    import normlab as nl

    bn = nl.nn.BatchNorm1d(pre.shape[1], dtype=pre.dtype, activation="relu")
    with torch.no_grad():
        bn.weight.fill_(gamma)
        bn.bias.fill_(beta)
        return (bn(pre) > 0).to(pre.dtype).mean(0)


@register
class ReluHalf(Experiment):
    id = "relu-half"
    claim = "With β = 0, BN keeps about 50% of ReLU units active; β > 0 raises it"
    source = "docs/sources.md#seed-002 (ReLU and dead units)"
    reference = "50% at β = 0 (Φ(β/γ) under a normal assumption)"
    seed_says = (
        "By centring pre-activations near 0, BN makes a good share of a ReLU unit's inputs "
        "positive, so it stays alive. Under a simplified normal assumption BN with β = 0 "
        "keeps the activation probability near 50%, and the learnable β lets the network "
        "tune it, e.g. a positive β raises it."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {
        "betas": (-1.0, 0.0, 0.5, 1.0),
        "gammas": (1.0, 2.0),
        "batch": 512,
        "units": 64,
    }

    def run(self, config: Config, progress=None) -> Result:
        c = config
        with T.seeded(c.seed):
            lin = torch.nn.Linear(c.in_features, c.units, dtype=torch.float64)
            gauss = torch.randn(c.batch, c.in_features, dtype=torch.float64) * 2 + 1
            split = load_digits(seed=c.seed)
            pre_gauss = lin(gauss).detach()
            pre_digits = lin(split.x_train.double()).detach()
        rows, worst, lines = [], 0.0, []
        monotone = True
        dense = [i / 20 for i in range(-45, 46)]  # β grid for the analytic curves
        steps = len(c.gammas) + 1
        for k, gamma in enumerate(c.gammas):
            measured = []
            for beta in c.betas:
                p = activation_probability(pre_gauss, gamma, beta)
                analytic = normal_cdf(beta / gamma)
                measured.append(float(p.mean()))
                worst = max(worst, abs(measured[-1] - analytic))
                rows.append(
                    [
                        "Gaussian",
                        gamma,
                        beta,
                        analytic,
                        measured[-1],
                        float(p.min()),
                        float(p.max()),
                    ]
                )
            monotone &= all(b > a for a, b in itertools.pairwise(measured))
            lines.append(
                Line(f"Φ(β/{gamma:g})", dense, [normal_cdf(b / gamma) for b in dense], f"C{k}-")
            )
            lines.append(
                Line(f"measured, γ = {gamma:g}", [float(b) for b in c.betas], measured, f"C{k}o")
            )
            notify(progress, (k + 1) / steps, f"γ = {gamma:g}")
        digit_probs = []
        for beta in c.betas:
            p = activation_probability(pre_digits, 1.0, beta)
            digit_probs.append(float(p.mean()))
            rows.append(
                [
                    "digits",
                    1.0,
                    beta,
                    normal_cdf(beta),
                    digit_probs[-1],
                    float(p.min()),
                    float(p.max()),
                ]
            )
        lines.append(
            Line("measured on digits, γ = 1", [float(b) for b in c.betas], digit_probs, "kx")
        )
        notify(progress, 1.0, "digits")
        at_zero = activation_probability(pre_digits, 1.0, 0.0)
        digits_half = float(at_zero.mean())
        gauss_half = float(activation_probability(pre_gauss, 1.0, 0.0).mean())
        monotone &= all(b > a for a, b in itertools.pairwise(digit_probs))
        holds = worst <= c.tolerance and abs(digits_half - 0.5) <= c.digits_tolerance and monotone
        return self.result(
            config,
            verdict="holds" if holds else "fails",
            rule=(
                "holds if on Gaussian inputs the measured activation probability (mean over "
                f"units) is within {c.tolerance:g} of Φ(β/γ) at every β in {list(c.betas)} and "
                f"γ in {list(c.gammas)}, on the digits it is within {c.digits_tolerance:g} of "
                "0.5 at β = 0, and it increases strictly with β on both."
            ),
            measured=(
                f"β = 0: {gauss_half:.1%} (Gaussian), {digits_half:.1%} (digits; units "
                f"{float(at_zero.min()):.0%}–{float(at_zero.max()):.0%}); max |measured − Φ(β/γ)| "
                f"= {worst:.3f}"
            ),
            setup=(
                f"A float64 Linear({c.in_features}, {c.units}) with torch's default init, then "
                "normlab BatchNorm1d (training mode, γ and β set, ReLU fused) on a batch of "
                f"{c.batch} Gaussian inputs N(1, 4) and on the {len(split.x_train)} digits "
                "training images (one batch). Activation probability of a unit = share of the "
                "batch with positive output. Nothing scaled down."
            ),
            metrics={
                "max_abs_error_gaussian": worst,
                "half_gaussian": gauss_half,
                "half_digits": digits_half,
                "half_digits_unit_range": [float(at_zero.min()), float(at_zero.max())],
                "monotone_in_beta": monotone,
            },
            tables={
                "Activation probability": {
                    "header": [
                        "inputs",
                        "γ",
                        "β",
                        "Φ(β/γ)",
                        "measured (mean)",
                        "min unit",
                        "max unit",
                    ],
                    "rows": rows,
                }
            },
            plots=[
                Plot(
                    title="ReLU activation probability after BN",
                    xlabel="β",
                    ylabel="P(unit active)",
                    lines=lines,
                )
            ],
            notes=(
                "BN centres the mean of each unit over the batch, so exactly half of the mass "
                "lies above 0 only for a symmetric distribution. Gaussian inputs through a "
                "linear layer give normal pre-activations and the measured share follows "
                "Φ(β/γ); on the digits the pre-activations are skewed, so individual units sit "
                f"between {float(at_zero.min()):.0%} and {float(at_zero.max()):.0%} active at "
                "β = 0 while the average stays near 50%."
            ),
        )
