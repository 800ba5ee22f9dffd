"""Generic tests over the layer table (tests/nn/descriptors.py): forward, backward and
state against an independent expectation, gradcheck, state_dict, pickle, repr, memory
formats, train/eval, bad inputs, empty and half-precision batches.

A case that reaches the fused kernels (``Case.fused``) runs the path-dependent tests twice,
with ``NORMLAB_KERNELS=numba`` and ``=torch`` (the torch-op path, the engine's reference),
and each run checks which path it took."""

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
# The tests whose code path depends on NORMLAB_KERNELS run a case on both paths where it
# reaches the kernels (Case.fused), on the torch ops alone elsewhere.
PATHS = ("numba", "torch")


def _paths(case: Case, mode: str | None = None) -> tuple[str, ...]:
    reaches = mode in case.fused if mode else bool(case.fused)
    return PATHS if reaches else PATHS[1:]


case_paths = pytest.mark.parametrize(
    ("case", "path"), [pytest.param(c, p, id=f"{c.id}-{p}") for c in CASES for p in _paths(c)]
)
case_mode_paths = pytest.mark.parametrize(
    ("case", "mode", "path"),
    [
        pytest.param(c, m, p, id=f"{c.id}-{m}-{p}")
        for c in CASES
        for m in ("train", "eval")
        for p in _paths(c, m)
    ],
)
_KERNEL_CALLS = ("batch_forward", "batch_backward", "affine_forward")


class _KernelSpy:
    def __init__(self, path: str) -> None:
        self.path = path
        self.calls = 0

    def check(self, case: Case, *, reached: bool = False) -> None:
        """Never a kernel on the torch path; on the numba path, some if ``reached``."""
        if self.path == "torch":
            assert self.calls == 0, "NORMLAB_KERNELS=torch still ran the fused kernels"
        elif reached:
            assert self.calls > 0, f"{case.id} never reached the kernels: a silent fallback"


def _use_path(monkeypatch, path: str) -> _KernelSpy:
    """Select the path by environment (read on every call) and count the kernels' calls."""
    from normlab import kernels

    monkeypatch.setenv(kernels.KERNELS_ENV, path)
    spy = _KernelSpy(path)
    for name in _KERNEL_CALLS:
        original = getattr(kernels, name)

        def counted(*args, _original=original, **kwargs):
            spy.calls += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return spy


def _input(case: Case, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(case.shape, generator=g) * 2 + 1).to(dtype)


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_every_exported_layer_is_in_the_table():
    covered = {type(c.make()).__name__ for c in CASES}
    assert covered == set(nl.nn.__all__)


@cases
def test_fused_matches_dispatch(case, monkeypatch):
    # Case.fused is what the engine does: a layer that starts (or stops) reaching the
    # kernels must be run on both paths by the tests below (or stop claiming to be)
    spy = _use_path(monkeypatch, "numba")
    reached = []
    for mode in ("train", "eval"):
        spy.calls = 0
        for dtype in (torch.float32, torch.float64):
            layer = case.make().to(dtype).train(mode == "train")
            x = _input(case, dtype).requires_grad_()
            layer(x).sum().backward()  # with gradients
            with torch.no_grad():
                layer(x)  # inference
        if spy.calls:
            reached.append(mode)
    assert case.fused == tuple(reached), f"set fused={tuple(reached)} for {case.id}"


@case_mode_paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_forward_backward_and_state_match_expectation(case, mode, path, dtype, monkeypatch):
    spy = _use_path(monkeypatch, path)
    layer = case.make().to(dtype).train(mode == "train")
    twin, inference = copy.deepcopy(layer), copy.deepcopy(layer)
    x = _input(case, dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = layer(xa)
    yb, owner = case.expected(twin, xb)
    assert ya.shape == x.shape and ya.dtype == x.dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(ya.double(), yb.double(), **tol)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    ya.backward(dy)
    yb.backward(dy.to(yb.dtype))
    torch.testing.assert_close(xa.grad.double(), xb.grad.double(), **tol)
    theirs = dict(owner.named_parameters())
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.double(), theirs[name].grad.double(), **tol)
    theirs = owner.state_dict()
    for name, v in layer.state_dict().items():
        torch.testing.assert_close(v, theirs[name].to(v.dtype), **tol, msg=name)
    # inference (no autograd graph): the kernels' forward-only entry points in both modes
    with torch.no_grad():
        y_inf = inference(x)
    torch.testing.assert_close(y_inf.double(), yb.detach().double(), **tol)
    for name, v in inference.state_dict().items():
        torch.testing.assert_close(v, theirs[name].to(v.dtype), **tol, msg=name)
    spy.check(case, reached=True)


@case_mode_paths
def test_gradcheck_float64(case, mode, path, monkeypatch):
    spy = _use_path(monkeypatch, path)
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
    spy.check(case)


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


@case_paths
def test_non_contiguous_and_channels_last_inputs(case, path, monkeypatch):
    spy = _use_path(monkeypatch, path)
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
    spy.check(case)


@case_paths
def test_train_and_eval_modes(case, path, monkeypatch):
    spy = _use_path(monkeypatch, path)
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
    spy.check(case)


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
    # docs/reliability.md case 5: empty output, zero gradients, running statistics untouched
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
