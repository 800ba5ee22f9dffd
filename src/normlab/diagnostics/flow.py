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

Reference: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015 (Fig. 1); Glorot & Bengio, "Understanding the
difficulty of training deep feedforward neural networks", AISTATS 2010 (saturation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from normlab.diagnostics._batch import LossFn, batch_loss, split_batch, trainable_params
from normlab.diagnostics._state import preserved

#: Module types the probe treats as layers (weight gradients, pre-activation owner).
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    _ConvNd,
    _NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm and normlab's subclasses
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: Layers that count as one step of depth (normalization layers share their producer's).
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, _ConvNd)

# Most specific first: ReLU6 subclasses Hardtanh.
_ACTIVATION_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.ReLU6, "relu6"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.ELU, "elu"),
    (nn.SELU, "selu"),
    (nn.CELU, "celu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Softplus, "softplus"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Hardswish, "hardswish"),
)
#: Saturating activations and the scale of their input relative to the sigmoid's.
SATURATING: dict[str, float] = {"sigmoid": 1.0, "tanh": 0.5}
#: Activations whose units can die (zero output and zero gradient for every z ≤ 0).
DYING: frozenset[str] = frozenset({"relu", "relu6"})


def activation_kind(module: nn.Module) -> str | None:
    """The activation a module applies to its input (or, for a normlab layer with a fused
    ``activation=``, to its affine output), or None."""
    fused = getattr(module, "activation", None)
    if isinstance(module, LAYER_TYPES) and isinstance(fused, str) and fused != "identity":
        return fused
    for cls, name in _ACTIVATION_MODULES:
        if isinstance(module, cls):
            return name
    return None


@dataclass(frozen=True)
class PreactivationStats:
    """Statistics of the values entering one activation over the probed batches.

    Attributes:
        activation: 'sigmoid', 'tanh', 'relu', ...
        count: number of values seen.
        num_units: units (features of a Linear output, channels of a Conv/BN output).
        mean, std, min, max: over all values (std is the population std).
        p15, p50, p85: percentiles (Ioffe & Szegedy Fig. 1), pooled over units.
        saturated_fraction: P(|z| > threshold) for sigmoid/tanh, else None.
        saturation_threshold: the |z| bound used (tanh: half the sigmoid's), or None.
        dead_fraction: share of units never positive over the probed batches, for
            relu/relu6, else None.
        active_fraction: P(z > 0), the activation probability.
    """

    activation: str
    count: int
    num_units: int
    mean: float
    std: float
    min: float
    max: float
    p15: float
    p50: float
    p85: float
    saturated_fraction: float | None
    saturation_threshold: float | None
    dead_fraction: float | None
    active_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerFlow:
    """What the probe measured at one layer.

    Attributes:
        name: qualified module name in the model (``model.get_submodule(name)``).
        kind: module class name, e.g. 'Linear', 'BatchNorm1d'.
        index: 1-based position in forward order among probed layers.
        depth: 1-based count of weight layers (Linear/Conv/Bilinear) up to this one;
            a normalization layer shares the depth of the weight layer before it.
        weight_norm: ‖W‖ (Frobenius) after the probe, or None without a weight.
        weight_grad_norm: ‖∂L/∂W‖, RMS over backward passes; None if none reached it.
        grad_weight_ratio: weight_grad_norm / weight_norm.
        input_grad_norm: ‖∂L/∂x‖ of the layer input, RMS over passes; None if the input
            did not require grad.
        input_grad_rms: ‖∂L/∂x‖/√numel(x), RMS over passes (per-element scale, comparable
            across layers of different widths and batch shapes).
        preact: statistics of the pre-activation this layer feeds, or None.
    """

    name: str
    kind: str
    index: int
    depth: int
    weight_norm: float | None
    weight_grad_norm: float | None
    grad_weight_ratio: float | None
    input_grad_norm: float | None
    input_grad_rms: float | None
    preact: PreactivationStats | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preact"] = None if self.preact is None else self.preact.to_dict()
        return d


