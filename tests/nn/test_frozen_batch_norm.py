"""FrozenBatchNorm: fixed statistics and affine as buffers, BatchNorm's state_dict."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import normlab as nl


def _trained_bn(cls=torch.nn.BatchNorm2d, shape=(6, 3, 4, 4), **kw):
    bn = cls(3, **kw)
    for i in range(4):
        bn(torch.randn(shape) * (1 + i) + i)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


def test_batch_norm_checkpoint_loads_and_stays_frozen_through_train_and_optimizer():
    bn = _trained_bn()
    buf = io.BytesIO()
    torch.save(bn.state_dict(), buf)
    buf.seek(0)
    frozen = nl.nn.FrozenBatchNorm2d(3)
    frozen.load_state_dict(torch.load(buf, weights_only=True))  # strict
    assert int(frozen.num_batches_tracked) == 4
    conv = torch.nn.Conv2d(3, 3, 1)
    model = torch.nn.Sequential(conv, frozen).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert list(frozen.parameters()) == []
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(5, 3, 4, 4)
    model(x).pow(2).sum().backward()
    opt.step()
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(frozen(x), bn(x))  # in train mode: BN's eval output
    assert conv.weight.grad is not None  # the gradient flows through to the input


def test_state_dict_loads_back_into_batch_norm_with_the_counter():
    frozen = nl.nn.FrozenBatchNorm2d.from_batch_norm(_trained_bn())
    bn = torch.nn.BatchNorm2d(3, momentum=None)
    bn.load_state_dict(frozen.state_dict())  # strict: same keys
    assert int(bn.num_batches_tracked) == 4
    assert list(frozen.state_dict()) == list(bn.state_dict())


def test_checkpoint_without_num_batches_tracked_loads():
    # torchvision's FrozenBatchNorm2d saves no counter; neither did BN before version 2
    sd = _trained_bn().state_dict()
    del sd["num_batches_tracked"]
    frozen = nl.nn.FrozenBatchNorm2d(3)
    frozen.load_state_dict(sd)
    assert int(frozen.num_batches_tracked) == 0
    torch.testing.assert_close(frozen.running_var, sd["running_var"])


def test_from_batch_norm_handles_affine_false_activation_and_untracked():
    bn = _trained_bn(torch.nn.BatchNorm1d, (8, 3), affine=False)
    frozen = nl.nn.FrozenBatchNorm1d.from_batch_norm(bn)
    assert torch.equal(frozen.weight, torch.ones(3)) and torch.equal(frozen.bias, torch.zeros(3))
    x = torch.randn(5, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    fused = nl.nn.BatchNorm1d(3, activation="relu").eval()
    assert nl.nn.FrozenBatchNorm1d.from_batch_norm(fused).activation == "relu"
    torch.testing.assert_close(nl.nn.FrozenBatchNorm1d.from_batch_norm(fused)(x), fused(x))
    with pytest.raises(ValueError, match="no running statistics"):
        nl.nn.FrozenBatchNorm1d.from_batch_norm(torch.nn.BatchNorm1d(3, track_running_stats=False))


def test_eps_default_and_a_dead_channel():
    frozen = nl.nn.FrozenBatchNorm2d(2)
    assert frozen.eps == 1e-5 and repr(frozen) == "FrozenBatchNorm2d(2, eps=1e-05)"
    frozen.running_var.zero_()  # a channel that never fired
    y = frozen(torch.randn(3, 2, 2, 2))
    assert torch.isfinite(y).all()


def test_not_a_batch_norm_to_tools():
    # tools that look for _BatchNorm (convert_sync_batchnorm, recalibration) must not
    # treat a frozen layer as trainable BN
    assert not isinstance(nl.nn.FrozenBatchNorm2d(3), _BatchNorm)
