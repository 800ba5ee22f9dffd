"""Test-time adaptation of BN statistics: AdaBN and prior-weighted mixing.

Under covariate shift, eval-mode BN normalises test data with training statistics and
its output mean becomes γ(m_test − μ_pop)/sqrt(σ²_pop + ε) + β instead of β
(docs/sources.md#seed-002).
Re-estimating the statistics on the test batches closes the gap:

- ``mode='batch'`` (AdaBN, Li et al. 2016, "Revisiting Batch Normalization For Practical
  Domain Adaptation"): each test batch is normalised with its own statistics (over the
  whole batch, per rank), but the stored running statistics and ``num_batches_tracked``
  are never touched. For plain BatchNorm this is exactly BN's training-mode forward, so
  gradients flow through the statistics (TENT-style entropy minimisation can
  back-propagate through it); for ghost BN, batch renorm and SyncBatchNorm — whose
  training forwards are something else — the batch statistics are substituted into the
  eval forward and are constants in backward.
- ``mode='mix'`` (Schneider et al. 2020, "Improving robustness against common corruptions
  by covariate shift adaptation", eq. 1): with n the number of samples in the test batch
  and N = ``prior``,

      μ = N/(N+n) · μ_s + n/(N+n) · μ_t,    σ² = N/(N+n) · σ²_s + n/(N+n) · σ²_t

  where μ_s, σ²_s are the stored (source) statistics and μ_t, σ²_t the batch's (biased
  variance, as BN's training forward uses). ``prior=0`` is 'batch'; ``prior → ∞`` is plain
  eval. The mixed statistics are constants in backward.

Both apply per forward call and leave every stored buffer bit-identical: the layer's
forward runs with substituted flags/tensors and the originals are put back by a forward
hook that runs even if the forward raises.
"""

from __future__ import annotations

import torch
from torch import nn

import normlab.nn as nlnn
from normlab.functional._checks import is_finite_nonnegative
from normlab.functional.stats import moments
from normlab.tools._common import batch_norm_layers, channel_dim, tracks_stats

MODES = ("batch", "mix")
_SAVED = "_normlab_adapt_saved"


def _population_stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # normlab layers may de-bias their EMA for eval; use what eval mode would use.
    if hasattr(module, "population_stats"):
        return module.population_stats()
    return module.running_mean, module.running_var


def _plain_classes() -> tuple[type, ...]:
    """Layers whose training forward is exactly 'normalise with this batch's statistics'
    (so 'batch' mode can use it, gradients through the statistics included). Ghost BN
    (chunks), batch renorm (r, d against the running statistics) and SyncBatchNorm
    (statistics of all ranks, a collective per call) are not; for them 'batch' mode
    substitutes the batch's statistics into their eval forward instead."""
    return (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nlnn.BatchNorm,
        nlnn.BatchNorm1d,
        nlnn.BatchNorm2d,
        nlnn.BatchNorm3d,
    )


def _stack(module: nn.Module) -> list:
    return module.__dict__.setdefault(_SAVED, [])


def _batch_pre_hook(module: nn.Module, args):
    _stack(module).append(("batch", module.training, module.track_running_stats))
    # Training-mode forward without buffers: batch statistics, nothing stored.
    module.training = True
    module.track_running_stats = False


def _make_mix_pre_hook(prior: float):
    def hook(module: nn.Module, args):
        x = args[0]
        c = channel_dim(module) % x.dim()
        dims = tuple(d for d in range(x.dim()) if d != c)
        n = x.shape[0]  # samples in the test batch (Schneider et al.'s n)
        source_mean, source_var = _population_stats(module)
        with torch.no_grad():
            if x.numel() == 0:
                mean, var = source_mean, source_var
            else:
                batch_mean, batch_var = moments(x.detach(), dims)
                dtype = batch_mean.dtype if source_mean is None else source_mean.dtype
                mean, var = batch_mean.to(dtype), batch_var.to(dtype)
                w_source = prior / (prior + n)
                if w_source > 0:  # prior 0 needs no source (layers without buffers too)
                    mean = w_source * source_mean + (1 - w_source) * mean
                    var = w_source * source_var + (1 - w_source) * var
        saved = (
            "mix",
            module.training,
            module.running_mean,
            module.running_var,
            getattr(module, "ema_debias", None),
        )
        _stack(module).append(saved)
        module.training = False
        # Substitute the tensors (the originals are kept aside untouched, not overwritten).
        module.running_mean = mean
        module.running_var = var
        if saved[4] is not None:
            module.ema_debias = False  # the mixed statistics are already what eval must use

    return hook


