"""The zoo's registry: every model against torchvision's published facts (torchvision is
not installed): parameter counts, module names, shapes; and what normlab needs of them (fx
tracing, the in-place switch). One family's own facts: tests/bench/zoo/test_<family>.py."""

import copy

import pytest
import torch
from torch import nn

from normlab.bench import zoo

# num_params of torchvision's ImageNet weights (1000 classes), from the model pages of
# pytorch.org/vision/stable/models (resnet18, resnet50, mobilenet_v2, regnet_y_400mf) and,
# for mobilenet_v3_small, MobileNet_V3_Small_Weights.IMAGENET1K_V1.meta in
# torchvision/models/mobilenetv3.py (the source of that page).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856,
    "regnet_small": 4_344_144,  # regnet_y_400mf
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(name):
    assert _count(zoo.build(name)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_output_shape_and_fx_trace(name):
    model = zoo.build(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)  # (N, 3, H, W): the smallest side every model reduces to 1x1
    assert model(x).shape == (2, 7)  # training mode
    traced = torch.fx.symbolic_trace(model.eval())
    assert any(n.op == "call_module" for n in traced.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


# (key, shape) pairs of torchvision's models at 1000 classes
KNOWN_KEYS = {
    "resnet50": [
        ("layer1.0.conv2.weight", (64, 64, 3, 3)),
        ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
        ("layer4.2.bn3.running_var", (2048,)),
        ("fc.weight", (1000, 2048)),
    ],
    "mobilenet_v2": [
        ("features.0.0.weight", (32, 3, 3, 3)),
        ("features.0.1.running_mean", (32,)),
        ("features.1.conv.0.0.weight", (32, 1, 3, 3)),  # t = 1: depthwise first
        ("features.1.conv.1.weight", (16, 32, 1, 1)),  # projection
        ("features.1.conv.2.num_batches_tracked", ()),  # projection BN
        ("features.2.conv.0.0.weight", (96, 16, 1, 1)),  # expansion
        ("features.2.conv.1.0.weight", (96, 1, 3, 3)),
        ("features.2.conv.3.bias", (24,)),
        ("features.17.conv.2.weight", (320, 960, 1, 1)),
        ("features.18.0.weight", (1280, 320, 1, 1)),
        ("classifier.1.weight", (1000, 1280)),
    ],
    "mobilenet_v3_small": [
        ("features.0.0.weight", (16, 3, 3, 3)),
        ("features.1.block.0.0.weight", (16, 1, 3, 3)),  # no expansion: depthwise first
        ("features.1.block.1.fc1.weight", (8, 16, 1, 1)),  # SE
        ("features.1.block.1.fc2.bias", (16,)),
        ("features.1.block.2.1.running_var", (16,)),  # projection BN
        ("features.4.block.2.fc1.weight", (24, 96, 1, 1)),
        ("features.11.block.3.0.weight", (96, 576, 1, 1)),
        ("features.12.0.weight", (576, 96, 1, 1)),
        ("classifier.0.weight", (1024, 576)),
        ("classifier.3.weight", (1000, 1024)),
    ],
    "regnet_small": [
        ("stem.0.weight", (32, 3, 3, 3)),
        ("stem.1.running_mean", (32,)),
        ("trunk_output.block1.block1-0.proj.0.weight", (48, 32, 1, 1)),
        ("trunk_output.block1.block1-0.f.a.0.weight", (48, 32, 1, 1)),
        ("trunk_output.block1.block1-0.f.b.0.weight", (48, 8, 3, 3)),  # groups of 8
        ("trunk_output.block1.block1-0.f.se.fc1.weight", (8, 48, 1, 1)),  # 0.25 * 32
        ("trunk_output.block1.block1-0.f.c.1.weight", (48,)),
        ("trunk_output.block2.block2-2.f.se.fc2.bias", (104,)),
        ("trunk_output.block4.block4-5.f.c.0.weight", (440, 440, 1, 1)),
        ("fc.weight", (1000, 440)),
    ],
}


@pytest.mark.parametrize("name", sorted(KNOWN_KEYS))
def test_state_dict_keys_and_shapes_follow_torchvision(name):
    state = zoo.build(name).state_dict()
    for key, shape in KNOWN_KEYS[name]:
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "regnet_small"])
def test_inplace_off_computes_the_same_outputs_and_gradients(name):
    on = zoo.build(name, num_classes=5)
    off = zoo.set_inplace(copy.deepcopy(on), False)
    assert not any(getattr(m, "inplace", False) for m in off.modules())
    assert zoo.build(name, inplace=False).state_dict().keys() == on.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out_on = on(x)
    torch.manual_seed(1)
    out_off = off(x)
    torch.testing.assert_close(out_off, out_on, rtol=0, atol=0)
    out_on.square().sum().backward()
    out_off.square().sum().backward()
    for (k, a), b in zip(on.named_parameters(), off.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=k)
    zoo.set_inplace(off, True)
    assert all(m.inplace for m in off.modules() if isinstance(getattr(m, "inplace", None), bool))


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'.*resnet18"):
        zoo.build("resnet19")
    with pytest.raises(ValueError, match=r"activation must be one of .*'gelu'"):
        zoo.resnet18(activation="gelu")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        zoo.mobilenet_v2(num_classes=0)
