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
