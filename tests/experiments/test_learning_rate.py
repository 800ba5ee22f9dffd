import pytest

from tests.experiments.quick import check_well_formed, quick_result


@pytest.fixture(scope="module")
def result(request):
    return quick_result(request, "learning-rate")


def test_well_formed(result):
    check_well_formed(result, "learning-rate")
    m = result.metrics
    assert len(m["rates"]) == len(m["test_accuracy"]["bn"]) == len(m["test_accuracy"]["none"])


def test_bn_at_least_as_good_at_every_rate(result):
    acc = result.metrics["test_accuracy"]
    assert all(b >= p for b, p in zip(acc["bn"], acc["none"], strict=True))
