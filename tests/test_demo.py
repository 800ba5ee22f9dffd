"""normlab.experiments.demo: the model it builds, its config checks and its verdict rule."""

import math

import pytest
import torch
from torch import nn

import normlab as nl
from normlab.experiments import demo
from normlab.report.text import describe_ratio


def test_build_mlp_structure_and_init():
    cfg = demo.DemoConfig(depth=3, width=50, init_gain=5.0)
    plain = demo.build_mlp(cfg, bn=False, in_features=64, num_classes=10)
    bn = demo.build_mlp(cfg, bn=True, in_features=64, num_classes=10)
    assert [type(m).__name__ for m in plain] == ["Linear", "Sigmoid"] * 3 + ["Linear"]
    assert [type(m) for m in bn][:3] == [nn.Linear, nl.nn.BatchNorm1d, nn.Sigmoid]
    for a, b in zip(
        (m for m in plain if isinstance(m, nn.Linear)), (m for m in bn if isinstance(m, nn.Linear))
    ):
        assert torch.equal(a.weight, b.weight)  # the same initial weights, by construction
        assert torch.equal(a.bias, torch.zeros_like(a.bias))
    # N(0, (g / sqrt(fan_in))^2): the empirical std of the 50x50 layers is close to 5/sqrt(50)
    w = torch.cat([plain[2].weight.flatten(), plain[4].weight.flatten()]).detach()
    assert float(w.std()) == pytest.approx(5 / math.sqrt(50), rel=0.05)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("depth", 0, "depth must be an int ≥ 1"),
        ("activation", "gelu", "activation must be one of"),
        ("batch_size", 1, "BatchNorm needs two samples"),
        ("lr", -1.0, "lr must be a positive number"),
        ("momentum", 1.0, r"momentum must be in \[0, 1\)"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        demo.DemoConfig(**{field: value})


def headline(plain_ratio, bn_ratio, plain_acc, bn_acc):
    return {
        "plain_first_over_last": plain_ratio,
        "bn_first_over_last": bn_ratio,
        "plain_log10_imbalance": abs(math.log10(plain_ratio)),
        "bn_log10_imbalance": abs(math.log10(bn_ratio)),
        "plain_final_accuracy": plain_acc,
        "bn_final_accuracy": bn_acc,
    }


@pytest.mark.parametrize(
    ("h", "verdict"),
    [
        (headline(1e-3, 0.9, 0.10, 0.95), "holds"),
        (headline(1e4, 1.2, 0.10, 0.95), "holds"),  # exploding without BN is cured too
        (headline(1e-3, 0.9, 0.80, 0.95), "inconclusive"),  # accuracy gap under 30 points
        (headline(0.5, 0.9, 0.10, 0.95), "inconclusive"),  # gradients were fine anyway
        (headline(0.5, 20.0, 0.10, 0.95), "fails"),  # BN unbalanced the gradients
        (headline(1e-3, 0.9, 0.95, 0.90), "fails"),  # BN learned less
    ],
)
def test_verdict_rule(h, verdict):
    got, rule, summary = demo._verdict(demo.DemoConfig(), h)
    assert got == verdict
    assert "at least 30 points" in rule and "chance 10%" in summary


def test_describe_ratio():
    assert describe_ratio(1 / 1693.0) == "1,693x smaller"
    assert describe_ratio(13919.0) == "13,919x larger"
    assert describe_ratio(0.96) == "0.96x"
    assert describe_ratio(1 / 3) == "3x smaller"
