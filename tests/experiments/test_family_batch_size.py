import pytest

from tests.experiments.quick import check_well_formed, quick_result


@pytest.fixture(scope="module")
def result(request):
    return quick_result(request, "family-batch-size")


def test_well_formed(result):
    check_well_formed(result, "family-batch-size")
    err = result.metrics["test_error"]
    assert set(err) == {"bn", "gn", "ln", "in"}
    assert all(0.0 <= e <= 1.0 for per_batch in err.values() for e in per_batch.values())
    assert all(set(per_batch) == {"32", "4"} for per_batch in err.values())
