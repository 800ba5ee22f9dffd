"""landscape at quick scale (40 steps, probes every 10).

Robustness, measured over quick seeds 0-7: the verdict was 'fails' in all eight, with the
plain net's gradient change 0.02-0.07x BN's and its β-smoothness 0.14-0.20x BN's at equal
steps (the plain net still on its initial plateau, which the notes say), 2 loss-matched
probes each time.
"""

import math

import pytest

from normlab.experiments.landscape import QUANTITIES, loss_matched_ratios


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_every_quantity_measured(quick_result):
    median = quick_result("landscape").metrics["median"]
    assert set(median["bn"]) == set(QUANTITIES)
    assert all(v > 0 for v in median["none"].values())


def _series(losses, value):
    return {"loss": losses, **{q: [value] * len(losses) for q in QUANTITIES}}


def test_loss_matching():
    plain = _series([2.0, 1.0, 0.1], 4.0)
    plain["beta_smoothness"] = [8.0, 6.0, 2.0]
    bn = _series([1.1, 0.01], 1.0)  # 1.1 matches the plain probe at 1.0; 0.01 matches none
    ratios, pairs = loss_matched_ratios(plain, bn, 1.5)
    assert pairs == 1
    assert ratios["gradient_predictiveness"] == 4.0 and ratios["beta_smoothness"] == 6.0
    ratios, pairs = loss_matched_ratios(plain, _series([50.0], 1.0), 1.5)
    assert pairs == 0 and math.isnan(ratios["top_eigenvalue"])


def _measurement(plain_value, bn_value, plain_losses=(2.0, 1.0, 0.5, 0.25)):
    """Four BN probes at losses 2 … 0.25; the plain net's at plain_losses."""
    from normlab.experiments.landscape import Measurement

    plain = _series(list(plain_losses), plain_value)
    bn = _series([2.0, 1.0, 0.5, 0.25], bn_value)
    for s in (plain, bn):
        s["step"] = list(range(0, 10 * len(s["loss"]), 10))
    return Measurement(series={"none": plain, "bn": bn}, history={})


@pytest.mark.parametrize(
    ("measurement", "verdict"),
    [
        (_measurement(4.0, 1.0), "holds"),  # rougher by 4x at equal steps and equal loss
        (_measurement(0.5, 1.0), "fails"),  # the plain net is the smoother one
        (_measurement(1.5, 1.0), "inconclusive"),  # rougher, but by less than 2x
        # rougher at equal steps, but no plain probe reaches BN's losses: no equal-loss check
        (_measurement(4.0, 1.0, plain_losses=(20.0, 10.0, 9.0, 8.0)), "inconclusive"),
    ],
)
def test_verdict_rule(measurement, verdict):
    from normlab.experiments import get

    exp = get("landscape")
    assert exp.judge(exp.quick_config(), measurement) == verdict


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_quick_run_measures_bn_rougher_at_equal_steps(quick_result):
    # at quick scale the plain net sits on its initial plateau, where the landscape is flat:
    # its gradient change and β-smoothness are below BN's (0.07x and 0.20x at the most over
    # seeds 0-7), the verdict is 'fails', and the notes say why
    r = quick_result("landscape")
    ratio = r.metrics["ratio_plain_over_bn"]
    assert ratio["gradient_predictiveness"] < 0.5 and ratio["beta_smoothness"] < 0.5
    assert r.verdict == "fails"
    assert "plateau" in r.notes
