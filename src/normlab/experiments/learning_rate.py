"""learning-rate: BN tolerates much larger learning rates than the same net without it.

Ioffe & Szegedy (2015, §4.2) trained BN-Inception at 5x and 30x the base rate ("BN-x5",
"BN-x30"); Bjorck et al. (2018) show that without BN large rates diverge while BN keeps
the activations bounded. Here: the same small CNN with and without BN, trained with SGD at
each rate of a grid that includes 5x and 30x a base rate; the largest rate at which each
still trains is compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from normlab.data import load_digits
from normlab.experiments import _training as T
from normlab.experiments.base import Experiment, Line, Plot, Progress, Result, Verdict
from normlab.experiments.registry import register


@dataclass(frozen=True)
class Config:
    seed: int = 0
    base_lr: float = 0.1  # the plain net's best rate on this task (momentum 0.9)
    multiples: tuple[float, ...] = (0.3, 1.0, 3.0, 5.0, 10.0, 30.0, 100.0)
    steps: int = 300
    batch_size: int = 64
    momentum: float = 0.9
    channels: tuple[int, ...] = (16, 32, 32)
    trains_accuracy: float = 0.9  # a run "trains" if its final test accuracy reaches this


@dataclass
class Measurement:
    """What :class:`LearningRate` measured: final test accuracy and divergence per rate of
    the grid, for the nets 'none' and 'bn'."""

    rates: list[float]
    test_accuracy: dict[str, list[float]]
    diverged: dict[str, list[bool]]

    def largest_trainable(self, threshold: float) -> dict[str, float | None]:
        """Per net, the largest rate whose final test accuracy reaches ``threshold`` (None:
        no rate does)."""
        out: dict[str, float | None] = {}
        for net, acc in self.test_accuracy.items():
            ok = [lr for lr, a in zip(self.rates, acc, strict=True) if a >= threshold]
            out[net] = max(ok) if ok else None
        return out

    def ratio(self, threshold: float) -> float | None:
        """BN's largest trainable rate over the plain net's; None when the grid does not
        bracket both limits (a net trains at no rate, or at the largest one)."""
        best = self.largest_trainable(threshold)
        if None in best.values() or self.rates[-1] in best.values():
            return None
        return best["bn"] / best["none"]


@register
class LearningRate(Experiment):
    id = "learning-rate"
    claim = "BN tolerates much larger learning rates."
    source = (
        "docs/sources.md#seed-002; Ioffe & Szegedy 2015 §4.2 (BN-x5, BN-x30); Bjorck et al. 2018"
    )
    reference = "BN-Inception trains at 5x and 30x the base rate; without BN a 5x rate diverges"
    seed_says = (
        "BN smooths the loss landscape (a smaller Hessian spectral norm), which allows larger "
        "learning rates and faster training."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {
        "multiples": (3.0, 30.0),
        "steps": 60,
        "trains_accuracy": 0.5,
    }
    MIN_RATIO = 5.0
    PAPER_MULTIPLES = (5.0, 30.0)  # Ioffe & Szegedy's BN-x5 and BN-x30

    def rule(self, config: Config) -> str:
        return (
            f"holds if the largest rate of the grid at which the BN net still trains (final "
            f"test accuracy ≥ {config.trains_accuracy:.0%} after {config.steps} steps) is ≥ "
            f"{self.MIN_RATIO:g}x the plain net's; fails if it is not larger at all; "
            f"inconclusive in between, or if either net trains at no rate or at the largest "
            f"rate of the grid (the grid does not bracket its limit)."
        )

    def measure(self, config: Config, progress: Progress | None = None) -> Measurement:
        data = load_digits(seed=config.seed, image=True)
        rates = [config.base_lr * m for m in config.multiples]
        runs = [(norm, lr) for norm in T.BN_LABELS for lr in rates]
        m = Measurement(rates, {n: [] for n in T.BN_LABELS}, {n: [] for n in T.BN_LABELS})
        for k, (norm, lr) in enumerate(runs):
            with T.seeded(config.seed):
                model = T.small_cnn(data.num_classes, channels=config.channels, norm=norm)
            hist = T.train_as(
                config,
                model,
                data,
                lr=lr,
                progress=progress,
                progress_span=(k / len(runs), (k + 1) / len(runs)),
                label=f"{T.NORM_NAMES[norm]}, lr {lr:g}",
            )
            m.test_accuracy[norm].append(hist.final_test_accuracy)
            m.diverged[norm].append(hist.diverged)
        return m

    def judge(self, config: Config, m: Measurement) -> Verdict:
        ratio = m.ratio(config.trains_accuracy)
        if ratio is None:
            return "inconclusive"
        return "holds" if ratio >= self.MIN_RATIO else "fails" if ratio <= 1 else "inconclusive"

    def present(self, config: Config, m: Measurement, verdict: Verdict) -> Result:
        best, ratio = m.largest_trainable(config.trains_accuracy), m.ratio(config.trains_accuracy)

        def at(j: int, norm: str) -> str:
            acc = f"{m.test_accuracy[norm][j]:.1%}"
            return acc + (" (diverged)" if m.diverged[norm][j] else "")

        def fmt(lr):
            return "none" if lr is None else f"{lr:g} ({lr / config.base_lr:g}x base)"

        measured = f"largest rate that trains: BN {fmt(best['bn'])} vs plain {fmt(best['none'])}"
        if ratio is not None:
            measured += f", {ratio:g}x"
        for mult in self.PAPER_MULTIPLES:
            if mult in config.multiples:
                j = config.multiples.index(mult)
                measured += f"; at {mult:g}x: plain {at(j, 'none')}, BN {at(j, 'bn')}"
        return self.verdict_result(
            config,
            verdict,
            measured=measured,
            setup=(
                f"Small CNN (3×3 convs {list(config.channels)}, ReLU, global average pool) on "
                f"scikit-learn's 8×8 digits instead of Inception/ImageNet (Ioffe & Szegedy) or "
                f"ResNet/CIFAR-10 (Bjorck et al.), with and without BN after each conv, same "
                f"initial weights; SGD momentum {config.momentum}, batch {config.batch_size}, "
                f"{config.steps} steps at each rate base × {list(config.multiples)}, base "
                f"{config.base_lr:g} (about the plain net's best rate). No warm-up, no decay, no "
                f"weight decay: only the rate changes."
            ),
            metrics={
                "rates": m.rates,
                "test_accuracy": m.test_accuracy,
                "diverged": m.diverged,
                "largest_trainable_rate": best,
                "ratio_bn_over_plain": ratio,
            },
            plots=[
                Plot(
                    f"Final test accuracy after {config.steps} steps vs learning rate",
                    "learning rate",
                    "test accuracy",
                    [
                        Line(label, m.rates, m.test_accuracy[net], style)
                        for (net, label), style in zip(
                            T.BN_LABELS.items(), ("o-", "s-"), strict=True
                        )
                    ],
                    logx=True,
                )
            ],
            tables={
                "final test accuracy per rate": {
                    "header": ["learning rate", "× base", *T.BN_LABELS.values()],
                    "rows": [
                        [f"{lr:g}", f"{mult:g}x", *(at(j, net) for net in T.BN_LABELS)]
                        for j, (lr, mult) in enumerate(zip(m.rates, config.multiples, strict=True))
                    ],
                }
            },
            notes=_notes(verdict),
        )


def _notes(verdict: Verdict) -> str:
    """Why BN should tolerate larger rates, and whether this run showed it."""
    why = (
        "BN makes each layer's output invariant to the scale of the weights before it, "
        "so a too-large step grows the weight norm, which lowers the effective rate "
        "η/‖w‖² of the next steps (van Laarhoven 2017)"
    )
    if verdict == "fails":
        return (
            f"{why}, which should let the net self-stabilise; here BN did not train at a "
            "larger rate than the plain net, so that mechanism did not carry it further."
        )
    return (
        f"{why}: the net self-stabilises. The classifier layer has no BN after it, so BN's "
        "tolerance is finite too."
    )
