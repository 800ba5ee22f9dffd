import sys

import pytest
import torch

from normlab.bench import memory
from normlab.bench.layers import saved_tensors


def _tiny():
    """A hand-countable graph: x (2, 4) and w (4, 3) float32, both requiring grad.

    * ``x[:, :2] * x[:, 2:]`` saves both operands: two views of x's storage (32 B);
    * ``x @ w`` saves x (again) and w (48 B);
    * ``relu`` saves its output, a new (2, 3) tensor (24 B);
    * ``sum`` and ``+`` save no tensors.

    So 5 saved tensors in 3 storages, 32 + 48 + 24 = 104 bytes; 3 of the tensors have
    6 or more elements (x whole, w, the relu output)."""
    x = torch.randn(2, 4, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)

    def fn():
        a = x[:, :2] * x[:, 2:]
        c = (x @ w).relu()
        return a.sum() + c.sum()

    return fn, x, w


def test_saved_for_backward_counts_storages_once_against_a_hand_count():
    fn, _, w = _tiny()
    saved = memory.saved_for_backward(fn, exclude=[w], activation_numel=6)
    assert saved == {
        "bytes": 104,
        "storages": 3,
        "tensors": 5,
        "excluded_bytes": 48,
        "activation_sized": 3,
    }


def test_saved_for_backward_sees_inplace_outputs_as_their_inputs_storage():
    x = torch.randn(8, 16, requires_grad=True)  # 512 B

    def fn():
        y = x * 2  # saves nothing (a constant factor); y: 512 B
        return y.relu_().sum()  # saves its output: y's storage

    assert memory.saved_for_backward(fn) == {
        "bytes": 512,
        "storages": 1,
        "tensors": 1,
        "excluded_bytes": 0,
    }


def test_layer_bench_keeps_its_saved_tensor_fields():
    fn, _, _ = _tiny()
    assert saved_tensors(fn, 6) == {"bytes": 104, "tensors": 3, "activation_sized": 3}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_rss_resets_and_sees_a_touched_allocation():
    assert memory.reset_peak_rss()
    before = memory.rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    during = memory.peak_rss_bytes()
    del block
    assert during - before >= 60 * 2**20
    # the peak outlives the free (the kernel's RSS counters are per-CPU and read
    # approximately: allow a few pages of slack)
    assert memory.peak_rss_bytes() >= during - 2**20
    assert memory.reset_peak_rss()
    assert memory.peak_rss_bytes() < during - 32 * 2**20  # and goes with a reset
