"""The demo (``normlab demo``): docs/sources.md#seed-000 measured on real data.

Two deep MLPs on scikit-learn's handwritten digits, identical but for one thing: the
second has a BatchNorm layer between every linear map and its sigmoid
(docs/sources.md#seed-000: BN "placed after the linear transform and before the activation").

    plain:  x → [Linear → sigmoid] × depth → Linear → logits
    BN:     x → [Linear → BatchNorm1d → sigmoid] × depth → Linear → logits

Both start from the *same* weights (the Linear layers of the BN net are copied from the
plain net) and train with the same optimizer, steps, batch order and seed. Measured:

1. at initialisation (one batch = the whole training set, training mode): per-layer
   weight-gradient norms and the sigmoid inputs' ranges, percentiles and saturated
   fraction P(|z| > 5);
2. training: loss per step, test accuracy (eval mode) every ``eval_every`` steps;
3. Ioffe & Szegedy's Fig. 1: the 15/50/85th percentiles, over the test set, of one deep
   unit's sigmoid input over training (batch statistics for BN, as it trains);
4. a sweep of the initial weight scale (plain net, at initialisation only).

Initialisation: W ~ N(0, (g/√fan_in)²) with gain g = 5, biases 0. At g = 1 (LeCun) the
sigmoid inputs stay within about ±1.5 and nothing saturates — gradients still vanish, but
only through σ' ≤ 1/4 per layer. At g ≥ 8 a third of the inputs saturate, yet the larger
weights also amplify the backward signal and the plain net slowly learns. g = 5 has both of
the symptoms of docs/sources.md#seed-000: deep sigmoid inputs spread to about ±9 with a
tenth beyond |z| > 5, and a first-layer gradient three orders of magnitude below the last.
The init sweep in the results shows this trade-off, measured.

Optimizer: SGD with momentum 0.9 (Ioffe & Szegedy's choice). Adam's per-parameter scaling
partly undoes vanishing gradients, which would blur the comparison.

Everything runs on one intra-op thread: the matrices are tiny (batch 64 × width 100), and
on a shared 2-core machine two threads made each step 10-17x slower (measured). The run is
deterministic for a seed.

The module is split like every experiment: :func:`measure` returns numbers only
(:class:`DemoMeasurement`), :func:`judge` applies the stated rule to them, and
:func:`run_demo` presents both as the results.json payload (:class:`DemoResults`, schema
``demo.schema.json``) that :mod:`normlab.report.demo` draws. Model, training loop and
accuracy are the experiments' shared helpers (:mod:`normlab.experiments._training`).

Reference: Ioffe & Szegedy, ICML 2015, §4.1 and Fig. 1; Glorot & Bengio, AISTATS 2010.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from normlab import data
from normlab.diagnostics import FlowResult, gradient_flow, preactivations
from normlab.diagnostics.flow import SATURATING, quantiles
from normlab.experiments import _training as T
from normlab.experiments.base import Progress, Verdict, load_schema, notify
from normlab.report.text import describe_ratio

ACTIVATIONS: tuple[str, ...] = ("relu", "sigmoid", "tanh")

#: JSON Schema (draft 2020-12) of the demo's results.json (``demo.schema.json``).
RESULTS_SCHEMA: dict[str, Any] = load_schema("demo.schema.json")


@dataclass(frozen=True)
class DemoConfig:
    """What ``normlab demo`` runs. Defaults: under a minute on 2 shared CPU cores."""

    depth: int = 20
    width: int = 100
    steps: int = 600
    activation: str = "sigmoid"
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    init_gain: float = 5.0
    saturation_threshold: float = 5.0
    eval_every: int = 20
    trace_points: int = 60
    init_sweep: tuple[float, ...] = (1.0, 2.5, 5.0, 8.0, 12.0)

    def __post_init__(self) -> None:
        checks = [
            ("depth", self.depth, 1, "e.g. --depth 20"),
            ("width", self.width, 2, "e.g. --width 100"),
            ("steps", self.steps, 1, "e.g. --steps 600"),
            ("batch_size", self.batch_size, 2, "BatchNorm needs two samples per batch"),
            ("eval_every", self.eval_every, 1, ""),
            ("trace_points", self.trace_points, 2, ""),
        ]
        for name, value, low, hint in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"demo: {name} must be an int ≥ {low}, got {value!r}. {hint}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"demo: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        for name in ("lr", "init_gain", "saturation_threshold"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"demo: {name} must be a positive number, got {value!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"demo: momentum must be in [0, 1), got {self.momentum!r}")

    @property
    def trace_layer(self) -> int:
        """The deep layer whose unit is traced: layer 15 of 20, as in docs/sources.md#seed-000."""
        return max(1, round(0.75 * self.depth))


