"""torch.fx symbolic tracing of models with normlab layers (src/normlab/nn/_fx.py): every
layer of the family is one ``call_module`` node, as torch's own layers are, and the
GraphModule computes what the model computes (outputs, gradients, statistics) in
training and in eval; the same model with torch's BN traces to the same graph."""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import normlab as nl
from normlab.nn._fx import QuantizationFusionWarning
from tests.nn.descriptors import CASES, Case
from tests.tools.helpers import images, small_resnet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Wrap(nn.Module):
    """Ops before and after the layer, so the graph has real neighbours."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return torch.tanh(self.norm(x * 2.0 - 0.5)) * 1.5


def _input(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def _module_calls(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "call_module"]


def _assert_same_run(a: nn.Module, b: nn.Module, x: torch.Tensor, exact: bool, tol=1e-5):
    """a(x) and b(x): outputs, input and parameter gradients, and state after the call."""
    check = (
        (lambda u, v, msg: torch.testing.assert_close(u, v, rtol=0, atol=0, msg=msg))
        if exact
        else (lambda u, v, msg: torch.testing.assert_close(u, v, rtol=tol, atol=tol, msg=msg))
    )
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    check(ya, yb, "output")
    dy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(5))
    ya.backward(dy)
    yb.backward(dy)
    check(xa.grad, xb.grad, "input gradient")
    # In registration order: a fused-activation layer's names differ from its torch twin's
    # (norm.weight vs norm.0.weight), its tensors do not.
    pa, pb = list(a.named_parameters()), list(b.parameters())
    assert len(pa) == len(pb)
    for (name, p), q in zip(pa, pb):
        check(p.grad, q.grad, f"gradient of {name}")
    sa, sb = a.state_dict(), list(b.state_dict().values())
    assert len(sa) == len(sb)
    for (name, v), w in zip(sa.items(), sb):
        check(v, w, name)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_layer_is_one_leaf_node_and_runs_as_itself(case: Case, mode):
    model = Wrap(case.make()).train(mode == "train")
    twin = copy.deepcopy(model)
    gm = fx.symbolic_trace(model)
    assert _module_calls(gm.graph) == ["norm"]
    ops = [n.op for n in gm.graph.nodes]
    assert ops.count("get_attr") == 0, "the layer's internals leaked into the graph"
    (node,) = (n for n in gm.graph.nodes if n.op == "call_module")
    assert node.args[0].target is operator.sub and node.kwargs == {}
    assert gm.norm is model.norm  # the GraphModule calls the layer object itself
    _assert_same_run(gm, twin, _input(case.shape), exact=True)


EXTRA = [  # fused activations and the any-rank layer, against torch layer + activation
    (
        lambda: nl.nn.BatchNorm2d(3, activation="relu"),
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()),
        (4, 3, 3, 2),
    ),
    (
        lambda: nl.nn.BatchNorm(3, channel_dim=1, activation="leaky_relu", negative_slope=0.2),
        lambda: nn.Sequential(nn.BatchNorm3d(3), nn.LeakyReLU(0.2)),
        (2, 3, 2, 2, 2),
    ),
    (
        lambda: nl.nn.GroupNorm(2, 4, activation="silu"),
        lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()),
        (3, 4, 5),
    ),
    (
        lambda: nl.nn.LayerNorm(4, activation="tanh"),
        lambda: nn.Sequential(nn.LayerNorm(4), nn.Tanh()),
        (3, 2, 4),
    ),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("ours, theirs, shape", EXTRA)
def test_fused_activation_layers_trace_as_one_node_and_match_torch(ours, theirs, shape, mode):
    layer, reference = ours(), theirs()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    reference[0].load_state_dict(layer.state_dict())
    gm = fx.symbolic_trace(Wrap(layer).train(mode == "train"))
    assert _module_calls(gm.graph) == ["norm"]
    _assert_same_run(gm, Wrap(reference).train(mode == "train"), _input(shape), exact=False)


class ConvNet(nn.Module):
    """Conv2d → BN → ReLU(inplace) → Conv2d → BN → ReLU → AdaptiveAvgPool → Linear."""

    def __init__(self, bn: type) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), bn(6)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), bn(6)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x):  # (N, 3, H, W) -> (N, 4)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _pair(cls_a=nn.BatchNorm2d, cls_b=nl.nn.BatchNorm2d):
    torch.manual_seed(0)
    a = ConvNet(cls_a)
    with torch.no_grad():
        for bn in (a.bn1, a.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    b = ConvNet(cls_b)
    b.load_state_dict(a.state_dict())
    return a, b


def _signature(graph: fx.Graph) -> list[tuple]:
    return [(n.op, str(n.target), tuple(str(a) for a in n.args)) for n in graph.nodes]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_bn_model_traces_like_torch_and_matches_it(mode):
    torch_model, ours = _pair()
    ga = fx.symbolic_trace(torch_model.train(mode == "train"))
    gb = fx.symbolic_trace(ours.train(mode == "train"))
    assert _signature(ga.graph) == _signature(gb.graph)
    x = images(8, size=5)
    _assert_same_run(gb, ga, x, exact=False)  # normlab vs torch numerics: within 1e-5
    # A second training step: the statistics the first one stored are used alike.
    _assert_same_run(gb, ga, images(8, size=5, seed=1), exact=False)


def test_nested_layers_keep_their_qualified_names():
    model = small_resnet("normlab")  # BN inside nn.Sequential stem and custom blocks
    gm = fx.symbolic_trace(model)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nl.nn.BatchNorm2d)]
    assert [t for t in _module_calls(gm.graph) if t in bn_names] == bn_names
    _assert_same_run(gm, copy.deepcopy(model), images(4, size=5), exact=True)


def test_a_layer_called_twice_is_two_nodes_with_one_target():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nl.nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.bn(x) * 2)

    assert _module_calls(fx.symbolic_trace(Twice()).graph) == ["bn", "bn"]


class _ConvIntoFunctionTracer(fx.Tracer):
    """A custom tracer: traces into Conv2d (not a leaf here), keeps the defaults else."""

    def is_leaf_module(self, m, qualname):
        return not isinstance(m, nn.Conv2d) and super().is_leaf_module(m, qualname)


class _NormlabLeafTracer(fx.Tracer):
    """A custom tracer that already declares normlab's layers leaves (as fold's does)."""

    def is_leaf_module(self, m, qualname):
        return type(m).__module__.startswith("normlab.") or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("tracer", [_ConvIntoFunctionTracer, _NormlabLeafTracer])
def test_custom_tracers_keep_normlab_layers_as_leaves(tracer):
    _, ours = _pair()
    graph = tracer().trace(ours)
    calls = _module_calls(graph)
    assert calls.count("bn1") == 1 and calls.count("bn2") == 1
    gm = fx.GraphModule(ours, graph)
    _assert_same_run(gm, copy.deepcopy(ours), images(4, size=5), exact=True)


def test_the_layer_alone_as_trace_root_says_how_to_trace_it():
    with pytest.raises(TypeError, match=r"BatchNorm2d: .*leaf.*torch.nn.Sequential\(layer\)"):
        fx.symbolic_trace(nl.nn.BatchNorm2d(3))
    gm = fx.symbolic_trace(nn.Sequential(nl.nn.BatchNorm2d(3)))  # the route it names
    assert _module_calls(gm.graph) == ["0"]


def test_quantization_tracer_sees_leaves_and_warns_where_torch_would_fuse():
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    _, ours = _pair()
    model = nn.Sequential(nl.nn.BatchNorm2d(3), ours)  # the first BN follows no Conv
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = QuantizationTracer([], []).trace(model)
    assert _module_calls(graph).count("1.bn1") == 1
    messages = [str(w.message) for w in caught if w.category is QuantizationFusionWarning]
    assert len(messages) == 2
    assert "'1.bn1' after Conv2d '1.conv1'" in messages[0]
    assert "normlab.tools.to_torch_for_quantization" in messages[0]
    # plain symbolic tracing does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationFusionWarning)
        fx.symbolic_trace(model)


def test_fold_works_on_a_traced_model():
    model = small_resnet("normlab")
    x = images(4, size=5)
    gm = fx.symbolic_trace(model).eval()
    folded, unfolded = nl.fold(gm, x)
    assert isinstance(folded, fx.GraphModule)
    assert not any(isinstance(m, nl.nn.BatchNorm2d) for m in folded.modules())
    # the same layers fold (and stay, with the same reasons) as in the untraced model
    _, unfolded_plain = nl.fold(model, x)
    assert unfolded == unfolded_plain
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fx_experimental_fuse_keeps_the_model_correct():
    # torch.fx.experimental.optimization.fuse folds Conv-BN by exact torch types: a normlab
    # BN is left as its own node (normlab.fold is the folding tool), never mis-fused.
    from torch.fx.experimental.optimization import fuse

    _, ours = _pair()
    ours.eval()
    x = images(4, size=5)
    with torch.no_grad():
        torch.testing.assert_close(fuse(ours)(x), ours(x), rtol=0, atol=0)
