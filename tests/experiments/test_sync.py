import pytest
import torch

import normlab as nl
from normlab.experiments import sync as S


@pytest.mark.distributed
def test_holds_in_quick_mode(quick_result):
    r = quick_result("sync")
    assert r.verdict == "holds", r.measured + r.error
    d = r.metrics["max_abs_diff"]
    assert d["float64"] <= 1e-12 and d["float32"] <= 1e-5
    # the empty-rank split was part of the run
    assert any(row[0] == "[0, 23]" for row in r.tables[next(iter(r.tables))]["rows"])


# -- the one-process parts, without a process group (fast) -------------------------------


def test_max_diff_is_relative_to_the_reference_magnitude():
    assert S._max_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == pytest.approx(2 / 5)
    assert S._max_diff(torch.empty(0), torch.empty(0)) == 0.0  # an empty rank's slice


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_process_trajectory_is_torchs_batch_norm(dtype):
    # the experiment's single-process reference run, with SyncBatchNorm outside a process
    # group, follows torch's BatchNorm2d over the SGD steps within the experiment's tolerance
    c = S.Config(steps=2)
    dt = getattr(torch, dtype)
    runs = []
    for layer in (
        nl.nn.SyncBatchNorm(c.channels, dtype=dt),
        torch.nn.BatchNorm2d(c.channels, dtype=dt),
    ):
        S._init_layer(layer, c)
        runs.append(S._trajectory(c, layer, (7, 16), dt, None, lambda t: t))
    tol = c.tolerance[c.dtypes.index(dtype)]
    for ours, theirs in zip(*runs, strict=True):
        assert ours["num_batches_tracked"] == theirs["num_batches_tracked"]
        for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            assert S._max_diff(ours[key], theirs[key]) <= tol, key


# -- the verdict rule on synthetic measurements ------------------------------------------


def _synthetic(f32=1e-7, f64=1e-15, same_count=True):
    """Two splits × 2 steps, every quantity off by ``f32`` (float32) and ``f64`` (float64),
    except ∂γ at the last float32 step, off by 10x that."""
    diffs = dict.fromkeys(S.QUANTITIES, 0.0)
    steps = []
    for split in ((7, 16), (0, 23)):
        for dtype, d in (("float32", f32), ("float64", f64)):
            for step in (1, 2):
                ds = {k: d for k in diffs}
                if (split, dtype, step) == ((0, 23), "float32", 2):
                    ds["dweight"] = 10 * d
                steps.append(S.StepComparison(split, dtype, step, ds, same_count, 1e-16))
    return S.Measurement(steps)


@pytest.mark.parametrize(
    ("args", "verdict", "failed"),
    [
        ({}, "holds", ""),
        ({"f32": 2e-6}, "fails", "float32 within 1e-05"),  # 10x that on ∂γ: above 1e-5
        ({"f64": 1e-11}, "fails", "float64 within 1e-12"),
        (
            {"same_count": False},
            "fails",
            "float32 within 1e-05; float64 within 1e-12; same num_batches_tracked",
        ),
    ],
)
def test_verdict_rule(args, verdict, failed):
    from normlab.experiments import get

    exp = get("sync")
    m = _synthetic(**args)
    assert exp.judge(exp.quick_config(), m) == verdict
    says = f"Measured, the rule fails on: {failed}." if failed else ""
    assert exp.failures(exp.quick_config(), m) == says


def test_measurement_summaries():
    m = _synthetic()
    assert m.worst("float32") == pytest.approx(1e-6) and m.worst("float64") == 1e-15
    assert m.per_quantity["dweight"] == pytest.approx(1e-6) and m.per_quantity["y"] == 1e-7
    assert _synthetic(same_count=False).worst("float64") == float("inf")


def test_notes_follow_the_verdict():
    from normlab.experiments import get

    exp = get("sync")
    cfg = exp.quick_config()
    holds = exp.present(cfg, _synthetic(), "holds")
    assert "An empty rank still takes part" in holds.notes
    assert len(holds.tables[next(iter(holds.tables))]["rows"]) == 8
    bad = _synthetic(f32=1e-5)
    fails = exp.present(cfg, bad, exp.judge(cfg, bad))
    assert fails.verdict == "fails" and "rounding" not in fails.notes
    assert "largest difference is in dweight at split [0, 23], float32, step 2" in fails.notes


def test_a_bad_split_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match=r"split \(3,\) must give 2"):
        S.check_splits(S.Config(splits=((3,),)))
