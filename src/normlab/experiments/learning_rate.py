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
from normlab.experiments.base import Experiment, Line, Plot, Progress, Result
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

    def run(self, config: Config, progress: Progress | None = None) -> Result:
        data = load_digits(seed=config.seed, image=True)
        rates = [config.base_lr * m for m in config.multiples]
        runs = 2 * len(rates)
        acc: dict[str, list[float]] = {"none": [], "bn": []}
        diverged: dict[str, list[bool]] = {"none": [], "bn": []}
        for i, norm in enumerate(("none", "bn")):
            for j, lr in enumerate(rates):
                with T.seeded(config.seed):
                    model = T.small_cnn(data.num_classes, channels=config.channels, norm=norm)
                k = i * len(rates) + j
                hist = T.train(
                    model,
                    data,
                    steps=config.steps,
                    lr=lr,
                    batch_size=config.batch_size,
                    momentum=config.momentum,
                    seed=config.seed,
                    progress=progress,
                    progress_span=(k / runs, (k + 1) / runs),
                    label=f"{T.NORM_NAMES[norm]}, lr {lr:g}",
                )
                acc[norm].append(hist.final_test_accuracy)
                diverged[norm].append(hist.diverged)

        def largest_trainable(norm: str) -> float | None:
            ok = [lr for lr, a in zip(rates, acc[norm], strict=True) if a >= config.trains_accuracy]
            return max(ok) if ok else None

        best = {k: largest_trainable(k) for k in acc}
        rule = (
            f"holds if the largest rate of the grid at which the BN net still trains (final "
            f"test accuracy ≥ {config.trains_accuracy:.0%} after {config.steps} steps) is ≥ "
            f"{self.MIN_RATIO:g}x the plain net's; fails if it is not larger at all; "
            f"inconclusive in between, or if either net trains at no rate or at the largest "
            f"rate of the grid (the grid does not bracket its limit)."
        )
        top = rates[-1]
        if None in best.values() or top in best.values():
            verdict, ratio = "inconclusive", None
        else:
            ratio = best["bn"] / best["none"]
            verdict = (
                "holds" if ratio >= self.MIN_RATIO else "fails" if ratio <= 1 else "inconclusive"
            )

        def at(j: int, norm: str) -> str:
            return f"{acc[norm][j]:.1%}" + (" (diverged)" if diverged[norm][j] else "")

        def fmt(lr):
            return "none" if lr is None else f"{lr:g} ({lr / config.base_lr:g}x base)"

        measured = f"largest rate that trains: BN {fmt(best['bn'])} vs plain {fmt(best['none'])}"
        if ratio is not None:
            measured += f", {ratio:g}x"
        for mult in (5.0, 30.0):  # Ioffe & Szegedy's BN-x5 and BN-x30
            if mult in config.multiples:
                j = config.multiples.index(mult)
                measured += f"; at {mult:g}x: plain {at(j, 'none')}, BN {at(j, 'bn')}"
        rows = [
            [
                f"{lr:g}",
                f"{m:g}x",
                at(j, "none"),
                at(j, "bn"),
            ]
            for j, (lr, m) in enumerate(zip(rates, config.multiples, strict=True))
        ]
        return self.result(
            config,
            verdict=verdict,
            rule=rule,
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
                "rates": rates,
                "test_accuracy": acc,
                "diverged": diverged,
                "largest_trainable_rate": best,
                "ratio_bn_over_plain": ratio,
            },
            plots=[
                Plot(
                    f"Final test accuracy after {config.steps} steps vs learning rate",
                    "learning rate",
                    "test accuracy",
                    [
                        Line("without BN", rates, acc["none"], "o-"),
                        Line("with BN", rates, acc["bn"], "s-"),
                    ],
                    logx=True,
                )
            ],
            tables={
                "final test accuracy per rate": {
                    "header": ["learning rate", "× base", "without BN", "with BN"],
                    "rows": rows,
                }
            },
            notes=(
                "BN makes each layer's output invariant to the scale of the weights before it, "
                "so a too-large step grows the weight norm, which lowers the effective rate "
                "η/‖w‖² of the next steps (van Laarhoven 2017): the net self-stabilises. The "
                "classifier layer has no BN after it, so BN's tolerance is finite too."
            ),
        )
