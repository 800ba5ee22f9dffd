"""``normlab.fuse``: BN → activation and BN → add(residual) → activation as one layer.

A ResNet or MobileNet is written ``bn → ReLU(inplace=True)`` and
``bn → (+ identity) → ReLU``; the fused kernels and the memory saving of a fused layer
(:class:`normlab.nn.BatchNorm2d` with ``activation=``, ``forward(input, residual)``) only
apply when the three are one call. :func:`fuse` finds those chains in a ``torch.fx``
graph of the model and rewrites each into one normlab layer:

* ``BatchNorm{1,2,3}d`` (torch's or normlab's, any mode, affine and tracking as they
  are) whose output has exactly one user, an activation (module, function or tensor
  method; inplace or not): ReLU, ReLU6, Hardtanh, Hardswish, LeakyReLU, ELU, SiLU,
  Sigmoid, Tanh → ``BatchNorm2d(..., activation=...)``;
* a BN whose only user is an add (``+``, ``+=``, ``torch.add`` without ``alpha``, either
  operand order) of another graph value r, itself followed by one of those activations
  as its only user → ``bn(x, residual=r)`` with the activation; without an activation
  (MobileNetV2's projection) → ``bn(x, residual=r)``.

The fused layer keeps the BN's qualified name, parameters and buffers (the same tensor
objects), so ``state_dict()`` has the same keys and values and checkpoints load both
ways; the activation modules it replaces hold no state. A BN that feeds an add as the
*other* operand of an already fused add (a ResNet downsample BN) stays as it is: the
add belongs to the first BN (with ``save='output'`` it becomes an identity layer that
keeps its output, which the fused add keeps anyway as its residual). Without ``example_inputs`` an add operand is assumed to be
shaped like the BN's output (a broadcasting add would fail at run time with the
layer's shape error); with them, shapes are propagated and broadcasting adds are left.

Tracing: ``torch.fx.symbolic_trace`` with every norm layer kept a leaf. A model with
data-dependent control flow does not trace; then each child that traces is fused on
its own and the rest left, and the report says why (``strict=True`` raises instead;
the default warns once).
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FuseReport", "fuse"]

_WHERE = "normlab.fuse"


@dataclass
class FuseReport:
    """What :func:`fuse` did. ``fused``: BN qualified name → what it absorbed
    (e.g. ``'relu'``, ``'add+relu'``, ``'add'``); ``unfused``: BN name → why not;
    ``untraced``: module name → the tracing error, for parts left as they are."""

    fused: dict[str, str] = field(default_factory=dict)
    unfused: dict[str, str] = field(default_factory=dict)
    untraced: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} of {len(self.fused) + len(self.unfused)} BN layers"]
        lines += [f"  {k}: {v}" for k, v in self.fused.items()]
        lines += [f"  not {k}: {v}" for k, v in self.unfused.items()]
        lines += [f"  untraced {k}: {v}" for k, v in self.untraced.items()]
        return "\n".join(lines)


def _normlab_classes() -> dict[type, type]:
    from normlab import nn as nln

    return {
        nn.BatchNorm1d: nln.BatchNorm1d,
        nn.BatchNorm2d: nln.BatchNorm2d,
        nn.BatchNorm3d: nln.BatchNorm3d,
        nln.BatchNorm1d: nln.BatchNorm1d,
        nln.BatchNorm2d: nln.BatchNorm2d,
        nln.BatchNorm3d: nln.BatchNorm3d,
    }


class _Tracer(fx.Tracer):
    """Keeps every norm layer (torch's or normlab's) a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


# activation modules → (name, attributes to read as keywords)
def _module_activation(m: nn.Module) -> dict | None:
    t = type(m)
    if t is nn.ReLU:
        return {"activation": "relu"}
    if t is nn.ReLU6:
        return {"activation": "relu6"}
    if t is nn.Hardtanh:
        return {"activation": "hardtanh", "min_val": m.min_val, "max_val": m.max_val}
    if t is nn.Hardswish:
        return {"activation": "hardswish"}
    if t is nn.LeakyReLU:
        return {"activation": "leaky_relu", "negative_slope": m.negative_slope}
    if t is nn.ELU:
        return {"activation": "elu", "alpha": m.alpha}
    if t is nn.SiLU:
        return {"activation": "silu"}
    if t is nn.Sigmoid:
        return {"activation": "sigmoid"}
    if t is nn.Tanh:
        return {"activation": "tanh"}
    return None


# functions → (name, [(parameter, default)] after the input, keyword of the layer)
_FUNCTIONS = {
    F.relu: ("relu", []),
    torch.relu: ("relu", []),
    torch.relu_: ("relu", []),
    F.relu_: ("relu", []),
    F.relu6: ("relu6", []),
    F.hardtanh: ("hardtanh", [("min_val", -1.0), ("max_val", 1.0)]),
    F.hardswish: ("hardswish", []),
    F.leaky_relu: ("leaky_relu", [("negative_slope", 0.01)]),
    F.elu: ("elu", [("alpha", 1.0)]),
    F.silu: ("silu", []),
    torch.sigmoid: ("sigmoid", []),
    F.sigmoid: ("sigmoid", []),
    torch.tanh: ("tanh", []),
    F.tanh: ("tanh", []),
}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
            "tanh": "tanh", "tanh_": "tanh"}  # fmt: skip


