import pytest

from normlab.experiments.mnist_fig1 import drift, relative_drift


def test_drift_measures():
    still = [[-1.0, 0.0, 1.0]] * 3
    assert drift(still) == 0.0 and relative_drift(still) == 0.0
    moving = [[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 3.0]]  # median moves by 3
    assert drift(moving) == pytest.approx(3.0)
    # mean 15-85 spread: (2 + 2 + 2) / 3 = 2
    assert relative_drift(moving) == pytest.approx(1.5)


def test_plots(quick_result):
    assert len(quick_result("mnist-fig1").plots) == 4  # Fig. 1a, 1b, 1c and every unit's drift


def test_direction(quick_result):
    m = quick_result("mnist-fig1").metrics
    assert m["median_drift"]["bn"] < m["median_drift"]["none"]
    assert m["test_accuracy"]["bn"] >= m["test_accuracy"]["none"]
