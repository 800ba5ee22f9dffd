import pytest
import torch

from normlab.experiments.scale_invariance import Config, exactness


def test_exact_part_and_the_role_of_eps():
    ex = exactness(Config(scales=(1e-3, 10.0)), torch.Generator().manual_seed(0))
    assert max(ex.out_err) <= 1e-12 and max(ex.grad_err) <= 1e-12
    assert abs(ex.euler_cos) <= 1e-12
    # ε > 0 breaks the invariance once a²σ² is near ε (a = 1e-3: σ²a² ≈ 1e-6 < ε)
    assert ex.out_err_eps[0] > 0.1 and ex.out_err_eps[1] < 1e-4


def test_holds_in_quick_mode(quick_result):
    r = quick_result("scale-invariance")
    assert r.verdict == "holds", r.measured
    m = r.metrics
    assert m["eff_lr_ratio_decay"] > 1 > m["eff_lr_ratio_no_decay"]
    assert m["max_abs_cos_no_decay"] < 1e-3 and m["max_abs_cos_decay"] < 1e-3
    assert m["norm_start_end_no_decay"][1] > m["norm_start_end_no_decay"][0]
    assert m["norm_start_end_decay"][1] < m["norm_start_end_decay"][0]
    assert m["accuracy_decay"] >= m["accuracy_no_decay"] - 0.02


def _synthetic(*, out_err=0.0, cos=1e-6, plain_end=1.2, decay_end=0.5, acc_decay=0.95):
    """A Measurement where every part of the rule passes, unless the arguments say
    otherwise: ‖W₁‖ goes 1 → ``plain_end`` without weight decay and 1 → ``decay_end`` with."""
    from normlab.experiments.scale_invariance import Exactness, Measurement, TrainingRun

    exact = Exactness([0.1, 10.0], [out_err, 0.0], [0.0, 0.0], [1e-3, 1e-9], [1e-3, 1e-9], 0.0)
    return Measurement(
        exact=exact,
        plain=TrainingRun(0.0, 0.1, [1.0, 1.1, plain_end], cos, 0.95),
        decay=TrainingRun(0.05, 0.1, [1.0, 0.8, decay_end], cos, acc_decay),
    )


@pytest.mark.parametrize(
    ("changes", "verdict", "failed"),
    [
        ({}, "holds", ""),
        ({"acc_decay": 0.93}, "holds", ""),  # a 2-point cost is within the tolerance
        ({"out_err": 1e-9}, "fails", "(1) exact in float64"),
        ({"cos": 2e-3}, "fails", "(2) gradient orthogonal to W₁ in training"),
        ({"plain_end": 0.9}, "fails", "(3) ‖W₁‖ and η/‖W₁‖² move as stated"),
        ({"decay_end": 1.1}, "fails", "(3) ‖W₁‖ and η/‖W₁‖² move as stated"),
        ({"acc_decay": 0.9}, "fails", "(4) weight decay costs ≤ 2% accuracy"),
    ],
)
def test_verdict_rule(changes, verdict, failed):
    from normlab.experiments import get

    exp = get("scale-invariance")
    m = _synthetic(**changes)
    assert exp.judge(exp.quick_config(), m) == verdict
    says = f"Measured, the rule fails on: {failed}." if failed else ""
    assert exp.failures(exp.quick_config(), m) == says


def test_effective_learning_rate_is_lr_over_squared_norm():
    m = _synthetic()
    assert m.decay.eff_lr == pytest.approx([0.1, 0.1 / 0.64, 0.1 / 0.25])
    assert m.decay.eff_lr_ratio == pytest.approx(4.0) and m.plain.eff_lr_ratio < 1


def test_notes_follow_the_verdict():
    from normlab.experiments import get

    exp = get("scale-invariance")
    cfg = exp.quick_config()
    holds = exp.present(cfg, _synthetic(), "holds")
    assert "test accuracy is unchanged" in holds.notes
    bad = _synthetic(acc_decay=0.5)
    fails = exp.present(cfg, bad, exp.judge(cfg, bad))
    assert fails.verdict == "fails" and "unchanged" not in fails.notes
    assert "fails on: (4) weight decay costs" in fails.notes