# -- measure -----------------------------------------------------------------------------


@dataclass
class NetRun:
    """One network's measurements (plain or BN)."""

    name: str
    init_layers: list[dict[str, Any]]
    after_layers: list[dict[str, Any]]
    loss_steps: list[int]
    loss: list[float]
    eval_steps: list[int]
    test_accuracy: list[float]
    trace: dict[str, list[float]]
    final_test_accuracy: float
    final_train_loss: float
    seconds: float


@dataclass
class DemoMeasurement:
    """Everything the demo measured: numbers only (no display text)."""

    config: DemoConfig
    n_train: int
    n_test: int
    num_classes: int
    trace_unit: int
    plain: NetRun
    bn: NetRun
    init_sweep: list[dict[str, float]]
    headline: dict[str, float | None]
    threads: int


def build_mlp(config: DemoConfig, *, bn: bool, in_features: int, num_classes: int) -> nn.Sequential:
    """[Linear → (BatchNorm1d →) activation] × depth → Linear, every Linear (the classifier
    too) N(0, (g/√fan_in)²) with biases 0, drawn from a generator seeded by ``config.seed``
    (so the plain and the BN net get the same weights)."""
    gen = torch.Generator().manual_seed(config.seed)
    with T.seeded(config.seed):  # construction's default init: overwritten, RNG restored
        return T.mlp(
            in_features,
            [config.width] * config.depth,
            num_classes,
            norm="bn" if bn else "none",
            activation=config.activation,
            init_std=config.init_gain,
            init_classifier=True,
            generator=gen,
        )


@contextmanager
def _compute_settings(threads: int | None):
    """One intra-op thread and flushed denormals (tiny gradients in saturated sigmoid
    nets are denormal floats, 10-100x slower on x86); restored afterwards."""
    old_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(old_threads)


def _layer_rows(flow: FlowResult) -> list[dict[str, Any]]:
    """One row per hidden layer (depth 1..L, the output layer last): the weight layer's
    gradient and the statistics of the activation input it feeds (through BN if any)."""
    rows: dict[int, dict[str, Any]] = {}
    for rec in flow.layers:
        row = rows.setdefault(rec.depth, {"layer": rec.depth})
        if rec.kind == "Linear":
            row.update(
                weight_norm=rec.weight_norm,
                weight_grad_norm=rec.weight_grad_norm,
                grad_weight_ratio=rec.grad_weight_ratio,
            )
        if rec.preact is not None:
            p = rec.preact
            row.update(
                preact_mean=p.mean,
                preact_std=p.std,
                preact_min=p.min,
                preact_max=p.max,
                p15=p.p15,
                p50=p.p50,
                p85=p.p85,
                saturated_fraction=p.saturated_fraction,
                active_fraction=p.active_fraction,
                dead_fraction=p.dead_fraction,
            )
    return [rows[k] for k in sorted(rows)]


def _probe(model: nn.Module, batch, config: DemoConfig) -> list[dict[str, Any]]:
    return _layer_rows(
        gradient_flow(model, batch, saturation_threshold=config.saturation_threshold)
    )


