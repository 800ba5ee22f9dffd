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
