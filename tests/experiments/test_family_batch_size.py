import pytest
import torch

import normlab.nn as nlnn
from normlab.experiments import family_batch_size as F
from normlab.experiments import get

ID = "family-batch-size"


# -- the quick run measures what the experiment is about ----------------------------------


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_values_per_statistic_are_as_designed(quick_result):
    # quick config: 8×8 → stride-2 conv 32 ch (4×4) → stride-2 conv 64 ch (2×2) → fc 128;
    # GN with 8 groups. Hand-counted from that design, not from the code under test.
    counts = quick_result(ID).metrics["values_per_statistic"]
    assert counts["bn"]["2"] == [2 * 4 * 4, 2 * 2 * 2, 2]  # BN's last layer: 1 per sample
    assert counts["bn"]["32"] == [32 * 4 * 4, 32 * 2 * 2, 32]
    for b in ("2", "32"):  # the batch-free norms pool the same number at every batch size
        assert counts["gn"][b] == [(32 // 8) * 4 * 4, (64 // 8) * 2 * 2, 128 // 8]
        assert counts["ln"][b] == [32 * 4 * 4, 64 * 2 * 2, 128]
        assert counts["in"][b] == [4 * 4, 2 * 2, None]  # IN is undefined in the fc layer
    assert quick_result(ID).metrics["layer_shapes"] == [[32, 4, 4], [64, 2, 2], [128]]


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_bn_degrades_at_batch_2(quick_result):
    # BN's error rose by 27–56 points from batch 32 to 2 over quick seeds 0–15
    err = quick_result(ID).metrics["mean_test_error"]["bn"]
    assert err["2"] > err["32"] + 0.15


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_gn_varies_less_across_batch_sizes_than_bn(quick_result):
    # over quick seeds 0–15 GN's spread was at most 0.48 of BN's (GN's is mostly the shorter
    # training at batch 32: 21 steps)
    metrics = quick_result(ID).metrics
    spread = {
        k: max(per.values()) - min(per.values()) for k, per in metrics["mean_test_error"].items()
    }
    assert metrics["error_spread_across_batches"] == pytest.approx(spread)
    assert spread["gn"] < 0.6 * spread["bn"]


@pytest.mark.slow  # the quick run takes seconds (conftest.QUICK_RUN_MARKS)
def test_per_seed_errors_are_recorded_for_every_norm_and_batch(quick_result):
    err = quick_result(ID).metrics["test_error"]
    assert set(err) == {"bn", "gn", "ln", "in", "bn-precise"}
    for per_batch in err.values():
        assert set(per_batch) == {"32", "2"}
        assert all(len(runs) == 1 and 0.0 <= e <= 1.0 for runs in per_batch.values() for e in runs)


# -- values_per_statistic against hand counts on another shape ----------------------------


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        ("bn", [3 * 64, 3 * 16, 3]),  # channel over batch × positions; fc feature over batch
        ("gn", [2 * 64, 3 * 16, 3]),  # 2 groups: 4/2 and 6/2 channels × positions; 6/2 feats
        ("ln", [4 * 64, 6 * 16, 6]),
        ("in", [64, 16, None]),
    ],
)
def test_values_per_statistic_counts_each_norm(norm, expected):
    config = F.Config(channels=(4, 6), strides=(1, 2), hidden=(6,), gn_groups=2)
    torch.manual_seed(0)
    model = F.build_model(config, norm)
    bn_before = [b.clone() for b in model.buffers()]
    shapes, counts = F.values_per_statistic(model, torch.randn(3, 1, 8, 8))
    assert shapes == ((4, 8, 8), (6, 4, 4), (6,))
    assert list(counts) == expected
    assert model.training  # mode restored
    assert all(torch.equal(a, b) for a, b in zip(bn_before, model.buffers(), strict=True))


def test_measure_rejects_bad_configs_by_name():
    with pytest.raises(ValueError, match="num_seeds"):
        F.measure(F.Config(num_seeds=0))
    with pytest.raises(ValueError, match="batch_sizes"):
        F.measure(F.Config(batch_sizes=(32, 1)))


