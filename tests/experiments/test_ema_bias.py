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


def test_max_z():
    from normlab.experiments.ema_bias import max_z

    assert max_z([]) == 0.0
    assert max_z([(3.0, 1.0, 0.5), (0.0, 1.0, 1.0)]) == 4.0


def _synthetic(raw_off=0.0, deb_off=0.0, var_off=0.0, gain=0.1, steps=20):
    """μ = 0.1, m = 3, σ² = 4, standard errors 0.01: running mean off the formula by
    raw_off, de-biased mean and variance off the truth by deb_off and var_off; early
    accuracy raised by ``gain`` at each checkpoint."""
    from normlab.experiments.ema_bias import EarlyAccuracy, Measurement, Trace

    se = [0.01] * steps
    trace = Trace(
        0.1,
        raw=[expected_running_mean(3.0, 0.1, t) + raw_off for t in range(1, steps + 1)],
        raw_se=se,
        deb=[3.0 + deb_off] * steps,
        deb_se=se,
        var=[4.0] * steps,
        var_deb=[4.0 + var_off] * steps,
        var_deb_se=se,
    )
    # the checkpoint at 200 > 1/μ is not judged: counted, its loss would fail every run
    acc = EarlyAccuracy([1, 10, 200], [0.3, 0.8, 0.9], [0.3 + gain, 0.8 + gain, 0.0], [0.5] * 3)
    return Measurement(3.0, 4.0, [trace], acc, n_features=64, num_classes=10)


@pytest.mark.parametrize(
    ("synthetic", "verdict", "says"),
    [
        (_synthetic(), "holds", None),
        (_synthetic(raw_off=0.049, deb_off=-0.049, var_off=0.049), "holds", None),  # 4.9 se
        (_synthetic(raw_off=0.06), "fails", "(1) the running mean is 6.0 standard errors"),
        (_synthetic(var_off=-0.06), "fails", "(2) the de-biased statistics are 6.0"),
        (_synthetic(gain=0.0), "fails", "(3) de-biasing did not raise"),  # no gain at t ≤ 100
    ],
)
def test_verdict_rule_and_notes(synthetic, verdict, says):
    from normlab.experiments import get

    exp = get("ema-bias")
    config = exp.Config(train_momentum=0.01)  # checkpoints t ≤ 100 are judged, not 200
    assert exp.judge(config, synthetic) == verdict
    notes = exp.present(config, synthetic, verdict).notes
    assert ("Not as claimed" in notes) == (verdict == "fails")
    assert says is None or says in notes
