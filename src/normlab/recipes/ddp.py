"""A recipe: data-parallel training of a small CNN on digits, with synchronised batch norm.

Recipes are applications built on the library (``normlab.nn``, ``normlab.distributed``,
``normlab.data``); the library never imports them, and they never import the command line
(:mod:`normlab.cli.train` wraps this one; ``normlab.train`` is the ``python -m`` entry).

The same code runs in three ways:

* ``normlab train --nproc 1`` (or ``python -m normlab.train``): one process, no process
  group — the reference a synchronised run must reproduce.
* ``normlab train --nproc N``: spawns N local worker processes joined in a gloo group
  over a file store in a temporary directory (no port to choose), gathers rank 0's
  result and reports every rank's error.
* ``torchrun --nproc_per_node N -m normlab.train …`` (or ``torchrun … $(which normlab)
  train …``): when torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``, ``LOCAL_RANK``) is present, each process joins the group torchrun set
  up (``env://``; gloo on CPU, NCCL when CUDA is available) and nothing is spawned. Multi
  node is torchrun's job (``--nnodes``, ``--rdzv-endpoint``).

Each step draws one *global* batch of ``batch_size`` samples (the same indices on every
rank, from ``seed``) and rank r trains on its contiguous slice ``tensor_split(batch, N)[r]``
(uneven when N does not divide the batch). The local loss is scaled so that DDP's
gradient *average* equals the gradient of the mean loss over the global batch. With
``sync=True`` every ``BatchNorm2d`` is a :class:`normlab.nn.SyncBatchNorm`, so the
forward pass, the gradients and the loss trajectory are those of one process on the global
batch, up to float rounding. With ``sync=False`` each rank normalises with its own slice's
statistics (what plain DDP does; effectively ghost batch norm of size B/N).

Logs (and the returned result) come from rank 0 only. The process-group ``timeout``
bounds every blocked collective, so a rank that dies or never arrives ends the run with
an error on the others instead of a hang.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from normlab.distributed import process_group

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TrainConfig:
    """What ``normlab train`` does; every choice that changes results is here.

    Attributes:
        steps: optimizer steps.
        batch_size: the *global* batch, split over the ranks.
        nproc: local processes to spawn (ignored under torchrun, which sets the world).
        sync: synchronise batch-norm statistics across ranks (SyncBatchNorm).
        seed: model initialisation, data split and batch order.
        lr, momentum, weight_decay: SGD.
        width: channels of the first convolution (the CNN has width, 2·width, 2·width).
        timeout: process-group timeout in seconds (bounds every blocked collective).
        log_every: rank 0 reports every this many steps (0: only the last).
    """

    steps: int = 100
    batch_size: int = 128
    nproc: int = 1
    sync: bool = True
    seed: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    width: int = 16
    timeout: float = 300.0
    log_every: int = 10

    def check(self) -> TrainConfig:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"train: {name}={getattr(self, name)!r} {why}")

        if self.steps < 1:
            raise bad("steps", "must be at least 1")
        if self.nproc < 1:
            raise bad("nproc", "must be at least 1")
        if self.batch_size < 2:
            raise bad("batch_size", "must be at least 2 (batch norm needs two samples)")
        if self.width < 1:
            raise bad("width", "must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "must be a positive number")
        if not self.timeout > 0:
            raise bad("timeout", "must be positive (seconds)")
        return self


@dataclass
class TrainResult:
    """Rank 0's record of a run (JSON-ready via :meth:`to_dict`)."""

    config: dict
    world_size: int
    backend: str
    launcher: str  # 'single', 'spawn' or 'torchrun'
    losses: list[float] = field(default_factory=list)  # mean loss over the global batch
    accuracies: list[float] = field(default_factory=list)  # on the global batch
    step_seconds: list[float] = field(default_factory=list)  # rank 0, per step
    test_accuracy: float = float("nan")
    seconds: float = 0.0

    @property
    def median_step_ms(self) -> float:
        # the first step pays one-off costs (handshakes, allocator warm-up)
        times = self.step_seconds[1:] or self.step_seconds
        return 1e3 * statistics.median(times) if times else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["median_step_ms"] = self.median_step_ms
        return d


