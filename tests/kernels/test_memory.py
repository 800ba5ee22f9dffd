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
