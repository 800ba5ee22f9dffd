"""mnist-fig1: Ioffe & Szegedy's Figure 1 on digits — accuracy curves and the drift of a
sigmoid's input distribution, with and without BN.

The network is the paper's 3×100 sigmoid MLP trained with batch 60; MNIST is replaced by
scikit-learn's 8×8 digits and 50k steps by a few thousand. Fig. 1(b, c) traces the 15th,
50th and 85th percentiles of one last-hidden-layer unit's sigmoid input over training; we
trace the same and, so the verdict does not hang on one unit, measure the drift of every
unit of that layer.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import ClassVar

from normlab.data import load_digits
from normlab.experiments import _training as T
from normlab.experiments.base import (
    Experiment,
    Line,
    Plot,
    Progress,
    Result,
    Verdict,
)
from normlab.experiments.registry import register


@dataclass(frozen=True)
class Config:
    seed: int = 0
    width: int = 100
    depth: int = 3
    batch_size: int = 60
    steps: int = 6000
    lr: float = 0.5  # plain SGD, as the paper (no momentum)
    num_probes: int = 30  # evaluation points over training
    unit: int = 0  # the traced unit of the last hidden layer
    target_accuracy: float = 0.9  # "trains faster": steps to reach this test accuracy


def drift(trace: list[list[float]]) -> float:
    """How far a unit's input distribution moves over training, in units of z.

    trace[t] = (p15, p50, p85) at probe t. Drift = max over the three percentiles of
    (max_t p − min_t p): the largest move of any of them, in the units the sigmoid sees.
    """
    return max(max(c) - min(c) for c in zip(*trace, strict=True))


def relative_drift(trace: list[list[float]]) -> float:
    """:func:`drift` divided by the mean over t of (p85 − p15): the move in units of the
    distribution's own width (ill-conditioned while that width is tiny, e.g. an untrained
    plain net, so it is reported but not used by the verdict)."""
    spread = statistics.fmean(p85 - p15 for p15, _, p85 in trace)
    return drift(trace) / spread if spread > 0 else float("inf")


def steps_to(history: T.History, target: float) -> int | None:
    """The first evaluation step at which the test accuracy reached ``target`` (None: never)."""
    hit = [s for s, a in zip(history.eval_steps, history.test_accuracy, strict=True) if a >= target]
    return hit[0] if hit else None


@dataclass
class Measurement:
    """What :class:`MnistFig1` measured: numbers only. Keys of the dicts: 'none', 'bn'."""

    n_train: int
    n_test: int
    target_accuracy: float
    history: dict[str, T.History]
    traces: dict[str, list[list[list[float]]]]  # [unit][probe] → (p15, p50, p85)

    @property
    def drifts(self) -> dict[str, list[float]]:
        return {k: [drift(tr) for tr in self.traces[k]] for k in self.traces}

    @property
    def median_drift(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.drifts.items()}

    @property
    def median_relative_drift(self) -> dict[str, float]:
        return {k: statistics.median(map(relative_drift, tr)) for k, tr in self.traces.items()}

    @property
    def drift_ratio(self) -> float:
        """Median drift without BN over with BN."""
        d = self.median_drift
        return d["none"] / d["bn"] if d["bn"] > 0 else float("inf")

    @property
    def test_accuracy(self) -> dict[str, float]:
        return {k: h.final_test_accuracy for k, h in self.history.items()}

    @property
    def steps_to_target(self) -> dict[str, int | None]:
        return {k: steps_to(h, self.target_accuracy) for k, h in self.history.items()}


@register
class MnistFig1(Experiment):
    id = "mnist-fig1"
    claim = (
        "A BN net trains faster and reaches higher accuracy; the 15/50/85th percentiles of a "
        "sigmoid's input stay stable with BN and drift without."
    )
    source = "Ioffe & Szegedy 2015, Figure 1 (MNIST, 3×100 sigmoid, batch 60, 50k steps)"
    reference = "test accuracy 0.980 (BN) vs 0.977 (plain) in reproductions; stable vs drifting"
    seed_says = (
        "BN keeps each layer's input distribution stable during training (less internal "
        "covariate shift), so the network trains faster."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {"steps": 300, "num_probes": 6}
    MIN_DRIFT_RATIO = 2.0

    def rule(self, config: Config) -> str:
        return (
            f"holds if the median over the last hidden layer's units of the drift of the sigmoid "
            f"input (the largest move of its 15/50/85th percentiles over training, in units of "
            f"z) is ≥ {self.MIN_DRIFT_RATIO:g}x larger without BN, the BN "
            f"net reaches {config.target_accuracy:.0%} test accuracy in no more steps, and its "
            f"final test accuracy is ≥ the plain net's; inconclusive if neither net reaches "
            f"{config.target_accuracy:.0%}; fails otherwise."
        )

    def measure(self, config: Config, progress: Progress | None = None) -> Measurement:
        data = load_digits(seed=config.seed)
        eval_every = max(1, config.steps // config.num_probes)
        widths = [config.width] * config.depth
        with T.seeded(config.seed):
            models = {
                norm: T.mlp(64, widths, data.num_classes, norm=norm) for norm in ("none", "bn")
            }
        T.copy_weights(models["none"], models["bn"])
        hist, traces = {}, {}
        for i, (norm, model) in enumerate(models.items()):
            per_probe: list[list[list[float]]] = []  # [probe][unit] → (p15, p50, p85)

            def on_eval(_step, m, per_probe=per_probe):
                per_probe.append(T.unit_percentiles(m, data.x_test))

            hist[norm] = T.train_as(
                config,
                model,
                data,
                momentum=0.0,
                eval_every=eval_every,
                on_eval=on_eval,
                progress=progress,
                progress_span=(i / 2, (i + 1) / 2),
                label="plain" if norm == "none" else "BN",
            )
            traces[norm] = [[probe[u] for probe in per_probe] for u in range(config.width)]
        return Measurement(
            n_train=len(data.x_train),
            n_test=len(data.x_test),
            target_accuracy=config.target_accuracy,
            history=hist,
            traces=traces,
        )

    def judge(self, config: Config, m: Measurement) -> Verdict:
        reach, acc = m.steps_to_target, m.test_accuracy
        if reach["bn"] is None and reach["none"] is None:
            return "inconclusive"
        faster = reach["bn"] is not None and (reach["none"] is None or reach["bn"] <= reach["none"])
        if m.drift_ratio >= self.MIN_DRIFT_RATIO and faster and acc["bn"] >= acc["none"]:
            return "holds"
        return "fails"

    def present(self, config: Config, m: Measurement, verdict: Verdict) -> Result:
        hist, traces, drifts = m.history, m.traces, m.drifts
        median_drift, acc, reach, ratio = (
            m.median_drift,
            m.test_accuracy,
            m.steps_to_target,
            (m.drift_ratio),
        )

        def fmt_steps(s):
            return f"step {s}" if s is not None else "never"

        measured = (
            f"test accuracy BN {acc['bn']:.3f} vs plain {acc['none']:.3f}; "
            f"{config.target_accuracy:.0%} at {fmt_steps(reach['bn'])} vs "
            f"{fmt_steps(reach['none'])}; median input drift BN {median_drift['bn']:.2f} vs "
            f"plain {median_drift['none']:.2f} ({ratio:.1f}x)"
        )
        u = config.unit
        plots = [
            Plot(
                "Test accuracy (Fig. 1a)",
                "step",
                "test accuracy",
                [
                    hist["none"].accuracy_line("without BN"),
                    hist["bn"].accuracy_line("with BN"),
                ],
            )
        ]
        for norm, panel in (("none", "b, without BN"), ("bn", "c, with BN")):
            steps = hist[norm].eval_steps
            plots.append(
                Plot(
                    f"Sigmoid input of unit {u}, last hidden layer (Fig. 1{panel})",
                    "step",
                    "15th / 50th / 85th percentile",
                    [
                        Line(f"{q}th", steps, [p[j] for p in traces[norm][u]], "-")
                        for j, q in enumerate((15, 50, 85))
                    ],
                )
            )
        plots.append(
            Plot(
                "Drift of each last-layer unit's sigmoid input (sorted)",
                "unit rank",
                "drift (z units)",
                [
                    Line("without BN", list(range(config.width)), sorted(drifts["none"]), "-"),
                    Line("with BN", list(range(config.width)), sorted(drifts["bn"]), "-"),
                ],
            )
        )
        return self.verdict_result(
            config,
            verdict,
            measured=measured,
            setup=(
                f"{config.depth}×{config.width} sigmoid MLP as in the paper, on scikit-learn's "
                f"8×8 digits ({m.n_train} train / {m.n_test} test) instead of MNIST, batch "
                f"{config.batch_size}, "
                f"plain SGD lr {config.lr}, {config.steps} steps instead of 50k; same initial "
                f"weights with and without BN. Percentiles are taken over the {m.n_test} test "
                f"images "
                f"in training mode (batch statistics; running statistics untouched) at "
                f"{len(hist['bn'].eval_steps)} points. Absolute accuracies are not comparable "
                f"with MNIST's; the comparison is the direction and the size of the drift."
            ),
            metrics={
                "test_accuracy": acc,
                "steps_to_target": reach,
                "median_drift": median_drift,
                "median_relative_drift": m.median_relative_drift,
                "drift_ratio_plain_over_bn": ratio,
                f"unit{u}_drift": {k: drifts[k][u] for k in drifts},
            },
            plots=plots,
            tables={
                f"unit {u}: percentiles (15/50/85) of its sigmoid input": {
                    "header": ["step", "without BN", "with BN"],
                    "rows": [
                        [
                            s,
                            " / ".join(f"{v:.2f}" for v in a),
                            " / ".join(f"{v:.2f}" for v in b),
                        ]
                        for s, a, b in zip(
                            hist["bn"].eval_steps, traces["none"][u], traces["bn"][u], strict=True
                        )
                    ],
                }
            },
            notes=(
                "With BN the sigmoid input is γ·x̂ + β, so its percentiles move only as γ and β "
                "are learned; without BN they move with every weight below. The drift measure "
                "includes the initial point, which is conservative for BN (γ grows early)."
            ),
        )