@dataclass(frozen=True)
class FlowResult:
    """Everything :class:`GradientFlow` measured. ``layers`` are in forward order."""

    layers: list[LayerFlow]
    forward_passes: int
    backward_passes: int
    saturation_threshold: float
    unattached: dict[str, PreactivationStats] = field(default_factory=dict)

    def layer(self, name: str) -> LayerFlow:
        for rec in self.layers:
            if rec.name == name:
                return rec
        raise KeyError(f"no probed layer named {name!r}; probed: {[r.name for r in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.layers],
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "saturation_threshold": self.saturation_threshold,
            "unattached": {k: v.to_dict() for k, v in self.unattached.items()},
        }


class _SiteStats:
    """Running statistics of one pre-activation site."""

    def __init__(self, activation: str, unit_dim: int, max_samples: int, threshold: float):
        self.activation = activation
        self.unit_dim = unit_dim
        self.max_samples = max_samples
        self.threshold = threshold * SATURATING[activation] if activation in SATURATING else None
        self.count = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.saturated = 0
        self.positive = 0
        self.ever_active: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.num_sampled = 0

    @torch.no_grad()
    def add(self, z: torch.Tensor) -> None:
        z = z.detach()
        if z.numel() == 0:
            return
        zd = z.double()
        self.count += z.numel()
        self.sum += float(zd.sum())
        self.sumsq += float((zd * zd).sum())
        self.min = min(self.min, float(z.min()))
        self.max = max(self.max, float(z.max()))
        self.positive += int((z > 0).sum())
        if self.threshold is not None:
            self.saturated += int((z.abs() > self.threshold).sum())
        unit_dim = self.unit_dim % z.dim() if z.dim() > 1 else 0
        active = (z > 0).transpose(0, unit_dim).reshape(z.shape[unit_dim], -1).any(1)
        if z.dim() == 1:
            active = (z > 0).any().reshape(1)
        if self.ever_active is None or self.ever_active.shape != active.shape:
            self.ever_active = active
        else:
            self.ever_active |= active
        room = self.max_samples - self.num_sampled
        if room > 0:
            flat = z.reshape(-1).float().cpu()
            if flat.numel() > room:  # an even stride keeps every part of the batch
                flat = flat[torch.linspace(0, flat.numel() - 1, room).long()]
            self.samples.append(flat.clone())
            self.num_sampled += flat.numel()

    def result(self) -> PreactivationStats:
        n = self.count
        mean = self.sum / n
        var = max(self.sumsq / n - mean * mean, 0.0)
        q = quantiles(torch.cat(self.samples), (0.15, 0.5, 0.85))
        units = 0 if self.ever_active is None else int(self.ever_active.numel())
        dead = None
        if self.activation in DYING and units:
            dead = float((~self.ever_active).sum()) / units
        return PreactivationStats(
            activation=self.activation,
            count=n,
            num_units=units,
            mean=mean,
            std=math.sqrt(var),
            min=self.min,
            max=self.max,
            p15=q[0],
            p50=q[1],
            p85=q[2],
            saturated_fraction=None if self.threshold is None else self.saturated / n,
            saturation_threshold=self.threshold,
            dead_fraction=dead,
            active_fraction=self.positive / n,
        )


_FEATURES_LAST = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def quantiles(values: torch.Tensor, q: Sequence[float]) -> list[float]:
    """Quantiles of all values, linearly interpolated (``torch.quantile``'s and numpy's
    default definition), in float64. numpy's selection is O(n), ~20x faster than
    ``torch.quantile``'s sort on the 10⁵-value sites the probe sees."""
    import numpy as np

    flat = values.detach().reshape(-1).double().cpu().numpy()
    return np.quantile(flat, np.asarray(q, dtype=np.float64)).tolist()


def _unit_dim(layer: nn.Module | None) -> int:
    # Linear/Bilinear/LayerNorm put features last; Conv and BatchNorm use dim 1.
    return -1 if isinstance(layer, _FEATURES_LAST) else 1


