import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import normlab as nl
from tests.tools.helpers import assert_identical, bn_layers, images, small_resnet, snapshot

KINDS = ["torch", "normlab"]
SIZES = (2, 9, 5)  # unequal batches: equal weight per sample differs from per batch


def _batches(sizes=SIZES, shift=1.0):
    return [images(n, seed=10 + i, shift=shift) for i, n in enumerate(sizes)]


def _captured_inputs(model, batches):
    """Each BN layer's inputs over ``batches``, concatenated along the batch dim."""
    seen = {m: [] for m in bn_layers(model)}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen[m].append(a[0])) for m in seen]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return [torch.cat(seen[m]).double() for m in bn_layers(model)]


def _population(x):  # float64 mean and unbiased variance per channel of (N, C, H, W)
    return x.mean((0, 2, 3)), x.var((0, 2, 3), correction=1)


def _assert_stats(bn, x, **tol):
    mean, var = _population(x)
    torch.testing.assert_close(bn.running_mean.double(), mean, **tol)
    torch.testing.assert_close(bn.running_var.double(), var, **tol)


TOL = {"rtol": 2e-5, "atol": 2e-6}


@pytest.mark.parametrize("kind", KINDS)
def test_equals_population_statistics_of_the_training_mode_inputs(kind):
    model = small_resnet(kind)
    batches = _batches()
    # reference: a copy in plain training mode (its outputs do not depend on its buffers)
    inputs = _captured_inputs(copy.deepcopy(model).train(), batches)
    nbt = [m.num_batches_tracked.clone() for m in bn_layers(model)]
    nl.recalibrate(model, batches)
    for bn, x, n in zip(bn_layers(model), inputs, nbt):
        _assert_stats(bn, x, **TOL)
        assert torch.equal(bn.num_batches_tracked, n)


def test_update_bn_weights_batches_equally_and_differs_on_unequal_batches():
    model = small_resnet("torch")
    batches = _batches()
    theirs = copy.deepcopy(model)
    update_bn(batches, theirs)
    nl.recalibrate(model, batches)
    with torch.no_grad():
        conv_out = [model.stem[0](x).double() for x in batches]
    equal_weight_mean = torch.stack([y.mean((0, 2, 3)) for y in conv_out]).mean(0)
    torch.testing.assert_close(theirs.stem[1].running_mean.double(), equal_weight_mean, **TOL)
    _assert_stats(model.stem[1], torch.cat(conv_out), **TOL)  # count-weighted: exact
    gap = (theirs.stem[1].running_mean - model.stem[1].running_mean).abs().max()
    assert gap > 1e-3
    # update_bn's variance is the mean of the batch variances (drops the spread of the
    # batch means), so it differs even when all batches have the same size.
    same = _batches((6, 6, 6), shift=0.0)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    update_bn(same, theirs)
    nl.recalibrate(ours, same)
    torch.testing.assert_close(theirs.stem[1].running_mean, ours.stem[1].running_mean, **TOL)
    assert not torch.allclose(theirs.stem[1].running_var, ours.stem[1].running_var, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_sequential_reaches_the_eval_mode_fixed_point_and_the_default_does_not(kind):
    batches = _batches()
    seq, default = small_resnet(kind), small_resnet(kind)
    nl.recalibrate(seq, batches, sequential=True)
    nl.recalibrate(default, batches)
    # sequential: every layer's statistics are those of what it sees at inference
    for bn, x in zip(bn_layers(seq), _captured_inputs(seq.eval(), batches)):
        _assert_stats(bn, x, **TOL)
    # the first layer sees the same input either way; deeper ones do not
    torch.testing.assert_close(seq.stem[1].running_var, default.stem[1].running_var, **TOL)
    eval_inputs = _captured_inputs(default.eval(), batches)
    bn, x = bn_layers(default)[-1], eval_inputs[-1]
    assert not torch.allclose(bn.running_var.double(), _population(x)[1], rtol=1e-3)


def test_batch_structures_and_num_batches():
    batches = _batches()
    expected = small_resnet("normlab")
    nl.recalibrate(expected, batches[:2])
    as_tuples = small_resnet("normlab")
    nl.recalibrate(as_tuples, [(x, torch.zeros(len(x))) for x in batches], num_batches=2)
    as_dicts = small_resnet("normlab")
    dicts = iter([{"image": x, "label": 0} for x in batches])  # a one-shot iterator
    nl.recalibrate(as_dicts, dicts, 2, sequential=True, input_fn=lambda b: b["image"])
    for model in (as_tuples, as_dicts):
        torch.testing.assert_close(model.stem[1].running_var, expected.stem[1].running_var, **TOL)
    assert_identical(snapshot(as_tuples), snapshot(expected))
    with pytest.raises(TypeError, match="input_fn=lambda b"):
        nl.recalibrate(small_resnet("torch"), [{"image": batches[0]}])
    with pytest.raises(ValueError, match="num_batches"):
        nl.recalibrate(small_resnet("torch"), batches, num_batches=0)


@pytest.mark.parametrize("sequential", [False, True])
def test_restores_modes_and_changes_nothing_on_error(sequential):
    model = small_resnet("torch").train()
    model.blocks[0].bn2.momentum = None
    model.blocks[1].eval()
    modes = {m: m.training for m in model.modules()}
    before = snapshot(model)
    bad = [images(4), images(4)[:, :2]]  # the second batch has the wrong channel count
    with pytest.raises(RuntimeError):
        nl.recalibrate(model, bad, sequential=sequential)
    assert_identical(snapshot(model), before)
    assert {m: m.training for m in model.modules()} == modes
    assert model.blocks[0].bn2.momentum is None
    assert all(m.track_running_stats for m in bn_layers(model))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    nl.recalibrate(model, _batches(), sequential=sequential)
    assert {m: m.training for m in model.modules()} == modes


def test_non_finite_data_raises_before_any_change():
    model = small_resnet("normlab")
    before = snapshot(model)
    x = images(4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        nl.recalibrate(model, [images(4), x])
    assert_identical(snapshot(model), before)


def test_frozen_and_unreached_layers_keep_their_statistics():
    model = small_resnet("torch")
    model.extra = nn.BatchNorm2d(6)  # registered, never called
    nl.freeze(model.blocks[1])
    frozen = snapshot(model.blocks[1])
    with pytest.warns(RuntimeWarning, match="extra"):
        nl.recalibrate(model, _batches())
    assert_identical(snapshot(model.blocks[1]), frozen)
    assert torch.equal(model.extra.running_var, torch.ones(6))


def test_ema_debias_is_switched_off_after_recalibration():
    model = small_resnet("normlab")
    for m in bn_layers(model):
        m.ema_debias = True
    nl.recalibrate(model, _batches())
    assert not any(m.ema_debias for m in bn_layers(model))


def test_batch_renorm_gathers_in_its_training_mode_without_advancing_its_schedule():
    plain = small_resnet("torch")
    renorm = nl.convert(plain, to="renorm")  # step 3 < warmup: renorm's forward is BN's
    batches = _batches()
    nl.recalibrate(plain, batches)
    nl.recalibrate(renorm, batches)
    for a, b in zip(bn_layers(renorm), bn_layers(plain)):
        torch.testing.assert_close(a.running_mean, b.running_mean, **TOL)
        torch.testing.assert_close(a.running_var, b.running_var, **TOL)
        assert a.num_batches_tracked == 3
