import pytest

from normlab.experiments import get
from tests.experiments.quick import check_well_formed, quick_result


@pytest.fixture(scope="module")
def result(request):
    return quick_result(request, "renorm")


def test_well_formed(result):
    check_well_formed(result, "renorm")
    assert len(result.tables["eval-mode test accuracy"]["rows"]) == 4


def test_schedule_is_the_papers_compressed():
    exp = get("renorm")
    full = exp._schedule(exp.Config(steps=160_000))
    assert full == {"warmup_steps": 5000, "d_max_steps": 25000, "r_max_steps": 40000}
    assert exp._schedule(exp.Config(steps=2000)) == {
        "warmup_steps": 62,
        "d_max_steps": 312,
        "r_max_steps": 500,
    }


def test_renorm_beats_bn_on_few_class_batches(result):
    # the strongest effect (≈ 18 points in quick and default mode)
    gain = result.metrics["brn_minus_bn"]
    assert gain["2 classes × 8"] > 0.05
