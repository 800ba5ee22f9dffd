import pytest

from normlab.experiments.mnist_fig1 import drift, relative_drift
from tests.experiments.quick import check_well_formed, quick_result


@pytest.fixture(scope="module")
def result(request):
    return quick_result(request, "mnist-fig1")


def test_drift_measures():
    still = [[-1.0, 0.0, 1.0]] * 3
    assert drift(still) == 0.0 and relative_drift(still) == 0.0
    moving = [[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 3.0]]  # median moves by 3
    assert drift(moving) == pytest.approx(3.0)
    # mean 15-85 spread: (2 + 2 + 2) / 3 = 2
    assert relative_drift(moving) == pytest.approx(1.5)


def test_well_formed(result):
    check_well_formed(result, "mnist-fig1")
    assert len(result.plots) == 4  # Fig. 1a, 1b, 1c and the drift of every unit


def test_direction(result):
    m = result.metrics
    assert m["median_drift"]["bn"] < m["median_drift"]["none"]
    assert m["test_accuracy"]["bn"] >= m["test_accuracy"]["none"]
