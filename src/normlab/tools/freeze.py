"""Freeze BN statistics and/or affine parameters so that they stay frozen through
``model.train()`` and optimizer steps.

torch's usual recipe, ``bn.eval()``, is undone by the next ``model.train()`` (every
training loop calls it), and ``requires_grad_(False)`` alone leaves the running
statistics moving. :func:`freeze` makes both stick, for torch's and normlab's BN layers.

How (and why this way): a frozen-statistics layer gets a forward pre-hook that runs its
forward in eval mode (normalise with the running statistics, update nothing) and a
forward hook (``always_call``, so it runs even if the forward raises) that puts its
``training`` flag back. The alternative, swapping layers for ``FrozenBatchNorm``, changes
module types and state_dict layout, cannot keep γ/β trainable while the statistics are
frozen, and needs a different class per rank; a flag read by normlab's forward would not
reach ``torch.nn.BatchNorm2d`` layers in the same model. The hooks work for both, keep
the state_dict unchanged, and survive ``copy.deepcopy`` and pickling of the model (they
are module-level functions; the state lives in an attribute of the layer). They are not
part of the state_dict: after loading weights into a fresh model, call :func:`freeze`
again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from normlab.tools._common import batch_norm_layers, remove_hooks_by_id, tracks_stats

_STATE = "_normlab_freeze"
_SAVED_TRAINING = "_normlab_freeze_training"


@dataclass
class FreezeState:
    """What :func:`freeze` did to one layer, so :func:`unfreeze` can undo exactly that."""

    stats_hooks: tuple[int, int] | None = None  # (pre-hook id, forward-hook id)
    requires_grad: dict[str, bool] = field(default_factory=dict)  # before affine freeze

    @property
    def stats(self) -> bool:
        return self.stats_hooks is not None

    @property
    def affine(self) -> bool:
        return bool(self.requires_grad)


def freeze_state(module: nn.Module) -> FreezeState | None:
    """The layer's :class:`FreezeState`, or None if it was never frozen."""
    return module.__dict__.get(_STATE)


def stats_frozen(module: nn.Module) -> bool:
    """True when ``module``'s statistics were frozen by :func:`freeze`."""
    state = freeze_state(module)
    return state is not None and state.stats


def _eval_forward_pre_hook(module: nn.Module, args):
    module.__dict__[_SAVED_TRAINING] = module.training
    module.training = False


def _restore_training_hook(module: nn.Module, args, output):
    if _SAVED_TRAINING in module.__dict__:
        module.training = module.__dict__.pop(_SAVED_TRAINING)


def _affine_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {
        name: p
        for name in ("weight", "bias")
        if isinstance(p := getattr(module, name, None), nn.Parameter)
    }


def freeze(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every BN layer of ``model`` **in place**; returns ``model`` for chaining.

    Args:
        model: any module; each ``torch.nn``/normlab BatchNorm inside it (or ``model``
            itself) is frozen.
        stats: normalise with the running statistics and never update them, in training
            mode too (``model.train()`` does not undo it): BN's eval-mode map
            y = γ (x − running_mean)/sqrt(running_var + ε) + β, gradients still flowing to
            x (and to γ, β unless ``affine``). ``num_batches_tracked`` stays put.
        affine: set ``requires_grad=False`` on γ and β, so optimizers skip them (an
            optimizer step with weight decay or momentum leaves them bit-identical); the
            previous flags are remembered for :func:`unfreeze`.

    What is False is left as it is (``freeze(m, stats=False)`` does not unfreeze frozen
    statistics; use :func:`unfreeze`). Freezing twice is harmless.

    Raises:
        ValueError: ``stats=True`` on a layer without running statistics
            (``track_running_stats=False``): it has nothing to freeze to.

    This is the behaviour of detectron2/torchvision's ``FrozenBatchNorm2d`` (Wu et al.),
    without changing module types; with ``affine=False`` it is "BN in eval mode with
    trainable γ, β", common when fine-tuning on small batches.
    """
    layers = batch_norm_layers(model)
    if stats:
        untracked = [name for name, m in layers if not tracks_stats(m)]
        if untracked:
            raise ValueError(
                f"freeze: layers {untracked} have no running statistics "
                f"(track_running_stats=False), so their statistics cannot be frozen; use "
                f"freeze(model, stats=False) to freeze only their affine parameters, or "
                f"recalibrate them first after enabling track_running_stats."
            )
    for _, m in layers:
        state = m.__dict__.setdefault(_STATE, FreezeState())
        if stats and state.stats_hooks is None:
            pre = m.register_forward_pre_hook(_eval_forward_pre_hook)
            # prepend: hooks registered later (adapt) restore first, so restores run LIFO
            post = m.register_forward_hook(_restore_training_hook, always_call=True, prepend=True)
            state.stats_hooks = (pre.id, post.id)
        if affine and not state.requires_grad:
            params = _affine_params(m)
            state.requires_grad = {name: p.requires_grad for name, p in params.items()}
            for p in params.values():
                p.requires_grad_(False)
        if not state.stats and not state.affine:
            del m.__dict__[_STATE]
    return model


def unfreeze(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Undo :func:`freeze` **in place**; returns ``model``.

    ``stats=True`` removes the eval-mode hooks (the layer follows ``model.train()`` /
    ``.eval()`` again, with its current ``training`` flag); ``affine=True`` restores the
    ``requires_grad`` flags γ and β had before :func:`freeze`. Layers never frozen are
    left alone.
    """
    for _, m in batch_norm_layers(model):
        state = freeze_state(m)
        if state is None:
            continue
        if stats and state.stats_hooks is not None:
            remove_hooks_by_id(m, *state.stats_hooks)
            m.__dict__.pop(_SAVED_TRAINING, None)
            state.stats_hooks = None
        if affine and state.requires_grad:
            params = _affine_params(m)
            for name, flag in state.requires_grad.items():
                if name in params:
                    params[name].requires_grad_(flag)
            state.requires_grad = {}
        if not state.stats and not state.affine:
            del m.__dict__[_STATE]
    return model