def build_model(width: int = 16, num_classes: int = 10, *, sync: bool = False) -> torch.nn.Module:
    """Conv-BN-ReLU ×3 and a linear classifier for (N, 1, 8, 8) digits.

    BatchNorm is normlab's (ReLU fused); with ``sync`` each is converted to
    :class:`normlab.nn.SyncBatchNorm` (local batch norm when no process group is running).
    """
    from normlab.nn import BatchNorm2d, SyncBatchNorm

    w = width
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, w, 3, padding=1, bias=False),
        BatchNorm2d(w, activation="relu"),
        torch.nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
        BatchNorm2d(2 * w, activation="relu"),
        torch.nn.MaxPool2d(2),  # 8×8 → 4×4
        torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
        BatchNorm2d(2 * w, activation="relu"),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * w, num_classes),
    )
    return SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def _buffer_sync(enabled: bool) -> dict:
    """DDP's per-forward buffer broadcast switch (renamed in torch 2.13)."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: enabled}


def _global_batches(n: int, batch_size: int, steps: int, seed: int):
    """Index tensors of the global batches, reshuffled every epoch, identical on every
    rank (the generator is seeded, not shared)."""
    g = torch.Generator().manual_seed(seed + 1)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def run_rank(
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    *,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float, float], None] | None = None,
) -> TrainResult | None:
    """Train on one rank (the process group, if any, is already initialised).

    Returns the :class:`TrainResult` on rank 0 and None elsewhere; ``on_step(step, loss,
    accuracy)`` is called on rank 0 only.
    """
    from normlab.data import load_digits

    start = time.perf_counter()
    data = load_digits(image=True, seed=cfg.seed)
    if cfg.batch_size > len(data.x_train):
        raise ValueError(
            f"train: batch_size={cfg.batch_size} exceeds the {len(data.x_train)} training "
            f"digits; use --batch-size {len(data.x_train)} or less"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.width, data.num_classes, sync=cfg.sync).to(device)
    distributed = world_size > 1
    net = model
    if distributed:
        # With synchronised statistics the running buffers already agree on every rank, so
        # DDP's per-step buffer broadcast would be a wasted collective.
        net = torch.nn.parallel.DistributedDataParallel(model, **_buffer_sync(not cfg.sync))
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    result = TrainResult(
        config=asdict(cfg),
        world_size=world_size,
        backend=dist.get_backend() if distributed else "none",
        launcher="single",
    )
    model.train()
    for step, idx in enumerate(
        _global_batches(len(data.x_train), cfg.batch_size, cfg.steps, cfg.seed)
    ):
        t0 = time.perf_counter()
        local = torch.tensor_split(idx, world_size)[rank]
        x, y = data.x_train[local].to(device), data.y_train[local].to(device)
        logits = net(x)
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        # DDP averages gradients over ranks; scale so the average is d(mean global loss).
        (loss_sum * (world_size / cfg.batch_size)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = torch.stack([loss_sum.detach(), (logits.argmax(1) == y).sum().to(loss_sum.dtype)])
        if distributed:
            dist.all_reduce(stats)  # for the log only: the global batch's loss and accuracy
        if rank == 0:
            result.step_seconds.append(time.perf_counter() - t0)
            loss, acc = (stats / cfg.batch_size).tolist()
            result.losses.append(loss)
            result.accuracies.append(acc)
            if on_step is not None:
                on_step(step, loss, acc)
    if rank != 0:
        return None
    model.eval()  # eval BN uses running statistics: no collective, rank 0 alone is fine
    with torch.no_grad():
        pred = model(data.x_test.to(device)).argmax(1).cpu()
    result.test_accuracy = float((pred == data.y_test).float().mean())
    result.seconds = time.perf_counter() - start
    return result


# -- launchers -------------------------------------------------------------------------


def under_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) set this process's rank."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def _threads_per_rank(local_world: int) -> int:  # what launch() gives each worker too
    return max(1, (os.cpu_count() or 1) // local_world)


def train(
    cfg: TrainConfig, *, on_step: Callable[[int, float, float], None] | None = None
) -> TrainResult | None:
    """Run training as configured: under torchrun if its environment is present, else
    spawning ``cfg.nproc`` local gloo workers (or in this process for ``nproc=1``).

    Returns rank 0's :class:`TrainResult` (None on the other torchrun ranks).
    ``on_step(step, loss, accuracy)`` runs in this process for rank 0's steps: directly
    under torchrun or in a single process, streamed from the worker when spawning.
    """
    cfg.check()
    if under_torchrun():
        return _train_torchrun(cfg, on_step)
    if cfg.nproc == 1:
        result = run_rank(cfg, on_step=on_step)
        return result
    return _train_spawn(cfg, on_step)


def _train_torchrun(cfg: TrainConfig, on_step) -> TrainResult | None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    # A group we create is also freed by us, before the interpreter exits: its gloo threads
    # must not outlive it (normlab.distributed.processes, "Lifetime": rank 1, idle after its last
    # collective, used to abort at exit under CPU load).
    owns_group = not dist.is_initialized()
    group = (
        process_group(backend, timeout=cfg.timeout, init_method="env://")
        if owns_group
        else contextlib.nullcontext()
    )
    with group:
        result = run_rank(cfg, rank, world, device=device, on_step=on_step if rank == 0 else None)
    if result is not None:
        result.launcher = "torchrun"
    return result


def _spawned_rank(rank: int, world: int, cfg: TrainConfig) -> dict | None:
    from normlab.distributed import report

    result = run_rank(cfg, rank, world, on_step=(lambda *step: report(step)) if rank == 0 else None)
    return None if result is None else result.to_dict()


def _train_spawn(cfg: TrainConfig, on_step=None) -> TrainResult:
    from normlab.distributed import launch

    payload = launch(
        _spawned_rank,
        cfg.nproc,
        cfg,
        timeout=cfg.timeout,
        on_report=None if on_step is None else (lambda rank, step: on_step(*step)),
        # Not normlab.train itself: under `python -m normlab.train` the workers re-run it
        # as __mp_main__, which must not find it imported already.
        preload=("normlab", "sklearn.datasets"),
    )[0]
    result = TrainResult(
        **{k: v for k, v in payload.items() if k in TrainResult.__dataclass_fields__}
    )
    result.launcher = "spawn"
    return result
