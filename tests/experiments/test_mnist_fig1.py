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


def _synthetic(drift_plain, drift_bn, accs_plain, accs_bn):
    """One unit per net whose median moves by the given drift; test accuracy at steps
    0, 10, 20 as given; target accuracy 0.9."""
    from normlab.experiments._training import History
    from normlab.experiments.mnist_fig1 import Measurement

    def trace(d):
        return [[[-1.0, 0.0, 1.0], [-1.0, d, 1.0]]]  # drift = max(0, d, 0) for d ≥ 0

    def hist(accs):
        return History(eval_steps=[0, 10, 20], test_accuracy=list(accs))

    return Measurement(
        n_train=10,
        n_test=5,
        target_accuracy=0.9,
        history={"none": hist(accs_plain), "bn": hist(accs_bn)},
        traces={"none": trace(drift_plain), "bn": trace(drift_bn)},
    )


@pytest.mark.parametrize(
    ("args", "verdict"),
    [
        ((4.0, 1.0, (0.1, 0.5, 0.92), (0.1, 0.93, 0.95)), "holds"),
        ((4.0, 1.0, (0.1, 0.5, 0.7), (0.1, 0.5, 0.95)), "holds"),  # only BN reaches 90%
        ((4.0, 1.0, (0.1, 0.5, 0.6), (0.1, 0.5, 0.8)), "inconclusive"),  # neither reaches 90%
        ((1.5, 1.0, (0.1, 0.5, 0.92), (0.1, 0.93, 0.95)), "fails"),  # drift ratio 1.5 < 2
        ((4.0, 1.0, (0.1, 0.91, 0.92), (0.1, 0.5, 0.95)), "fails"),  # BN reaches 90% later
        ((4.0, 1.0, (0.1, 0.91, 0.97), (0.1, 0.91, 0.95)), "fails"),  # BN ends lower
    ],
)
def test_verdict_rule(args, verdict):
    from normlab.experiments.registry import get

    exp = get("mnist-fig1")
    assert exp.judge(exp.quick_config(), _synthetic(*args)) == verdict
