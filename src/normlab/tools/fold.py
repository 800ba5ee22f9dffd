"""Fold eval-mode BatchNorm layers into neighbouring Conv/ConvTranspose/Linear layers.

A deployed model does not need its BN layers: in eval mode each is a per-channel affine
map, which merges into the linear layer next to it (formulas and exactness conditions:
:mod:`normlab.functional.fold`). :func:`fold` finds the pairs, folds what can be folded
exactly, and reports the rest.

Finding pairs. The model's forward is traced with ``torch.fx`` (BN, Conv, Linear and
normlab modules as leaves), which shows real data flow: a BN is folded into the layer
that produces its input when that layer's output goes nowhere else, or else into the
layer that consumes its output when the BN's output goes nowhere else (a BN whose output
also feeds a residual add, or a module called twice, is left alone). If the forward
cannot be traced (data-dependent control flow), adjacent children of every
``nn.Sequential`` are used instead — a Sequential's forward chains them by construction.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from normlab.functional.fold import fold_weights, shift_is_zero
from normlab.tools._common import (
    channel_dim,
    is_batch_norm,
    is_frozen_batch_norm,
    set_submodule,
)

_WHERE = "fold"
_ACTIVATION_MODULES = {
    "relu": lambda bn: nn.ReLU(),
    "leaky_relu": lambda bn: nn.LeakyReLU(bn.negative_slope),
    "sigmoid": lambda bn: nn.Sigmoid(),
    "tanh": lambda bn: nn.Tanh(),
    "silu": lambda bn: nn.SiLU(),
}


class Unfolded(NamedTuple):
    """A BN layer :func:`fold` left in place, and why."""

    name: str
    reason: str


class FoldResult(NamedTuple):
    """``model``: the folded copy; ``unfolded``: the BN layers still in it.
    Unpacks as ``model, unfolded = fold(m)``."""

    model: nn.Module
    unfolded: list[Unfolded]


class _Pair(NamedTuple):
    bn: str
    layer: str
    bn_first: bool


def _is_foldable_layer(m: nn.Module) -> bool:
    return isinstance(m, (_ConvNd, nn.Linear)) and not isinstance(
        m.weight, nn.parameter.UninitializedParameter
    )


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


class _Tracer(fx.Tracer):
    """Keeps BN/Conv/Linear (and any normlab module) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            is_batch_norm(m)
            or is_frozen_batch_norm(m)
            or _is_foldable_layer(m)
            or type(m).__module__.startswith("normlab.")
            or super().is_leaf_module(m, qualname)
        )


def _bn_stats(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(bn, "population_stats"):  # normlab: what eval mode uses (EMA de-biasing)
        return bn.population_stats()
    return bn.running_mean, bn.running_var


def _bn_problem(bn: nn.Module) -> str | None:
    """Why this BN cannot be folded at all, or None."""
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False): eval mode uses batch statistics"
    if channel_dim(bn) != 1:
        return f"channel_dim={channel_dim(bn)}: only channels at dim 1 fold into Conv/Linear"
    return None


def _zero_padded(conv: _ConvNd) -> bool:
    # _reversed_padding_repeated_twice holds the resolved amounts, 'same' included.
    return conv.padding_mode == "zeros" and any(
        p != 0 for p in conv._reversed_padding_repeated_twice
    )


def _pair_problem(bn: nn.Module, layer: nn.Module, bn_first: bool, ranks: dict) -> str | None:
    """Why folding ``bn`` into ``layer`` (on the given side) would not be exact, or None."""
    c = _in_channels(layer) if bn_first else _out_channels(layer)
    if c != bn.num_features:
        return f"channel count {bn.num_features} does not match {type(layer).__name__} ({c})"
    if isinstance(layer, nn.Linear) and ranks.get(id(bn), 2) != 2:
        return f"its input is {ranks[id(bn)]}-D: BN normalises dim 1, Linear acts on the last dim"
    if not bn_first:
        return None
    if getattr(bn, "activation", None) is not None:
        return f"its fused activation {bn.activation!r} sits between it and the next layer"
    if isinstance(layer, nn.Linear):
        return None
    mean, var = _bn_stats(bn)
    if shift_is_zero(mean, var, bn.eps, bn.weight, bn.bias):
        return None
    if isinstance(layer, _ConvTransposeNd):
        return "precedes a ConvTranspose with a non-zero shift β − μγ/σ (not expressible as a bias)"
    if _zero_padded(layer):
        return (
            "precedes a zero-padded convolution: its shift β − μγ/σ would be missing at the "
            "padded borders (exact only without padding or with reflect/replicate/circular)"
        )
    return None


