"""``diagnose``: one probe of a model on a batch → a verdict per layer and what to do.

Verdict rules (each a keyword argument; a layer can trip several, the verdict is the
first in the order exploding, dead, saturated, vanishing, healthy):

- *exploding*: a non-finite gradient, or a back-propagated gradient (below) more than
  ``exploding_ratio`` (1e3) times the output layer's;
- *dead*: more than ``dead_threshold`` (50 %) of a ReLU layer's units never positive;
- *saturated*: more than ``saturated_threshold`` (25 %) of a sigmoid/tanh layer's inputs
  beyond the saturation bound (|z| > 5 for the sigmoid, docs/sources.md#seed-000) — a quarter
  of the units passing back ~no gradient on every sample is already a crippled layer;
- *vanishing*: a back-propagated gradient below ``vanishing_ratio`` (1e-3) times the
  output layer's.

The back-propagated gradient of a weight layer (Linear/Conv) is the per-element RMS of
∂L/∂x at its input, ``input_grad_rms``: the signal the backward pass delivers there, whose
decay from the output layer down *is* the vanishing gradient (Glorot & Bengio 2010,
Fig. 7). The output layer's has been through no activation derivative yet, so it is the
reference. Unlike ‖∂L/∂W‖/‖W‖, this does not shrink when a normalization layer follows a
layer with large weights (BN makes the layer scale-invariant: ∂L/∂W ∝ 1/‖W‖), which
would mislabel a healthy BN network as vanishing. Normalization layers get the
activation-based verdicts only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn

from normlab.diagnostics._batch import LossFn
from normlab.diagnostics.flow import SATURATING, WEIGHT_LAYER_TYPES, FlowResult, gradient_flow

Verdict = Literal["healthy", "saturated", "vanishing", "exploding", "dead"]
VERDICT_ORDER: tuple[str, ...] = ("exploding", "dead", "saturated", "vanishing", "healthy")


@dataclass(frozen=True)
class LayerVerdict:
    """One layer's verdict.

    Attributes:
        name, kind, depth: as in :class:`normlab.diagnostics.LayerFlow`.
        verdict: the most severe problem found, or 'healthy'.
        problems: every rule the layer tripped, most severe first.
        relative_grad: the layer's back-propagated gradient (``input_grad_rms``) ÷ the output
            layer's; None for layers without one (normalization layers).
        reasons: one plain sentence per problem, with the measured number.
    """

    name: str
    kind: str
    depth: int
    verdict: str
    problems: list[str]
    relative_grad: float | None
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found: per-layer verdicts, the raw probe, recommendations."""

    layers: list[LayerVerdict]
    flow: FlowResult
    reference_layer: str | None
    recommendations: list[str]
    thresholds: dict[str, float]

    @property
    def healthy(self) -> bool:
        return all(v.verdict == "healthy" for v in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "layers": [v.to_dict() for v in self.layers],
            "reference_layer": self.reference_layer,
            "recommendations": list(self.recommendations),
            "thresholds": dict(self.thresholds),
            "flow": self.flow.to_dict(),
        }


def layer_ranges(depths: list[int]) -> str:
    """'3–20' / '1, 4–6': sorted layer numbers as compact ranges."""
    nums = sorted(set(depths))
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}–{nums[j]}")
        i = j + 1
    return ", ".join(parts)


def _word(depths: list[int]) -> str:
    return "layer" if len(set(depths)) == 1 else "layers"


def recommend(layers: list[LayerVerdict], flow: FlowResult) -> list[str]:
    """Plain-language advice from per-layer verdicts (where to put normalization etc.)."""
    by = {v: [lv for lv in layers if v in lv.problems] for v in VERDICT_ORDER}
    preact = {r.name: r.preact for r in flow.layers}
    has_norm = any(r.kind.lower().find("norm") >= 0 for r in flow.layers)
    recs: list[str] = []
    if by["exploding"]:
        d = [lv.depth for lv in by["exploding"]]
        recs.append(
            f"Gradients explode in {_word(d)} {layer_ranges(d)}: lower the learning rate or the "
            f"initial weight scale, clip gradients, or normalize the layers' outputs."
        )
    if by["saturated"]:
        d = [lv.depth for lv in by["saturated"]]
        acts = sorted({preact[lv.name].activation for lv in by["saturated"] if preact[lv.name]})
        act = "/".join(acts) or "activation"
        recs.append(
            f"Insert BatchNorm before the {act} in {_word(d)} {layer_ranges(d)}: "
            f"{'its' if len(set(d)) == 1 else 'their'} inputs sit in the flat tails where the "
            f"derivative is ~0 (the failure of docs/sources.md#seed-000); normalization pulls "
            f"each batch back to mean 0, variance 1."
        )
    if by["dead"]:
        d = [lv.depth for lv in by["dead"]]
        recs.append(
            f"Dead ReLU units in {_word(d)} {layer_ranges(d)}: lower the learning rate, use "
            f"BatchNorm before the ReLU (β = 0 keeps about half the units active), or LeakyReLU."
        )
    vanish_only = [lv for lv in by["vanishing"] if lv.verdict == "vanishing"]
    if vanish_only:
        d = [lv.depth for lv in vanish_only]
        fix = (
            "check the initialisation scale and the normalization layers' placement"
            if has_norm
            else "insert BatchNorm after the linear maps (before the activations), or use "
            "ReLU with He initialisation or residual connections"
        )
        recs.append(
            f"Gradients vanish in {_word(d)} {layer_ranges(d)} (the back-propagated gradient is "
            f"more than 1000x weaker than at the output layer): {fix}."
        )
    if not recs:
        recs.append("No problem found: gradients reach every layer and no activation saturates.")
    return recs