def _unit_trace(model, x, layer_name: str, unit: int) -> list[float]:
    return quantiles(
        preactivations(model, x, training=True)[layer_name][:, unit], (0.15, 0.5, 0.85)
    )


def _train(
    name: str,
    model: nn.Module,
    split: data.Split,
    config: DemoConfig,
    layer_name: str,
    unit: int,
    progress: Progress | None,
    span: tuple[float, float],
) -> NetRun:
    """Train with the shared loop (batch order from ``seed + 1``, the same for both nets),
    tracing the unit's percentiles over the test set every ``steps / trace_points``."""
    trace_every = max(1, config.steps // (config.trace_points - 1))
    trace: dict[str, list] = {"steps": [], "p15": [], "p50": [], "p85": []}

    def record(step: int, net: nn.Module) -> None:
        trace["steps"].append(step)
        for key, v in zip(("p15", "p50", "p85"), _unit_trace(net, split.x_test, layer_name, unit)):
            trace[key].append(v)

    def on_step(step: int, net: nn.Module) -> None:
        if step % trace_every == 0 or step == config.steps:
            record(step, net)

    record(0, model)
    start = time.perf_counter()
    hist = T.train_as(
        config,
        model,
        split,
        seed=config.seed + 1,
        eval_every=config.eval_every,
        on_step=on_step,
        progress=progress,
        progress_span=span,
        label=f"training {name}",
    )
    losses = hist.loss
    return NetRun(
        name=name,
        init_layers=[],
        after_layers=[],
        loss_steps=list(range(1, len(losses) + 1)),
        loss=losses,
        eval_steps=hist.eval_steps,
        test_accuracy=hist.test_accuracy,
        trace=trace,
        final_test_accuracy=hist.final_test_accuracy,
        final_train_loss=sum(losses[-20:]) / len(losses[-20:]) if losses else math.nan,
        seconds=time.perf_counter() - start,
    )


def _deep_saturation(rows: list[dict[str, Any]]) -> float | None:
    """Mean saturated fraction over layers 2..L (layer 1 sees the standardised input)."""
    values = [r["saturated_fraction"] for r in rows[1:] if r.get("saturated_fraction") is not None]
    return sum(values) / len(values) if values else None


def _init_sweep(config: DemoConfig, split: data.Split, batch) -> list[dict[str, float]]:
    out = []
    for gain in config.init_sweep:
        cfg = replace(config, init_gain=gain, init_sweep=())
        model = build_mlp(cfg, bn=False, in_features=split.x_train.shape[1], num_classes=10)
        rows = _probe(model, batch, config)
        first = rows[0]["weight_grad_norm"]
        last = rows[-2]["weight_grad_norm"] if len(rows) > 1 else first
        tl = rows[config.trace_layer - 1]
        out.append(
            {
                "gain": gain,
                "saturated_fraction": _deep_saturation(rows),
                "trace_layer_max_abs": max(abs(tl["preact_min"]), abs(tl["preact_max"])),
                "first_over_last_hidden_grad": first / last if last else math.inf,
            }
        )
    return out


def _headline(config: DemoConfig, plain: NetRun, bn: NetRun) -> dict[str, float | None]:
    p0, b0 = plain.init_layers, bn.init_layers
    last_hidden = config.depth - 1  # index of layer L's row
    tl = config.trace_layer - 1
    scale = SATURATING.get(config.activation)
    plain_ratio = p0[0]["weight_grad_norm"] / p0[last_hidden]["weight_grad_norm"]
    bn_ratio = b0[0]["weight_grad_norm"] / b0[last_hidden]["weight_grad_norm"]
    return {
        "plain_first_grad": p0[0]["weight_grad_norm"],
        "plain_last_grad": p0[last_hidden]["weight_grad_norm"],
        "bn_first_grad": b0[0]["weight_grad_norm"],
        "bn_last_grad": b0[last_hidden]["weight_grad_norm"],
        "plain_first_over_last": plain_ratio,
        "bn_first_over_last": bn_ratio,
        "plain_log10_imbalance": abs(math.log10(plain_ratio)) if plain_ratio > 0 else math.inf,
        "bn_log10_imbalance": abs(math.log10(bn_ratio)) if bn_ratio > 0 else math.inf,
        "bn_over_plain_first_grad": b0[0]["weight_grad_norm"] / p0[0]["weight_grad_norm"],
        "saturation_bound": None if scale is None else config.saturation_threshold * scale,
        "plain_saturated_fraction": _deep_saturation(p0),
        "bn_saturated_fraction": _deep_saturation(b0),
        "plain_trace_layer_min": p0[tl]["preact_min"],
        "plain_trace_layer_max": p0[tl]["preact_max"],
        "bn_trace_layer_min": b0[tl]["preact_min"],
        "bn_trace_layer_max": b0[tl]["preact_max"],
        "plain_final_accuracy": plain.final_test_accuracy,
        "bn_final_accuracy": bn.final_test_accuracy,
        "plain_final_loss": plain.final_train_loss,
        "bn_final_loss": bn.final_train_loss,
    }


def measure(
    config: DemoConfig, progress: Progress | None = None, *, threads: int | None = 1
) -> DemoMeasurement:
    """Run the demo's measurements (never prints, never writes files, RNG restored)."""
    with _compute_settings(threads), T.seeded(config.seed):
        split = data.load_digits(seed=config.seed)
        in_features, num_classes = split.x_train.shape[1], split.num_classes
        plain = build_mlp(config, bn=False, in_features=in_features, num_classes=num_classes)
        bn = build_mlp(config, bn=True, in_features=in_features, num_classes=num_classes)
        T.copy_weights(plain, bn)  # the same initial weights, whatever the RNG did

        batch = (split.x_train, split.y_train)
        notify(progress, 0.0, "probing at initialisation")
        init_plain, init_bn = _probe(plain, batch, config), _probe(bn, batch, config)

        # The traced unit: in the layer of docs/sources.md#seed-000 (15 of 20), the unit whose
        # median input over the test set is farthest from 0 at initialisation in the plain net
        # — the drift the seed describes. The BN net's unit with the same index has the same
        # weights.
        layer_idx = config.trace_layer
        lin_pos = [j for j, m in enumerate(plain) if isinstance(m, nn.Linear)][layer_idx - 1]
        z = preactivations(plain, split.x_test, training=True)[str(lin_pos)]
        unit = int(z.median(0).values.abs().argmax())
        bn_pos = [j for j, m in enumerate(bn) if isinstance(m, nn.BatchNorm1d)][layer_idx - 1]

        plain_run = _train("plain", plain, split, config, str(lin_pos), unit, progress, (0, 0.5))
        bn_run = _train("BN", bn, split, config, str(bn_pos), unit, progress, (0.5, 1.0))
        plain_run.name, bn_run.name = "plain", "bn"
        plain_run.init_layers, bn_run.init_layers = init_plain, init_bn

        notify(progress, 1.0, "probing after training")
        plain_run.after_layers = _probe(plain, batch, config)
        bn_run.after_layers = _probe(bn, batch, config)
        sweep = _init_sweep(config, split, batch)
        used_threads = torch.get_num_threads()
    return DemoMeasurement(
        config=config,
        n_train=len(split.x_train),
        n_test=len(split.x_test),
        num_classes=num_classes,
        trace_unit=unit,
        plain=plain_run,
        bn=bn_run,
        init_sweep=sweep,
        headline=_headline(config, plain_run, bn_run),
        threads=used_threads,
    )


# -- judge -------------------------------------------------------------------------------

RULE = (
    "holds if, at initialisation, BN brings the first-layer / layer-L gradient ratio at "
    "least two orders of magnitude closer to 1 than without BN (|log10 ratio| smaller by "
    "≥ 2), and after training the BN net's test accuracy is at least 30 points higher; "
    "fails if BN makes either worse; inconclusive otherwise"
)


def judge(h: dict[str, Any]) -> Verdict:
    """The claim of docs/sources.md#seed-000 — BN restores gradient flow and training — as
    :data:`RULE`, over the headline numbers (``*_log10_imbalance``, ``*_final_accuracy``)."""
    gain = h["plain_log10_imbalance"] - h["bn_log10_imbalance"]
    gap = h["bn_final_accuracy"] - h["plain_final_accuracy"]
    if gain >= 2 and gap >= 0.30:
        return "holds"
    if gain < 0 or gap < 0:
        return "fails"
    return "inconclusive"


# -- present -----------------------------------------------------------------------------


@dataclass
class DemoResults:
    """What ``normlab demo`` shows; ``to_dict`` is what results.json holds."""

    config: dict[str, Any]
    data: dict[str, Any]
    init: dict[str, Any]
    trace_unit: dict[str, Any]
    plain: NetRun
    bn: NetRun
    init_sweep: list[dict[str, float]]
    headline: dict[str, float]
    verdict: str
    rule: str
    summary: str
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(config: DemoConfig, h: dict[str, Any]) -> tuple[str, str, str]:
    """(verdict, rule, one-sentence summary) for the headline numbers ``h``."""
    summary = (
        f"At initialisation the plain net's first-layer gradient is "
        f"{describe_ratio(h['plain_first_over_last'])} than its layer {config.depth}'s; with BN it is "
        f"{describe_ratio(h['bn_first_over_last'])}. After {config.steps} steps: BN "
        f"{h['bn_final_accuracy']:.1%} test accuracy, plain {h['plain_final_accuracy']:.1%} "
        f"(chance 10%)."
    )
    return judge(h), RULE, summary


def present(m: DemoMeasurement, seconds: float = 0.0) -> DemoResults:
    """The measurement and its verdict as the results.json payload."""
    config = m.config
    verdict, rule, summary = _verdict(config, m.headline)
    layer = config.trace_layer
    return DemoResults(
        config=asdict(config),
        data={
            "name": "scikit-learn digits (8x8, 10 classes)",
            "n_train": m.n_train,
            "n_test": m.n_test,
            "chance_accuracy": 1.0 / m.num_classes,
        },
        init={
            "name": f"N(0, ({config.init_gain:g}/sqrt(fan_in))^2), biases 0",
            "gain": config.init_gain,
            "why": (
                f"gain {config.init_gain:g} = {config.init_gain:g}x LeCun's 1/sqrt(fan_in): "
                "large enough that deep sigmoid inputs leave the linear region "
                "(docs/sources.md#seed-000's |z| > 5), small enough that the larger weights do "
                "not amplify the backward signal back to health; the init sweep shows the "
                "trade-off"
            ),
            "optimizer": f"SGD, lr {config.lr:g}, momentum {config.momentum:g}",
        },
        trace_unit={
            "layer": layer,
            "unit": m.trace_unit,
            "selection": (
                f"the unit of layer {layer} whose median input over the test set is "
                f"farthest from 0 at initialisation in the plain net; same index (same "
                f"initial weights) in the BN net; percentiles over the test set, batch "
                f"statistics for BN"
            ),
        },
        plain=m.plain,
        bn=m.bn,
        init_sweep=m.init_sweep,
        headline=m.headline,
        verdict=verdict,
        rule=rule,
        summary=summary,
        seconds=seconds,
        versions={"torch": torch.__version__, "intra_op_threads": str(m.threads)},
    )


def run_demo(
    config: DemoConfig | None = None,
    progress: Progress | None = None,
    *,
    threads: int | None = 1,
) -> DemoResults:
    """Measure, judge and present the demo (never prints, never writes files).

    Args:
        config: the run's settings (:class:`DemoConfig` defaults if None).
        progress: called as ``progress(fraction_done, message)``.
        threads: intra-op threads during the run (None: leave torch's setting).
    """
    start = time.perf_counter()
    m = measure(config or DemoConfig(), progress, threads=threads)
    return present(m, seconds=time.perf_counter() - start)
