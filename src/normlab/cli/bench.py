"""``normlab bench``: normlab's batch norm against torch eager, torch.compile and a copy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from normlab.cli import _output


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1e-2 else f"{seconds * 1e3:.1f}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _table(results: dict) -> Table:
    compiled = any("compile" in r["train"]["seconds"] for r in results["cases"])
    env = results["environment"]
    table = Table(
        title=f"BatchNorm + ReLU, float32, {env['threads']} threads, median of "
        f"{results['repeats']}: ms; ×torch = torch / normlab; copies = time / copy_",
        title_justify="left",
    )
    for col in ("case", "phase", "path"):
        table.add_column(col)
    for col in ("normlab", "torch", *(("compile",) if compiled else ()), "copy"):
        table.add_column(f"{col} ms", justify="right")
    table.add_column("×torch", justify="right")
    table.add_column("copies", justify="right")
    table.add_column("saved MB (act.-sized)", justify="right")
    for r in results["cases"]:
        shape = "×".join(map(str, r["shape"])) + (" CL" if r["channels_last"] else "")
        for phase in ("train", "eval"):
            p = r[phase]
            s = p["seconds"]
            ratio = p["torch_over_normlab"]
            colour = "green" if ratio >= 1.0 else "red"
            row = [
                f"{r['name']} {shape}" if phase == "train" else "",
                "fwd+bwd" if phase == "train" else "eval fwd",
                r["normlab_path"] if phase == "train" else r["normlab_eval_path"],
                _ms(s["normlab"]),
                _ms(s["torch"]),
                *((_ms(s["compile"]) if "compile" in s else "-",) if compiled else ()),
                _ms(s["copy"]),
                f"[{colour}]{ratio:.2f}[/]",
                f"{p['normlab_copies']:.2f}",
            ]
            if phase == "train":
                sv = r["saved"]
                row.append(
                    f"{_mb(sv['normlab']['bytes'])} ({sv['normlab']['activation_sized']}) vs "
                    f"{_mb(sv['torch']['bytes'])} ({sv['torch']['activation_sized']})"
                )
            else:
                row.append("")
            table.add_row(*row)
    return table


def bench(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory to write bench.json into (created if missing)."),
    ] = None,
    quick: bool = typer.Option(False, "--quick", help="Tiny shapes, few repeats (seconds)."),
    compile: bool = typer.Option(
        False, "--compile", help="Also time torch.compile (compiles for minutes on 2 cores)."
    ),
    paths: bool = typer.Option(
        False, "--paths", help="Also time normlab forced onto each path (kernels / torch ops)."
    ),
    repeats: int = typer.Option(
        0, "--repeats", help="Samples per contender (default 15, quick 3)."
    ),
    threads: int = typer.Option(0, "--threads", help="torch threads (default: torch's own)."),
    case: Annotated[
        list[str] | None,
        typer.Option("--case", help="Only this case (repeatable), e.g. --case resnet-stem."),
    ] = None,
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Time normlab's BatchNorm+ReLU against torch eager, torch.compile and a plain copy_.

    Interleaved medians, with the bytes each saves for backward and the kernels' JIT time.
    """
    import torch

    from normlab import bench as nb
    from normlab.report import write_json

    if repeats < 0 or threads < 0:
        raise typer.BadParameter("--repeats and --threads must be >= 0 (0: the default)")
    if threads:
        torch.set_num_threads(threads)
    if compile:
        # Inductor compiles in a pool of worker processes that outlive the compilation and
        # compete with the timed contenders on a small machine; compile in-process.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    cases = nb.QUICK_CASES if quick else nb.CASES
    if case:
        names = [c.name for c in cases]
        unknown = sorted(set(case) - set(names))
        if unknown:
            raise typer.BadParameter(f"unknown case {unknown}; choose from {names}")
        cases = tuple(c for c in cases if c.name in case)
    repeats = repeats or (3 if quick else 15)
    start = time.perf_counter()
    results: dict = {"environment": nb.environment(), "repeats": repeats, "quick": quick}
    results["jit"] = nb.jit_warmup(threaded=not quick)  # quick shapes run serially
    rows = []
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_output.err_console,
        transient=True,
        disable=json_out,
    ) as progress:
        task = progress.add_task("bench", total=len(cases) * 2 * repeats)
        for case in cases:
            progress.update(task, description=f"{case.name} {case.shape}")
            rows.append(
                nb.run_case(
                    case,
                    repeats=repeats,
                    compile=compile,
                    paths=paths,
                    sample_seconds=0.002 if quick else 0.02,
                    on_repeat=lambda: progress.advance(task),
                )
            )
    results["cases"] = rows
    results["seconds"] = time.perf_counter() - start
    if out is not None:
        write_json(Path(out) / "bench.json", results)
    if json_out:
        _output.emit_json(results)
        return
    c = _output.console
    jit = results["jit"]
    c.print(
        f"kernels' first call (JIT compile or cache load): {jit['seconds']:.1f} s "
        f"(cache hits {jit['cache_hits']}, misses {jit['cache_misses']})"
    )
    c.print(_table(results))
    if out is not None:
        c.print(f"wrote {Path(out) / 'bench.json'}")
    c.print(f"[dim]{results['seconds']:.0f} s[/]")
