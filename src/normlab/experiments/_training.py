"""What the experiments share: seeding, model builders, batch streams, one training loop,
evaluation, and layer probes.

Everything here is deterministic for a seed: weights come from the global RNG seeded inside
:func:`seeded` at construction, batches from a ``torch.Generator`` seeded by the caller, and
nothing reads the global RNG during training. Nothing prints or writes files; training
reports progress through the optional callback of :mod:`normlab.experiments.base`.

Models are plain ``torch.nn.Sequential`` stacks of ``Linear``/``Conv2d`` → optional norm
→ activation, so an experiment can find the k-th linear map, norm layer or activation by
type (see :func:`modules_of`). Normalization layers are normlab's own (:func:`norm_layer`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nlnn
from normlab import diagnostics
from normlab.data import Split
from normlab.experiments.base import Line, Progress, notify
from normlab.functional.batch_norm import NonFiniteStatisticsWarning


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG inside the block (for model construction and any sampling
    done there) and restore the caller's RNG state after it, so an experiment is
    deterministic for its seed and leaves no trace on the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# norm kind → the normlab.nn classes it needs (1-D/MLP form, 2-D/CNN form)
_NORM_CLASSES: dict[str, tuple[str, str]] = {
    "bn": ("BatchNorm1d", "BatchNorm2d"),
    "brn": ("BatchRenorm1d", "BatchRenorm2d"),
    "gn": ("GroupNorm", "GroupNorm"),
    "ln": ("LayerNorm", "LayerNorm"),
    "in": ("InstanceNorm2d", "InstanceNorm2d"),
}

NORM_NAMES = {
    "none": "no norm",
    "bn": "BatchNorm",
    "brn": "BatchRenorm",
    "gn": "GroupNorm",
    "ln": "LayerNorm",
    "in": "InstanceNorm",
    "bn-running": "BN, running stats",
}

# the two nets of a with/without-BN comparison, as plots and tables name them (forward order)
BN_LABELS = {"none": "without BN", "bn": "with BN"}


class RunningStatsNorm(nn.Module):
    """BatchNorm that normalises with its *running* statistics in training too.

    In training each batch still updates the running mean/variance (torch's EMA, momentum
    0.1), but the output is the eval-mode one, y = γ(x − μ_run)/sqrt(σ²_run + ε) + β, with
    μ_run, σ²_run constants for backward. The layer keeps BN's re-scaling but removes the
    per-batch noise of the statistics (and their gradient), which is the control the
    noise-regularisation experiment needs.
    """

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn(x)
        with torch.no_grad():
            self.bn(x)  # update the running statistics from this batch; output unused
        self.bn.eval()
        try:
            return self.bn(x)
        finally:
            self.bn.train()


def norm_layer(kind: str, num_features: int, *, image: bool = False, spatial=None, **kwargs):
    """A normalization layer over ``num_features`` channels, or None for ``kind='none'``.

    Args:
        kind: 'none', 'bn', 'bn-running' (:class:`RunningStatsNorm`), 'brn', 'gn', 'ln',
            'in'.
        image: the input is (N, C, H, W) rather than (N, C).
        spatial: (H, W) of the input, needed by 'ln' on images (LayerNorm over C·H·W).
        kwargs: passed to the layer (e.g. ``num_groups`` for 'gn', the renorm schedule).
    """
    if kind == "none":
        return None
    if kind == "bn-running":
        return RunningStatsNorm(norm_layer("bn", num_features, image=image, **kwargs))
    cls = getattr(nlnn, _NORM_CLASSES[kind][1 if image else 0])
    if kind == "gn":
        groups = kwargs.pop("num_groups", min(32, num_features))
        return cls(groups, num_features, **kwargs)
    if kind == "ln":
        shape = (num_features, *spatial) if image else (num_features,)
        return cls(shape, **kwargs)
    if kind == "in":
        kwargs.setdefault("affine", True)
        return cls(num_features, **kwargs)
    return cls(num_features, **kwargs)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}


def mlp(
    in_features: int,
    widths: Sequence[int],
    num_classes: int,
    *,
    norm: str = "none",
    activation: str = "sigmoid",
    bias: bool = True,
    init_std: float | None = None,
    init_classifier: bool = False,
    generator: torch.Generator | None = None,
    norm_kwargs: dict | None = None,
) -> nn.Sequential:
    """Linear → [norm] → activation for each width, then a Linear classifier.

    The norm sits between the linear map and the activation, where Ioffe & Szegedy (2015)
    and docs/sources.md#seed-000 put it.

    Args:
        bias: whether the hidden Linear layers have a bias (the classifier always has one).
            True by default even with a norm after them, so that a plain and a normalised
            net built from the same seed share every weight; False for a layer whose
            output BN must see as exactly W·x (scale invariance), and note that a bias
            draws from the RNG, so the two choices give different weights for one seed.
        init_std: if given, hidden weights are N(0, init_std² / fan_in) and biases 0
            (init_std = 1 is LeCun's init); None keeps torch's default
            U(±1/sqrt(fan_in)).
        init_classifier: give the classifier the same N(0, init_std² / fan_in) weights and
            zero bias (the demo's network); by default it keeps torch's init.
        generator: draw the ``init_std`` weights from this generator instead of the global
            RNG (construction still draws torch's default init from the global RNG, which
            these weights then replace), so the weights depend on the generator alone.
    """

    def init(linear: nn.Linear) -> nn.Linear:
        if init_std is not None:
            std = init_std / math.sqrt(linear.in_features)
            nn.init.normal_(linear.weight, 0.0, std, generator=generator)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        return linear

    layers: list[nn.Module] = []
    fan_in = in_features
    for width in widths:
        linear = init(nn.Linear(fan_in, width, bias=bias))
        layers.append(linear)
        n = norm_layer(norm, width, **(norm_kwargs or {}))
        if n is not None:
            layers.append(n)
        layers.append(_ACTIVATIONS[activation]())
        fan_in = width
    classifier = nn.Linear(fan_in, num_classes)
    layers.append(init(classifier) if init_classifier else classifier)
    return nn.Sequential(*layers)


def mlp_widths(in_features: int, widths: Sequence[int], num_classes: int) -> str:
    """An MLP's layer widths as the reports write them: '64-128-128-10'."""
    return "-".join(map(str, (in_features, *widths, num_classes)))


def small_cnn(
    num_classes: int = 10,
    *,
    channels: Sequence[int] = (16, 32, 32),
    norm: str = "bn",
    image_size: int = 8,
    strides: Sequence[int] = (1, 2, 1),
    norm_kwargs: dict | None = None,
    pool: str = "avg",
    hidden: Sequence[int] = (),
) -> nn.Sequential:
    """A small CNN for 1×8×8 digits: 3×3 conv (padding 1, the given strides) → [norm] →
    ReLU blocks, then global average pooling (``pool='avg'``) or the last feature map
    flattened (``pool='flatten'``), then fully connected Linear → [norm] → ReLU blocks of the
    widths ``hidden`` (none by default), then a Linear classifier. Convolutions and hidden
    Linear layers have no bias when a norm follows (its β plays that role).

    In the hidden Linear layers the norm takes its 1-D form (BatchNorm1d: each feature over
    the batch alone, one value per sample; GroupNorm and LayerNorm over features). Instance
    norm is undefined there — a sample's feature is a single value, whose own mean it
    equals — so ``norm='in'`` leaves those layers unnormalised (with a bias).
    """
    if pool not in ("avg", "flatten"):
        raise ValueError(f"small_cnn: pool must be 'avg' or 'flatten', got {pool!r}")
    layers: list[nn.Module] = []
    in_ch, size = 1, image_size
    for out_ch, stride in zip(channels, strides, strict=True):
        layers.append(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=norm == "none"))
        size = (size + 2 - 3) // stride + 1
        n = norm_layer(norm, out_ch, image=True, spatial=(size, size), **(norm_kwargs or {}))
        if n is not None:
            layers.append(n)
        layers.append(nn.ReLU())
        in_ch = out_ch
    if pool == "avg":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = in_ch
    else:
        layers.append(nn.Flatten())
        features = in_ch * size * size
    for width in hidden:
        n = None if norm == "in" else norm_layer(norm, width, **(norm_kwargs or {}))
        layers.append(nn.Linear(features, width, bias=n is None))
        if n is not None:
            layers.append(n)
        layers.append(nn.ReLU())
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def modules_of(model: nn.Module, *types: type) -> list[nn.Module]:
    """The submodules of ``model`` that are instances of ``types``, in forward order."""
    return [m for m in model.modules() if isinstance(m, types)]


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy the weights of src's Linear/Conv layers into dst's, in order (same shapes):
    a plain and a normalised net then start from the same initialisation."""
    kinds = (nn.Linear, nn.Conv2d)
    pairs = list(zip(modules_of(src, *kinds), modules_of(dst, *kinds), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            b.weight.copy_(a.weight)
            if a.bias is not None and b.bias is not None:
                b.bias.copy_(a.bias)


# -- batches ---------------------------------------------------------------------------


def iid_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation of range(n) per epoch, the last
    incomplete batch of each epoch dropped."""
    if not 0 < batch_size <= n:
        raise ValueError(f"iid_batches: batch_size must be in [1, {n}], got {batch_size}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def class_grouped_batches(
    y: torch.Tensor, classes_per_batch: int, per_class: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless non-i.i.d. index batches: each holds ``per_class`` examples of each of
    ``classes_per_batch`` random classes (Ioffe 2017 §4.3 used 16 classes × 2 images), so
    a batch's statistics differ systematically from the population's."""
    classes = torch.unique(y)
    if not 0 < classes_per_batch <= len(classes):
        raise ValueError(
            f"class_grouped_batches: classes_per_batch must be in [1, {len(classes)}], got "
            f"{classes_per_batch}"
        )
    pools = [torch.nonzero(y == c).flatten() for c in classes]
    cursors = [0] * len(pools)
    orders = [p[torch.randperm(len(p), generator=generator)] for p in pools]
    while True:
        chosen = torch.randperm(len(classes), generator=generator)[:classes_per_batch]
        parts = []
        for c in chosen.tolist():
            if cursors[c] + per_class > len(orders[c]):
                orders[c] = pools[c][torch.randperm(len(pools[c]), generator=generator)]
                cursors[c] = 0
            parts.append(orders[c][cursors[c] : cursors[c] + per_class])
            cursors[c] += per_class
        yield torch.cat(parts)


# -- evaluation and training ------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (running statistics) inside the block; its mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct argmax predictions in eval mode, mode restored."""
    with eval_mode(model):
        return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode cross-entropy, mode restored."""
    with eval_mode(model):
        return float(F.cross_entropy(model(x), y))


@dataclass
class History:
    """A training run: loss per step, and accuracies at the evaluation steps."""

    loss: list[float] = field(default_factory=list)  # training-batch loss per finite step
    eval_steps: list[int] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)  # eval mode, full train set
    test_accuracy: list[float] = field(default_factory=list)  # eval mode, test set
    diverged: bool = False  # a non-finite loss stopped the run

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1] if self.test_accuracy else float("nan")

    @property
    def final_train_accuracy(self) -> float:
        return self.train_accuracy[-1] if self.train_accuracy else float("nan")

    def accuracy_line(self, label: str, style: str = "-") -> Line:
        """The run's test-accuracy curve (against the evaluation steps) as a plot line."""
        return Line(label, self.eval_steps, self.test_accuracy, style)


def train(
    model: nn.Module,
    data: Split,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    weight_decay_on: str = "all",
    cosine_decay: bool = False,
    seed: int = 0,
    eval_every: int = 0,
    batch_stream: Iterator[torch.Tensor] | None = None,
    on_eval: Callable[[int, nn.Module], None] | None = None,
    on_gradient: Callable[[int, nn.Module], None] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    progress: Progress | None = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
    label: str = "training",
) -> History:
    """Minibatch SGD (with momentum) on cross-entropy; deterministic for ``seed``.

    Batches come from ``batch_stream`` or :func:`iid_batches` with a generator seeded by
    ``seed``. Evaluates (eval mode) on the whole train and test sets at step 0, every
    ``eval_every`` steps (0: only at the start and the end) and after the last step,
    calling ``on_eval(step, model)`` each time. A non-finite loss stops the run with
    ``diverged=True``. ``on_gradient(step, model)`` runs after the backward pass, before the
    update (gradients in ``.grad``, weights not yet moved); ``on_step(step, model)`` after
    the update. Steps count from 1. L2 ``weight_decay`` applies to every parameter
    (``weight_decay_on='all'``) or only to weight matrices and kernels (``'weights'``: ndim
    ≥ 2, not biases or a norm's γ, β). ``progress`` gets fractions mapped into
    ``progress_span``. With ``cosine_decay`` the rate follows lr·(1 + cos(π·t/steps))/2,
    reaching 0 at the last step (Loshchilov & Hutter 2017), so the final weights are not a
    noisy snapshot of a constant-rate walk.
    """
    gen = torch.Generator().manual_seed(seed)
    stream = batch_stream or iid_batches(len(data.x_train), batch_size, gen)
    if weight_decay_on == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    elif weight_decay_on == "weights":
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    else:
        raise ValueError(
            f"train: weight_decay_on must be 'all' or 'weights', got {weight_decay_on!r}"
        )
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine_decay else None
    hist = History()
    lo, hi = progress_span
    report_every = max(1, steps // 20)

    def evaluate(step: int) -> None:
        hist.eval_steps.append(step)
        hist.train_accuracy.append(accuracy(model, data.x_train, data.y_train))
        hist.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        if on_eval is not None:
            on_eval(step, model)

    model.train()
    with warnings.catch_warnings():
        # a run at a learning rate too large for the net is an expected outcome of some
        # experiments; the BN layers' warning about its non-finite batch is not news
        warnings.simplefilter("ignore", NonFiniteStatisticsWarning)
        evaluate(0)
        for step in range(1, steps + 1):
            idx = next(stream)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                hist.diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if on_gradient is not None:
                on_gradient(step, model)
            opt.step()
            if sched is not None:
                sched.step()
            hist.loss.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, model)
            if eval_every and step % eval_every == 0 and step != steps:
                evaluate(step)
            if step % report_every == 0 or step == steps:
                notify(progress, lo + (hi - lo) * step / steps, f"{label}: step {step}/{steps}")
        # a diverged model is evaluated as it is (non-finite logits score about chance)
        evaluate(len(hist.loss) if hist.diverged else steps)
    return hist


SGD_FIELDS = ("steps", "lr", "batch_size", "momentum", "seed")


def train_as(config, model: nn.Module, data: Split, **kwargs) -> History:
    """:func:`train` with an experiment config's SGD settings: each of :data:`SGD_FIELDS` not
    given in ``kwargs`` is read from the config field of that name, so a config that names one
    differently (or an experiment that varies it) passes it explicitly."""
    settings = {k: getattr(config, k) for k in SGD_FIELDS if k not in kwargs}
    return train(model, data, **settings, **kwargs)


@dataclass
class LayerProbe:
    """Per hidden layer k (the k-th Linear/Conv and the activation after it), on one batch
    in training mode: the weight-gradient norm ‖∂L/∂W_k‖ and the activation's input z_k."""

    grad_norm: list[float]
    saturated_fraction: list[float]  # share of |z| > threshold (sigmoid/tanh sites)
    z_min: list[float]
    z_max: list[float]


def probe_layers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, saturation: float = 5.0
) -> LayerProbe:
    """:func:`normlab.diagnostics.gradient_flow` on (x, y) in training mode (batch
    statistics; running statistics, modes and ``.grad`` untouched), reduced to one entry
    per hidden layer: layers followed by an activation, not the classifier."""
    flow = diagnostics.gradient_flow(model, (x, y), training=True, saturation_threshold=saturation)
    sites = [rec.preact for rec in flow.layers if rec.preact is not None]
    weights = [rec for rec in flow.layers if rec.kind in ("Linear", "Conv2d")][: len(sites)]
    return LayerProbe(
        grad_norm=[rec.weight_grad_norm for rec in weights],
        saturated_fraction=[site.saturated_fraction or 0.0 for site in sites],
        z_min=[site.min for site in sites],
        z_max=[site.max for site in sites],
    )


def unit_percentiles(
    model: nn.Module, x: torch.Tensor, q: Sequence[float] = (0.15, 0.50, 0.85)
) -> list[list[float]]:
    """Percentiles over the batch x of every unit of the last hidden layer's activation
    input, in training mode (running statistics untouched): ``[unit][len(q)]``.

    One no-grad forward through :func:`normlab.diagnostics.preactivations`; all units at
    once (``diagnostics.unit_percentiles`` takes one unit per forward).
    """
    pre = diagnostics.preactivations(model, x, training=True)
    z = list(pre.values())[-1]  # forward order: the last activation site
    per_unit = z.transpose(0, 1).reshape(z.shape[1], -1).double()  # (C, N·spatial)
    return torch.quantile(per_unit, torch.tensor(list(q), dtype=torch.float64), dim=1).T.tolist()