def test_two_values_per_statistic_normalise_to_plus_minus_one():
    # what the notes say about BN at 2 values per statistic, checked on normlab's layer
    bn = nlnn.BatchNorm1d(5)
    x = torch.tensor([[0.3, -2.0, 5.0, 1.0, 7.0], [1.5, 4.0, -1.0, 1.2, -3.0]])
    out = bn(x)
    # |x̂| = (d/2)/sqrt(d²/4 + ε) for a gap d: 0.9995 at d = 0.2 (ε = 1e-5)
    torch.testing.assert_close(out.abs(), torch.ones_like(out), rtol=0, atol=1e-3)


# -- the verdict rule on synthetic measurements --------------------------------------------


def synthetic(errors: dict[str, tuple[float, float]]) -> F.Measurement:
    """One seed, batches (32, 2); errors[norm] = (error at 32, error at 2)."""
    return F.Measurement(
        batch_sizes=(32, 2),
        seeds=(0,),
        layer_shapes=((1,),),
        values_per_statistic={k: {32: (32,), 2: (2,)} for k in F.NORMS},
        test_error={k: {32: (e[0],), 2: (e[1],)} for k, e in errors.items()},
        diverged={k: {32: (False,), 2: (False,)} for k in F.NORMS},
        steps={32: 10, 2: 160},
        test_size=100,
    )


# the paper's Table 1/2 at batch 32 and 2 (LN, IN flat)
PAPER = {
    "bn": (0.236, 0.347),
    "gn": (0.241, 0.241),
    "ln": (0.253, 0.253),
    "in": (0.284, 0.284),
    "bn-precise": (0.236, 0.347),
}


def test_rule_holds_on_the_papers_numbers():
    assert F.judge(synthetic(PAPER), margin=0.01) == "holds"


def test_rule_fails_when_bn_rises_no_more_than_gn():
    flat = {**PAPER, "bn": (0.236, 0.240), "gn": (0.241, 0.245)}  # equal rises
    assert F.judge(synthetic(flat), margin=0.01) == "fails"
    better = {**PAPER, "bn": (0.236, 0.230)}  # BN improves at batch 2
    assert F.judge(synthetic(better), margin=0.01) == "fails"


@pytest.mark.parametrize(
    "change",
    [
        {"bn": (0.236, 0.241)},  # BN's rise of 0.5 point exceeds GN's but is below the margin
        {"gn": (0.241, 0.345)},  # BN rises 11 points, but GN rises nearly as much
        {"ln": (0.230, 0.230)},  # BN degrades, but LN does not trail BN at batch 32
        {"in": (0.236, 0.236)},  # IN equal to BN at batch 32 is not trailing
    ],
)
def test_rule_is_inconclusive_in_between(change):
    assert F.judge(synthetic({**PAPER, **change}), margin=0.01) == "inconclusive"


def test_rule_uses_the_seed_mean():
    m = F.Measurement(
        batch_sizes=(32, 2),
        seeds=(0, 1),
        layer_shapes=((1,),),
        values_per_statistic={k: {32: (32,), 2: (2,)} for k in F.NORMS},
        # BN's rise is 0.30 in one seed and 0 in the other: mean 0.15 ≥ margin
        test_error={
            **{k: {32: (e[0], e[0]), 2: (e[1], e[1])} for k, e in PAPER.items()},
            "bn": {32: (0.2, 0.2), 2: (0.5, 0.2)},
        },
        diverged={k: {32: (False, False), 2: (False, False)} for k in F.NORMS},
        steps={32: 10, 2: 160},
        test_size=100,
    )
    assert m.rise("bn") == pytest.approx(0.15)
    assert F.judge(m, margin=0.01) == "holds"


# -- presentation comes from the measurement -----------------------------------------------


def test_presentation_shows_counts_next_to_errors():
    m = synthetic(PAPER)
    config = get(ID).quick_config()
    fields = F.present(m, config)
    (table,) = fields["tables"].values()
    rows = {(r[0], r[1]): r[2:] for r in table["rows"]}
    assert rows[("BatchNorm", "test error (%)")] == ["23.6", "34.7"]
    assert rows[("BatchNorm", "values per statistic")] == ["32", "2"]
    assert rows[("BN, population stats", "test error (%)")] == ["23.6", "34.7"]
    assert ("BN, population stats", "values per statistic") not in rows
    assert "BN 23.6/34.7, GN 24.1/24.1" in fields["measured"]
    assert "batch 2 is ≥ 1 point above its error at batch 32" in fields["rule"]
