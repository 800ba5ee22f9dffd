"""Generic tests over the layer table (tests/nn/descriptors.py): forward, backward and
state against an independent expectation, gradcheck, state_dict, pickle, repr, memory
formats, train/eval, bad inputs, empty and half-precision batches."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import normlab as nl
from tests.nn.descriptors import CASES, Case

ids = [c.id for c in CASES]
cases = pytest.mark.parametrize("case", CASES, ids=ids)


def _input(case: Case, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(case.shape, generator=g) * 2 + 1).to(dtype)


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_every_exported_layer_is_in_the_table():
    covered = {type(c.make()).__name__ for c in CASES}
    assert covered == set(nl.nn.__all__)


@cases
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_backward_and_state_match_expectation(case, mode):
    layer = case.make().train(mode == "train")
    twin = copy.deepcopy(layer)
    x = _input(case)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = layer(xa)
    yb, owner = case.expected(twin, xb)
    assert ya.shape == x.shape and ya.dtype == x.dtype
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ya.double(), yb.double(), **tol)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ya.backward(dy)
    yb.backward(dy.to(yb.dtype))
    torch.testing.assert_close(xa.grad.double(), xb.grad.double(), **tol)
    theirs = dict(owner.named_parameters())
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.double(), theirs[name].grad.double(), **tol)
    theirs = owner.state_dict()
    for name, v in layer.state_dict().items():
        torch.testing.assert_close(v, theirs[name].to(v.dtype), **tol, msg=name)


@cases
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_float64(case, mode):
    layer = case.make().double().train(mode == "train")
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())
    x = _input(case, torch.float64).requires_grad_()

    def f(x, *ps):
        # a fresh copy per call: training steps update running statistics (and renorm's
        # step), and gradcheck must see the same function every time
        return functional_call(copy.deepcopy(layer), dict(zip(names, ps)), (x,))

    assert gradcheck(f, (x, *params), fast_mode=True)
    if case.gradgrad:
        assert gradgradcheck(f, (x, *params), fast_mode=True)


@cases
def test_state_dict_round_trip_with_weights_only(case):
    layer = case.make()
    layer(_input(case))  # one training step, so buffers differ from a fresh layer
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = case.make()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # make sure loading, not construction, brings the values
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for k, v in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    layer.eval()
    fresh.eval()
    x = _input(case, seed=1)
    assert torch.equal(layer(x), fresh(x))


@cases
def test_pickle_deepcopy_and_repr(case):
    layer = case.make()
    x = _input(case)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert repr(clone) == repr(layer)
        assert type(clone) is type(layer)
        assert torch.equal(clone(x), copy.deepcopy(layer)(x))
    assert repr(layer).startswith(type(layer).__name__ + "(")


@cases
def test_non_contiguous_and_channels_last_inputs(case):
    layer = case.make()
    x = _input(case)
    y = copy.deepcopy(layer)(x)
    strided = torch.stack([x, x], dim=-1)[..., 0]  # same values, non-contiguous
    assert not strided.is_contiguous()
    torch.testing.assert_close(copy.deepcopy(layer)(strided), y)
    if x.dim() == 4:
        xcl = x.contiguous(memory_format=torch.channels_last)
        ycl = copy.deepcopy(layer)(xcl)
        torch.testing.assert_close(ycl, y)
        if case.channels_last:
            assert ycl.is_contiguous(memory_format=torch.channels_last)


@cases
def test_train_and_eval_modes(case):
    layer = case.make()
    x = _input(case)
    y_train = layer(x)
    layer.eval()
    before = _state(layer)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)  # eval is deterministic
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"eval changed {k}"
    if not case.batch_stats:
        assert torch.equal(y1, y_train)  # no batch statistics: train and eval agree


@cases
def test_bad_inputs_raise_clear_errors(case):
    layer = case.make()
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(case.shape, dtype=torch.int64))
    for shape, exc, pattern in case.errors:
        before = _state(layer)
        with pytest.raises(exc, match=pattern):
            layer(torch.randn(shape))
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), f"a failed call changed {k}"


@cases
def test_empty_batch_and_empty_spatial_dims_leave_state_alone(case):
    # reliability 5: empty output, zero gradients, running statistics untouched
    layer = case.make()
    before = _state(layer)
    shapes = [(0, *case.shape[1:])]
    trailing = isinstance(layer, (torch.nn.LayerNorm, torch.nn.RMSNorm))
    if len(case.shape) >= 3 and not trailing and getattr(layer, "_channel_dim", 1) == 1:
        shapes.append((2, case.shape[1], 0, *case.shape[3:]))
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape
        y.sum().backward()
        for p in layer.parameters():
            assert torch.equal(p.grad, torch.zeros_like(p)), shape
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), (k, shape)


@cases
def test_half_input_with_float32_state(case):
    layer = case.make()
    x = _input(case).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = copy.deepcopy(case.make())(x.float())
    torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.05)
    for v in layer.state_dict().values():
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
