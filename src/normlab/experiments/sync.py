"""sync: synchronised BN over k processes equals single-process BN on the whole batch.

Two gloo processes (joined over a FileStore in a temporary directory: no ports) each run
``normlab.nn.SyncBatchNorm`` on their part of a global batch — uneven parts, one of a
single sample, and an empty one — for a few SGD steps. One process runs
``normlab.nn.BatchNorm2d`` (and ``torch.nn.BatchNorm2d``) on the concatenated batch. We
compare outputs, input gradients, γ/β gradients (summed over ranks, as DDP would) and the
running statistics after every step.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import ClassVar

import torch

from normlab.experiments.base import Experiment, Result, notify
from normlab.experiments.registry import register

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Config:
    seed: int = 0
    world_size: int = 2
    splits: tuple[tuple[int, ...], ...] = ((7, 16), (1, 22), (0, 23))  # samples per rank
    channels: int = 6
    spatial: int = 4  # inputs (n, C, spatial, spatial)
    steps: int = 3
    lr: float = 0.1
    dtypes: tuple[str, ...] = ("float32", "float64")
    tolerance: tuple[float, ...] = (1e-5, 1e-12)  # per dtype: max |Δ| / (1 + max |reference|)
    timeout: float = 120.0  # seconds for the whole multi-process run


def _global_data(c: Config, split: tuple[int, ...], dtype: torch.dtype, step: int):
    """The global batch x and upstream gradient r of one step (same on every process)."""
    n = sum(split)
    g = torch.Generator().manual_seed(c.seed * 1000 + 17 * n + step)
    shape = (n, c.channels, c.spatial, c.spatial)
    offset = torch.linspace(-50, 50, c.channels).view(1, -1, 1, 1)  # channels far from 0
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, r


def _trajectory(c: Config, layer, split, dtype, part: slice | None, group_sum) -> list[dict]:
    """Run ``steps`` SGD steps of L = Σ r·y; return per step the output and input gradient
    (of ``part`` of the batch), γ/β gradients (reduced by ``group_sum``) and buffers."""
    out = []
    for step in range(c.steps):
        x, r = _global_data(c, split, dtype, step)
        if part is not None:
            x, r = x[part], r[part]
        x = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=False)
        y = layer(x)
        (y * r).sum().backward()
        gw, gb = group_sum(layer.weight.grad.clone()), group_sum(layer.bias.grad.clone())
        with torch.no_grad():
            layer.weight -= c.lr * gw
            layer.bias -= c.lr * gb
        out.append(
            {
                "y": y.detach(),
                "dx": x.grad.detach(),
                "dweight": gw,
                "dbias": gb,
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "num_batches_tracked": int(layer.num_batches_tracked),
            }
        )
    return out


def _init_layer(layer, c: Config) -> None:
    g = torch.Generator().manual_seed(c.seed + 99)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c.channels, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c.channels, generator=g))


def _rank_main(rank: int, c: Config, store_path: str, results) -> None:
    """One worker: join the gloo group, run every (split, dtype) case with SyncBatchNorm."""
    try:
        import torch.distributed as dist

        import normlab as nl

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store_path, c.world_size),
            rank=rank,
            world_size=c.world_size,
            timeout=datetime.timedelta(seconds=max(5.0, c.timeout / 2)),
        )

        def group_sum(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        cases = {}
        for split in c.splits:
            start = sum(split[:rank])
            part = slice(start, start + split[rank])
            for name in c.dtypes:
                layer = nl.nn.SyncBatchNorm(c.channels, dtype=_DTYPES[name])
                _init_layer(layer, c)
                cases[(split, name)] = _trajectory(
                    c, layer.train(), split, _DTYPES[name], part, group_sum
                )
        dist.destroy_process_group()
        # plain pickle bytes: torch's queue pickler would pass tensors as shared-memory file
        # descriptors, which die with this process before the parent reads them
        results.put((rank, True, pickle.dumps(cases)))
    except BaseException as e:  # report to the parent, which decides
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _mp_context():
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "normlab"])  # no-op if the server runs already
        return ctx
    return mp.get_context("spawn")


def run_ranks(c: Config) -> list[dict]:
    """Start ``world_size`` worker processes, wait at most ``timeout`` seconds, and return
    each rank's cases; kill the workers and raise on a failure or a timeout."""
    ctx = _mp_context()
    tmp = tempfile.mkdtemp(prefix="normlab-sync-")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main, args=(r, c, os.path.join(tmp, "store"), results), daemon=True
        )
        for r in range(c.world_size)
    ]
    try:
        for p in procs:
            p.start()
        got: dict[int, dict] = {}
        deadline = time.monotonic() + c.timeout
        while len(got) < c.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"ranks {sorted(set(range(c.world_size)) - set(got))} did not finish in {c.timeout:g} s"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)
                ]
                if dead:
                    raise RuntimeError(
                        f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed: {value}")
            got[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=10)
        return [got[r] for r in range(c.world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / (1 + max |b|): rounding-level for any magnitude (∂γ sums hundreds of
    terms of size ~10, so float32 rounding alone is ~1e-5 in absolute terms)."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    b = b.double()
    return float((a.double() - b).abs().max() / (1.0 + b.abs().max()))


@register
class Sync(Experiment):
    id = "sync"
    claim = "Synchronised BN over k processes equals single-process BN over the concatenated batch"
    source = (
        "docs/sources.md#seed-002 (distributed training), docs/sources.md#seed-004 "
        "(distributed topic)"
    )
    reference = "exact up to float error"
    seed_says = (
        "In data-parallel training each device sees only its slice of the batch; with BN "
        "the statistics must be synchronised across devices so that they are those of the "
        "whole mini-batch, otherwise small per-device batches give noisy statistics."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {"splits": ((7, 16), (0, 23)), "steps": 2}

    def run(self, config: Config, progress=None) -> Result:
        import normlab as nl

        c = config
        for split in c.splits:
            if len(split) != c.world_size or min(split) < 0 or sum(split) < 2:
                raise ValueError(
                    f"sync: split {split} must give {c.world_size} non-negative sizes summing to ≥ 2"
                )
        notify(progress, 0.05, f"starting {c.world_size} gloo workers")
        ranks = run_ranks(c)
        notify(progress, 0.8, "single-process reference")
        rows, worst = [], {name: 0.0 for name in c.dtypes}
        keys = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
        per_quantity = {k: 0.0 for k in keys}
        vs_torch = 0.0
        for split in c.splits:
            for name, _tol in zip(c.dtypes, c.tolerance):
                dtype = _DTYPES[name]
                single = nl.nn.BatchNorm2d(c.channels, dtype=dtype)
                ref = torch.nn.BatchNorm2d(c.channels, dtype=dtype)
                _init_layer(single, c)
                _init_layer(ref, c)
                ours = _trajectory(c, single.train(), split, dtype, None, lambda t: t)
                theirs = _trajectory(c, ref.train(), split, dtype, None, lambda t: t)
                for step in range(c.steps):
                    parts = [rk[(split, name)][step] for rk in ranks]
                    merged = {k: torch.cat([p[k] for p in parts]) for k in ("y", "dx")}
                    diffs = {k: _max_diff(merged[k], ours[step][k]) for k in ("y", "dx")}
                    for k in ("dweight", "dbias", "running_mean", "running_var"):
                        diffs[k] = max(_max_diff(p[k], ours[step][k]) for p in parts)
                    same_count = all(
                        p["num_batches_tracked"] == ours[step]["num_batches_tracked"] for p in parts
                    )
                    d = max(diffs.values()) if same_count else float("inf")
                    worst[name] = max(worst[name], d)
                    for k in keys:
                        per_quantity[k] = max(per_quantity[k], diffs[k])
                    if name == "float64":
                        vs_torch = max(
                            vs_torch, *(_max_diff(ours[step][k], theirs[step][k]) for k in keys)
                        )
                    rows.append([str(list(split)), name, step + 1, *(diffs[k] for k in keys)])
        holds = all(worst[n] <= tol for n, tol in zip(c.dtypes, c.tolerance))
        return self.result(
            config,
            verdict="holds" if holds else "fails",
            rule=(
                "holds if, for every split of the global batch over "
                f"{c.world_size} ranks in {[list(s) for s in c.splits]} and every step, the "
                "outputs, input gradients, γ/β gradients (summed over ranks) and running "
                "mean/variance of SyncBatchNorm equal those of single-process BatchNorm2d "
                "on the concatenated batch to within "
                + ", ".join(f"{t:g} ({n})" for n, t in zip(c.dtypes, c.tolerance))
                + " (max |difference| / (1 + max |reference|) per quantity), with the same "
                "num_batches_tracked."
            ),
            measured="max |sync − single| / (1 + |single|) = "
            + ", ".join(f"{worst[n]:.1e} ({n})" for n in c.dtypes)
            + f" over {len(c.splits)} splits × {c.steps} steps",
            setup=(
                f"{c.world_size} processes joined in a gloo group over a FileStore in a temporary "
                f"directory, each running normlab.nn.SyncBatchNorm({c.channels}) on its slice "
                f"of a global batch of shape (n, {c.channels}, {c.spatial}, {c.spatial}) with "
                f"channel means spread over ±50; splits {[list(s) for s in c.splits]} "
                "(uneven, one rank with a single sample, one rank empty); loss Σ r·y with a "
                f"fixed random r; {c.steps} SGD steps (lr {c.lr:g}) on γ and β with "
                "gradients all-reduced. Reference: one process, normlab.nn.BatchNorm2d and "
                "torch.nn.BatchNorm2d on the concatenated batch, same data and updates. "
                "Nothing scaled down beyond the process count."
            ),
            metrics={
                "max_abs_diff": worst,
                "max_abs_diff_per_quantity": per_quantity,
                "single_normlab_vs_torch_float64": vs_torch,
            },
            tables={
                "SyncBatchNorm vs one process (max |Δ| / (1 + max |reference|))": {
                    "header": [
                        "split",
                        "dtype",
                        "step",
                        "output",
                        "∂x",
                        "∂γ",
                        "∂β",
                        "running mean",
                        "running var",
                    ],
                    "rows": rows,
                }
            },
            notes=(
                "An empty rank still takes part in every collective and contributes nothing "
                "to the statistics, so the other rank's output equals BN on the whole batch. "
                "In float32 the differences are rounding (the global statistics are merged "
                "in float64 on each rank, BN on one process sums in a different order). "
                f"The one-process reference itself matches torch.nn.BatchNorm2d to {vs_torch:.1e} "
                "in float64."
            ),
        )