def _try_pair(plan, taken, why, bn_name, bn, layer_name, layer, bn_first, ranks) -> bool:
    """Plan folding ``bn`` into ``layer`` (before it if ``bn_first``) and return True, unless
    the fold would not be exact (the reason is appended to ``why``) or that side of the
    layer already absorbs a BN (``taken``: ``(layer name, 'in' | 'out')``)."""
    if (p := _pair_problem(bn, layer, bn_first, ranks)) is not None:
        why.append(p)
        return False
    key = (layer_name, "in" if bn_first else "out")
    if key in taken:
        return False
    plan.append(_Pair(bn_name, layer_name, bn_first))
    taken.add(key)
    return True


def _plan_from_graph(model, graph, bns, ranks, reasons) -> list[_Pair]:
    modules = dict(model.named_modules())
    calls: dict[int, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])].append(node)
    plan, taken = [], set()  # taken: (layer name, side) already absorbing a BN
    for name, bn in bns:
        nodes = calls.get(id(bn), [])
        if len(nodes) != 1:
            reasons[name] = (
                "not called in the traced forward" if not nodes else f"called {len(nodes)} times"
            )
            continue
        node = nodes[0]
        src = node.args[0] if node.args else None
        why = []
        # 1. BN after a layer: its input comes straight from a Conv/Linear used only here.
        if isinstance(src, fx.Node) and src.op == "call_module":
            layer = modules[src.target]
            if not _is_foldable_layer(layer):
                why.append(f"follows {type(layer).__name__}, not a Conv/Linear")
            elif len(calls[id(layer)]) != 1:
                why.append(f"follows {src.target!r}, which is called more than once")
            elif len(src.users) != 1:
                why.append(f"follows {src.target!r}, whose output is also used elsewhere")
            elif _try_pair(plan, taken, why, name, bn, src.target, layer, False, ranks):
                continue
        else:
            why.append("its input does not come from a module")
        # 2. BN before a layer: its output goes only into a Conv/Linear's input.
        users = list(node.users)
        if len(users) != 1:
            why.append(f"its output has {len(users)} consumers (e.g. a residual add)")
        else:
            user = users[0]
            layer = modules.get(user.target) if user.op == "call_module" else None
            if layer is None or not _is_foldable_layer(layer):
                why.append("its output does not go into a Conv/Linear")
            elif len(calls[id(layer)]) != 1 or user.args[:1] != (node,):
                why.append(f"precedes {user.target!r}, which is called more than once")
            elif _try_pair(plan, taken, why, name, bn, user.target, layer, True, ranks):
                continue
        reasons[name] = "; ".join(why)
    return plan


def _plan_from_sequentials(model, bns, ranks, reasons, trace_error) -> list[_Pair]:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {id(m): name for name, m in bns}
    plan, placed, taken = [], set(), set()
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        prefix = f"{seq_name}." if seq_name else ""
        for i, (_, m) in enumerate(children):
            if id(m) not in names or id(m) in placed or uses[id(m)] != 1:
                continue
            for j, bn_first in ((i - 1, False), (i + 1, True)):
                if not 0 <= j < len(children):
                    continue
                lname, layer = children[j]
                if (
                    _is_foldable_layer(layer)
                    and uses[id(layer)] == 1
                    and _try_pair(
                        plan, taken, [], names[id(m)], m, prefix + lname, layer, bn_first, ranks
                    )
                ):
                    placed.add(id(m))
                    break
    for name, bn in bns:
        if id(bn) not in placed:
            reasons[name] = (
                f"the model could not be traced by torch.fx ({trace_error}), and the BN is not "
                f"next to a foldable Conv/Linear inside an nn.Sequential"
            )
    return plan


def _record_ranks(model, example_inputs, bns) -> dict[int, int]:
    ranks: dict[int, int] = {}

    def hook(module, args):
        ranks.setdefault(id(module), args[0].dim())

    handles = [bn.register_forward_pre_hook(hook) for _, bn in bns]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _leaves(o)]
    return []


