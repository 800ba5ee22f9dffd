import copy

import pytest
import torch
from torch import nn

import normlab as nl
from tests.tools.helpers import assert_identical, images, small_resnet, snapshot

CLASSES = {"torch": nn.BatchNorm2d, "normlab": nl.nn.BatchNorm2d}


def _micro_batches():
    return [images(n, seed=30 + i, shift=2.0) for i, n in enumerate((3, 8, 5))]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_update_from_k_micro_batches_equals_one_big_batch(kind, momentum):
    bn = CLASSES[kind](3, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.num_batches_tracked.fill_(4)
    big = copy.deepcopy(bn)
    separately = copy.deepcopy(bn)
    micro = _micro_batches()
    outputs = []
    with nl.accumulate_stats(bn):
        for x in micro:
            outputs.append(bn(x))
    big(torch.cat(micro))
    for x in micro:
        separately(x)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn, name), getattr(big, name), msg=name)
        assert not torch.allclose(getattr(bn, name), getattr(separately, name), rtol=1e-3)
    assert bn.num_batches_tracked == big.num_batches_tracked == 5
    # the forward is unchanged: each micro-batch is normalised with its own statistics
    for x, y in zip(micro, outputs):
        torch.testing.assert_close(y, copy.deepcopy(separately)(x))


def test_model_first_layer_matches_big_batch_and_deeper_layers_update_once():
    model = small_resnet("normlab").train()
    big = copy.deepcopy(model)
    micro = _micro_batches()
    with nl.accumulate_stats(model):
        for x in micro:
            model(x).sum().backward()
    big(torch.cat(micro))
    torch.testing.assert_close(model.stem[1].running_var, big.stem[1].running_var)
    counts = {m.num_batches_tracked.item() for m in model.modules() if hasattr(m, "running_var")}
    assert counts == {4}  # small_resnet made 3 updates; this step made one more


def test_error_inside_the_block_changes_nothing_and_restores_the_layers():
    model = small_resnet("torch").train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), nl.accumulate_stats(model):
        model(images(4))
        raise RuntimeError("boom")
    assert_identical(snapshot(model), before)
    bn = model.stem[1]
    assert bn.track_running_stats and not bn._forward_pre_hooks
    model(images(4))
    assert bn.num_batches_tracked == before["stem.1.num_batches_tracked"] + 1


def test_eval_and_frozen_layers_are_left_alone():
    model = small_resnet("torch").train()
    model.stem.eval()
    nl.freeze(model.blocks[0])
    before = snapshot(model)
    with nl.accumulate_stats(model):
        model(images(4))
        model(images(6))
    after = snapshot(model)
    for key in before:
        same = torch.equal(before[key], after[key])
        is_stat = "running" in key or "num_batches" in key
        assert same == (key.startswith(("stem", "blocks.0")) or not is_stat), key


def test_non_finite_policy_raise_changes_nothing():
    model = nn.Sequential(nl.nn.BatchNorm2d(3, nonfinite="raise"), nl.nn.BatchNorm2d(3))
    model.train()
    before = snapshot(model)
    x = images(4)
    x[0, 1, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError), nl.accumulate_stats(model):
        model(images(4))
        model(x)
    assert_identical(snapshot(model), before)


def test_batch_renorm_steps_once_per_accumulated_step():
    bn = nl.nn.BatchRenorm2d(3, warmup_steps=0, r_max_steps=0, d_max_steps=0, r_max=1.5)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    micro = _micro_batches()
    start = copy.deepcopy(bn)
    outputs = []
    with nl.accumulate_stats(bn):
        for x in micro:
            outputs.append(bn(x))
    for x, y in zip(micro, outputs):  # every micro-batch saw the step's starting statistics
        torch.testing.assert_close(y, copy.deepcopy(start)(x))
    big = nn.BatchNorm2d(3)  # the running statistics update like BN's
    big.load_state_dict(start.state_dict())
    big(torch.cat(micro))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(big, name), msg=name)
