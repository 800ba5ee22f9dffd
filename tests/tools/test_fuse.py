"""normlab.fuse on torchvision-layout blocks: same loss, gradients and running statistics
as the unfused model, state_dict round trips, the BNs that fused, eval mode,
channels_last, untraceable models and the report."""

import copy
import warnings

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import kernels
from tests.tools.zoo_shapes import models

MODELS = models()


def _grads(model, x):
    loss = model(x).pow(2).mean()
    names = [n for n, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    return loss.detach(), dict(zip(names, grads))


def _assert_rel(a, b, tol=1e-4, what="", floor=1e-6):
    # floor: gradients of a conv feeding a BN are orthogonal to its weight and can be
    # pure cancellation (~1e-8 against 1e-2 elsewhere); they are compared to the model's
    # gradient scale, not to their own
    scale = max(float(b.abs().max()), floor)
    assert float((a - b).abs().max()) / scale <= tol, what


@pytest.fixture(params=["torch", "numba"])
def path(request, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, request.param)
    return request.param


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_model_matches_original(name, cl, path):
    make, n_bn, n_fused = MODELS[name]
    torch.manual_seed(0)
    model = make()
    before = copy.deepcopy(model.state_dict())
    fused, report = nl.fuse(model, report=True)
    # the input model is untouched, the fused one holds normlab layers under the same names
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(report.fused) == n_fused and len(report.fused) + len(report.unfused) == n_bn
    for bn_name in report.fused:
        assert isinstance(fused.get_submodule(bn_name), nl.nn.BatchNorm2d)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if cl:
        x = x.to(memory_format=torch.channels_last)
        model, fused = (
            model.to(memory_format=torch.channels_last),
            fused.to(memory_format=torch.channels_last),
        )
    loss0, g0 = _grads(model, x)
    loss1, g1 = _grads(fused, x)
    _assert_rel(loss1, loss0, what="loss")
    assert g0.keys() == g1.keys()
    floor = 1e-3 * max(float(g.abs().max()) for g in g0.values())
    for k in g0:
        _assert_rel(g1[k], g0[k], what=k, floor=floor)
    s0, s1 = model.state_dict(), fused.state_dict()
    assert s0.keys() == s1.keys()
    for k in s0:  # running statistics after the training step
        _assert_rel(s1[k].double(), s0[k].double(), what=k)
    model.eval()
    fused.eval()
    with torch.no_grad():
        _assert_rel(fused(x), model(x), what="eval output")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip_both_ways(name):
    make = MODELS[name][0]
    torch.manual_seed(0)
    a, b = make(), make()
    fused = nl.fuse(a)
    fused.load_state_dict(b.state_dict())  # original checkpoint → fused model
    c = make()
    c.load_state_dict(fused.state_dict())  # fused checkpoint → original model
    for k, v in b.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v) and torch.equal(c.state_dict()[k], v)


def test_resnet18_counts_and_reasons():
    _, report = nl.fuse(MODELS["resnet18"][0](), report=True)
    kinds = sorted(report.fused.values())
    assert kinds.count("relu") == 9 and kinds.count("add+relu") == 8
    assert sorted(report.unfused) == [f"blocks.{i}.downsample.1" for i in (2, 4, 6)]
    assert all("residual operand" in r for r in report.unfused.values())
    assert "fused 17 of 20" in str(report)


def test_shared_output_is_left_and_functional_forms_fuse():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.bn1(x)
            b = torch.nn.functional.leaky_relu(self.bn2(x), 0.2)
            c = self.bn3(x).relu_()
            return a.relu() + a + b + c  # bn1's output has two users

    model = M()
    fused, report = nl.fuse(model, report=True)
    assert set(report.fused) == {"bn2", "bn3"} and "2 users" in report.unfused["bn1"]
    assert fused.bn2.activation == "leaky_relu" and fused.bn2.negative_slope == 0.2
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(fused(x), model(x))


def test_example_inputs_leave_broadcasting_adds():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(x) + x.mean((2, 3), keepdim=True))

    x = torch.randn(4, 3, 5, 5)
    fused, report = nl.fuse(M(), (x,), report=True)
    assert "broadcasts" in report.unfused["bn"]
    model = M()
    model.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fused(x), model(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = self.bn(x)
        return self.block(x)


def test_untraceable_model_fuses_children_and_warns_or_raises():
    model = Untraceable()
    with pytest.warns(UserWarning, match="could not trace"):
        fused, report = nl.fuse(model, report=True)
    assert "block.1" in report.fused and "bn" in report.unfused
    assert "could not be traced" in report.unfused["bn"]
    x = torch.randn(2, 3, 4, 4).abs()
    torch.testing.assert_close(fused(x), model(x))
    with pytest.raises(RuntimeError, match="could not trace"):
        nl.fuse(model, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nl.fuse(MODELS["resnet18"][0]())  # traces: no warning
