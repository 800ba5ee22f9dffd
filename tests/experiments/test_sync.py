import pytest

pytestmark = pytest.mark.distributed


def test_holds_in_quick_mode(quick_result):
    r = quick_result("sync")
    assert r.verdict == "holds", r.measured + r.error
    d = r.metrics["max_abs_diff"]
    assert d["float64"] <= 1e-12 and d["float32"] <= 1e-5
    # the empty-rank split was part of the run
    assert any(row[0] == "[0, 23]" for row in r.tables[next(iter(r.tables))]["rows"])
