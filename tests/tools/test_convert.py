import copy
import io

import pytest
import torch
from torch import nn

import normlab as nl
from tests.tools.helpers import (
    SmallResNet,
    assert_identical,
    bn_layers,
    images,
    small_resnet,
    snapshot,
)


def _types(model):
    return {type(m) for m in bn_layers(model)}


def test_round_trip_torch_normlab_torch_leaves_everything_identical():
    model = small_resnet("torch")
    ours = nl.convert(model, to="normlab")
    back = nl.convert(ours, to="torch")
    assert _types(model) == _types(back) == {nn.BatchNorm2d}
    assert _types(ours) == {nl.nn.BatchNorm2d}
    assert_identical(snapshot(ours), snapshot(model))
    assert_identical(snapshot(back), snapshot(model))
    x = images(8, seed=4)
    assert torch.equal(back(x), model(x))
    torch.testing.assert_close(ours(x), model(x))
    for m in (model, ours, back):  # one training step each: same outputs and statistics
        m.train()
    y_model, y_ours, y_back = model(x), ours(x), back(x)
    assert torch.equal(y_back, y_model)
    torch.testing.assert_close(y_ours, y_model)
    assert_identical(snapshot(back), snapshot(model))


def test_settings_flags_device_and_dtype_are_carried():
    model = nn.Sequential(
        nn.BatchNorm1d(3, eps=1e-3, momentum=None, affine=False),
        nn.BatchNorm2d(3, bias=False),
        nn.BatchNorm3d(3, track_running_stats=False, dtype=torch.float64),
        nn.Sequential(nn.BatchNorm2d(3)),
    )
    model[0].num_batches_tracked.fill_(7)
    model[1].weight.requires_grad_(False)
    model.eval()
    model[3][0].train()
    ours = nl.convert(model, to="normlab")
    back = nl.convert(ours, to="torch")
    for m in (ours, back):
        a, b, c, (d,) = m
        assert a.eps == 1e-3 and a.momentum is None and not a.affine and a.weight is None
        assert a.num_batches_tracked == 7
        assert b.bias is None and not b.weight.requires_grad
        assert (
            not c.track_running_stats and c.running_mean is None and c.weight.dtype == torch.float64
        )
        assert d.training and not a.training
        assert d.weight.requires_grad
    meta = nl.convert(nn.BatchNorm2d(3, device="meta"), to="normlab")
    assert isinstance(meta, nl.nn.BatchNorm2d) and meta.running_mean.device.type == "meta"


def test_shared_layers_stay_shared_and_inplace_returns_the_model():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    out = nl.convert(model, to="normlab")
    assert out[0] is out[2] and isinstance(out[0], nl.nn.BatchNorm2d)
    assert isinstance(model[0], nn.BatchNorm2d) and type(model[0]) is nn.BatchNorm2d
    assert nl.convert(model, to="normlab", inplace=True) is model
    assert model[0] is model[2] and isinstance(model[0], nl.nn.BatchNorm2d)


def test_torch_syncbn_checkpoint_runs_as_normlab():
    model = SmallResNet(nn.BatchNorm2d)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    ours = nl.convert(model, to="normlab")
    assert _types(ours) == {nl.nn.SyncBatchNorm}
    buf.seek(0)
    ours.load_state_dict(torch.load(buf, weights_only=True))
    ours.train()(images(4))  # no process group: plain BN on CPU
    back = nl.convert(ours, to="torch")
    assert _types(back) == {nn.SyncBatchNorm}
    assert_identical(snapshot(back), snapshot(ours))


def test_other_norm_layers_round_trip():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.LayerNorm([4, 6, 6], elementwise_affine=True, bias=False),
        nn.RMSNorm(6, eps=1e-4),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    ours = nl.convert(model, to="normlab")
    assert [type(m).__module__.split(".")[0] for m in ours[1:]] == ["normlab"] * 4
    back = nl.convert(ours, to="torch")
    assert [type(m) for m in back] == [type(m) for m in model]
    x = images(4)
    assert_identical(snapshot(back), snapshot(model))
    torch.testing.assert_close(ours(x), model(x))
    assert torch.equal(back(x), model(x))


def test_to_renorm_keeps_eval_and_equals_bn_during_warmup():
    model = small_resnet("torch")
    renorm = nl.convert(model, to="renorm", r_max=2.0)
    assert _types(renorm) == {nl.nn.BatchRenorm2d}
    assert renorm.stem[1].num_batches_tracked == 3  # the schedule continues from here
    assert renorm.stem[1].r_max == 2.0
    x = images(8, seed=5)
    torch.testing.assert_close(renorm(x), model(x))
    model.train(), renorm.train()  # step 3 < warmup_steps: r = 1, d = 0, i.e. plain BN
    torch.testing.assert_close(renorm(x), model(x))
    back = snapshot(nl.convert(renorm, to="torch"))  # the step count travels as the BN's
    assert back.keys() == snapshot(model).keys()
    for k, v in snapshot(model).items():
        torch.testing.assert_close(back[k], v, msg=k)


