import pytest

from normlab.experiments.ema_bias import expected_running_mean


def test_formula_equals_the_recursion_on_constant_batches():
    # batches whose mean is exactly m: r_t follows the formula to rounding
    for momentum in (0.1, 0.01, 0.9):
        r, m = 0.0, 3.0
        for t in range(1, 200):
            r = (1 - momentum) * r + momentum * m
            assert r == pytest.approx(expected_running_mean(m, momentum, t), rel=1e-12)


def test_holds_in_quick_mode(quick_result):
    r = quick_result("ema-bias")
    assert r.verdict == "holds", r.measured
    m = r.metrics
    assert m["max_z_formula"] <= 5 and m["max_z_debiased_mean"] <= 5
    acc = m["accuracy"]
    # the first checkpoint: raw statistics are pulled toward (0, 1); de-biasing helps a lot
    assert acc["debiased"][0] > acc["raw"][0] + 0.1
