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
from normlab.experiments.base import Experiment, Line, Plot, Progress, Result, Verdict, notify
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


def increasing(values: list[float]) -> bool:
    """Each value strictly above the one before."""
    return all(b > a for a, b in itertools.pairwise(values))


@dataclass
class Share:
    """The activation probability at one (γ, β): mean over units, and the extreme units."""

    gamma: float
    beta: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, pre: torch.Tensor, gamma: float, beta: float) -> Share:
        p = activation_probability(pre, gamma, beta)
        return cls(gamma, beta, float(p.mean()), float(p.min()), float(p.max()))

    @property
    def analytic(self) -> float:
        """Φ(β/γ): the share for normal pre-activations."""
        return normal_cdf(self.beta / self.gamma)


@dataclass
class Measurement:
    """What :class:`ReluHalf` measured: numbers only."""

    n_digits: int  # digits training images, one batch
    gaussian: list[Share]  # Gaussian inputs: every (γ, β) of the config, γ-major
    digits: list[Share]  # the digits: γ = 1, every β of the config
    half_gaussian: Share  # γ = 1, β = 0
    half_digits: Share

    @property
    def curves(self) -> dict[float, list[Share]]:
        """The Gaussian shares by γ, each in the config's β order."""
        out: dict[float, list[Share]] = {}
        for s in self.gaussian:
            out.setdefault(s.gamma, []).append(s)
        return out

    @property
    def max_abs_error_gaussian(self) -> float:
        """Largest |measured − Φ(β/γ)| on the Gaussian inputs."""
        return max([0.0, *(abs(s.mean - s.analytic) for s in self.gaussian)])

    @property
    def monotone_in_beta(self) -> bool:
        """The mean share rises strictly with β (in the config's order) for every γ on the
        Gaussian inputs and on the digits."""
        curves = [*self.curves.values(), self.digits]
        return all(increasing([s.mean for s in curve]) for curve in curves)


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

    def rule(self, config: Config) -> str:
        return (
            "holds if on Gaussian inputs the measured activation probability (mean over "
            f"units) is within {config.tolerance:g} of Φ(β/γ) at every β in "
            f"{list(config.betas)} and γ in {list(config.gammas)}, on the digits it is within "
            f"{config.digits_tolerance:g} of 0.5 at β = 0, and it increases strictly with β on "
            "both."
        )

    def measure(self, config: Config, progress: Progress | None = None) -> Measurement:
        c = config
        with T.seeded(c.seed):
            lin = torch.nn.Linear(c.in_features, c.units, dtype=torch.float64)
            gauss = torch.randn(c.batch, c.in_features, dtype=torch.float64) * 2 + 1
            split = load_digits(seed=c.seed)
            pre_gauss = lin(gauss).detach()
            pre_digits = lin(split.x_train.double()).detach()
        gaussian = []
        for k, gamma in enumerate(c.gammas):
            gaussian += [Share.of(pre_gauss, gamma, beta) for beta in c.betas]
            notify(progress, (k + 1) / (len(c.gammas) + 1), f"γ = {gamma:g}")
        digits = [Share.of(pre_digits, 1.0, beta) for beta in c.betas]
        notify(progress, 1.0, "digits")
        return Measurement(
            n_digits=len(split.x_train),
            gaussian=gaussian,
            digits=digits,
            half_gaussian=Share.of(pre_gauss, 1.0, 0.0),
            half_digits=Share.of(pre_digits, 1.0, 0.0),
        )

    def judge(self, config: Config, m: Measurement) -> Verdict:
        holds = (
            m.max_abs_error_gaussian <= config.tolerance
            and abs(m.half_digits.mean - 0.5) <= config.digits_tolerance
            and m.monotone_in_beta
        )
        return "holds" if holds else "fails"

    def present(self, config: Config, m: Measurement, verdict: Verdict) -> Result:
        c, half = config, m.half_digits
        rows = [
            [inputs, s.gamma, s.beta, s.analytic, s.mean, s.min, s.max]
            for inputs, shares in (("Gaussian", m.gaussian), ("digits", m.digits))
            for s in shares
        ]
        dense = [i / 20 for i in range(-45, 46)]  # β grid for the analytic curves
        lines = []
        for k, (gamma, curve) in enumerate(m.curves.items()):
            lines += [
                Line(f"Φ(β/{gamma:g})", dense, [normal_cdf(b / gamma) for b in dense], f"C{k}-"),
                Line(
                    f"measured, γ = {gamma:g}",
                    [float(s.beta) for s in curve],
                    [s.mean for s in curve],
                    f"C{k}o",
                ),
            ]
        lines.append(
            Line(
                "measured on digits, γ = 1",
                [float(s.beta) for s in m.digits],
                [s.mean for s in m.digits],
                "kx",
            )
        )
        return self.verdict_result(
            config,
            verdict,
            measured=(
                f"β = 0: {m.half_gaussian.mean:.1%} (Gaussian), {half.mean:.1%} (digits; units "
                f"{half.min:.0%}–{half.max:.0%}); max |measured − Φ(β/γ)| "
                f"= {m.max_abs_error_gaussian:.3f}"
            ),
            setup=(
                f"A float64 Linear({c.in_features}, {c.units}) with torch's default init, then "
                "normlab BatchNorm1d (training mode, γ and β set, ReLU fused) on a batch of "
                f"{c.batch} Gaussian inputs N(1, 4) and on the {m.n_digits} digits "
                "training images (one batch). Activation probability of a unit = share of the "
                "batch with positive output. Nothing scaled down."
            ),
            metrics={
                "max_abs_error_gaussian": m.max_abs_error_gaussian,
                "half_gaussian": m.half_gaussian.mean,
                "half_digits": half.mean,
                "half_digits_unit_range": [half.min, half.max],
                "monotone_in_beta": m.monotone_in_beta,
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
            notes=_notes(c, m),
        )


def _notes(c: Config, m: Measurement) -> str:
    """The reading of the numbers: each of the verdict's three conditions as measured."""
    half = m.half_digits
    follows = (
        "the measured share follows Φ(β/γ)"
        if m.max_abs_error_gaussian <= c.tolerance
        else f"yet the measured share is up to {m.max_abs_error_gaussian:.3f} from Φ(β/γ)"
    )
    average = (
        "while the average stays near 50%"
        if abs(half.mean - 0.5) <= c.digits_tolerance
        else f"and the average is {half.mean:.1%}, not 50%"
    )
    monotone = "" if m.monotone_in_beta else " The share does not rise strictly with β."
    return (
        "BN centres the mean of each unit over the batch, so exactly half of the mass "
        "lies above 0 only for a symmetric distribution. Gaussian inputs through a "
        f"linear layer give normal pre-activations and {follows}; on the digits the "
        "pre-activations are skewed, so individual units sit between "
        f"{half.min:.0%} and {half.max:.0%} active at β = 0 {average}.{monotone}"
    )