def test_to_ghost_needs_a_virtual_batch_size():
    model = small_resnet("normlab")
    with pytest.raises(ValueError, match="virtual_batch_size"):
        nl.convert(model, to="ghost")
    ghost = nl.convert(model, to="ghost", virtual_batch_size=8)
    assert _types(ghost) == {nl.nn.GhostBatchNorm2d}
    x = images(8, seed=6)
    torch.testing.assert_close(ghost(x), model(x))
    ghost.train(), model.train()  # one ghost batch of 8 = plain BN
    torch.testing.assert_close(ghost(x), model(x))
    assert ghost.stem[1].virtual_batch_size == 8


def test_to_frozen_stays_eval_in_training_mode():
    model = small_resnet("torch")
    frozen = nl.convert(model, to="frozen")
    assert {type(m) for m in frozen.modules() if "Frozen" in type(m).__name__} == {
        nl.nn.FrozenBatchNorm2d
    }
    assert frozen.state_dict().keys() == model.state_dict().keys()
    x = images(8, seed=7)
    expected = model(x)
    frozen.train()
    torch.testing.assert_close(frozen(x), expected)
    with pytest.raises(ValueError, match="no running statistics"):
        nl.convert(nn.BatchNorm2d(3, track_running_stats=False), to="frozen")
    sync = nl.convert(model, to="sync")
    with pytest.raises(ValueError, match="rank=1, 2 or 3"):
        nl.convert(sync, to="frozen")
    assert isinstance(nl.convert(sync, to="frozen", rank=2).stem[1], nl.nn.FrozenBatchNorm2d)


def test_to_group_carries_affine_and_checks_the_group_count():
    model = small_resnet("torch")
    gn = nl.convert(model, to="group", num_groups=6)
    assert gn.stem[1].num_groups == 6 and gn.stem[1].num_channels == 6
    assert torch.equal(gn.stem[1].weight, model.stem[1].weight)
    x = images(4)
    # GroupNorm(C) normalises each sample's channel over H, W: an InstanceNorm
    conv = model.stem[0](x)
    expected = nn.functional.instance_norm(
        conv, weight=model.stem[1].weight, bias=model.stem[1].bias
    )
    torch.testing.assert_close(gn.stem[1](conv), expected)
    with pytest.raises(ValueError, match="does not divide"):
        nl.convert(model, to="group", num_groups=4)
    with pytest.raises(ValueError, match="num_groups=G"):
        nl.convert(model, to="group")


def test_freeze_state_travels_with_the_layer():
    model = small_resnet("torch")
    model.stem[1].bias.requires_grad_(False)
    nl.freeze(model)
    ours = nl.convert(model, to="normlab").train()
    before = snapshot(ours)
    ours(images(4))
    assert_identical(snapshot(ours), before)
    assert not any(p.requires_grad for m in bn_layers(ours) for p in m.parameters())
    nl.unfreeze(ours)
    assert ours.stem[1].weight.requires_grad and not ours.stem[1].bias.requires_grad


def test_refuses_conversions_that_would_change_results():
    with pytest.raises(ValueError, match="fused activation"):
        nl.convert(nl.nn.BatchNorm2d(3, activation="relu"), to="torch")
    with pytest.raises(ValueError, match="ema_debias"):
        nl.convert(nl.nn.BatchNorm2d(3, ema_debias=True), to="torch")
    with pytest.raises(ValueError, match="no torch counterpart"):
        nl.convert(nl.nn.BatchNorm(3, channel_dim=-1), to="torch")
    with pytest.raises(ValueError, match="to must be one of"):
        nl.convert(nn.BatchNorm2d(3), to="batchnorm")
    with pytest.raises(TypeError, match="does not take the argument 'virtual_batch_size'"):
        nl.convert(nn.BatchNorm2d(3), to="normlab", virtual_batch_size=4)


def test_normlab_extras_are_carried_between_normlab_classes():
    bn = nl.nn.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.3, nonfinite="raise")
    sync = nl.convert(copy.deepcopy(bn), to="sync")
    ghost = nl.convert(bn, to="ghost", virtual_batch_size=2)
    for m in (sync, ghost):
        assert (m.activation, m.negative_slope, m.nonfinite) == ("leaky_relu", 0.3, "raise")
