"""When the engine uses the kernels, and that both paths give the same results."""

import numba
import pytest
import torch
from torch.autograd import gradgradcheck

import normlab.functional as NF
import normlab.nn as nln
from normlab import kernels
from tests import reference as ref

DIMS = (0, 2, 3)


def _plan(x, w=None, b=None):
    return kernels.plan_batch(x, DIMS, w, b, center=True)


@pytest.fixture
def numba_mode(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")


def _run(module, x, dy):
    xg = x.detach().clone().requires_grad_()
    y = module(xg)
    grads = torch.autograd.grad(y, (xg, module.weight, module.bias), dy)
    return y.detach(), grads


@pytest.mark.parametrize("channels_last", [False, True])
def test_both_paths_agree_over_training_steps(monkeypatch, channels_last):
    g = torch.Generator().manual_seed(0)
    torch_path, kernel_path = (
        nln.BatchNorm2d(6, activation="relu"),
        nln.BatchNorm2d(6, activation="relu"),
    )
    for step in range(3):
        x = torch.randn(4, 6, 5, 5, generator=g) * (step + 1) + step
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=g)
        monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
        y_t, g_t = _run(torch_path, x, dy)
        monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
        y_k, g_k = _run(kernel_path, x, dy)
        torch.testing.assert_close(y_k, y_t)
        for a, b in zip(g_k, g_t):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kernel_path.running_mean, torch_path.running_mean)
    torch.testing.assert_close(kernel_path.running_var, torch_path.running_var)
    assert int(kernel_path.num_batches_tracked) == 3
    for m in (torch_path, kernel_path):
        m.eval()
    x = torch.randn(4, 6, 5, 5, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(kernel_path(x), torch_path(x))


def test_env_var_forces_the_torch_path(monkeypatch):
    x = torch.randn(8, 3, 4, 4)
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    assert _plan(x) is not None
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert kernels.mode() == "torch" and _plan(x) is None
    stat = torch.zeros(1, 3, 1, 1)
    assert kernels.plan_affine(x, stat, stat + 1, None, None) is None

    def fail(*a, **k):
        raise AssertionError("kernel called under NORMLAB_KERNELS=torch")

    monkeypatch.setattr(kernels, "batch_forward", fail)
    monkeypatch.setattr(kernels, "affine_forward", fail)
    bn = nln.BatchNorm2d(3)
    bn(x).sum().backward()
    with torch.no_grad():
        bn.eval()(x)


def test_bad_env_value_says_what_to_type(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match=r"NORMLAB_KERNELS='fast'.*'torch'"):
        NF.batch_norm(torch.randn(4, 3), None, None, training=True)


def test_auto_mode_uses_the_size_threshold(monkeypatch):
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    big = torch.empty(max(kernels.MIN_NUMEL, 64), 1)
    assert _plan_2d(big) is not None
    if kernels.MIN_NUMEL > 1:
        assert _plan_2d(torch.empty(kernels.MIN_NUMEL - 1, 1)) is None


def _plan_2d(x):
    return kernels.plan_batch(x, (0,), None, None, center=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 3, 2, 2, device="meta"),
        lambda: torch.nn.Parameter(torch.randn(4, 3, 2, 2)),  # a tensor subclass
        lambda: torch.randn(4, 3, 2, 2, dtype=torch.complex64),
    ],
    ids=["meta", "subclass", "complex"],
)
def test_inputs_the_kernels_do_not_take_go_to_torch(numba_mode, make):
    x = make()
    assert _plan(x) is None
    stat = torch.zeros(1, 3, 1, 1, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        assert kernels.plan_affine(x, stat, stat + 1, None, None) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_takes_the_kernels(numba_mode, dtype):
    # bf16/fp16 storage, float32 parameters (autocast) or the input's own (tests/kernels/
    # test_half.py has the numerics); float64 or other dtypes are still not taken
    x = torch.randn(8, 3, 4, 4).to(dtype)
    for p in (None, torch.ones(3), torch.ones(3, dtype=dtype)):
        assert kernels.plan_batch(x, DIMS, p, p, center=True, flat=True) is not None
    stat = torch.zeros(1, 3, 1, 1)
    with torch.no_grad():
        assert kernels.plan_affine(x, stat, stat + 1, None, None) is not None
    y16 = NF.batch_norm(x, None, None, training=True, activation="relu")
    y32 = NF.batch_norm(x.float(), None, None, training=True, activation="relu")
    assert y16.dtype == dtype
    torch.testing.assert_close(y16, y32.to(dtype), rtol=2**-7, atol=1e-5)  # 1 ulp


def test_cases_outside_batch_norm_go_to_torch(numba_mode):
    x = torch.randn(4, 3, 5)
    assert kernels.plan_batch(x, (2,), None, None, center=True) is None  # LayerNorm-like
    assert kernels.plan_batch(x, (0, 2), None, None, center=False) is None  # RMS
    w = torch.ones(1, 3, 5)  # elementwise affine
    assert kernels.plan_batch(x, (0, 2), w, None, center=True) is None
    assert kernels.plan_batch(torch.empty(0, 3, 5), (0, 2), None, None, center=True) is None


def test_eval_with_gradients_uses_torch_ops(numba_mode):
    x = torch.randn(4, 3, 5, requires_grad=True)
    stat = torch.zeros(1, 3, 1)
    assert kernels.plan_affine(x, stat, stat + 1, None, None) is None
    with torch.no_grad():
        assert kernels.plan_affine(x, stat, stat + 1, None, None) is not None
    bn = nln.BatchNorm1d(3).eval()
    (g,) = torch.autograd.grad(bn(x).sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 1 / (1 + bn.eps) ** 0.5))