def diagnose(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    training: bool | None = None,
    saturation_threshold: float = 5.0,
    saturated_threshold: float = 0.25,
    dead_threshold: float = 0.5,
    vanishing_ratio: float = 1e-3,
    exploding_ratio: float = 1e3,
) -> Diagnosis:
    """Probe ``model`` on ``batch`` (one forward + backward, state left untouched, see
    :func:`normlab.diagnostics.gradient_flow`) and give each layer a verdict.

    Args:
        batch: ``(inputs, target)`` or inputs; loss_fn: as :func:`gradient_flow`.
        training: probe mode (None: as the model is).
        saturation_threshold: |z| bound of a saturated sigmoid input (tanh: half).
        saturated_threshold, dead_threshold: fractions that make a layer saturated / dead.
        vanishing_ratio, exploding_ratio: bounds on the relative gradient against the
            reference layer (see the module docstring).
    """
    for name, value in (
        ("saturated_threshold", saturated_threshold),
        ("dead_threshold", dead_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"diagnose: {name} must be a fraction in [0, 1], got {value}")
    if not 0 < vanishing_ratio < 1 < exploding_ratio:
        raise ValueError(
            f"diagnose: need 0 < vanishing_ratio < 1 < exploding_ratio, got {vanishing_ratio}, "
            f"{exploding_ratio}"
        )
    flow = gradient_flow(
        model, batch, loss_fn, training=training, saturation_threshold=saturation_threshold
    )

    # The back-propagated signal at each weight layer's input, per element; compared with
    # the output layer's (see the module docstring).
    def is_weight_layer(r) -> bool:
        return isinstance(model.get_submodule(r.name) if r.name else model, WEIGHT_LAYER_TYPES)

    signal = [r for r in flow.layers if is_weight_layer(r) and r.input_grad_rms is not None]
    ref = signal[-1] if signal else None
    ref_rms = ref.input_grad_rms if ref is not None else None
    usable = ref_rms is not None and ref_rms > 0 and math.isfinite(ref_rms)

    verdicts = []
    for r in flow.layers:
        problems: list[str] = []
        reasons: list[str] = []
        rel = None
        g = r.input_grad_rms
        if usable and g is not None and is_weight_layer(r):
            rel = g / ref_rms if math.isfinite(g) else math.inf
        nonfinite = any(
            v is not None and not math.isfinite(v) for v in (r.weight_grad_norm, r.input_grad_rms)
        )
        if nonfinite or (rel is not None and rel > exploding_ratio):
            problems.append("exploding")
            reasons.append(
                f"back-propagated gradient {_fmt(rel)}x the output layer's (> {exploding_ratio:g}x)"
                if rel is not None and math.isfinite(rel)
                else "non-finite gradient"
            )
        p = r.preact
        if p is not None and p.dead_fraction is not None and p.dead_fraction > dead_threshold:
            problems.append("dead")
            reasons.append(f"{p.dead_fraction:.0%} of {p.activation} units never active")
        if (
            p is not None
            and p.saturated_fraction is not None
            and p.activation in SATURATING
            and p.saturated_fraction > saturated_threshold
        ):
            problems.append("saturated")
            reasons.append(
                f"{p.saturated_fraction:.0%} of {p.activation} inputs have |z| > "
                f"{p.saturation_threshold:g}"
            )
        if rel is not None and rel < vanishing_ratio:
            problems.append("vanishing")
            reasons.append(
                f"back-propagated gradient {_fmt(rel)}x the output layer's (< {vanishing_ratio:g}x)"
            )
        problems.sort(key=VERDICT_ORDER.index)
        verdicts.append(
            LayerVerdict(
                name=r.name,
                kind=r.kind,
                depth=r.depth,
                verdict=problems[0] if problems else "healthy",
                problems=problems,
                relative_grad=rel,
                reasons=reasons,
            )
        )
    return Diagnosis(
        layers=verdicts,
        flow=flow,
        reference_layer=None if ref is None else ref.name,
        recommendations=recommend(verdicts, flow),
        thresholds={
            "saturation_threshold": saturation_threshold,
            "saturated_threshold": saturated_threshold,
            "dead_threshold": dead_threshold,
            "vanishing_ratio": vanishing_ratio,
            "exploding_ratio": exploding_ratio,
        },
    )


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2g}" if 1e-2 <= abs(x) < 1e3 else f"{x:.1e}"
