"""normlab._private: each shortcut answers as its public equivalent (or, with none, as
the documented torch behaviour it stands for)."""

from __future__ import annotations

import os

import torch

from normlab import _private


def test_env_raw_follows_os_environ(monkeypatch):
    name = "NORMLAB_PRIVATE_TEST_VAR"
    monkeypatch.delenv(name, raising=False)
    read = _private.env_raw(name)
    assert read() is None
    monkeypatch.setenv(name, "numba")
    value = read()
    assert os.fsdecode(value) == os.environ.get(name) == "numba"
    os.environ[name] = "torch"
    assert os.fsdecode(read()) == "torch"
    del os.environ[name]
    assert read() is None


def test_kernels_see_jit_tracing_by_the_public_query():
    # the replaced shortcut (torch._C._get_tracing_state): normlab.kernels.traced now
    # asks torch.jit.is_tracing, and still routes a traced call away from the kernels
    from normlab import kernels

    x = torch.ones(2, 3)
    assert not kernels.traced(x)
    seen = []

    def f(t):
        seen.append(kernels.traced(t))
        return t * 2

    torch.jit.trace(f, x, check_trace=False)
    assert seen == [True]


def test_functorch_queries_and_unwrapping():
    x = torch.randn(3, 4)
    assert not _private.functorch_active()
    assert _private.functorch_value(x) is not None
    seen = {}
    buf = torch.zeros(3, 4)

    def f(v):
        seen["active"] = _private.functorch_active()
        seen["value"] = _private.functorch_value(v)
        with _private.DisableFuncTorch():  # a plain buffer updated under the transform
            buf.add_(seen["value"] if seen["value"] is not None else 0.0)
        return (v * v).sum()

    torch.func.grad(f)(x)
    assert seen["active"]
    torch.testing.assert_close(buf, x)
    torch.testing.assert_close(seen["value"], x)  # the plain tensor under grad's wrapper
    torch.func.vmap(lambda v: f(v))(x)
    assert seen["value"] is None  # batched by vmap: no single plain tensor


def test_dispatch_modes_counts_active_modes():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert _private.dispatch_modes() == 0
    with Mode():
        assert _private.dispatch_modes() == 1


def test_unwrap_if_dead_passes_live_tensors_through():
    x = torch.randn(2)
    assert _private.unwrap_if_dead(x) is x
