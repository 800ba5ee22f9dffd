"""Functional LayerNorm, RMSNorm, GroupNorm, InstanceNorm vs torch.nn.functional and
float64 references; invariances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import normlab.functional as NF
from tests import reference as ref


def _x(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 3 + 1


def test_same_positional_arguments_as_torch_functional():
    x = _x(2, 4, 3, 5)
    w, b = _x(3, 5, seed=1), _x(3, 5, seed=2)
    torch.testing.assert_close(
        NF.layer_norm(x, (3, 5), w, b, 1e-3), F.layer_norm(x, (3, 5), w, b, 1e-3)
    )
    torch.testing.assert_close(NF.rms_norm(x, (5,), w[0], 1e-3), F.rms_norm(x, (5,), w[0], 1e-3))
    w4, b4 = _x(4, seed=3), _x(4, seed=4)
    torch.testing.assert_close(NF.group_norm(x, 2, w4, b4, 1e-3), F.group_norm(x, 2, w4, b4, 1e-3))
    rm, rv = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
    trm, trv = rm.clone(), rv.clone()
    torch.testing.assert_close(
        NF.instance_norm(x, rm, rv, w4, b4, True, 0.3, 1e-3),
        F.instance_norm(x, trm, trv, w4, b4, True, 0.3, 1e-3),
    )
    torch.testing.assert_close((rm, rv), (trm, trv))
    torch.testing.assert_close(
        NF.instance_norm(x, rm, rv, w4, b4, False, 0.3, 1e-3),
        F.instance_norm(x, trm, trv, w4, b4, False, 0.3, 1e-3),
    )
    with pytest.raises(ValueError, match=r"use_input_stats=False.*running_mean"):
        NF.instance_norm(x, use_input_stats=False)
    with pytest.raises(ValueError, match="momentum must be a number"):
        NF.instance_norm(x, rm, rv, momentum=None)


def test_float64_references_at_large_offsets():
    # float32 input sitting at 1e4 with std 0.1: the engine's shifted statistics stay within
    # 1e-3 of float64 (docs/reliability.md case 13); torch's kernels are the comparison
    # point
    x = (torch.randn(4, 6, 8) * 0.1 + 1e4).float()
    torch.testing.assert_close(
        NF.group_norm(x, 3).double(), ref.group_norm(x, 3), rtol=0, atol=1e-3
    )
    torch.testing.assert_close(
        NF.layer_norm(x, (6, 8)).double(), ref.layer_norm(x, 2), rtol=0, atol=1e-3
    )
    torch.testing.assert_close(
        NF.instance_norm(x).double(), ref.group_norm(x, 6), rtol=0, atol=1e-3
    )


@given(
    groups=st.sampled_from([1, 2, 4]),
    shift=st.floats(-1e3, 1e3),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_group_norm_shift_and_scale_invariance(groups, shift, scale, seed):
    x = _x(3, 4, 5, seed=seed)
    y = NF.group_norm(x, groups, eps=0.0)
    torch.testing.assert_close(NF.group_norm(x * scale + shift, groups, eps=0.0), y)
    torch.testing.assert_close(y, ref.group_norm(x, groups, eps=0.0))


def test_rms_norm_is_not_centred_and_layer_norm_is():
    x = _x(3, 8) + 5
    y = NF.rms_norm(x, (8,), eps=0.0)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, dtype=x.dtype))
    assert (y.mean(-1).abs() > 0.5).all()
    z = NF.layer_norm(x, 8, eps=0.0)
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, dtype=x.dtype))
