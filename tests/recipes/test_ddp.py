"""``normlab train`` (normlab.recipes.ddp): DDP + SyncBatchNorm on gloo ranks reproduces one
process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlab.cli import main
from normlab.recipes import ddp as training

pytestmark = pytest.mark.timeout(180)

STEPS = 5


def _cfg(**kw) -> training.TrainConfig:
    base = {"steps": STEPS, "batch_size": 64, "width": 8, "log_every": 0}
    return training.TrainConfig(**{**base, **kw})


def _run_rank_worker(rank: int, world: int, cfg: training.TrainConfig) -> dict | None:
    result = training.run_rank(cfg, rank, world)
    return None if result is None else result.to_dict()


@pytest.fixture(scope="module")
def single():
    return training.run_rank(_cfg()).to_dict()  # the global batch in one process


@pytest.mark.distributed
@pytest.mark.parametrize("world, batch_size", [(2, 64), (3, 64)])  # 3 ranks: 22, 21, 21
def test_sync_loss_trajectory_matches_one_process(gloo_pools, single, world, batch_size):
    pool = gloo_pools.get(world)
    synced = pool.run(_run_rank_worker, _cfg(batch_size=batch_size), timeout=120)[0]
    local = pool.run(_run_rank_worker, _cfg(sync=False), timeout=120)[0]
    assert synced["world_size"] == world and synced["backend"] == "gloo"
    torch.testing.assert_close(synced["losses"], single["losses"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(synced["accuracies"], single["accuracies"])
    assert abs(synced["test_accuracy"] - single["test_accuracy"]) <= 1 / 450
    # the comparison can fail: per-rank statistics give a different trajectory
    diff = max(abs(a - b) for a, b in zip(local["losses"][1:], single["losses"][1:]))
    assert diff > 1e-3


@pytest.mark.distributed
def test_cli_train_nproc_2_steps_5_runs_and_matches_one_process(capsys):
    main(["train", "--nproc", "2", "--steps", "5", "--json"])  # the documented defaults
    result = json.loads(capsys.readouterr().out)
    assert result["world_size"] == 2 and result["launcher"] == "spawn"
    assert len(result["losses"]) == 5 and result["median_step_ms"] > 0
    single = training.run_rank(training.TrainConfig(steps=5))
    torch.testing.assert_close(result["losses"], single.losses, rtol=1e-4, atol=1e-4)


@pytest.mark.distributed
def test_cli_reports_every_failing_rank(capsys):
    # a global batch larger than the training set fails inside every worker
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--nproc", "2", "--steps", "1", "--batch-size", "5000"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "2 of 2 ranks failed" in err and "rank 0" in err and "rank 1" in err
    assert "--batch-size" in err


def test_cli_rejects_bad_options_before_spawning(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--nproc", "0"])
    assert "nproc" in capsys.readouterr().err


@pytest.mark.distributed
def test_runs_unchanged_under_torchrun(single, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in training.TORCHRUN_VARS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    # --log-dir: torchrun's own files go to tmp_path, not a torchelastic_* left in /tmp
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path)]
    cmd += ["-m", "normlab.train"]
    cmd += ["--steps", str(STEPS), "--batch-size", "64", "--width", "8", "--json"]
    cmd += ["--timeout", "60"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank frees its process group before exiting (a live group's gloo threads used to
    # abort rank 1 at interpreter exit under load); process_group warns if it cannot
    assert "still referenced after destroy_process_group" not in proc.stderr, proc.stderr
    result = json.loads(proc.stdout)  # one JSON document: rank 0 alone prints
    assert result["launcher"] == "torchrun" and result["world_size"] == 2
    torch.testing.assert_close(result["losses"], single["losses"], rtol=1e-4, atol=1e-4)
    assert time.monotonic() - start < 150


# -- one process, no process group (fast) -------------------------------------------------


def test_one_process_run_through_the_cli(capsys):
    args = ["train", "--steps", "2", "--batch-size", "32", "--width", "8"]
    main([*args, "--no-sync", "--log-every", "1"])
    printed = capsys.readouterr().out
    assert "normlab train" in printed and "spawning" not in printed  # no workers
    logged = [float(m) for m in re.findall(r"step +\d+  loss (\S+)", printed)]
    main([*args, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["world_size"] == 1 and result["launcher"] == "single"
    assert result["backend"] == "none" and len(result["losses"]) == 2
    # same seed, same start; SyncBatchNorm outside a process group is plain BatchNorm
    assert logged == pytest.approx(result["losses"], abs=1e-4)  # printed to 4 decimals


# -- the old path: ``normlab.train`` re-exports the recipe and stays a ``-m`` entry ---------


def test_normlab_train_is_the_recipe():
    import normlab.train as shim

    for name in shim.__all__:
        assert getattr(shim, name) is getattr(training, name)


@pytest.mark.slow
def test_python_m_normlab_train_runs_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in training.TORCHRUN_VARS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    cmd = [sys.executable, "-m", "normlab.train", "--steps", "1", "--batch-size", "16"]
    cmd += ["--width", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["launcher"] == "single" and len(result["losses"]) == 1
