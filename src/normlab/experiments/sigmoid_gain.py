"""sigmoid-gain: centering a sigmoid input of mean 4 raises the expected gradient > 10x.

The expected gradient of a sigmoid unit whose input is z ~ N(μ, s²) is
g(μ, s) = E[σ'(z)] = E[σ(z)(1 − σ(z))], computed here by Gauss–Hermite quadrature
(probabilists' nodes, exact for polynomials of degree < 2·nodes; σ' is smooth, so 120
nodes give ~1e-15). The gain of centering is g(0, s)/g(4, s). It depends on s, which the
seed does not give: 14.15x for a point mass (s → 0), 10x at s ≈ 0.74, 7.86x at s = 1.
We report the whole curve, the range of s where the claim holds, and check the analytic
values against a layer measured with and without BN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from normlab.experiments.base import Experiment, Line, Plot, Result, notify
from normlab.experiments.registry import register


@dataclass(frozen=True)
class Config:
    seed: int = 0
    mean: float = 4.0  # the seed's saturated input mean
    claimed_gain: float = 10.0
    spreads: tuple[float, ...] = (0.1, 0.25, 0.5, 0.74, 1.0, 1.5, 2.0, 3.0)  # measured s
    batch: int = 4096
    in_features: int = 128
    units: int = 256
    quad_nodes: int = 120
    rel_tolerance: float = 0.05  # measured vs analytic


@functools.lru_cache(maxsize=4)
def _hermite_nodes(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.hermite_e.hermegauss(nodes)  # an eigenproblem: compute once


def expected_sigmoid_grad(mu: float, s: float, nodes: int = 120) -> float:
    """E[σ'(z)] for z ~ N(mu, s²) by Gauss–Hermite quadrature (probabilists' weights)."""
    t, w = _hermite_nodes(nodes)
    z = mu + s * t
    sig = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow
    return float(np.sum(w * sig * (1.0 - sig)) / math.sqrt(2.0 * math.pi))


def gain(mu: float, s: float, nodes: int = 120) -> float:
    """g(0, s)/g(mu, s): the gain from centering without changing the spread."""
    return expected_sigmoid_grad(0.0, s, nodes) / expected_sigmoid_grad(mu, s, nodes)


def crossing(fn, target: float, lo: float = 1e-6, hi: float = 10.0) -> float | None:
    """The s in [lo, hi] where the decreasing function fn(s) equals target (bisection),
    or None when it does not cross there."""
    if fn(lo) <= target or fn(hi) >= target:
        return None
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fn(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def _measured(c: Config, s: float, g: torch.Generator) -> dict[str, float]:
    """Mean σ'(z) at a layer's sigmoid input, without BN and with BN, for spread s."""
    import normlab as nl

    x = torch.randn(c.batch, c.in_features, generator=g, dtype=torch.float64)
    w = torch.randn(c.units, c.in_features, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True) * s  # each unit: z ~ N(mean, s²) exactly
    # the linear layer as a function: an nn.Linear would draw (and discard) random weights
    # from the caller's global RNG
    z = torch.nn.functional.linear(x, w, torch.full((c.units,), c.mean, dtype=torch.float64))
    centred = nl.nn.BatchNorm1d(c.units, dtype=torch.float64)  # γ = s: centre only
    unit = nl.nn.BatchNorm1d(c.units, dtype=torch.float64)  # γ = 1: torch's default init
    with torch.no_grad():
        centred.weight.fill_(s)

    def mean_grad(pre: torch.Tensor) -> float:
        sig = torch.sigmoid(pre)
        return float((sig * (1 - sig)).mean())

    with torch.no_grad():
        return {
            "plain": mean_grad(z),
            "bn_centre": mean_grad(centred(z)),
            "bn_unit": mean_grad(unit(z)),
        }


@register
class SigmoidGain(Experiment):
    id = "sigmoid-gain"
    claim = "Centering a sigmoid input whose mean is 4 raises the expected gradient more than 10x"
    source = "docs/sources.md#seed-002 (mitigating vanishing gradients and saturation)"
    reference = "> 10x"
    seed_says = (
        "For a sigmoid unit, if BN moves the mean of its input from 4 (a saturated region) "
        "to 0, the expected gradient magnitude can increase by more than 10x. The seed gives "
        "no spread for the input."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {"spreads": (0.25, 1.0, 2.0), "batch": 1024, "units": 64}

    def run(self, config: Config, progress=None) -> Result:
        c = config
        n = c.quad_nodes
        grid = [0.0, *[float(v) for v in np.round(np.linspace(0.05, 4.0, 80), 4)]]
        analytic_gain = [gain(c.mean, s, n) for s in grid]
        s_star = crossing(lambda s: gain(c.mean, s, n), c.claimed_gain)
        g0_unit = expected_sigmoid_grad(0.0, 1.0, n)
        point_gain = gain(c.mean, 0.0, n)
        notify(progress, 0.1, "analytic")
        g = torch.Generator().manual_seed(c.seed)
        rows, worst = [], 0.0
        meas_gain, meas_gain_unit, an_at, an_unit = [], [], [], []
        for k, s in enumerate(c.spreads):
            m = _measured(c, s, g)
            a_plain = expected_sigmoid_grad(c.mean, s, n)
            a_centre = expected_sigmoid_grad(0.0, s, n)
            errs = [
                abs(m["plain"] / a_plain - 1),
                abs(m["bn_centre"] / a_centre - 1),
                abs(m["bn_unit"] / g0_unit - 1),
            ]
            worst = max(worst, *errs)
            meas_gain.append(m["bn_centre"] / m["plain"])
            meas_gain_unit.append(m["bn_unit"] / m["plain"])
            an_at.append(a_centre / a_plain)
            an_unit.append(g0_unit / a_plain)
            rows.append(
                [
                    s,
                    a_plain,
                    m["plain"],
                    a_centre,
                    m["bn_centre"],
                    an_at[-1],
                    meas_gain[-1],
                    meas_gain_unit[-1],
                ]
            )
            notify(progress, 0.1 + 0.9 * (k + 1) / len(c.spreads), f"s = {s:g}")

        analytic_ok = point_gain > c.claimed_gain and s_star is not None
        measured_ok = worst <= c.rel_tolerance
        holds = analytic_ok and measured_ok
        gain_at_1 = gain(c.mean, 1.0, n)
        s_star_txt = f"{s_star:.2f}" if s_star is not None else "none"
        # with BN's default γ = 1 the centred input has s = 1 whatever the input spread
        s_unit_star = crossing(
            lambda s: g0_unit / expected_sigmoid_grad(c.mean, s, n), c.claimed_gain
        )
        return self.result(
            config,
            verdict="holds" if holds else "fails",
            rule=(
                "The seed gives no input spread, so its claim is read as 'can': holds if "
                f"the analytic gain g(0, s)/g({c.mean:g}, s) exceeds {c.claimed_gain:g} for "
                "narrow inputs (s → 0) — the measured figure states for which s — and the "
                "gains measured at a Linear layer's sigmoid input without BN and with BN "
                f"match the analytic values within {c.rel_tolerance:.0%} at every measured s."
            ),
            measured=(
                f"{point_gain:.1f}x at s → 0; > {c.claimed_gain:g}x only for s < {s_star_txt}; "
                f"{gain_at_1:.1f}x at s = 1"
            ),
            setup=(
                f"Analytic: E[σ'(z)] by {n}-node Gauss–Hermite quadrature for z ~ N({c.mean:g}, "
                f"s²) and N(0, s²), s ∈ [0, 4]. Measured: a float64 Linear({c.in_features}, "
                f"{c.units}) with bias {c.mean:g} and rows of norm s on Gaussian inputs "
                f"(batch {c.batch}), so every unit's input is N({c.mean:g}, s²); mean σ'(z) "
                "without BN, after normlab BatchNorm1d with γ = s (centring only, same "
                "spread) and with γ = 1 (BN's default: unit spread). Nothing scaled down: "
                "this is the seed's single-unit statement."
            ),
            metrics={
                "gain_point_mass": point_gain,
                "gain_at_s1": gain_at_1,
                "s_where_gain_is_claimed": s_star,
                "gain_bn_unit_gamma_max_s_above_claim": s_unit_star,
                "expected_grad_centred_unit_spread": g0_unit,
                "max_rel_error_measured_vs_analytic": worst,
            },
            tables={
                "Measured at a layer vs analytic": {
                    "header": [
                        "s",
                        f"g({c.mean:g}, s) analytic",
                        "no BN measured",
                        "g(0, s) analytic",
                        "BN γ=s measured",
                        "gain analytic",
                        "gain measured",
                        "gain, BN γ=1",
                    ],
                    "rows": rows,
                }
            },
            plots=[
                Plot(
                    title=f"Gain of centring a sigmoid input of mean {c.mean:g}",
                    xlabel="input spread s",
                    ylabel="E[σ'] centred / E[σ'] at mean 4",
                    logy=True,
                    lines=[
                        Line("analytic, same spread: g(0,s)/g(4,s)", grid, analytic_gain, "-"),
                        Line(
                            "analytic, BN γ=1: g(0,1)/g(4,s)",
                            grid,
                            [g0_unit / expected_sigmoid_grad(c.mean, s, n) for s in grid],
                            "--",
                        ),
                        Line("measured, BN γ=s", [float(s) for s in c.spreads], meas_gain, "o"),
                        Line(
                            "measured, BN γ=1", [float(s) for s in c.spreads], meas_gain_unit, "s"
                        ),
                        Line("claimed 10x", [grid[0], grid[-1]], [c.claimed_gain] * 2, ":"),
                    ],
                )
            ],
            notes=(
                f"The claim depends on the spread s of the input. For a point mass the gain is "
                f"σ'(0)/σ'(4) = {point_gain:.2f}x; it falls below {c.claimed_gain:g}x at "
                f"s ≈ {s_star_txt} and is {gain_at_1:.2f}x at s = 1, because a wide input "
                "puts mass both in the saturated tail (raising E[σ'] at mean 4) and away from "
                "the peak (lowering it at mean 0). BN with its default γ = 1 also rescales "
                f"the input to s = 1; its gain exceeds {c.claimed_gain:g}x only if the input "
                f"was narrower than s ≈ {s_unit_star if s_unit_star is not None else 0:.2f}. "
                "So 'more than 10x' holds for narrow inputs and is closer to 8x for the unit "
                "spread BN produces."
            ),
        )
