"""MobileNetV2 / V3-Small: norm_layer everywhere, torchvision's BN settings."""

import copy

from torch import nn

import normlab as nl
from normlab.bench import zoo


def test_norm_layer_is_used_for_every_norm_and_convert_keeps_the_keys():
    model = zoo.mobilenet_v2(num_classes=10, norm_layer=nl.nn.BatchNorm2d)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, nl.nn.BatchNorm2d) for m in norms)
    assert len(norms) == sum(
        isinstance(m, nn.BatchNorm2d) for m in zoo.mobilenet_v2(num_classes=10).modules()
    )
    torch_model = zoo.resnet18(num_classes=10)
    converted = nl.convert(copy.deepcopy(torch_model), to="normlab")
    assert converted.state_dict().keys() == torch_model.state_dict().keys()
    converted.load_state_dict(torch_model.state_dict())


def test_mobilenet_v3_defaults_to_torchvisions_batch_norm_settings():
    bns = [m for m in zoo.mobilenet_v3_small().modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in bns} == {(1e-3, 0.01)}
    bns = [m for m in zoo.resnet18().modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in bns} == {(1e-5, 0.1)}
