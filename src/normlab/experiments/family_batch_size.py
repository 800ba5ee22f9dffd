"""family-batch-size: BN degrades at small batches, GN does not; LN and IN trail at normal
batches (Wu & He 2018, Table 1, Table 2 and Fig. 1).

What the claim is about is how many values each normalisation statistic is computed from.
BatchNorm's per-channel mean and variance pool the batch and the spatial positions, so
they get noisier as the batch shrinks; GroupNorm, LayerNorm and InstanceNorm pool one
sample's values, the same number at any batch size. In Wu & He's ResNet-50 at batch 2 the
last stage (7×7) pools 2·49 = 98 values per channel, from two images whose positions are
strongly correlated. On 8×8 digits, conv nets alone trained as well at batch 2 as at 32:
this experiment's previous design (BN pooling 2·64, 2·16, 2·16 values per channel at batch
2) reported ``fails``, and a pilot going down to 2·4 values did not degrade either. So the
net here shrinks the maps to 4×4 and 2×2 with stride-2 convs and ends in a fully connected
hidden layer where BatchNorm1d sees one value per sample: its statistics pool 2·16, 2·4
and 2 values at batch 2, from the late-stage range down to the extreme.
:func:`values_per_statistic` counts them from the model itself and the report prints them
beside the errors.

The experiment is split into measure → judge → present: :func:`measure` trains every
(norm, batch size, seed) and returns a :class:`Measurement` (numbers only), :func:`judge`
applies the verdict rule to it, and :meth:`FamilyBatchSize.run` builds the text, tables and
plot from both.

Protocol (Wu & He §4.1): the same number of epochs at every batch size, and the learning
rate scaled linearly with the batch, lr = 0.1 · B/32 (Goyal et al. 2017), so each training
sample moves the weights by the same amount whatever B. BN is evaluated in eval mode with
its running statistics, as in the paper, and again with population statistics recomputed
over the training set (precise BN, Wu & Johnson 2021, via :func:`normlab.recalibrate`):
the part of BN's small-batch rise that remains with population statistics comes from
training on noisy batch statistics, the part that goes away from bad running estimates.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from normlab.data import load_digits
from normlab.experiments import _training as T
from normlab.experiments.base import Experiment, Line, Plot, Progress, Result, Verdict, notify
from normlab.experiments.registry import register
from normlab.tools.recalibrate import recalibrate

NORMS = ("bn", "gn", "ln", "in")
PRECISE = "bn-precise"  # BN evaluated with recomputed population statistics
_LABELS = {**T.NORM_NAMES, PRECISE: "BN, population stats"}


@dataclass(frozen=True)
class Config:
    seed: int = 0  # the first seed; seeds seed, seed + 1, … (data split and initial weights)
    num_seeds: int = 3
    batch_sizes: tuple[int, ...] = (32, 16, 8, 4, 2)  # the paper's, largest first
    epochs: float = 2.0  # training samples seen = epochs × training-set size, at every batch
    lr_per_32: float = 0.1  # lr = lr_per_32 · batch / 32 (Wu & He: 0.1 · B/32)
    momentum: float = 0.9
    channels: tuple[int, ...] = (32, 64)
    strides: tuple[int, ...] = (2, 2)  # 8×8 → 4×4 → 2×2
    hidden: tuple[int, ...] = (128,)  # fully connected layers after the flattened last map
    gn_groups: int = 8
    recalibration_batch: int = 256  # batch size of the population-statistics pass
    margin: float = 0.01  # 1 point of test error


# -- measure ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """What the runs measured: numbers only, keyed by norm ('bn', 'gn', 'ln', 'in', and
    'bn-precise' for BN with population statistics) and batch size.

    Attributes:
        batch_sizes: the batch sizes, largest first.
        seeds: the seeds (one data split and one initialisation each).
        layer_shapes: per hidden layer (every Conv2d/Linear but the classifier), the shape of
            one sample's output: (C, H, W) or (C,).
        values_per_statistic: norm → batch → per hidden layer, how many values one of the
            norm's statistics (a mean, a variance) is computed from in training; None where
            the layer has no norm.
        test_error: norm → batch → per seed, the eval-mode error on the held-out set.
        diverged: norm → batch → per seed, whether training stopped on a non-finite loss.
        steps: batch → SGD steps (the same number of samples at every batch size).
        test_size: number of held-out samples (one sample is 1/test_size of error).
    """

    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    layer_shapes: tuple[tuple[int, ...], ...]
    values_per_statistic: Mapping[str, Mapping[int, tuple[int | None, ...]]]
    test_error: Mapping[str, Mapping[int, tuple[float, ...]]]
    diverged: Mapping[str, Mapping[int, tuple[bool, ...]]]
    steps: Mapping[int, int]
    test_size: int

    @property
    def largest(self) -> int:
        return max(self.batch_sizes)

    @property
    def smallest(self) -> int:
        return min(self.batch_sizes)

    def mean_error(self, norm: str, batch: int) -> float:
        return statistics.fmean(self.test_error[norm][batch])

    def rise(self, norm: str) -> float:
        """Mean error at the smallest batch minus mean error at the largest."""
        return self.mean_error(norm, self.smallest) - self.mean_error(norm, self.largest)

    def spread(self, norm: str) -> float:
        """Largest minus smallest mean error across the batch sizes."""
        means = [self.mean_error(norm, b) for b in self.batch_sizes]
        return max(means) - min(means)


def _statistic_size(norm: nn.Module, out: torch.Tensor) -> int:
    """How many values of ``out`` (the norm's input, (N, C, *spatial)) one statistic pools."""
    n, c = out.shape[0], out.shape[1]
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return out.numel() // c  # each channel over the batch and the positions
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        return out.numel() // (n * c)  # each sample and channel over the positions
    if isinstance(norm, nn.GroupNorm):
        return out.numel() // (n * norm.num_groups)  # each sample and group of channels
    if isinstance(norm, nn.LayerNorm):
        return math.prod(norm.normalized_shape)  # each sample over the trailing dims
    raise TypeError(f"values_per_statistic: no rule for {type(norm).__name__}")


_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


@torch.no_grad()
def values_per_statistic(
    model: nn.Sequential, x: torch.Tensor
) -> tuple[tuple[tuple[int, ...], ...], tuple[int | None, ...]]:
    """Per hidden layer of ``model`` fed the batch ``x``: one sample's output shape, and how
    many values each statistic of the norm right after it pools (None: no norm there).

    Hidden layers are the Conv2d/Linear modules of the Sequential except the last (the
    classifier). Runs one forward in eval mode (no running statistics change; the counts
    depend on shapes only, so they are the training-mode ones).
    """
    children = list(model)
    hidden = [i for i, m in enumerate(children) if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        children[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i in hidden
    ]
    try:
        with T.eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    shapes, counts = [], []
    for i in hidden:
        after = children[i + 1] if i + 1 < len(children) else None
        shapes.append(tuple(outputs[i].shape[1:]))
        is_norm = isinstance(after, _NORM_TYPES)
        counts.append(_statistic_size(after, outputs[i]) if is_norm else None)
    return tuple(shapes), tuple(counts)


def build_model(config: Config, norm: str, num_classes: int = 10) -> nn.Sequential:
    """The net every run trains: stride-2 3×3 convs, the last map flattened, the hidden
    fully connected layers, a classifier; ``norm`` after every conv and hidden layer
    (instance norm after the convs only). Weights from the global RNG: seed around it."""
    return T.small_cnn(
        num_classes,
        channels=config.channels,
        strides=config.strides,
        norm=norm,
        norm_kwargs={"num_groups": config.gn_groups} if norm == "gn" else None,
        pool="flatten",
        hidden=config.hidden,
    )


def measure(config: Config, progress: Progress | None = None) -> Measurement:
    """Train every norm at every batch size for every seed; see the module docstring."""
    if config.num_seeds < 1:
        raise ValueError(f"family-batch-size: num_seeds must be at least 1, got {config.num_seeds}")
    if config.epochs <= 0:
        raise ValueError(f"family-batch-size: epochs must be positive, got {config.epochs}")
    if len(config.batch_sizes) < 2 or min(config.batch_sizes) < 2:
        raise ValueError(
            "family-batch-size: batch_sizes needs at least two sizes, each ≥ 2 (BN needs two "
            f"values per channel), got {config.batch_sizes}"
        )
    seeds = tuple(config.seed + k for k in range(config.num_seeds))
    batch_sizes = tuple(sorted(config.batch_sizes, reverse=True))
    keys = (*NORMS, PRECISE)
    err: dict[str, dict[int, list[float]]] = {m: {b: [] for b in batch_sizes} for m in keys}
    diverged: dict[str, dict[int, list[bool]]] = {m: {b: [] for b in batch_sizes} for m in NORMS}
    counts: dict[str, dict[int, tuple[int | None, ...]]] = {m: {} for m in NORMS}
    shapes: tuple[tuple[int, ...], ...] = ()

    data = load_digits(seed=seeds[0], image=True)
    n_train, test_size = len(data.x_train), len(data.x_test)
    # the same number of training samples at every batch size: epochs × n_train
    steps = {b: max(1, round(config.epochs * n_train / b)) for b in batch_sizes}
    for norm in NORMS:
        with T.seeded(seeds[0]):
            model = build_model(config, norm)
        for b in batch_sizes:
            shapes, counts[norm][b] = values_per_statistic(model, data.x_train[:b])

    total = len(seeds) * len(NORMS) * sum(steps.values())
    done = 0
    for seed in seeds:
        data = load_digits(seed=seed, image=True)
        for norm in NORMS:
            for b in batch_sizes:
                with T.seeded(seed):
                    model = build_model(config, norm, data.num_classes)
                hist = T.train(
                    model,
                    data,
                    steps=steps[b],
                    lr=config.lr_per_32 * b / 32,
                    batch_size=b,
                    momentum=config.momentum,
                    cosine_decay=True,
                    seed=seed,
                    progress=progress,
                    progress_span=(done / total, (done + steps[b]) / total),
                    label=f"seed {seed}, {T.NORM_NAMES[norm]}, batch {b}",
                )
                done += steps[b]
                err[norm][b].append(1.0 - hist.final_test_accuracy)
                diverged[norm][b].append(hist.diverged)
                if norm == "bn":
                    # population statistics of each layer's eval-mode input (sequential),
                    # over the whole training set: the running averages' ideal
                    recalibrate(
                        model, list(data.x_train.split(config.recalibration_batch)), sequential=True
                    )
                    err[PRECISE][b].append(1.0 - T.accuracy(model, data.x_test, data.y_test))
    notify(progress, 1.0, "done")
    return Measurement(
        batch_sizes=batch_sizes,
        seeds=seeds,
        layer_shapes=shapes,
        values_per_statistic=counts,
        test_error={m: {b: tuple(v) for b, v in per.items()} for m, per in err.items()},
        diverged={m: {b: tuple(v) for b, v in per.items()} for m, per in diverged.items()},
        steps=steps,
        test_size=test_size,
    )


# -- judge --------------------------------------------------------------------------------


def judge(m: Measurement, margin: float) -> Verdict:
    """The verdict rule (see :func:`rule_text`) on the seed-mean errors.

    holds: BN's rise (error at the smallest batch − at the largest) ≥ margin, BN's rise
    exceeds GN's by ≥ margin, and at the largest batch LN's and IN's errors both exceed BN's;
    fails: BN's rise ≤ GN's; inconclusive otherwise.
    """
    bn_degrades = m.rise("bn") >= margin and m.rise("bn") - m.rise("gn") >= margin
    big = m.largest
    trail = all(m.mean_error(k, big) > m.mean_error("bn", big) for k in ("ln", "in"))
    if bn_degrades and trail:
        return "holds"
    if m.rise("bn") <= m.rise("gn"):
        return "fails"
    return "inconclusive"


def rule_text(m: Measurement, config: Config) -> str:
    k, big, small = config.margin * 100, m.largest, m.smallest
    return (
        f"Eval-mode test error (BN with its running statistics, as in the paper), mean over "
        f"{len(m.seeds)} seed(s), after {config.epochs:g} epochs at each batch size. Holds if "
        f"BN's error at batch {small} is ≥ {k:g} point above its error at batch {big} and that "
        f"rise exceeds GN's by ≥ {k:g} point, and at batch {big} both LN's and IN's errors are "
        f"above BN's; fails if BN's rise from batch {big} to {small} is no larger than GN's; "
        f"inconclusive otherwise."
    )


# -- present ------------------------------------------------------------------------------


def _pct(v: float) -> str:
    return f"{v * 100:.1f}"


def _mean_range(errors: Sequence[float]) -> str:
    """'mean (min–max)' in percent; the mean alone for one seed."""
    mean = _pct(statistics.fmean(errors))
    return mean if len(errors) == 1 else f"{mean} ({_pct(min(errors))}–{_pct(max(errors))})"


def _layer_name(k: int, shape: tuple[int, ...], n_conv: int) -> str:
    kind, index = ("conv", k + 1) if len(shape) == 3 else ("fc", k + 1 - n_conv)
    return f"{kind}{index} {'×'.join(str(s) for s in shape)}"


def _counts(values: tuple[int | None, ...]) -> str:
    return "/".join("—" if v is None else str(v) for v in values)


def _separation_note(m: Measurement, margin: float) -> str:
    """How much of BN's small-batch rise survives population statistics."""
    big, small = m.largest, m.smallest
    running, precise = m.rise("bn"), m.rise(PRECISE)
    text = (
        f"BN's rise from batch {big} to {small} is {running * 100:.1f} points with running "
        f"statistics and {precise * 100:.1f} with population statistics recomputed over the "
        f"training set"
    )
    if running < margin:  # no rise to split
        return text + "."
    kept = precise / running
    if kept >= 0.5:
        return text + (
            f": {kept:.0%} of it remains, so most of it comes from training on noisy batch "
            f"statistics (features learnt to work with a batch's own statistics), not from "
            f"bad running estimates."
        )
    return text + (
        f": only {max(kept, 0.0):.0%} remains, so most of it comes from the running estimates, "
        f"which better statistics repair."
    )


def _overlap_note(m: Measurement) -> str:
    """Whether the seeds' ranges of the judged comparisons overlap (the rule uses means)."""
    if len(m.seeds) < 2:
        return "One seed: no spread is shown, and differences of a few test digits are noise."
    big, small, e = m.largest, m.smallest, m.test_error

    def relation(what: str, a: Sequence[float], b: Sequence[float]) -> str:
        apart = min(a) > max(b) or min(b) > max(a)
        return f"{what} {'separate' if apart else 'overlap'}"

    parts = [
        relation(f"BN at batch {small} vs {big}:", e["bn"][small], e["bn"][big]),
        relation(f"LN vs BN at batch {big}:", e["ln"][big], e["bn"][big]),
        relation(f"IN vs BN at batch {big}:", e["in"][big], e["bn"][big]),
    ]
    return f"Min–max ranges over the {len(m.seeds)} seeds: " + "; ".join(parts) + "."


def _where_bn_breaks_note(m: Measurement, margin: float) -> str:
    """At which batch BN's error first rises by the margin, and what its statistics pool
    there; what two values per statistic mean."""
    big = m.largest
    risen = [b for b in m.batch_sizes if m.mean_error("bn", b) - m.mean_error("bn", big) >= margin]
    if not risen:
        return f"BN's mean error stays within {margin * 100:g} point of its batch-{big} error."
    first = max(risen)
    text = (
        f"BN's mean error is first ≥ {margin * 100:g} point above its batch-{big} error at "
        f"batch {first}, where its statistics pool "
        f"{_counts(m.values_per_statistic['bn'][first])} values (Wu & He's BN: at batch 8)."
    )
    if min(v for v in m.values_per_statistic["bn"][m.smallest] if v is not None) == 2:
        text += (
            " A statistic of 2 values normalises them to ±1 whatever they are (up to ε): "
            "at that count a BN layer passes on only which of the two samples is larger."
        )
    return text


def _steps_note(m: Measurement) -> str:
    """Equal epochs mean far fewer steps at large batches; say what that does to the
    batch-free norms, whose errors would otherwise not depend on the batch size."""
    big, small = m.largest, m.smallest
    changes = ", ".join(
        f"{T.NORM_NAMES[k]} {_pct(m.mean_error(k, big))} → {_pct(m.mean_error(k, small))}"
        for k in NORMS[1:]
    )
    text = (
        f"Equal epochs mean {m.steps[big]} SGD steps at batch {big} and {m.steps[small]} at "
        f"batch {small}; the batch-free norms' errors from batch {big} to {small}: {changes}"
    )
    if any(m.mean_error(k, big) > m.mean_error("bn", big) for k in ("ln", "in")):
        text += (
            f". Part of LN's and IN's trailing BN at batch {big} may be slower training in "
            f"few steps rather than the norm itself"
        )
    return text + "."


def present(m: Measurement, config: Config) -> dict:
    """The Result fields built from a measurement: headline, setup, tables, plot, notes."""
    big, small, bs = m.largest, m.smallest, m.batch_sizes
    n_conv = sum(len(s) == 3 for s in m.layer_shapes)
    layers = [_layer_name(k, s, n_conv) for k, s in enumerate(m.layer_shapes)]
    rows_err = [*NORMS[:1], PRECISE, *NORMS[1:]]

    def series(norm: str) -> str:
        return "/".join(_pct(m.mean_error(norm, b)) for b in bs)

    measured = (
        f"error (%) at batch {'/'.join(map(str, bs))}: BN {series('bn')}, GN {series('gn')}; "
        f"at batch {big}: LN {_pct(m.mean_error('ln', big))}, IN {_pct(m.mean_error('in', big))}"
        f"; BN at batch {small} pools {m.values_per_statistic['bn'][small][-1]} values per "
        f"channel in its last layer"
    )
    table_rows: list[list] = []
    for norm in rows_err:
        table_rows.append(
            [_LABELS[norm], "test error (%)", *(_mean_range(m.test_error[norm][b]) for b in bs)]
        )
        if norm in m.values_per_statistic:
            table_rows.append(
                [
                    _LABELS[norm],
                    "values per statistic",
                    *(_counts(m.values_per_statistic[norm][b]) for b in bs),
                ]
            )
    n_div = sum(d for per in m.diverged.values() for runs in per.values() for d in runs)
    notes = [
        f"Values per statistic are listed layer by layer ({' / '.join(layers)}): how many "
        f"numbers one mean or variance pools in training — for BN each channel over the "
        f"batch and the positions, for GN each sample's group of channels, for LN each "
        f"sample's layer, for IN each sample's channel over its positions (IN is undefined "
        f"in the fully connected layer, which then has none). Wu & He's ResNet-50 pools "
        f"2·49 = 98 values per channel in its last stage at batch 2.",
        _where_bn_breaks_note(m, config.margin),
        _separation_note(m, config.margin),
        _steps_note(m),
        _overlap_note(m),
        f"Errors are the mean (min–max) over seeds {', '.join(map(str, m.seeds))}; one test "
        f"digit is {100 / m.test_size:.2f} points.",
    ]
    if n_div:
        notes.append(f"{n_div} run(s) diverged (non-finite loss) and are scored as they stopped.")
    c_in = 1
    conv = []
    for ch, s in zip(config.channels, config.strides, strict=True):
        conv.append(f"3×3 conv {c_in}→{ch} stride {s}")
        c_in = ch
    return {
        "measured": measured,
        "rule": rule_text(m, config),
        "setup": (
            f"A small CNN on scikit-learn's 8×8 digits instead of ResNet-50 on ImageNet: "
            f"{', '.join(conv)}, the last map flattened, fully connected hidden layer(s) "
            f"{list(config.hidden)}, a linear classifier; layers {' / '.join(layers)}. "
            f"normlab's BatchNorm (2d after convs, 1d after the fc layer), GroupNorm "
            f"({config.gn_groups} groups), LayerNorm over each layer's per-sample shape and "
            f"InstanceNorm2d (affine; convs only) after every hidden layer, then ReLU. "
            f"{config.epochs:g} epochs (the same number of training samples) at each batch "
            f"size in {list(bs)}, lr {config.lr_per_32:g} × batch/32 (Wu & He's linear "
            f"scaling), SGD momentum {config.momentum:g}, cosine decay to 0; BN's running "
            f"statistics with torch's momentum 0.1. Eval-mode error on the {m.test_size} "
            f"held-out digits; BN also with population statistics (normlab.recalibrate, "
            f"sequential, batches of {config.recalibration_batch}). Seeds "
            f"{', '.join(map(str, m.seeds))} (each its own data split and initial weights)."
        ),
        "metrics": {
            "test_error": {
                k: {str(b): list(v) for b, v in per.items()} for k, per in m.test_error.items()
            },
            "mean_test_error": {k: {str(b): m.mean_error(k, b) for b in bs} for k in rows_err},
            "error_rise_small_minus_large": {k: m.rise(k) for k in rows_err},
            "error_spread_across_batches": {k: m.spread(k) for k in rows_err},
            "values_per_statistic": {
                k: {str(b): list(v) for b, v in per.items()}
                for k, per in m.values_per_statistic.items()
            },
            "layer_shapes": [list(s) for s in m.layer_shapes],
            "seeds": list(m.seeds),
            "diverged_runs": n_div,
        },
        "plots": [
            Plot(
                "Test error vs batch size (Wu & He Fig. 1), mean over seeds",
                "batch size",
                "test error",
                [
                    Line(
                        _LABELS[k],
                        list(bs),
                        [m.mean_error(k, b) for b in bs],
                        "o--" if k == PRECISE else "o-",
                    )
                    for k in rows_err
                ],
                logx=True,
            )
        ],
        "tables": {
            f"test error (%) as mean (min–max) over seeds, and values per statistic layer by "
            f"layer ({' / '.join(layers)}), per batch size (Wu & He Table 2)": {
                "header": ["norm", "", *(f"batch {b}" for b in bs)],
                "rows": table_rows,
            }
        },
        "notes": " ".join(notes),
    }


@register
class FamilyBatchSize(Experiment):
    id = "family-batch-size"
    claim = "BN degrades at small batches, GN does not; LN and IN trail at normal batches."
    source = (
        "docs/sources.md#seed-003; Wu & He 2018 (Group Normalization), Table 1, Table 2, Fig. 1"
    )
    reference = (
        "ResNet-50 ImageNet error at batch 32/16/8/4/2: BN 23.6/23.7/24.8/27.3/34.7, GN "
        "24.1/24.2/24.0/24.2/24.1; at batch 32: LN 25.3, IN 28.4"
    )
    seed_says = (
        "LayerNorm normalises each sample over (C, H, W), InstanceNorm each sample and channel "
        "over (H, W), GroupNorm each sample over groups of channels; none of them depends on "
        "the batch, unlike BatchNorm."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {"batch_sizes": (32, 2), "epochs": 0.5, "num_seeds": 1}

    def run(self, config: Config, progress: Progress | None = None) -> Result:
        m = measure(config, progress)
        verdict = judge(m, config.margin)
        return self.result(config, verdict=verdict, **present(m, config))
