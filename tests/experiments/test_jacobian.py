import pytest
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


def _synthetic(**changes):
    """A Measurement at m = 3 and 16 where every part of the rule passes, but for
    ``changes`` applied to the m = 16 point."""
    import dataclasses

    from normlab.experiments.jacobian import BatchSize, Measurement

    def point(m):
        return BatchSize(m, 1e-16, 2e-16, 0.0, 0.7 / m**0.5, 0.0, 0.01, 0.0)

    return Measurement([point(3), dataclasses.replace(point(16), **changes)])


@pytest.mark.parametrize(
    ("changes", "verdict", "failed"),
    [
        ({}, "holds", ""),
        ({"closed_vs_normlab": 1e-9}, "fails", "closed form = autograd to ≤ 1e-10"),
        ({"closed_vs_torch": 1e-9}, "fails", "closed form = autograd to ≤ 1e-10"),
        ({"min_abs_offdiagonal_train": 0.0}, "fails", "training-mode Jacobian dense (m > 2)"),
        ({"max_abs_offdiagonal_eval": 1e-17}, "fails", "eval-mode Jacobian diagonal"),
        ({"cross_channel": 1e-20}, "fails", "no entry couples two channels"),
    ],
)
def test_verdict_rule(changes, verdict, failed):
    from normlab.experiments import get

    exp, m = get("jacobian"), _synthetic(**changes)
    assert exp.judge(exp.quick_config(), m) == verdict
    says = f"Measured, the rule fails on: {failed}." if failed else ""
    assert exp.failures(exp.quick_config(), m) == says


def test_density_is_not_judged_at_m_2():
    # at m = 2 the off-diagonal entries vanish up to ε: a zero there is not a failure
    import dataclasses

    from normlab.experiments import get

    m = _synthetic()
    m.batch_sizes.insert(0, dataclasses.replace(m.batch_sizes[0], m=2, min_abs_offdiagonal_train=0))
    exp = get("jacobian")
    assert m.min_abs_offdiagonal_train == 0.01
    assert exp.judge(exp.quick_config(), m) == "holds"


def test_notes_follow_the_verdict():
    from normlab.experiments import get

    exp, cfg = get("jacobian"), get("jacobian").quick_config()
    holds = exp.present(cfg, _synthetic(), "holds")
    assert "each entry stays nonzero" in holds.notes and "fails" not in holds.notes
    bad = _synthetic(max_abs_offdiagonal_eval=0.5)
    fails = exp.present(cfg, bad, exp.judge(cfg, bad))
    assert fails.verdict == "fails"
    assert "stays nonzero" not in fails.notes
    assert "fails on: eval-mode Jacobian diagonal" in fails.notes
