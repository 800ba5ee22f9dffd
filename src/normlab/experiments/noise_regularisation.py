"""noise-regularisation: the noise of batch statistics regularises.

Three versions of the same ReLU MLP, same initial weights, trained alike: plain; with BN
(normalising by the batch's statistics, which differ from batch to batch — the noise);
and with the control layer :class:`~normlab.experiments._training.RunningStatsNorm`, which
is BN normalising by its running statistics during training too (eval-mode BN, running
estimates still updated from each batch), so it keeps BN's re-scaling without the per-batch
noise. If the noise regularises, BN's generalisation gap is smaller than the control's,
and more so at small batches, where the statistics are noisier. Several seeds are paired
so the effect is compared with its own seed-to-seed spread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import ClassVar

from normlab.data import Split, load_digits
from normlab.experiments import _training as T
from normlab.experiments.base import Experiment, Line, Plot, Progress, Result, Verdict
from normlab.experiments.registry import register

NORMS = ("none", "bn", "bn-running")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    batch_sizes: tuple[int, ...] = (8, 32, 128)
    seeds: int = 5  # paired runs per (net, batch size): seed, seed+1, ...
    train_size: int = 500  # a subset of the 1348 training digits, so the nets overfit
    widths: tuple[int, ...] = (256, 256)
    epochs: int = 20
    lr_per_32: float = 0.05  # lr = lr_per_32 · batch / 32 (linear scaling)
    momentum: float = 0.9
    significance: float = 2.0  # standard errors of the paired difference


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("inf")
    return mean, se


@dataclass
class Measurement:
    """What :class:`NoiseRegularisation` measured: per batch size and net (:data:`NORMS`),
    one value per seed of the test − train cross-entropy gap and the accuracies."""

    n_test: int
    gap: dict[int, dict[str, list[float]]]
    test_accuracy: dict[int, dict[str, list[float]]]
    train_accuracy: dict[int, dict[str, list[float]]]

    def paired(self, table: dict[int, dict[str, list[float]]], batch: int, a: str, b: str):
        """(mean, standard error) over seeds of net a − net b at ``batch``."""
        pairs = zip(table[batch][a], table[batch][b], strict=True)
        return _mean_se([x - y for x, y in pairs])

    @property
    def gap_diff(self) -> dict[int, tuple[float, float]]:
        """BN − running-statistics control gap (negative: BN generalises better)."""
        return {b: self.paired(self.gap, b, "bn", "bn-running") for b in self.gap}

    @property
    def acc_diff(self) -> dict[int, tuple[float, float]]:
        """BN − control test accuracy."""
        return {b: self.paired(self.test_accuracy, b, "bn", "bn-running") for b in self.gap}


@register
class NoiseRegularisation(Experiment):
    id = "noise-regularisation"
    claim = "The noise of batch statistics acts as a regulariser."
    source = "docs/sources.md#seed-002; Ioffe & Szegedy 2015 §3.4"
    reference = "qualitative (Ioffe & Szegedy: BN reduces or removes the need for Dropout)"
    seed_says = (
        "Each mini-batch's mean and variance are noisy estimates of the population's, so BN "
        "adds noise to every activation during training, which works as an implicit "
        "regulariser."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {
        "batch_sizes": (16, 64),
        "seeds": 2,
        "train_size": 300,
        "epochs": 4,
    }

    def rule(self, config: Config) -> str:
        small, large = min(config.batch_sizes), max(config.batch_sizes)
        z = config.significance
        return (
            f"Gap = test − train cross-entropy (eval mode) after {config.epochs} epochs; "
            f"differences are paired over {config.seeds} seeds. Holds if at the smallest batch "
            f"({small}) BN's gap is below the running-statistics control's by more than {z:g} "
            f"standard errors, BN's mean test accuracy there is not lower, and the gap advantage "
            f"at batch {small} is at least the one at batch {large} (noise falls with batch "
            f"size); fails if BN's gap is larger by more than {z:g} standard errors; "
            f"inconclusive otherwise."
        )

    def measure(self, config: Config, progress: Progress | None = None) -> Measurement:
        # per (batch size, net): lists over seeds
        gap: dict[int, dict[str, list[float]]] = {
            b: {n: [] for n in NORMS} for b in config.batch_sizes
        }
        test_acc = {b: {n: [] for n in NORMS} for b in config.batch_sizes}
        train_acc = {b: {n: [] for n in NORMS} for b in config.batch_sizes}
        # cost of a run ∝ samples seen, the same for every batch size
        runs = [(b, s, n) for b in config.batch_sizes for s in range(config.seeds) for n in NORMS]
        for k, (batch, s, norm) in enumerate(runs):
            seed = config.seed + s
            full = load_digits(seed=seed)
            data = Split(
                full.x_train[: config.train_size],
                full.y_train[: config.train_size],
                full.x_test,
                full.y_test,
                full.num_classes,
            )
            with T.seeded(seed):
                model = T.mlp(64, config.widths, data.num_classes, norm=norm, activation="relu")
            hist = T.train(
                model,
                data,
                steps=config.epochs * (config.train_size // batch),
                lr=config.lr_per_32 * batch / 32,
                batch_size=batch,
                momentum=config.momentum,
                seed=seed,
                progress=progress,
                progress_span=(k / len(runs), (k + 1) / len(runs)),
                label=f"{T.NORM_NAMES[norm]}, batch {batch}, seed {seed}",
            )
            test_loss = T.mean_loss(model, data.x_test, data.y_test)
            train_loss = T.mean_loss(model, data.x_train, data.y_train)
            gap[batch][norm].append(test_loss - train_loss)
            test_acc[batch][norm].append(hist.final_test_accuracy)
            train_acc[batch][norm].append(hist.final_train_accuracy)

        return Measurement(
            n_test=len(data.x_test), gap=gap, test_accuracy=test_acc, train_accuracy=train_acc
        )

    def judge(self, config: Config, m: Measurement) -> Verdict:
        small, large = min(config.batch_sizes), max(config.batch_sizes)
        z = config.significance
        d_gap, d_acc = m.gap_diff, m.acc_diff
        mean, se = d_gap[small]
        if mean > z * se:
            return "fails"
        if -mean > z * se and d_acc[small][0] >= 0 and mean <= d_gap[large][0]:
            return "holds"
        return "inconclusive"

    def present(self, config: Config, m: Measurement, verdict: Verdict) -> Result:
        gap, test_acc, train_acc = m.gap, m.test_accuracy, m.train_accuracy
        d_gap, d_acc = m.gap_diff, m.acc_diff
        d_acc_plain = {b: m.paired(test_acc, b, "bn", "none") for b in config.batch_sizes}
        d_gap_plain = {b: m.paired(gap, b, "bn", "none") for b in config.batch_sizes}
        small = min(config.batch_sizes)

        def pm(pair, scale=1.0):
            return f"{pair[0] * scale:+.2g}±{pair[1] * scale:.1g}"

        bs_text = "/".join(str(b) for b in config.batch_sizes)
        measured = (
            f"BN − running-stats control at batch {bs_text}: CE gap "
            + "/".join(pm(d_gap[b]) for b in config.batch_sizes)
            + ", test accuracy "
            + "/".join(pm(d_acc[b], 100) for b in config.batch_sizes)
            + " points (± 1 s.e.)"
        )
        rows = []
        for b in config.batch_sizes:
            for n in NORMS:
                rows.append(
                    [
                        b,
                        T.NORM_NAMES[n],
                        round(statistics.fmean(train_acc[b][n]), 4),
                        round(statistics.fmean(test_acc[b][n]), 4),
                        round(statistics.fmean(gap[b][n]), 4),
                    ]
                )
        bs = list(config.batch_sizes)
        return self.verdict_result(
            config,
            verdict,
            measured=measured,
            setup=(
                f"ReLU MLP {list(config.widths)} on {config.train_size} of scikit-learn's "
                f"digits (so it overfits; test on the {m.n_test} held-out digits) instead of the "
                f"paper's ImageNet Inception; plain vs BN vs BN normalising by its running "
                f"statistics during training (the noise-free control); same initial weights; "
                f"SGD momentum {config.momentum}, lr {config.lr_per_32} × batch/32, "
                f"{config.epochs} epochs at each batch size in {bs}; {config.seeds} seeds "
                f"(split, init and batch order change together, paired across nets). No "
                f"dropout, no weight decay."
            ),
            metrics={
                "gap_diff_bn_minus_control": {str(b): d_gap[b] for b in bs},
                "test_acc_diff_bn_minus_control": {str(b): d_acc[b] for b in bs},
                "gap_diff_bn_minus_plain": {str(b): d_gap_plain[b] for b in bs},
                "mean_gap": {str(b): {n: statistics.fmean(gap[b][n]) for n in NORMS} for b in bs},
                "mean_test_accuracy": {
                    str(b): {n: statistics.fmean(test_acc[b][n]) for n in NORMS} for b in bs
                },
            },
            plots=[
                Plot(
                    "Generalisation gap (test − train cross-entropy) vs batch size",
                    "batch size",
                    "gap, mean over seeds",
                    [
                        Line(T.NORM_NAMES[n], bs, [statistics.fmean(gap[b][n]) for b in bs], "o-")
                        for n in NORMS
                    ],
                    logx=True,
                ),
                Plot(
                    "Test accuracy vs batch size",
                    "batch size",
                    "test accuracy, mean over seeds",
                    [
                        Line(
                            T.NORM_NAMES[n],
                            bs,
                            [statistics.fmean(test_acc[b][n]) for b in bs],
                            "o-",
                        )
                        for n in NORMS
                    ],
                    logx=True,
                ),
            ],
            tables={
                "mean over seeds": {
                    "header": ["batch", "net", "train acc", "test acc", "gap (CE)"],
                    "rows": rows,
                }
            },
            notes=(
                "The control removes two things at once: the noise of the batch statistics and "
                "their gradient (BN's backward projects out the batch mean and the x̂ direction; "
                "the control treats its statistics as constants), so a difference between BN "
                "and the control cannot be attributed to the noise alone. ± is one standard "
                f"error of the paired difference over seeds. At batch {small} BN's test "
                f"accuracy differs from the control's by {d_acc[small][0] * 100:+.2f} points "
                f"and from the plain net's by {d_acc_plain[small][0] * 100:+.2f}"
                + (": a small effect at this scale." if abs(d_acc[small][0]) < 0.02 else ".")
            ),
        )
