"""The layers' validation cache (normlab.nn.batchnorm): a call with the signature of the
last validated call skips the checks; any change of input or layer state checks again,
with the same errors as an uncached layer."""

import pickle

import pytest
import torch

import normlab as nl
from normlab.nn import batchnorm as bn_module


@pytest.fixture
def checks(monkeypatch):
    """Counts the functional checks the layers run."""
    calls = []
    original = bn_module._check_batch_norm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(bn_module, "_check_batch_norm", spy)
    return calls


def _step(m, x):
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


def test_repeated_calls_are_checked_once(checks):
    m = nl.nn.BatchNorm1d(4, activation="relu")
    x = torch.randn(8, 4)
    for _ in range(3):
        m(x)
    assert len(checks) == 1
    m(torch.randn(16, 4))  # a new batch size: a new signature
    m(torch.randn(16, 4))
    assert len(checks) == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "momentum", None),
        lambda m: setattr(m, "momentum", 0.5),
        lambda m: setattr(m, "eps", 1e-3),
        lambda m: setattr(m, "nonfinite", "propagate"),
        lambda m: setattr(m, "track_running_stats", False),
        lambda m: m.eval(),
        lambda m: m.double(),
        lambda m: m.register_buffer("running_mean", None),
    ],
    ids=["momentum-none", "momentum", "eps", "nonfinite", "untracked", "eval", "double", "buf"],
)
def test_layer_changes_are_checked_again_and_behave_as_torch(checks, change):
    g = torch.Generator().manual_seed(0)
    ours, theirs = nl.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3, 5, generator=g) * 2 + 1
    for m in (ours, theirs):
        _step(m, x)
    before = len(checks)
    for m in (ours, theirs):
        change(m)
    dtype = ours.weight.dtype
    if ours.running_mean is None:  # the buffer change: both or neither (torch's rule)
        for m in (ours, theirs):
            m.register_buffer("running_var", None)
    for step in range(3):
        x = (torch.randn(6, 3, 5, generator=g) * (step + 1) + step).to(dtype)
        (y_a, g_a), (y_b, g_b) = _step(ours, x), _step(theirs, x)
        torch.testing.assert_close(y_a, y_b)
        torch.testing.assert_close(g_a, g_b)
    assert len(checks) == before + 1
    state, want = ours.state_dict(), theirs.state_dict()
    if ours.running_mean is None:  # torch still counts batches then; normlab does not
        del state["num_batches_tracked"], want["num_batches_tracked"]
    assert list(state) == list(want)
    for k, v in want.items():
        torch.testing.assert_close(state[k], v, msg=k)


def _error(call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda m: (m, torch.randn(8, 5)),  # wrong channel count
        lambda m: (m, torch.ones(8, 4, dtype=torch.int64)),  # not floating point
        lambda m: (m, torch.randn(1, 4)),  # one value per channel
        lambda m: (m, torch.randn(2, 4, 3, 3)),  # wrong rank
    ],
    ids=["channels", "dtype", "one-value", "rank"],
)
def test_bad_input_after_good_calls_raises_the_uncached_error(make_bad):
    warm = nl.nn.BatchNorm1d(4)
    warm(torch.randn(8, 4))
    fresh = nl.nn.BatchNorm1d(4)
    _, bad = make_bad(warm)
    assert _error(lambda: warm(bad)) == _error(lambda: fresh(bad))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: setattr(m, "eps", -1.0),
        lambda m: setattr(m, "momentum", 1.5),
        lambda m: setattr(m, "nonfinite", "ignore"),
        lambda m: setattr(m.weight, "data", torch.ones(5)),  # resized in place of the layer
        lambda m: setattr(m, "num_batches_tracked", None) or setattr(m, "momentum", None),
    ],
    ids=["eps", "momentum", "nonfinite", "weight-shape", "momentum-none-no-counter"],
)
def test_bad_layer_state_after_good_calls_raises_the_uncached_error(mutate):
    warm, fresh = nl.nn.BatchNorm1d(4), nl.nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    warm(x)
    mutate(warm)
    mutate(fresh)
    kind, message = _error(lambda: warm(x))
    assert (kind, message) == _error(lambda: fresh(x))
    assert "BatchNorm1d" in message


