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

from normlab.experiments.base import AllChecks, Progress, Result, Verdict, notify
from normlab.experiments.registry import register

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# what is compared after every step, in report order
QUANTITIES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")


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


def check_splits(c: Config) -> None:
    """Raise, naming the split and the fix, unless every split gives each rank a size."""
    for split in c.splits:
        if len(split) != c.world_size or min(split) < 0 or sum(split) < 2:
            raise ValueError(
                f"sync: split {split} must give {c.world_size} non-negative sizes summing to ≥ 2"
            )


@dataclass
class StepComparison:
    """One SGD step of one (split, dtype) case: SyncBatchNorm over the ranks against
    single-process BN on the concatenated batch."""

    split: tuple[int, ...]
    dtype: str
    step: int  # 1-based
    diffs: dict[str, float]  # quantity of QUANTITIES → max |Δ| / (1 + max |reference|)
    same_count: bool  # every rank's num_batches_tracked equals the reference's
    normlab_vs_torch: float  # the one-process reference against torch's BatchNorm2d

    @property
    def worst(self) -> float:
        """The largest difference over the quantities (inf if the step counts differ)."""
        return max(self.diffs.values()) if self.same_count else float("inf")


@dataclass
class Measurement:
    """What :class:`Sync` measured: one :class:`StepComparison` per split, dtype and step."""

    steps: list[StepComparison]

    def worst(self, dtype: str) -> float:
        return max([0.0] + [s.worst for s in self.steps if s.dtype == dtype])

    @property
    def per_quantity(self) -> dict[str, float]:
        return {k: max([0.0] + [s.diffs[k] for s in self.steps]) for k in QUANTITIES}

    @property
    def single_vs_torch_float64(self) -> float:
        return max([0.0] + [s.normlab_vs_torch for s in self.steps if s.dtype == "float64"])


def compare(c: Config, ranks: list[dict]) -> list[StepComparison]:
    """Replay every (split, dtype) case in this process with normlab's and torch's
    BatchNorm2d on the whole batch and compare each step with the ranks' results."""
    import normlab as nl

    out = []
    for split in c.splits:
        for name in c.dtypes:
            dtype = _DTYPES[name]
            single = nl.nn.BatchNorm2d(c.channels, dtype=dtype)
            ref = torch.nn.BatchNorm2d(c.channels, dtype=dtype)
            _init_layer(single, c)
            _init_layer(ref, c)
            ours = _trajectory(c, single.train(), split, dtype, None, lambda t: t)
            theirs = _trajectory(c, ref.train(), split, dtype, None, lambda t: t)
            for step in range(c.steps):
                parts = [rk[(split, name)][step] for rk in ranks]
                # outputs and input gradients are per sample: the ranks' slices, joined
                diffs = {
                    k: _max_diff(torch.cat([p[k] for p in parts]), ours[step][k])
                    for k in ("y", "dx")
                }
                # parameter gradients (all-reduced) and buffers: the same on every rank
                for k in ("dweight", "dbias", "running_mean", "running_var"):
                    diffs[k] = max(_max_diff(p[k], ours[step][k]) for p in parts)
                count = ours[step]["num_batches_tracked"]
                out.append(
                    StepComparison(
                        split=split,
                        dtype=name,
                        step=step + 1,
                        diffs=diffs,
                        same_count=all(p["num_batches_tracked"] == count for p in parts),
                        normlab_vs_torch=max(
                            _max_diff(ours[step][k], theirs[step][k]) for k in QUANTITIES
                        ),
                    )
                )
    return out


@register
class Sync(AllChecks):
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

    def rule(self, config: Config) -> str:
        c = config
        return (
            "holds if, for every split of the global batch over "
            f"{c.world_size} ranks in {[list(s) for s in c.splits]} and every step, the "
            "outputs, input gradients, γ/β gradients (summed over ranks) and running "
            "mean/variance of SyncBatchNorm equal those of single-process BatchNorm2d "
            "on the concatenated batch to within "
            + ", ".join(f"{t:g} ({n})" for n, t in zip(c.dtypes, c.tolerance))
            + " (max |difference| / (1 + max |reference|) per quantity), with the same "
            "num_batches_tracked."
        )

    def checks(self, config: Config, m: Measurement) -> dict[str, bool]:
        """The parts of :meth:`rule`, each named, and whether it passed."""
        within = {
            f"{name} within {tol:g}": m.worst(name) <= tol
            for name, tol in zip(config.dtypes, config.tolerance)
        }
        return {**within, "same num_batches_tracked": all(s.same_count for s in m.steps)}

    def measure(self, config: Config, progress: Progress | None = None) -> Measurement:
        check_splits(config)
        notify(progress, 0.05, f"starting {config.world_size} gloo workers")
        ranks = run_ranks(config)
        notify(progress, 0.8, "single-process reference")
        return Measurement(compare(config, ranks))

    def present(self, config: Config, m: Measurement, verdict: Verdict) -> Result:
        c = config
        vs_torch = m.single_vs_torch_float64
        if verdict == "holds":
            empty = (
                "An empty rank still takes part in every collective and contributes nothing "
                "to the statistics, so the other rank's output equals BN on the whole batch. "
                if any(0 in split for split in c.splits)
                else ""
            )
            why = (
                f"{empty}In float32 the differences are rounding (the global statistics are "
                "merged in float64 on each rank, BN on one process sums in a different order)."
            )
        else:
            worst = max(m.steps, key=lambda s: s.worst)
            quantity = max(worst.diffs, key=worst.diffs.get)
            why = (
                f"{self.failures(c, m)} The largest difference is in {quantity} at split "
                f"{list(worst.split)}, {worst.dtype}, step {worst.step}."
            )
        return self.verdict_result(
            config,
            verdict,
            measured="max |sync − single| / (1 + |single|) = "
            + ", ".join(f"{m.worst(n):.1e} ({n})" for n in c.dtypes)
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
                "max_abs_diff": {n: m.worst(n) for n in c.dtypes},
                "max_abs_diff_per_quantity": m.per_quantity,
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
                    "rows": [
                        [str(list(s.split)), s.dtype, s.step, *(s.diffs[k] for k in QUANTITIES)]
                        for s in m.steps
                    ],
                }
            },
            notes=(
                f"{why} The one-process reference itself matches torch.nn.BatchNorm2d to "
                f"{vs_torch:.1e} in float64."
            ),
        )
