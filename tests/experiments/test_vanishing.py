import pytest


def test_gradient_vanishes_without_bn_and_not_with_it(quick_result):
    m = quick_result("vanishing").metrics
    # robust at any step count: at init the plain net's layer-1 gradient is ~1e-17, BN's ~0.5
    assert m["grad_gain_bn_over_plain"] >= 1e6
    assert m["grad_ratio_layer1_over_last_init"]["none"] < 1e-6
    assert 0.1 < m["grad_ratio_layer1_over_last_init"]["bn"] < 10
    assert m["plain_gradient_shrink_per_layer_init"] > 2  # ÷ per layer toward the input


def test_saturation_only_with_large_weights(quick_result):
    r = quick_result("vanishing")
    m = r.metrics
    assert m["saturated_fraction_layer15_init"] == {"none": 0.0, "bn": 0.0}
    assert m["max_saturated_fraction_sweep_plain"] > 0.2  # N(0, 10²/fan_in) weights
    sweep = r.tables["initial weight scale"]["rows"]
    assert all(row[3] == 0.0 for row in sweep if row[1] == "BatchNorm")


def _synthetic(grad_plain: float, grad_bn: float, acc_plain: float, acc_bn: float):
    """A Measurement with the given layer-1 gradients at init and final test accuracies."""
    from normlab.experiments._training import History, LayerProbe
    from normlab.experiments.vanishing import Measurement

    def probe(g1):
        return LayerProbe([g1, 1.0], [0.0, 0.0], [-1.0, -1.0], [1.0, 1.0])

    def hist(acc):
        return History(eval_steps=[0, 10], test_accuracy=[0.1, acc])

    return Measurement(
        n_train=10,
        n_test=5,
        layer=2,
        init={"none": probe(grad_plain), "bn": probe(grad_bn)},
        trained={"none": probe(grad_plain), "bn": probe(grad_bn)},
        history={"none": hist(acc_plain), "bn": hist(acc_bn)},
        sweep=[],
    )


@pytest.mark.parametrize(
    ("args", "verdict"),
    [
        ((1e-6, 0.5, 0.10, 0.90), "holds"),
        ((1e-6, 0.5, 0.10, 0.40), "inconclusive"),  # BN itself has not learned yet
        ((1e-6, 0.5, 0.70, 0.90), "fails"),  # accuracy gap under 30 points
        ((1e-2, 0.5, 0.10, 0.90), "fails"),  # gradient gain 50x < 100x
        ((1e-6, 1e-4, 0.10, 0.90), "holds"),  # a gain of exactly 100x is enough
    ],
)
def test_verdict_rule(args, verdict):
    from normlab.experiments.registry import get

    exp = get("vanishing")
    assert exp.judge(exp.quick_config(), _synthetic(*args)) == verdict
