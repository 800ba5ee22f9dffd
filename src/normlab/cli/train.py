"""``normlab train``: data-parallel training of a small CNN on digits with SyncBatchNorm."""

from __future__ import annotations

import typer
from rich.table import Table

from normlab.cli import _output


def train(
    nproc: int = typer.Option(
        None,
        "--nproc",
        help="Local processes to spawn (gloo). Default 1. Under torchrun the world size "
        "comes from torchrun and --nproc must be omitted or equal to it.",
    ),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(
        128, "--batch-size", help="Global batch size, split over the ranks."
    ),
    sync: bool = typer.Option(
        True, "--sync/--no-sync", help="Synchronise batch-norm statistics across ranks."
    ),
    seed: int = typer.Option(0, "--seed", help="Initialisation, data split and batch order."),
    lr: float = typer.Option(0.1, "--lr", help="SGD learning rate (momentum 0.9)."),
    width: int = typer.Option(16, "--width", help="Channels of the first convolution."),
    timeout: float = typer.Option(
        300.0,
        "--timeout",
        help="Process-group timeout in seconds: a rank that stops answering ends the run "
        "with an error after this long.",
    ),
    log_every: int = typer.Option(10, "--log-every", help="Log every N steps (rank 0)."),
    json_out: bool = typer.Option(False, "--json", help="Print rank 0's result as JSON."),
) -> None:
    """Train a small CNN on the digits with DDP and SyncBatchNorm.

    Runs in one process, or spawns --nproc local gloo workers; only rank 0 prints.

    Under `torchrun --nproc_per_node N -m normlab.train` it joins torchrun's process group.
    """
    from normlab.recipes import ddp as training

    world = None
    if training.under_torchrun():
        import os

        world = int(os.environ["WORLD_SIZE"])
        if nproc is not None and nproc != world:
            raise typer.BadParameter(
                f"--nproc {nproc} conflicts with torchrun's WORLD_SIZE={world}; omit --nproc "
                f"under torchrun (use torchrun --nproc_per_node to choose the processes)",
                param_hint="--nproc",
            )
    cfg = training.TrainConfig(
        steps=steps,
        batch_size=batch_size,
        nproc=world if world is not None else (1 if nproc is None else nproc),
        sync=sync,
        seed=seed,
        lr=lr,
        width=width,
        timeout=timeout,
        log_every=log_every,
    )
    console = _output.console
    every = max(1, log_every) if log_every > 0 else steps

    def on_step(step: int, loss: float, acc: float) -> None:
        if not json_out and ((step + 1) % every == 0 or step + 1 == steps):
            console.print(f"step {step + 1:>5}  loss {loss:.4f}  batch accuracy {acc:.3f}")

    if not json_out and not training.under_torchrun() and cfg.nproc > 1:
        console.print(
            f"[dim]spawning {cfg.nproc} gloo workers ({'sync' if sync else 'local'} BN)...[/]"
        )
    result = training.train(cfg, on_step=on_step)
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if json_out:
        _output.emit_json(result.to_dict())
        return
    table = Table(title="normlab train")
    table.add_column("ranks", justify="right")
    table.add_column("BN", justify="left")
    table.add_column("final loss", justify="right")
    table.add_column("test accuracy", justify="right")
    table.add_column("median step", justify="right")
    table.add_row(
        str(result.world_size),
        "sync" if sync else "local",
        f"{result.losses[-1]:.4f}",
        f"{result.test_accuracy:.3f}",
        f"{result.median_step_ms:.1f} ms",
    )
    console.print(table)
