"""The output pool (kernels/_memory.py): a buffer is reused only when no tensor uses it."""

import gc
import subprocess
import sys

import pytest
import torch

import normlab.nn as nln
from normlab import kernels
from normlab.kernels import _memory

MIB = 1 << 20


@pytest.fixture
def pool(monkeypatch):
    """A fresh pool of 64 MiB for the test (the module's pool is left as it was)."""
    fresh = _memory._Pool(64 * MIB)
    monkeypatch.setattr(_memory, "_POOL", fresh)
    return fresh


def _big(shape=(4 * MIB // 4 // 16, 16)):  # 4 MiB of float32: the smallest pooled size
    return torch.randn(shape)


def test_a_buffer_is_reused_only_after_every_tensor_on_it_is_gone(pool):
    x = _big()
    a = _memory.empty_like(x)
    b = _memory.empty_like(x)
    assert a.data_ptr() != b.data_ptr()
    view = a[3:5]
    address = a.data_ptr()
    del a
    c = _memory.empty_like(x)  # a view still uses a's buffer
    assert c.data_ptr() != address
    del view
    gc.collect()
    d = _memory.empty_like(x)
    assert d.data_ptr() == address
    assert _memory.pool_info()["hits"] == 1


def test_tensors_autograd_keeps_are_not_handed_out_again(pool, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    x = torch.randn(64, 8, 64, 64, requires_grad=True)  # 8 MiB: pooled y and dx
    bn = nln.BatchNorm2d(8, activation="sigmoid")
    y = bn(x)  # sigmoid: backward needs only x, but y must survive another forward
    y_before = y.detach().clone()
    for _ in range(3):  # each forward takes a new buffer while y is alive
        other = bn(torch.randn_like(x))
        assert other.data_ptr() != y.data_ptr()
    torch.testing.assert_close(y.detach(), y_before, rtol=0, atol=0)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert gx.data_ptr() != y.data_ptr()


def test_outputs_have_the_layout_empty_like_gives(pool):
    for x in (
        torch.randn(8, 16, 96, 96),
        torch.randn(8, 16, 96, 96).to(memory_format=torch.channels_last),
        torch.randn(96, 96, 16, 8).permute(3, 2, 0, 1),  # neither: preserve → contiguous
        torch.randn(8, 16, 96, 96, dtype=torch.float64),
    ):
        for fmt in (torch.preserve_format, torch.contiguous_format):
            got = _memory.empty_like(x, fmt)
            want = torch.empty_like(x, memory_format=fmt)
            assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
            got.fill_(1.5)  # the whole storage is addressable
            assert got.untyped_storage().nbytes() == x.nbytes


def test_the_limit_holds_and_free_buffers_of_other_sizes_make_room(pool):
    pool.limit = 12 * MIB
    four, eight = _big(), _big((8 * MIB // 4 // 16, 16))
    a = _memory.empty_like(four)
    b = _memory.empty_like(eight)
    assert _memory.pool_info()["bytes"] == 12 * MIB
    c = _memory.empty_like(four)  # the pool is full and both buffers are in use
    assert _memory.pool_info()["bytes"] == 12 * MIB and c.shape == four.shape
    del b
    d = _memory.empty_like(_big((6 * MIB // 4 // 16, 16)))  # drops the free 8 MiB buffer
    info = _memory.pool_info()
    assert info["bytes"] == 10 * MIB and info["buffers"] == 2
    del a, c, d
    _memory.empty_cache()
    assert _memory.pool_info()["bytes"] == 0


def test_small_tensors_and_a_zero_limit_bypass_the_pool(pool):
    _memory.empty_like(torch.randn(100, 100))
    _memory.set_pool_limit(0)
    _memory.empty_like(_big())
    assert _memory.pool_info()["misses"] == 0
    with pytest.raises(ValueError, match="megabytes must be >= 0"):
        _memory.set_pool_limit(-1)


def test_training_steps_reusing_buffers_match_torch(pool, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    g = torch.Generator().manual_seed(0)
    ours, theirs = nln.BatchNorm2d(8, activation="relu"), torch.nn.BatchNorm2d(8)
    for _ in range(3):
        x = torch.randn(32, 8, 64, 64, generator=g).requires_grad_()
        dy = torch.randn(x.shape, generator=g)
        y = ours(x)
        (gx,) = torch.autograd.grad(y, x, dy)
        y_ref = torch.relu(theirs(x))
        (gx_ref,) = torch.autograd.grad(y_ref, x, dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
        del y, gx
    assert pool.hits >= 2


@pytest.mark.slow  # a fresh interpreter imports torch (5 s on the loaded box)
def test_a_bad_pool_size_in_the_environment_is_named():
    code = "import normlab.kernels._memory"
    env = {"NORMLAB_POOL_MB": "lots", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "NORMLAB_POOL_MB='lots' is not a number" in out.stderr


def test_pooled_tensors_save_pickle_and_share_like_any_tensor(pool, tmp_path):
    import pickle

    x = _big()
    y = _memory.empty_like(x).copy_(x)
    torch.save(y, tmp_path / "y.pt")
    assert torch.equal(torch.load(tmp_path / "y.pt"), x)
    assert torch.equal(pickle.loads(pickle.dumps(y)), x)
    address = y.data_ptr()
    y.share_memory_()  # moves to shared memory: the pool's buffer is free again
    assert y.is_shared() and torch.equal(y, x)
    assert _memory.empty_like(x).data_ptr() == address
    with pytest.raises(RuntimeError, match="not resizable"):  # the documented difference
        _memory.empty_like(x).resize_(2 * x.numel())


# -- in-place ops on pooled outputs (issue 11, item 2) -----------------------------------
# (8, 64, 56, 56) float32 is 6.4 MB: y and dx come from the pool. torch's reference is
# BatchNorm2d then the same in-place op, the pattern of every torchvision ResNet.
POOLED = (8, 64, 56, 56)


def _pair(activation=None):
    torch.manual_seed(3)
    ours = nln.BatchNorm2d(64, activation=activation)
    theirs = torch.nn.BatchNorm2d(64)
    with torch.no_grad():  # parameters away from 1 / 0, so their gradients are checked
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 64))
            m.bias.copy_(torch.linspace(-0.2, 0.2, 64))
    return ours, theirs


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(POOLED, generator=g) * 2 + 0.5
    return x, torch.randn(POOLED, generator=g), torch.randn(POOLED, generator=g)


def _step(bn, x, after, dy):
    """``after(bn(x))`` forward and backward; returns y and the gradients."""
    xg = x.clone().requires_grad_()
    y = bn(xg)
    assert not y._is_view()
    out = after(y)
    grads = torch.autograd.grad(out, (xg, bn.weight, bn.bias), dy)
    return out.detach(), grads


def _close(ours, theirs):
    (y, g), (y_ref, g_ref) = ours, theirs
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pooled_outputs_are_fresh_tensors_not_views(pool, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    x = torch.randn(POOLED)
    raw = _memory.empty_like(x)
    assert not raw._is_view() and raw._base is None and pool.misses == 1
    xg = x.clone().requires_grad_()
    y = nln.BatchNorm2d(64)(xg)
    (gx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    assert pool.misses == 3  # y and dx came from the pool too
    for t in (y, gx):
        assert not t._is_view() and t._base is None
        assert t.untyped_storage().nbytes() == x.nbytes and t.storage_offset() == 0


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(lambda y: torch.nn.ReLU(inplace=True)(y), id="ReLU(inplace=True)"),
        pytest.param(lambda y: y.relu_(), id="relu_"),
        pytest.param(lambda y: y.mul_(0.5), id="mul_"),
    ],
)
def test_inplace_ops_after_the_layer_train_like_torch(pool, monkeypatch, after):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    x, dy, _ = _inputs()
    ours, theirs = _pair()
    for _ in range(2):  # the second step reuses the pool's buffers
        _close(_step(ours, x, after, dy), _step(theirs, x, after, dy))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert pool.hits >= 2


@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_residual_added_in_place_trains_like_torch(pool, monkeypatch, activation):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    x, dy, residual = _inputs(1)
    residual.requires_grad_()
    ours, theirs = _pair(activation)

    def add_(y):  # a ResNet block's tail: y += identity, then relu in place
        y.add_(residual)
        return torch.relu_(y)

    def add_ref(y):  # out of place: torch's relu saves its result
        y = torch.relu(y) if activation == "relu" else y
        return torch.relu(y + residual)

    ours_out = _step(ours, x, add_, dy)
    theirs_out = _step(theirs, x, add_ref, dy)
    _close(ours_out, theirs_out)


def test_inplace_ops_on_eval_outputs_match_torch(pool, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    x, _, residual = _inputs(2)
    ours, theirs = _pair()
    for m in (ours, theirs):  # some running statistics to normalise with
        m(x)
        m.eval()
    with torch.no_grad():
        y = ours(x)
        assert not y._is_view() and pool.misses >= 1
        y += residual
        y.relu_()
        y_ref = torch.relu_(theirs(x) + residual)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_gradients_accumulate_in_place_into_a_pooled_dx(pool, monkeypatch):
    # AccumulateGrad keeps the first dx as x.grad and adds the next one into it in place.
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    x, dy, _ = _inputs(3)
    ours, theirs = _pair()
    grads = []
    for bn in (ours, theirs):
        xg = x.clone().requires_grad_()
        for _ in range(2):
            bn(xg).backward(dy)
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_an_output_modified_in_place_keeps_its_buffer(pool, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    x, dy, residual = _inputs(4)
    bn = nln.BatchNorm2d(64)
    xg = x.clone().requires_grad_()
    y = bn(xg)
    y.add_(residual).relu_()
    address, y_before = y.data_ptr(), y.detach().clone()
    held = [bn(torch.randn_like(x)) for _ in range(3)]  # each needs a buffer meanwhile
    assert address not in {t.data_ptr() for t in held}
    torch.testing.assert_close(y.detach(), y_before, rtol=0, atol=0)
    y.backward(dy)  # autograd's saved result of relu_ is y itself, still intact
    del y, held
    gc.collect()
    assert bn(x).data_ptr() == address  # free again once the last user is gone