def _activation_of(node: fx.Node, src: fx.Node, modules: dict) -> dict | None:
    """The layer keywords for activation ``node`` applied to ``src``, or None."""
    if not node.args or node.args[0] is not src:
        return None
    if node.op == "call_module":
        return _module_activation(modules[node.target])
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        return {"activation": _METHODS[node.target]} if not node.kwargs else None
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name, params = _FUNCTIONS[node.target]
        out = {"activation": name}
        extra = list(node.args[1:])
        for i, (p, default) in enumerate(params):
            value = extra[i] if i < len(extra) else node.kwargs.get(p, default)
            if isinstance(value, fx.Node):
                return None
            out[p] = value
        for k, v in node.kwargs.items():  # inplace=...: the BN output is private
            if k != "inplace" and k not in dict(params):
                return None
            if isinstance(v, fx.Node):
                return None
        return out
    return None


def _residual_of(node: fx.Node, src: fx.Node) -> fx.Node | None:
    """The other operand if ``node`` is ``src + r`` / ``r + src`` (no alpha), else None."""
    is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd,
              torch.add)) or (node.op == "call_method" and node.target in ("add", "add_"))  # fmt: skip
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is src else a if b is src else None
    if not isinstance(other, fx.Node) or other is src:
        return None
    return other


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    if ta is None or tb is None:
        return True  # no example inputs: assumed (see the module notes)
    return tuple(ta.shape) == tuple(tb.shape) and ta.dtype == tb.dtype


def _invertible(extra: dict) -> bool:
    """Whether the activation keywords ``extra`` name one save='output' can invert."""
    from normlab.functional.activations import activation_name, get_activation, inverse_of

    kw = {k: v for k, v in extra.items() if k in ("min_val", "max_val", "alpha")}
    name = activation_name(extra.get("activation"), **kw)
    return inverse_of(get_activation(name), extra.get("negative_slope", 0.01)) is not None


def _has_zero_weight(bn: nn.Module) -> bool:
    """Whether ``bn``'s γ has a zero entry now (torchvision's ``zero_init_residual``):
    save='output' cannot rebuild x̂ = (y − β)/γ there, so such a layer keeps its input.
    A meta-device γ has no values to look at and is taken as nonzero."""
    w = getattr(bn, "weight", None)
    return w is not None and not w.is_meta and bool((w == 0).any())


def _new_layer(bn: nn.Module, extra: dict, save) -> nn.Module:
    """The normlab layer for ``bn`` with the activation keywords ``extra``, holding
    ``bn``'s own parameter and buffer tensors (so the state_dict is unchanged)."""
    cls = _normlab_classes()[type(bn)]
    kwargs = {"affine": bn.affine, "track_running_stats": bn.track_running_stats}
    if bn.affine and getattr(bn, "bias", None) is None:
        kwargs["bias"] = False
    for k in ("nonfinite", "ema_debias"):
        if hasattr(bn, k):
            kwargs[k] = getattr(bn, k)
    if not hasattr(bn, "nonfinite"):
        kwargs["nonfinite"] = "propagate"  # torch's layer: keep torch's behaviour
    if save == "output" and _invertible(extra) and not _has_zero_weight(bn):
        kwargs["save"] = "output"
    new = cls(bn.num_features, bn.eps, bn.momentum, device="meta", **kwargs, **extra)
    new._parameters = dict(bn._parameters)
    new._buffers = dict(bn._buffers)
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.train(bn.training)
    return new


def _fuse_graph(gm: fx.GraphModule, prefix: str, report: FuseReport, save) -> None:
    modules = dict(gm.named_modules())
    bn_types = tuple(_normlab_classes())
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        bn = modules[node.target]
        name = prefix + node.target
        if type(bn) not in bn_types:
            report.unfused[name] = f"{type(bn).__name__} is not a plain BatchNorm1d/2d/3d"
            continue
        if getattr(bn, "activation", None) is not None:
            report.unfused[name] = f"already fused (activation={bn.activation!r})"
            continue
        if len(node.args) != 1 or node.kwargs:
            report.unfused[name] = "called with more than its input (already has a residual)"
            continue
        users = list(node.users)
        if len(users) != 1:
            report.unfused[name] = (
                f"its output has {len(users)} users; only a private chain can be fused"
            )
            continue
        user = users[0]
        act = _activation_of(user, node, modules)
        if act is not None:
            gm.add_submodule(node.target, _new_layer(bn, act, save))
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            report.fused[name] = act["activation"]
            continue
        r = _residual_of(user, node)
        if r is None and user.op == "call_module" and len(user.args) == 2 and user.args[1] is node:
            if save == "output" and _save_output_layer(gm, node, bn, name, report):
                continue  # the fused add keeps r (this output) for its backward anyway
            report.unfused[name] = (
                f"it is the residual operand of the add fused into {prefix}{user.target}"
            )
            continue
        if r is None:
            report.unfused[name] = f"followed by {user.op} {_describe(user.target)}, not fusable"
            continue
        if not _same_shape(node, r):
            report.unfused[name] = "the add broadcasts (residual shaped unlike the BN output)"
            continue
        add_users = list(user.users)
        act = None
        if len(add_users) == 1:
            act = _activation_of(add_users[0], user, modules)
        user.prepend(node)  # r may be computed after the BN: the BN moves down to the add
        node.args = (node.args[0], r)
        if act is not None:
            act_node = add_users[0]
            act_node.replace_all_uses_with(node)
            graph.erase_node(act_node)
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        gm.add_submodule(node.target, _new_layer(bn, act or {}, save))
        report.fused[name] = "add" + ("" if act is None else "+" + act["activation"])
    graph.lint()
    gm.recompile()