def test_double_backward_uses_the_differentiable_path(numba_mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return NF.batch_norm(x, None, None, w, b, training=True, activation="tanh")

    assert gradgradcheck(fn, (x, w, b))


def test_one_activation_sized_tensor_saved(numba_mode):
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    bn = nln.BatchNorm2d(4, activation="relu")
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bn(x)
    assert sum(s >= x.numel() for s in sizes) == 1
    y.sum().backward()  # and backward still works from it
    assert x.grad is not None


def test_thread_count_follows_torch(numba_mode):
    big = torch.randn(kernels.PARALLEL_MIN_NUMEL // 8, 8)  # large enough for threads
    before = torch.get_num_threads()
    try:
        want = min(2, numba.config.NUMBA_NUM_THREADS)
        torch.set_num_threads(want)
        NF.batch_norm(big, None, None, training=True)
        assert numba.get_num_threads() == want
        torch.set_num_threads(1)  # one torch thread: the serial kernels, no thread team
        assert kernels._threads(big.numel()) == 1
    finally:
        torch.set_num_threads(before)
    # small tensors run serially on the calling thread, whatever torch's count
    assert kernels._threads(kernels.PARALLEL_MIN_NUMEL - 1) == 1


def test_concurrent_calls_from_python_threads(numba_mode):
    import threading

    x = torch.randn(kernels.PARALLEL_MIN_NUMEL // 8, 8)  # the threaded kernels
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(NF.batch_norm(x, None, None, training=True, activation="relu"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    before = torch.get_num_threads()
    torch.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        want = NF.batch_norm(x, None, None, training=True, activation="relu")
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    assert not errors and len(results) == 9
    for y in results:  # same thread count, same partition of the sums: identical
        torch.testing.assert_close(y, want, rtol=0, atol=0)


# -- running statistics folded in by the forward kernel ----------------------------------
def _train_steps(monkeypatch, mode, shape, *, momentum, x_dtype, buf_dtype, channels_last):
    """Run NF.batch_norm for a few training steps on NORMLAB_KERNELS=mode; returns the
    outputs and the running buffers and counter."""
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    rm, rv = torch.zeros(c, dtype=buf_dtype), torch.ones(c, dtype=buf_dtype)
    nbt = torch.tensor(0)
    ys = []
    for step in range(3):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * (step + 1) + 3).to(x_dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = NF.batch_norm(
            x, rm, rv, training=True, momentum=momentum, num_batches_tracked=nbt, activation="relu"
        )
        ys.append(y)
    return ys, rm, rv, nbt


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "shape, x_dtype, buf_dtype, channels_last",
    [
        ((16, 5), torch.float32, torch.float32, False),
        ((16, 5), torch.float64, torch.float64, False),
        ((16, 5), torch.float32, torch.float64, False),  # buffers of another dtype
        ((4, 3, 5, 5), torch.float32, torch.float32, False),
        ((4, 3, 5, 5), torch.float32, torch.float32, True),
    ],
)
@pytest.mark.parametrize("threaded", [False, True])
def test_running_update_in_the_kernel_matches_torch_ops(
    request, monkeypatch, momentum, shape, x_dtype, buf_dtype, channels_last, threaded
):
    if threaded:  # the threaded (array) kernels instead of the serial ones by address
        request.getfixturevalue("threaded_kernels")
    kw = dict(momentum=momentum, x_dtype=x_dtype, buf_dtype=buf_dtype, channels_last=channels_last)
    ys_t, rm_t, rv_t, n_t = _train_steps(monkeypatch, "torch", shape, **kw)
    ys_k, rm_k, rv_k, n_k = _train_steps(monkeypatch, "numba", shape, **kw)
    tol = {"rtol": 1e-6, "atol": 1e-6} if torch.float32 in (x_dtype, buf_dtype) else {}
    for a, b in zip(ys_k, ys_t):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(rm_k, rm_t, **tol)
    torch.testing.assert_close(rv_k, rv_t, **tol)
    assert rm_k.dtype == buf_dtype and int(n_k) == int(n_t) == 3


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
@pytest.mark.parametrize("policy", ["skip", "raise", "propagate"])
def test_nonfinite_policy_inside_the_kernel(request, numba_mode, threaded, bad, policy):
    if threaded:
        request.getfixturevalue("threaded_kernels")
    x = torch.randn(32, 4) + 2
    if bad == "overflow":  # finite input whose float32 variance overflows (|x| ~ 1e20)
        x[:, 1] = torch.linspace(-1, 1, 32) * 1e20
    else:
        x[5, 1] = float(bad)
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(7)
    before = (rm.clone(), rv.clone(), nbt.clone())

    def call():
        return NF.batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt, nonfinite=policy)

    if policy == "raise":
        with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
            call()
    elif policy == "skip":
        with pytest.warns(NF.NonFiniteStatisticsWarning):
            call()
    else:
        call()
        assert not torch.isfinite(rv[1]) and int(nbt) == 8
        assert torch.isfinite(rm[[0, 2, 3]]).all()  # the other channels updated as usual
        return
    assert all(torch.equal(a, b) for a, b in zip((rm, rv, nbt), before))


@pytest.mark.parametrize(
    "make",
    [
        lambda c: (torch.zeros(2 * c)[::2], torch.ones(c), torch.tensor(0)),  # strided view
        lambda c: (torch.zeros(c), torch.ones(c, dtype=torch.float64), torch.tensor(0)),
        lambda c: (torch.zeros(c), torch.ones(c), torch.tensor(0, dtype=torch.int32)),
        lambda c: (torch.zeros(c, dtype=torch.float16), torch.ones(c).half(), torch.tensor(0)),
    ],
    ids=["strided", "mixed-dtypes", "int32-counter", "float16"],
)
def test_buffers_the_kernel_cannot_write_use_torch_ops(monkeypatch, make):
    x = torch.randn(16, 5) * 3 + 1
    results = []
    for mode in ("torch", "numba"):
        monkeypatch.setenv(kernels.KERNELS_ENV, mode)
        rm, rv, nbt = make(5)
        for _ in range(2):
            y = NF.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
        results.append((y, rm.float(), rv.float(), int(nbt)))
    (y_t, rm_t, rv_t, n_t), (y_k, rm_k, rv_k, n_k) = results
    tol = {"rtol": 1e-3, "atol": 1e-3}  # float16 buffers
    torch.testing.assert_close(y_k, y_t)
    torch.testing.assert_close(rm_k, rm_t, **tol)
    torch.testing.assert_close(rv_k, rv_t, **tol)
    assert n_k == n_t == 2


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("shape, channels_last", [((16, 6), False), ((4, 6, 3, 5), True)])
def test_serial_by_address_and_threaded_array_kernels_agree(
    request, monkeypatch, act, shape, channels_last
):
    # The small-tensor path (serial kernels by data pointer) against the threaded kernels
    # on numpy arrays, forward, backward and eval, weight/bias of another dtype included.
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, generator=g)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    out = []
    for threaded in (False, True):
        if threaded:
            request.getfixturevalue("threaded_kernels")
        xg = x.clone().requires_grad_()
        y = NF.batch_norm(xg, None, None, w, b, training=True, activation=act)
        grads = torch.autograd.grad(y, (xg, w, b), dy)
        with torch.no_grad():
            y_eval = NF.batch_norm(x, rm, rv, w, b, training=False, activation=act)
        out.append((y, *grads, y_eval))
    for a, b_ in zip(*out):
        assert a.dtype == b_.dtype and a.stride() == b_.stride()
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_a_big_kernel_call_keeps_torchs_thread_count(numba_mode):
    # Numba's first threaded launch used to reset the OpenMP thread count torch reads.
    big = torch.randn(kernels.PARALLEL_MIN_NUMEL // 8, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        NF.batch_norm(big, None, None, training=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_plans_differ_by_strides_and_take_per_channel_shapes(numba_mode):
    x = torch.randn(4, 3, 5, 5)
    cf, cl = _plan(x), _plan(x.to(memory_format=torch.channels_last))
    strided = _plan(x.transpose(2, 3))
    assert (cf.layout, cf.copy) == ("cf", False)
    assert (cl.layout, cl.copy) == ("cl", False) and cl.shape == (100, 3)
    assert (strided.layout, strided.copy) == ("cf", True)
    assert _plan(x) is cf  # cached
    x2 = torch.randn(8, 3)
    assert _plan_2d(x2) is not None
    assert kernels.plan_batch(x2, (0,), torch.ones(3), torch.ones(1, 3), True) is not None
    assert kernels.plan_batch(x2, (0,), torch.ones(3, 1), None, True) is None  # not (C,)
    assert kernels.plan_batch(x, DIMS, torch.ones(3), None, True) is None  # (C,) vs dim 1


def test_eval_plans_need_one_value_per_channel(numba_mode):
    x = torch.randn(8, 3)
    ok = torch.zeros(3)
    with torch.no_grad():
        assert kernels.plan_affine(x, ok, ok + 1, ok, ok) is not None
        assert kernels.plan_affine(x, torch.zeros(1, 3), ok + 1, None, None) is not None
        for bad in (torch.zeros(2), torch.zeros(5), torch.zeros(3, 1), torch.zeros(2, 1, 3)):
            assert kernels.plan_affine(x, bad, ok + 1, None, None) is None, bad.shape
            assert kernels.plan_affine(x, ok, ok + 1, bad, None) is None, bad.shape
        assert kernels.plan_affine(x, ok, ok + 1, ok.double(), None) is not None
        assert kernels.plan_affine(x, ok, ok.to(torch.int64), None, None) is None


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float64, torch.bfloat16])
def test_parameters_of_another_dtype_get_gradients_of_their_dtype(
    request, numba_mode, threaded, param_dtype
):
    if threaded:
        request.getfixturevalue("threaded_kernels")
    x = torch.randn(16, 4, requires_grad=True)
    w = torch.linspace(0.5, 1.5, 4).to(param_dtype).requires_grad_()
    b = torch.linspace(-1, 1, 4).to(param_dtype).requires_grad_()
    y = NF.batch_norm(x, None, None, w, b, training=True, activation="relu")
    dy = torch.randn(16, 4)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    assert gw.dtype == gb.dtype == param_dtype
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    y64 = torch.relu(ref.batch_norm_train(x64, w64, b64))
    want = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    tol = (
        {"rtol": 2e-2, "atol": 2e-2}
        if param_dtype == torch.bfloat16
        else {"rtol": 1e-5, "atol": 1e-5}
    )
    for got, exp in zip((gx, gw, gb), want):
        torch.testing.assert_close(got.double(), exp, **tol)


def test_outputs_come_from_the_pooled_allocator_on_every_path(numba_mode, monkeypatch):
    # A fresh 51 MB activation costs ~10 ms of page faults (kernels/_memory.py);
    # the serial by-address path once bypassed the allocator and lost that at one thread.
    from normlab.kernels import _memory, _run

    sizes = []
    original = _run.empty_like  # where the wrappers look it up

    def spy(x, memory_format=torch.preserve_format):
        sizes.append(x.numel())
        return original(x, memory_format)

    monkeypatch.setattr(_run, "empty_like", spy)
    x = torch.randn(_memory._MIN_BYTES // 4 // 8, 8, requires_grad=True)  # 4 MiB
    before = torch.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            torch.set_num_threads(threads)
            sizes.clear()
            y = NF.batch_norm(x, None, None, training=True)
            y.backward(torch.ones_like(y))
            with torch.no_grad():
                NF.batch_norm(x, torch.zeros(8), torch.ones(8), training=False)
            assert sizes == [x.numel()] * 3, threads  # y, dx, eval y
    finally:
        torch.set_num_threads(before)


def test_layer_eval_fast_path_matches_the_general_path_and_declines_what_it_cannot_do(
    numba_mode, monkeypatch
):
    g = torch.Generator().manual_seed(3)
    bn = nln.BatchNorm2d(5, activation="leaky_relu").eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=g))
        bn.running_var.copy_(torch.rand(5, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(5, generator=g))
    x = torch.randn(3, 5, 4, 4, generator=g)
    args = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, "leaky_relu", 0.01)
    with torch.no_grad():
        fast = kernels.affine_channels(x, 1, *args)
        general = torch.nn.functional.leaky_relu(
            ref.batch_norm_eval(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        ).float()
        torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn(x), fast, rtol=0, atol=0)
        xl = x.to(memory_format=torch.channels_last)
        assert kernels.affine_channels(xl, 1, *args).is_contiguous(
            memory_format=torch.channels_last
        )
    # parameters that need gradients, tensors elsewhere, and the torch mode: declined
    assert kernels.affine_channels(x, 1, *args) is None  # bn.weight requires grad
    meta = bn.running_mean.to("meta")
    with torch.no_grad():
        assert kernels.affine_channels(x, 1, meta, *args[1:]) is None
        assert kernels.affine_channels(x.double().to("meta"), 1, *args) is None
        monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
        assert kernels.affine_channels(x, 1, *args) is None
        torch.testing.assert_close(bn(x), general, rtol=1e-6, atol=1e-6)
