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