def _save_output_layer(gm: fx.GraphModule, node: fx.Node, bn, name: str, report) -> bool:
    """With save='output', a BN left alone whose output is the residual of a fused
    add → act layer: that layer keeps r for its backward, so this BN becomes an identity
    layer that keeps its output (the same storage) instead of its input, saving one
    activation-sized tensor per downsample block. False (nothing done) if γ has a zero."""
    if _has_zero_weight(bn):
        return False
    gm.add_submodule(node.target, _new_layer(bn, {}, "output"))
    report.fused[name] = "identity (save='output', the residual of a fused add)"
    return True


def _describe(target) -> str:
    return getattr(target, "__name__", str(target))


def _trace(module: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(module)
    name = module.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _fuse_module(module: nn.Module, prefix: str, report: FuseReport, save, example):
    """``module`` fused (a GraphModule), or, if it does not trace, itself with each
    child fused recursively."""
    try:
        gm = _trace(module)
    except Exception as e:  # fx raises TraceError, TypeError, ... for control flow
        report.untraced[prefix.rstrip(".") or "<model>"] = f"{type(e).__name__}: {e}"
        for child_name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm):
                report.unfused[prefix + child_name] = (
                    f"its parent {prefix.rstrip('.') or '<model>'} could not be traced"
                )
                continue
            setattr(module, child_name, _fuse_module(child, f"{prefix}{child_name}.", report,
                                                     save, None))  # fmt: skip
        return module
    if example is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        modes = {m: m.training for m in gm.modules()}
        with torch.no_grad():
            gm.eval()  # no running-statistics update from the shape pass
            ShapeProp(gm).propagate(*example)
        for m, mode in modes.items():
            m.train(mode)
    _fuse_graph(gm, prefix, report, save)
    return gm


def fuse(
    model: nn.Module,
    example_inputs: tuple | None = None,
    *,
    strict: bool = False,
    report: bool = False,
    save: str = "input",
):
    """A new model in which every BN → activation and BN → add → [activation] chain is one
    normlab layer (see the module notes); ``model`` is left untouched (deep copy).

    Args:
        model: any module; its BatchNorm1d/2d/3d layers (torch's or normlab's) are fused.
        example_inputs: optional tuple of inputs; when given, add operands are checked to
            be shaped like the BN output (broadcasting adds are left alone).
        strict: raise ``RuntimeError`` if any part of the model could not be traced
            (default: fuse what traces and warn once, naming the parts left).
        report: also return a :class:`FuseReport` (fused and unfused BNs, with reasons).
        save: 'input' (default; the layers keep x for backward) or 'output': BN →
            activation layers whose activation is invertible (identity, leaky_relu with
            slope > 0, elu with α > 0) keep only their output (In-Place ABN; see
            ``normlab.nn.BatchNorm2d``'s ``save``; a BN → add → act layer keeps y and
            the residual, which its block's first conv keeps anyway, and a BN that is
            that residual becomes an identity layer keeping its output); the others, and
            any layer whose γ has a zero entry at fuse time (``zero_init_residual``),
            keep x.

    Returns:
        The fused model (a ``torch.fx.GraphModule``, or the copied model with fused
        children when the whole does not trace); with ``report=True``,
        ``(model, FuseReport)``.

    Numerics: the fused model computes the same function; outputs and gradients agree
    with the original to rounding (≤ 1e-4 relative in float32).
    """
    if save not in ("input", "output"):
        raise ValueError(f"{_WHERE}: save must be 'input' or 'output', got {save!r}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    rep = FuseReport()
    fused = _fuse_module(copy.deepcopy(model), "", rep, save, example_inputs)
    if rep.untraced:
        msg = (
            f"{_WHERE}: could not trace {sorted(rep.untraced)} with torch.fx "
            f"({next(iter(rep.untraced.values()))}); fused the children that trace and left "
            f"the rest. BN layers not fused: {len(rep.unfused)} (see fuse(..., report=True))."
        )
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=2)
    return (fused, rep) if report else fused