def _fused_preactivation(module: nn.Module, inputs: tuple) -> torch.Tensor:
    """Re-run a fused norm+activation layer without its activation: z = γ·x̂ + β.

    The re-run sees the same input and mode; its buffer updates are undone so the probe
    leaves the running statistics exactly as the real forward left them.
    """
    saved = [(b, b.detach().clone()) for b in module.buffers(recurse=False)]
    activation = module.activation
    try:
        module.activation = None
        with torch.no_grad():
            return module.forward(*inputs)
    finally:
        module.activation = activation
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


class _Hooks:
    """Discovers layers and activation sites and owns every hook handle."""

    def __init__(self, model: nn.Module, layer_types: tuple[type[nn.Module], ...]):
        self.model = model
        self.handles: list[Any] = []
        self.layers = {
            m: name for name, m in model.named_modules() if isinstance(m, layer_types) and name
        }
        if isinstance(model, layer_types):
            self.layers[model] = ""
        self.acts = {
            m: (name, kind)
            for name, m in model.named_modules()
            if (kind := activation_kind(m)) is not None and m not in self.layers
        }
        self.order: list[nn.Module] = []  # layers in first-forward order
        self.last_layer: nn.Module | None = None
        self.consumer: dict[nn.Module, nn.Module] = {}  # layer -> activation module it feeds

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def on_layer(self, fn_after) -> None:
        """Register ``fn_after(module, inputs, output)`` on every layer; track order."""

        def hook(module, inputs, output):
            if module not in self.order:
                self.order.append(module)
            self.last_layer = module
            fn_after(module, inputs, output)

        for m in self.layers:
            self.handles.append(m.register_forward_hook(hook))

    def on_activation(self, fn_before) -> None:
        """Register ``fn_before(act_module, owner_layer_or_None, z)`` on activation modules."""

        def pre_hook(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                owner = self.last_layer
                if owner is not None:
                    # the first activation after a layer is the one it feeds
                    owner = owner if self.consumer.setdefault(owner, module) is module else None
                fn_before(module, owner, inputs[0])

        for m in self.acts:
            self.handles.append(m.register_forward_pre_hook(pre_hook))

    def reset_pass(self) -> None:
        self.last_layer = None


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
        self._hooks: _Hooks | None = None
        self._modes: list[tuple[nn.Module, bool]] = []
        self._reset()

    def _reset(self) -> None:
        self._sites: dict[nn.Module, _SiteStats] = {}
        self._unattached: dict[nn.Module, _SiteStats] = {}
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
        hooks = _Hooks(self.model, self.layer_types)
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

    def _install(self, hooks: _Hooks) -> None:
        model = self.model

        def root_pre(_module, _inputs):
            self._forward_passes += 1
            hooks.reset_pass()

        hooks.handles.append(model.register_forward_pre_hook(root_pre))

        def site_for(table: dict, key: nn.Module, kind: str, unit_dim: int) -> _SiteStats:
            site = table.get(key)
            if site is None:
                site = table[key] = _SiteStats(
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
                z = _fused_preactivation(module, inputs)
                site_for(self._sites, module, kind, _unit_dim(module)).add(z)
                hooks.consumer.setdefault(module, module)

        hooks.on_layer(after_layer)

        def before_activation(act, owner, z):
            _, kind = hooks.acts[act]
            if owner is not None:
                site_for(self._sites, owner, kind, _unit_dim(owner)).add(z)
            else:
                site_for(self._unattached, act, kind, _unit_dim(hooks.last_layer)).add(z)

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
    hooks = _Hooks(model, LAYER_TYPES)
    inputs, _ = split_batch(inputs, "preactivations")

    def after_layer(module, layer_inputs, _output):
        if activation_kind(module) is not None:
            captured[hooks.layers[module]] = _fused_preactivation(module, layer_inputs)
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
    dim = _unit_dim(module) % z.dim()
    if not 0 <= unit < z.shape[dim]:
        raise IndexError(
            f"unit_percentiles: unit must be in [0, {z.shape[dim]}) for layer {layer!r}, got {unit}"
        )
    return quantiles(z.select(dim, unit), q)