def _restore_hook(module: nn.Module, args, output):
    stack = module.__dict__.get(_SAVED)
    if not stack:
        return
    saved = stack.pop()
    if saved[0] == "batch":
        _, module.training, module.track_running_stats = saved
    else:
        _, module.training, module.running_mean, module.running_var, debias = saved
        if debias is not None:
            module.ema_debias = debias


class Adaptation:
    """Handle returned by :func:`adapt`: ``remove()`` ends the adaptation; also a context
    manager (``with adapt(model): ...``) whose exit calls ``remove()``."""

    def __init__(self, model: nn.Module, handles: list) -> None:
        self.model = model
        self._handles = handles

    def remove(self) -> None:
        """Stop adapting; the model behaves exactly as before :func:`adapt`. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        self.remove()


def adapt(model: nn.Module, mode: str = "batch", prior: float = 16) -> Adaptation:
    """Adapt every BN layer of ``model`` to the statistics of each test batch, without
    changing any stored statistic.

    Args:
        model: any module with torch or normlab BatchNorm layers (typically in eval mode;
            the adapted layers behave as described in either mode).
        mode: 'batch' (AdaBN: each batch's own statistics) or 'mix' (Schneider et al.
            2020: source and batch statistics blended with weights N/(N+n), n/(N+n)).
        prior: N, the weight of the source statistics in samples ('mix' only). Default 16,
            the paper's choice for ResNet-50 on ImageNet-C at batch size 1-64.

    Returns:
        An :class:`Adaptation`; the model is adapted from this call on (it **mutates** the
        model by adding forward hooks) until ``.remove()`` or the end of a ``with`` block::

            with nl.adapt(model, mode="mix", prior=16):
                logits = model(test_batch)
            handle = nl.adapt(model)      # function form
            ...; handle.remove()

    A batch of one sample per channel value in 'batch' mode raises as in BN training
    (its variance is undefined); use 'mix' with ``prior > 0`` for single samples.
    """
    if mode not in MODES:
        raise ValueError(
            f"adapt: mode must be one of {MODES}, got {mode!r}: 'batch' normalises with each "
            f"test batch's statistics (AdaBN), 'mix' blends them with the stored ones."
        )
    if not is_finite_nonnegative(prior):
        raise ValueError(
            f"adapt: prior must be a finite number >= 0 (the source statistics' weight in "
            f"samples; 0 means batch statistics only), got {prior!r}"
        )
    layers = batch_norm_layers(model)
    if mode == "mix":
        untracked = [name for name, m in layers if not tracks_stats(m)]
        if untracked:
            raise ValueError(
                f"adapt: mode='mix' blends stored statistics with the batch's, but layers "
                f"{untracked} have none (track_running_stats=False); use mode='batch'."
            )
    substitute = _make_mix_pre_hook(float(prior) if mode == "mix" else 0.0)
    handles = []
    for _, m in layers:
        pre = _batch_pre_hook if mode == "batch" and type(m) in _plain_classes() else substitute
        handles.append(m.register_forward_pre_hook(pre))
        # prepend + always_call: restores run first-registered-last and even on errors, so
        # adapt composes with freeze() and leaves the layer exactly as it found it.
        handles.append(m.register_forward_hook(_restore_hook, always_call=True, prepend=True))
    return Adaptation(model, handles)
