"""``normlab demo``: a short measured tour of what normlab's BatchNorm does."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from normlab.cli import _output


def _worked_example() -> dict:
    import torch

    import normlab as nl

    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    bn = nl.nn.BatchNorm1d(1, eps=0.0, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(1.0)
    y = bn(x).detach().flatten()
    mean, var = nl.functional.moments(x, 0)
    return {"x": [1, 2, 3, 4], "mean": float(mean), "var": float(var), "y": y.tolist()}


def _offset_accuracy(offsets: tuple[float, ...] = (1e2, 1e4, 1e6), std: float = 0.01) -> list[dict]:
    import torch

    import normlab as nl

    rows = []
    g = torch.Generator().manual_seed(0)
    for offset in offsets:
        x = (offset + std * torch.randn(256, 4, generator=g)).float()
        x64 = x.double()
        ref = (x64 - x64.mean(0)) / torch.sqrt(x64.var(0, unbiased=False) + 1e-5)
        ours = nl.functional.batch_norm(x, None, None, training=True)
        theirs = torch.nn.functional.batch_norm(x, None, None, training=True)
        rows.append(
            {
                "offset": offset,
                "normlab_max_err": float((ours.double() - ref).abs().max()),
                "torch_max_err": float((theirs.double() - ref).abs().max()),
            }
        )
    return rows


def _nan_batch() -> dict:
    import warnings

    import torch

    import normlab as nl

    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(32, 8, generator=g) + 3 for _ in range(2)]
    bad = clean[0].clone()
    bad[0, 0] = float("nan")
    ours, theirs = nl.nn.BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (clean[0], bad, clean[1]):
            ours(batch)
            theirs(batch)
    return {
        "normlab_running_mean_finite": bool(torch.isfinite(ours.running_mean).all()),
        "torch_running_mean_finite": bool(torch.isfinite(theirs.running_mean).all()),
    }


def demo(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Run the demonstration: the seed-003 worked example, float32 accuracy at large
    offsets against torch, and a NaN batch that does not poison the running statistics."""
    start = time.perf_counter()
    results = {
        "worked_example": _worked_example(),
        "offset_accuracy": _offset_accuracy(),
        "nan_batch": _nan_batch(),
    }
    results["seconds"] = time.perf_counter() - start
    if json_out:
        _output.emit_json(results)
        return
    c = _output.console
    we = results["worked_example"]
    c.print("[bold]Seed 003 worked example[/] x = [1, 2, 3, 4], γ = 2, β = 1, ε = 0")
    c.print(
        f"  μ = {we['mean']:.4g}, σ² = {we['var']:.4g}, y = "
        + ", ".join(f"{v:.3f}" for v in we["y"])
    )
    table = Table(title="float32 BatchNorm, std 0.01 around a large offset: max |error| vs float64")
    table.add_column("offset", justify="right")
    table.add_column("normlab", justify="right")
    table.add_column("torch", justify="right")
    for row in results["offset_accuracy"]:
        table.add_row(
            f"{row['offset']:.0e}", f"{row['normlab_max_err']:.1e}", f"{row['torch_max_err']:.1e}"
        )
    c.print(table)
    nb = results["nan_batch"]
    c.print(
        "[bold]One NaN batch among clean ones[/]: running_mean finite afterwards — "
        f"normlab: {nb['normlab_running_mean_finite']}, torch: {nb['torch_running_mean_finite']}"
    )
    c.print(f"[dim]{results['seconds']:.1f} s[/]")