def test_any_rank_layer_and_channels_last_input_hit_the_cache(checks):
    m = nl.nn.BatchNorm(6, channel_dim=-1)
    t = torch.nn.BatchNorm1d(6)
    for _ in range(3):
        x = torch.randn(4, 5, 6)
        torch.testing.assert_close(m(x), t(x.transpose(1, 2)).transpose(1, 2))
    m2 = nl.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    m2(x)
    m2(x.to(memory_format=torch.channels_last))  # same shape, other strides: still valid
    assert len(checks) == 2
    torch.testing.assert_close(m.running_var, t.running_var)


def test_overriding_the_checks_turns_the_cache_off(checks):
    class Strict(nl.nn.BatchNorm1d):
        seen = 0

        def _check_input_dim(self, input):
            Strict.seen += 1
            super()._check_input_dim(input)

    m = Strict(3)
    for _ in range(3):
        m(torch.randn(4, 3))
    assert Strict.seen == 3 and len(checks) == 0  # validated by _batch_norm each call
    assert not Strict._cache_checks and nl.nn.BatchNorm2d._cache_checks


def test_the_cache_is_not_part_of_pickles_or_state():
    m = nl.nn.BatchNorm1d(3)
    m(torch.randn(4, 3))
    assert m._checked is not None
    assert "_checked" not in pickle.loads(pickle.dumps(m)).__dict__
    assert list(m.state_dict()) == list(torch.nn.BatchNorm1d(3).state_dict())


class _Uncached(nl.nn.BatchNorm2d):
    """The same layer on the general path every call (overriding the checks turns the
    cache, and so the validated hot path, off)."""

    def _check_input_dim(self, input):
        super()._check_input_dim(input)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "relu"},
        {"activation": "leaky_relu", "negative_slope": 0.2, "momentum": None},
        {"track_running_stats": False},
        {"affine": False},
        {"ema_debias": True},
        {"save": "output", "activation": "leaky_relu"},
        {"nonfinite": "propagate"},
    ],
    ids=["plain", "relu", "leaky-cumulative", "untracked", "no-affine", "debias", "save", "prop"],
)
def test_validated_hot_path_matches_the_general_path(kw):
    """Cached calls (kernels or engine called directly) give the outputs, gradients,
    buffers and counter of the general path, in training and in eval."""
    torch.manual_seed(0)
    fast, slow = nl.nn.BatchNorm2d(3, **kw), _Uncached(3, **kw)
    assert fast._cache_checks and not slow._cache_checks
    slow.load_state_dict(fast.state_dict())
    for mode in ("train", "eval"):
        fast.train(mode == "train")
        slow.train(mode == "train")
        for _ in range(3):  # the 2nd and 3rd calls take the validated path
            x = torch.randn(4, 3, 5, 5)
            (yf, gf), (ys, gs) = _step(fast, x), _step(slow, x)
            torch.testing.assert_close(yf, ys, rtol=0, atol=0)
            torch.testing.assert_close(gf, gs, rtol=0, atol=0)
        for (name, a), (_, b) in zip(
            fast.state_dict().items(), slow.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_validated_hot_path_skips_and_raises_on_nonfinite_batches():
    m = nl.nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    m(x)
    m(x)  # validated
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = x.clone()
    bad[0, 1] = float("nan")
    with pytest.warns(nl.functional.NonFiniteStatisticsWarning, match="BatchNorm1d"):
        m(bad)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=k)
    m.nonfinite = "raise"
    m(x)  # a new signature (nonfinite changed): validated again, then cached
    with pytest.raises(FloatingPointError, match="not finite"):
        m(bad)