def fold(model: nn.Module, example_inputs=None, *, rtol: float = 1e-5) -> FoldResult:
    """A copy of ``model`` with every BN that directly follows or precedes a Conv1d/2d/3d,
    ConvTranspose1d/2d/3d or Linear folded into it; the original is not changed.

    Args:
        model: a module in eval mode (every submodule): folding bakes in the running
            statistics, which only eval mode uses.
        example_inputs: optional input (or tuple of inputs) to ``model``. When given, the
            folded model is checked on it — max |y_folded − y| ≤ rtol · max |y| for every
            output tensor, else ``RuntimeError`` — and the input ranks are recorded, so a BN
            next to a Linear is folded only on 2-D (N, C) data. Without it, BN1d next to a
            Linear is assumed to see (N, C) data (as ``torch.nn.utils.fusion`` assumes).
        rtol: tolerance of that check.

    Returns:
        :class:`FoldResult` ``(model, unfolded)``: the folded copy (same class; folded BN
        layers replaced by ``nn.Identity``, or by their fused activation module for
        normlab layers with ``activation=...``), and the BN layers left in place, each with
        the reason (output used twice, zero-padded conv after it, no running statistics…).

    Raises:
        ValueError: the model (or a submodule) is in training mode.

    Folding happens in float64 and rounds once to the layer's dtype. Every torch and
    normlab BatchNorm folds (SyncBatchNorm, batch renorm and ghost BN too: their eval map
    is BN's), and so does ``FrozenBatchNorm``; so does a BN frozen with
    :func:`normlab.freeze`.
    """
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (" ..." if len(training) > 5 else "")
        raise ValueError(
            f"{_WHERE}: the model must be in eval mode (folding uses the running statistics, "
            f"which training mode ignores); modules in training mode: {shown}. Call "
            f"model.eval() first."
        )
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    bns = [
        (name or "<model>", m)
        for name, m in model.named_modules()
        if is_batch_norm(m) or is_frozen_batch_norm(m)
    ]
    reasons: dict[str, str] = {}
    candidates = []
    for name, bn in bns:
        problem = _bn_problem(bn)
        if problem is None:
            candidates.append((name, bn))
        else:
            reasons[name] = problem
    ranks = _record_ranks(model, example_inputs, candidates) if example_inputs else {}
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # any tracing failure: fall back to the Sequential walk
        plan = _plan_from_sequentials(model, candidates, ranks, reasons, f"{type(e).__name__}: {e}")
    else:
        plan = _plan_from_graph(model, graph, candidates, ranks, reasons)

    folded = copy.deepcopy(model)
    with torch.no_grad():
        for pair in plan:
            _apply(folded, pair)
    unfolded = [Unfolded(name, reasons[name]) for name, _ in bns if name in reasons]
    if example_inputs is not None:
        _verify(model, folded, example_inputs, rtol)
    return FoldResult(folded, unfolded)


def _apply(model: nn.Module, pair: _Pair) -> None:
    bn = model.get_submodule(pair.bn)
    layer = model.get_submodule(pair.layer)
    mean, var = _bn_stats(bn)
    weight, bias = fold_weights(
        layer.weight,
        layer.bias,
        mean,
        var,
        bn.eps,
        bn.weight,
        bn.bias,
        bn_first=pair.bn_first,
        transpose=isinstance(layer, _ConvTransposeNd),
        groups=getattr(layer, "groups", 1),
    )
    trainable = layer.weight.requires_grad
    bias_trainable = trainable if layer.bias is None else layer.bias.requires_grad
    layer.weight = nn.Parameter(weight, requires_grad=trainable)
    layer.bias = nn.Parameter(bias, requires_grad=bias_trainable)
    activation = getattr(bn, "activation", None)
    replacement = _ACTIVATION_MODULES[activation](bn) if activation else nn.Identity()
    set_submodule(model, pair.bn, replacement)


def _verify(model: nn.Module, folded: nn.Module, example_inputs: tuple, rtol: float) -> None:
    with torch.no_grad():
        expected = _leaves(model(*example_inputs))
        actual = _leaves(folded(*example_inputs))
    for i, (y, z) in enumerate(zip(expected, actual)):
        scale = float(y.detach().abs().max()) if y.numel() else 0.0
        err = float((z.double() - y.double()).abs().max()) if y.numel() else 0.0
        if not err <= rtol * max(scale, 1e-30):
            raise RuntimeError(
                f"{_WHERE}: the folded model's output {i} differs from the original's by "
                f"{err:.3g} (max |y| = {scale:.3g}, rtol = {rtol}); the folding is not exact "
                f"for this model. Please report it with the model's structure."
            )
