"""Gradient flow: per-layer gradient norms and pre-activation statistics through hooks.

For every *layer* (Linear, Conv, Bilinear and normalization modules, normlab's included)
the probe records, over the forward/backward passes run inside its context:

- ``weight_norm`` ‖W‖, ``weight_grad_norm`` ‖∂L/∂W‖ and their ratio ‖∂L/∂W‖/‖W‖ (the
  relative step SGD takes with learning rate 1 — comparable across layers of any scale);
- ``input_grad_norm`` ‖∂L/∂x‖ of the layer's input and its per-element RMS
  ``input_grad_rms`` = ‖∂L/∂x‖/√numel(x) — the back-propagated signal whose decay across
  layers *is* the vanishing gradient (Glorot & Bengio 2010, Fig. 7), and unlike the
  weight gradient it does not depend on the scale of the layer's own weights when a
  normalization layer follows (None where x does not require grad; :func:`gradient_flow`
  makes the network input require it);
- the statistics of the *pre-activation* that the layer feeds: the input of the first
  activation module run after it (``nn.Sigmoid``, ``nn.Tanh``, ``nn.ReLU``, …), or, for a
  normlab layer with a fused ``activation=``, its affine output z = γ·x̂ + β, recomputed
  without the activation. Mean, std, min, max, the 15/50/85th percentiles (the three
  curves of Ioffe & Szegedy 2015, Fig. 1), the saturated fraction P(|z| > t) for
  sigmoid/tanh, the dead fraction for ReLU (units never positive over the probed
  batches) and the activation probability P(z > 0).

Norms over several backward passes are root-mean-square over passes of each pass's norm
(for one pass: the norm). Percentiles use up to ``max_samples`` values per site (an even
stride through the rest when there are more); mean, std, min, max and fractions use all.

Saturation: docs/sources.md#seed-000 calls a sigmoid saturated for |z| > 5, where σ'(z) < 0.0067
= 2.7 % of σ'(0). tanh(z) = 2σ(2z) − 1 reaches the same relative slope at |z| > 2.5, so tanh
sites use ``saturation_threshold / 2``.

Parts: :mod:`._flow_hooks` (which modules are layers and activations; the hooks),
:mod:`._flow_records` (the records and each site's running statistics); this module
drives them (:class:`GradientFlow`) and holds the one-shot probes.

Reference: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015 (Fig. 1); Glorot & Bengio, "Understanding the
difficulty of training deep feedforward neural networks", AISTATS 2010 (saturation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normlab.diagnostics._batch import LossFn, batch_loss, split_batch, trainable_params
from normlab.diagnostics._flow_hooks import (
    LAYER_TYPES,
    WEIGHT_LAYER_TYPES,
    Hooks,
    activation_kind,
    fused_preactivation,
    unit_dim,
)
from normlab.diagnostics._flow_records import (
    DYING,
    SATURATING,
    FlowResult,
    LayerFlow,
    PreactivationStats,
    SiteStats,
    quantiles,
)
from normlab.diagnostics._state import preserved

# Public names of the parts, importable from here as when this was one module.
__all__ = [
    "DYING",
    "LAYER_TYPES",
    "SATURATING",
    "WEIGHT_LAYER_TYPES",
    "FlowResult",
    "GradientFlow",
    "LayerFlow",
    "PreactivationStats",
    "activation_kind",
    "gradient_flow",
    "preactivations",
    "quantiles",
    "unit_percentiles",
]


class GradientFlow:
    """Probe gradient flow and pre-activations of any ``nn.Module`` through hooks.

    Usage::

        with GradientFlow(model) as flow:
            loss = F.cross_entropy(model(x), y)
            loss.backward()               # or torch.autograd.grad(loss, params)
        result = flow.result()            # FlowResult, per layer in forward order

    Run any number of forward/backward passes inside the context; statistics accumulate.
    On exit every hook handle is removed and every module's ``training`` flag restored
    (the probe never changes modes itself; a normlab fused-activation layer is re-run
    without its activation and its buffers put back). See the module docstring for what
    is measured and :func:`gradient_flow` for a one-shot probe that leaves the model,
    its buffers and its ``.grad`` untouched.

    Args:
        model: any module.
        saturation_threshold: |z| above which a sigmoid input counts as saturated
            (docs/sources.md#seed-000: 5); tanh uses half of it.
        max_samples: values kept per site for percentiles.
        layer_types: module types treated as layers (default :data:`LAYER_TYPES`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        saturation_threshold: float = 5.0,
        max_samples: int = 200_000,
        layer_types: tuple[type[nn.Module], ...] = LAYER_TYPES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientFlow: model must be a torch.nn.Module, got {type(model)}")
        if not (saturation_threshold > 0 and math.isfinite(saturation_threshold)):
            raise ValueError(
                f"GradientFlow: saturation_threshold must be a positive number "
                f"(docs/sources.md#seed-000 uses 5.0), got {saturation_threshold}"
            )
        if max_samples < 1:
            raise ValueError(f"GradientFlow: max_samples must be ≥ 1, got {max_samples}")
        self.model = model
        self.saturation_threshold = float(saturation_threshold)
        self.max_samples = int(max_samples)
        self.layer_types = layer_types
        self._hooks: Hooks | None = None
        self._modes: list[tuple[nn.Module, bool]] = []
        self._reset()

    def _reset(self) -> None:
        self._sites: dict[nn.Module, SiteStats] = {}
        self._unattached: dict[nn.Module, SiteStats] = {}
        self._wgrad_sq: dict[nn.Module, float] = {}
        self._wgrad_n: dict[nn.Module, int] = {}
        self._igrad_sq: dict[nn.Module, float] = {}
        self._igrad_n: dict[nn.Module, int] = {}
        self._igrad_elems: dict[nn.Module, int] = {}
        self._forward_passes = 0
        self._backward_passes = 0
        self._layer_modules: list[nn.Module] = []
        self._names: dict[nn.Module, str] = {}

    # -- context ------------------------------------------------------------------------
    def __enter__(self) -> GradientFlow:
        if self._hooks is not None:
            raise RuntimeError("GradientFlow: this probe is already active (not re-entrant)")
        self._reset()
        self._modes = [(m, m.training) for m in self.model.modules()]
        hooks = Hooks(self.model, self.layer_types)
        self._hooks = hooks
        self._names = dict(hooks.layers)
        try:
            self._install(hooks)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.remove()
            self._layer_modules = list(hooks.order)
        for m, training in self._modes:
            m.training = training

    def _install(self, hooks: Hooks) -> None:
        model = self.model

        def root_pre(_module, _inputs):
            self._forward_passes += 1
            hooks.reset_pass()

        hooks.handles.append(model.register_forward_pre_hook(root_pre))

        def site_for(table: dict, key: nn.Module, kind: str, unit_dim: int) -> SiteStats:
            site = table.get(key)
            if site is None:
                site = table[key] = SiteStats(
                    kind, unit_dim, self.max_samples, self.saturation_threshold
                )
            return site

        def after_layer(module, inputs, output):
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if x is not None and x.requires_grad and torch.is_grad_enabled():

                def input_grad(g, module=module):
                    self._igrad_sq[module] = self._igrad_sq.get(module, 0.0) + _sq_norm(g)
                    self._igrad_n[module] = self._igrad_n.get(module, 0) + 1
                    self._igrad_elems[module] = self._igrad_elems.get(module, 0) + g.numel()

                hooks.handles.append(x.register_hook(input_grad))
            kind = activation_kind(module)
            if kind is not None and x is not None:  # fused normlab activation
                z = fused_preactivation(module, inputs)
                site_for(self._sites, module, kind, unit_dim(module)).add(z)
                hooks.consumer.setdefault(module, module)

        hooks.on_layer(after_layer)

        def before_activation(act, owner, z):
            _, kind = hooks.acts[act]
            if owner is not None:
                site_for(self._sites, owner, kind, unit_dim(owner)).add(z)
            else:
                site_for(self._unattached, act, kind, unit_dim(hooks.last_layer)).add(z)

        hooks.on_activation(before_activation)

        seen: set[int] = set()
        for module in hooks.layers:
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or not w.requires_grad or id(w) in seen:
                continue
            seen.add(id(w))

            def weight_grad(g, module=module):
                self._wgrad_sq[module] = self._wgrad_sq.get(module, 0.0) + _sq_norm(g)
                self._wgrad_n[module] = self._wgrad_n.get(module, 0) + 1
                self._backward_passes = max(self._backward_passes, self._wgrad_n[module])

            hooks.handles.append(w.register_hook(weight_grad))

    # -- results ------------------------------------------------------------------------
    def result(self) -> FlowResult:
        """The per-layer records gathered so far (callable inside or after the context)."""
        order = self._hooks.order if self._hooks is not None else self._layer_modules
        records = []
        depth = 0
        for i, module in enumerate(order, start=1):
            if isinstance(module, WEIGHT_LAYER_TYPES) or depth == 0:
                depth += 1
            w = getattr(module, "weight", None)
            wnorm = float(w.detach().double().norm()) if isinstance(w, torch.Tensor) else None
            gnorm = _rms(self._wgrad_sq.get(module), self._wgrad_n.get(module))
            ratio = None
            if gnorm is not None and wnorm is not None:
                ratio = gnorm / wnorm if wnorm > 0 else math.inf
            site = self._sites.get(module)
            records.append(
                LayerFlow(
                    name=self._names.get(module, ""),
                    kind=type(module).__name__,
                    index=i,
                    depth=depth,
                    weight_norm=wnorm,
                    weight_grad_norm=gnorm,
                    grad_weight_ratio=ratio,
                    input_grad_norm=_rms(self._igrad_sq.get(module), self._igrad_n.get(module)),
                    input_grad_rms=_rms(self._igrad_sq.get(module), self._igrad_elems.get(module)),
                    preact=None if site is None or site.count == 0 else site.result(),
                )
            )
        unattached = {}
        names = {m: n for n, m in self.model.named_modules()}
        for act, site in self._unattached.items():
            if site.count:
                unattached[names.get(act, "")] = site.result()
        return FlowResult(
            layers=records,
            forward_passes=self._forward_passes,
            backward_passes=self._backward_passes,
            saturation_threshold=self.saturation_threshold,
            unattached=unattached,
        )


def _sq_norm(g: torch.Tensor) -> float:
    return float(g.detach().double().pow(2).sum())


def _rms(total: float | None, n: int | None) -> float | None:
    return None if not n else math.sqrt(total / n)


def _input_requires_grad(batch: Any) -> Any:
    """The batch with a floating inputs tensor replaced by a grad-requiring view of it, so
    the first layer's input gradient is recorded too (the caller's tensor is untouched)."""
    inputs, target = split_batch(batch, "gradient_flow")
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        inputs = inputs.detach().requires_grad_(True)
    return inputs if target is None else (inputs, target)


def _requires_grad(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def gradient_flow(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    training: bool | None = None,
    saturation_threshold: float = 5.0,
    max_samples: int = 200_000,
) -> FlowResult:
    """One forward and backward pass of ``model`` on ``batch`` under :class:`GradientFlow`.

    Gradients come from ``torch.autograd.grad``, so parameters' ``.grad`` are untouched;
    a floating inputs tensor is made to require grad (a detached alias) so that every
    layer, the first included, gets ``input_grad_norm``;
    modes, buffers (BatchNorm running statistics, ``num_batches_tracked``) and parameters
    are exactly as before. With ``training=None`` the model is probed in its current
    mode(s); True/False switch it temporarily.

    Args:
        batch: ``(inputs, target)`` or an inputs tensor (see :mod:`._batch`).
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)``); default
            cross-entropy for integer targets, MSE otherwise.
    """
    params = trainable_params(model)
    with preserved(model):
        if training is not None:
            model.train(training)
        with GradientFlow(
            model, saturation_threshold=saturation_threshold, max_samples=max_samples
        ) as flow:
            batch = _input_requires_grad(batch)
            inputs, _ = split_batch(batch, "gradient_flow")
            leaves = [*params, *([inputs] if _requires_grad(inputs) else [])]
            loss = batch_loss(model, batch, loss_fn, "gradient_flow")
            torch.autograd.grad(loss, leaves, allow_unused=True)
    return flow.result()


def preactivations(
    model: nn.Module, inputs: torch.Tensor, *, training: bool | None = None
) -> dict[str, torch.Tensor]:
    """The pre-activation of every activation site in one no-grad forward of ``inputs``.

    Keys are the names of the layers feeding each activation (the fused layer itself for a
    normlab layer with ``activation=``), values the detached tensors. Modes, buffers and
    parameters are left as they were (``training`` as in :func:`gradient_flow`).
    """
    captured: dict[str, torch.Tensor] = {}
    hooks = Hooks(model, LAYER_TYPES)
    inputs, _ = split_batch(inputs, "preactivations")

    def after_layer(module, layer_inputs, _output):
        if activation_kind(module) is not None:
            captured[hooks.layers[module]] = fused_preactivation(module, layer_inputs)
            hooks.consumer.setdefault(module, module)

    def before_activation(_act, owner, z):
        if owner is not None:
            captured.setdefault(hooks.layers[owner], z.detach().clone())

    with preserved(model):
        if training is not None:
            model.train(training)
        try:
            hooks.on_layer(after_layer)
            hooks.on_activation(before_activation)
            with torch.no_grad():
                model(inputs)
        finally:
            hooks.remove()
    return captured


def unit_percentiles(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    unit: int,
    q: Sequence[float] = (0.15, 0.5, 0.85),
    *,
    training: bool | None = None,
) -> list[float]:
    """Percentiles over the batch of one unit's pre-activation — one point of the
    Ioffe & Szegedy Fig. 1 traces (15/50/85th percentiles of a sigmoid input).

    Args:
        layer: name of the layer feeding the activation (a key of :func:`preactivations`).
        unit: feature index (channel for a conv layer; values pooled over positions).
        q: quantiles in [0, 1].
    """
    pre = preactivations(model, inputs, training=training)
    if layer not in pre:
        raise KeyError(
            f"unit_percentiles: no activation fed by layer {layer!r}; layers feeding an "
            f"activation: {sorted(pre)}"
        )
    z = pre[layer]
    module = model.get_submodule(layer) if layer else model
    dim = unit_dim(module) % z.dim()
    if not 0 <= unit < z.shape[dim]:
        raise IndexError(
            f"unit_percentiles: unit must be in [0, {z.shape[dim]}) for layer {layer!r}, got {unit}"
        )
    return quantiles(z.select(dim, unit), q)
