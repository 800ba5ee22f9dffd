import torch

from normlab.experiments.jacobian import _offdiag_share


def test_holds_in_quick_mode(quick_result):
    r = quick_result("jacobian")
    assert r.verdict == "holds", r.measured
    assert r.metrics["closed_vs_normlab"] <= 1e-10 and r.metrics["closed_vs_torch"] <= 1e-10
    assert r.metrics["max_abs_offdiagonal_eval"] == 0.0 and r.metrics["cross_channel"] == 0.0
    assert r.metrics["min_abs_offdiagonal_train"] > 0
    shares = list(r.metrics["offdiag_share_train"].values())
    assert all(0 < s < 1 for s in shares) and shares == sorted(shares, reverse=True)


def test_offdiag_share_reference():
    eye = torch.eye(3).unsqueeze(0)
    assert _offdiag_share(eye) == 0.0
    ones = torch.ones(1, 2, 2, dtype=torch.float64)  # |offdiag|² = 2 of a total 4
    assert abs(_offdiag_share(ones) - 0.5**0.5) < 1e-12
