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
