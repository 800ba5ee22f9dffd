import pytest

from normlab.experiments import get


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_four_batch_conditions(quick_result):
    assert len(quick_result("renorm").tables["eval-mode test accuracy"]["rows"]) == 4


def test_schedule_is_the_papers_compressed():
    exp = get("renorm")
    full = exp._schedule(exp.Config(steps=160_000))
    assert full == {"warmup_steps": 5000, "d_max_steps": 25000, "r_max_steps": 40000}
    assert exp._schedule(exp.Config(steps=2000)) == {
        "warmup_steps": 62,
        "d_max_steps": 312,
        "r_max_steps": 500,
    }


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_renorm_beats_bn_on_few_class_batches(quick_result):
    # the strongest effect (≈ 18 points in quick and default mode)
    gain = quick_result("renorm").metrics["brn_minus_bn"]
    assert gain["2 classes × 8"] > 0.05


def _synthetic(normal, tiny, few):
    """BRN − BN accuracy gaps per judged condition (BN at 0.8 everywhere)."""
    from normlab.experiments.renorm import Measurement

    gaps = {"normal": normal, "tiny": tiny, "few": few, "pairs": 0.0}
    acc = {c: {"bn": 0.8, "brn": 0.8 + g, "gn": 0.8} for c, g in gaps.items()}
    return Measurement(n_test=5, test_accuracy=acc, schedule={})


@pytest.mark.parametrize(
    ("gaps", "verdict"),
    [
        ((0.005, 0.05, 0.10), "holds"),
        ((-0.005, 0.02, 0.02), "holds"),  # within the 1-point tolerance at batch 32
        ((0.05, 0.05, 0.10), "inconclusive"),  # BRN better at batch 32 too: not "matches"
        ((0.0, 0.005, 0.10), "inconclusive"),  # above BN at batch 4, by less than a point
        ((0.0, -0.01, 0.10), "fails"),  # BRN below BN at batch 4
        ((0.0, 0.05, 0.0), "fails"),  # BRN not above BN on few-class batches
    ],
)
def test_verdict_rule(gaps, verdict):
    exp = get("renorm")
    assert exp.judge(exp.quick_config(), _synthetic(*gaps)) == verdict
