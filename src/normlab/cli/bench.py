"""``normlab bench``: normlab's batch norm against torch eager, torch.compile and a copy;
with ``--model``, a whole model's training step (:mod:`normlab.bench.models`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from normlab.cli import _output


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1e-2 else f"{seconds * 1e3:.1f}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _run_cases(cases, repeats: int, json_out: bool, label, run, **options) -> list:
    """``run(case, repeats=repeats, on_repeat=…, **options)`` for each case, in order, under
    one progress bar of 2 · ``repeats`` steps a case (each case times torch and normlab
    ``repeats`` times, calling ``on_repeat`` after each); ``label(case)`` names the case."""
    results = []
    with _output.counted_progress("bench", len(cases) * 2 * repeats, quiet=json_out) as bar:
        describe, advance = bar
        for case in cases:
            describe(label(case))
            results.append(run(case, repeats=repeats, on_repeat=advance, **options))
    return results


def _table(results: dict) -> Table:
    compiled = any("compile" in r["train"]["seconds"] for r in results["cases"])
    env = results["environment"]
    table = Table(
        title=f"BatchNorm + ReLU, float32 unless named, {env['threads']} threads, median of "
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
        if r.get("dtype", "float32") != "float32":  # e.g. "bfloat16 (float32 params)"
            shape += f" {r['dtype']}"
            if r.get("param_dtype"):
                shape += f" ({r['param_dtype']} params)"
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


def _models_tables(results: dict) -> list[Table]:
    """One table per run (model, memory format), one row per variant."""
    env = results["environment"]
    tables = []
    for run in results["runs"]:
        table = Table(
            title=f"{run['model']}, batch {run['batch']}, {run['size']}×{run['size']}, "
            f"{run['memory_format']}, {env['threads']} threads, median of "
            f"{results['repeats']} steps ± spread (max − min) / median; ×torch = torch / variant "
            f"(CPU: process CPU time, train / eval)",
            title_justify="left",
        )
        table.add_column("variant")
        table.add_column("in-place")
        for col in ("train ms", "×torch", "eval ms", "×torch", "CPU ×torch", "saved MB (tensors)"):
            table.add_column(col, justify="right")
        table.add_column("peak RSS MB (+training)", justify="right")
        table.add_column("loss Δrel", justify="right")
        for name, v in run["variants"].items():
            cells = [name, "yes" if v["inplace"] else "no"]
            for phase in ("train", "eval"):
                t = v[phase]
                ratio = t["torch_over"]
                colour = "green" if ratio >= 1.0 else "red"
                cells += [f"{_ms(t['seconds'])} ±{t['spread']:.0%}", f"[{colour}]{ratio:.2f}[/]"]
            cpu = [v[phase]["cpu_torch_over"] for phase in ("train", "eval")]
            cells.append(" / ".join("-" if r is None else f"{r:.2f}" for r in cpu))
            saved, rss = v["saved"], v["rss"]
            cells.append(
                "-" if saved is None else f"{_mb(saved['activation_bytes'])} ({saved['tensors']})"
            )
            cells.append(
                "-" if rss is None else f"{_mb(rss['peak_bytes'])} (+{_mb(rss['training_bytes'])})"
            )
            ok = v["loss_rel_diff"] <= run["loss_check"]["rtol"]
            cells.append(f"[{'green' if ok else 'red'}]{v['loss_rel_diff']:.1e}[/]")
            table.add_row(*cells)
        tables.append(table)
    return tables


def _bench_models(
    names: list[str],
    *,
    formats: list[str],
    batch: int,
    size: int,
    classes: int,
    repeats: int,
    warmup: int,
    compile: bool,
    inplace: str,
    rss: bool,
    out: Path | None,
    json_out: bool,
) -> None:
    from normlab.bench import environment
    from normlab.bench import models as nm
    from normlab.report import write_json
    from normlab.report.bench import write_models_plot

    try:
        cases = [
            nm.ModelCase(name, batch=batch, size=size, classes=classes, memory_format=fmt)
            for name in names
            for fmt in formats
        ]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    start = time.perf_counter()
    results: dict = {
        "kind": "models",
        "environment": environment(),
        "repeats": repeats,
        "warmup": warmup,
        "compile": compile,
    }
    runs = _run_cases(
        cases,
        repeats,
        json_out,
        lambda case: f"{case.model} {case.memory_format}",
        nm.run_model,
        warmup=warmup,
        compile=compile,
        inplace=inplace,
        rss=rss,
    )
    results["runs"] = runs
    results["seconds"] = time.perf_counter() - start
    if out is not None:
        write_json(Path(out) / "models.json", results)
        write_models_plot(Path(out) / "models.png", results)
    failed = [r for r in runs if not r["loss_check"]["ok"]]
    if json_out:
        _output.emit_json(results)
    else:
        c = _output.console
        for table in _models_tables(results):
            c.print(table)
        for r in runs:
            for name, v in r["variants"].items():
                if v["inplace_note"]:
                    c.print(
                        f"[yellow]{r['model']} {name}: in-place ops off[/] ({v['inplace_note']})",
                        highlight=False,
                    )
        if out is not None:
            c.print(f"wrote {Path(out) / 'models.json'} and {Path(out) / 'models.png'}")
        c.print(f"[dim]{results['seconds']:.0f} s[/]")
    for r in failed:
        worst = r["loss_check"]["max_rel_diff"]
        errs = ", ".join(f"{n} {v['loss_rel_err_f64']:.1e}" for n, v in r["variants"].items())
        _output.error(
            f"{r['model']} {r['memory_format']}: first-step losses differ from torch's by "
            f"{worst:.1e} (relative; tolerance {r['loss_check']['rtol']:.0e}); against float64: "
            f"{errs}"
        )
    if failed:
        raise typer.Exit(1)


def bench(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory to write bench.json into (with --model: models.json and "
            "models.png); created if missing.",
        ),
    ] = None,
    quick: bool = typer.Option(False, "--quick", help="Tiny shapes, few repeats (seconds)."),
    compile: bool = typer.Option(
        False, "--compile", help="Also time torch.compile (compiles for minutes on 2 cores)."
    ),
    paths: bool = typer.Option(
        False, "--paths", help="Also time normlab forced onto each path (kernels / torch ops)."
    ),
    repeats: int = typer.Option(
        0, "--repeats", help="Samples per contender (default 15, quick 3; --model: 7, quick 2)."
    ),
    threads: int = typer.Option(
        0, "--threads", help="torch threads (default: torch's own; --model: 2)."
    ),
    case: Annotated[
        list[str] | None,
        typer.Option("--case", help="Only this case (repeatable), e.g. --case resnet-stem."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Benchmark a whole model's training step and eval forward instead of one "
            "layer (repeatable): resnet18, resnet50, mobilenet_v2, mobilenet_v3_small, "
            "regnet_small, resnet18_leaky.",
        ),
    ] = None,
    memory_format: Annotated[
        list[str] | None,
        typer.Option(
            "--memory-format",
            help="With --model: contiguous (default) or channels_last (repeatable).",
        ),
    ] = None,
    batch: int = typer.Option(0, "--batch", help="With --model: batch size (default 32)."),
    size: int = typer.Option(0, "--size", help="With --model: image side (default 112)."),
    classes: int = typer.Option(0, "--classes", help="With --model: classes (default 100)."),
    warmup: Annotated[
        int | None,
        typer.Option("--warmup", help="With --model: untimed steps per variant (default 2)."),
    ] = None,
    inplace: str = typer.Option(
        "auto",
        "--inplace",
        help="With --model: in-place ReLU / residual adds: auto (as torchvision; off for a "
        "variant that cannot take them), on, off.",
    ),
    rss: bool = typer.Option(
        True, "--rss/--no-rss", help="With --model: peak RSS per variant (a subprocess each)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Time normlab's BatchNorm+ReLU against torch eager, torch.compile and a plain copy_.

    Interleaved medians, with the bytes each saves for backward and the kernels' JIT time.

    With --model, a whole model's training step and eval forward, torch against normlab.
    """
    import torch

    if repeats < 0 or threads < 0 or batch < 0 or size < 0 or classes < 0:
        raise typer.BadParameter(
            "--repeats, --threads, --batch, --size and --classes must be >= 0 (0: the default)"
        )
    if warmup is not None and warmup < 0:
        raise typer.BadParameter("--warmup must be >= 0")
    if model:
        if case or paths:
            raise typer.BadParameter(
                "--case and --paths choose layer cases; drop them, or drop --model"
            )
        from normlab.bench import models as nm

        unknown = sorted(set(model) - set(nm.MODEL_NAMES))
        if unknown:
            raise typer.BadParameter(f"unknown model {unknown}; choose from {list(nm.MODEL_NAMES)}")
        bad = sorted(set(memory_format or ()) - set(nm.MEMORY_FORMATS))
        if bad:
            raise typer.BadParameter(
                f"unknown memory format {bad}; choose from {list(nm.MEMORY_FORMATS)}"
            )
        if inplace not in nm.INPLACE_MODES:
            raise typer.BadParameter(
                f"--inplace must be one of {list(nm.INPLACE_MODES)}, got {inplace!r}"
            )
    else:
        given = [
            flag
            for flag, value in (
                ("--memory-format", memory_format),
                ("--batch", batch),
                ("--size", size),
                ("--classes", classes),
                ("--warmup", warmup),
                ("--inplace", inplace != "auto"),
                ("--no-rss", not rss),
            )
            if value
        ]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} apply to --model; add --model NAME")
    threads_before = torch.get_num_threads()
    if threads or model:
        torch.set_num_threads(threads or 2)
    try:
        _bench(
            model,
            quick=quick,
            compile=compile,
            paths=paths,
            repeats=repeats,
            case=case,
            formats=memory_format or ["contiguous"],
            batch=batch,
            size=size,
            classes=classes,
            warmup=warmup,
            inplace=inplace,
            rss=rss,
            out=out,
            json_out=json_out,
        )
    finally:  # in-process callers (tests, notebooks) keep their thread count
        torch.set_num_threads(threads_before)


def _bench(
    model: list[str] | None,
    *,
    quick: bool,
    compile: bool,
    paths: bool,
    repeats: int,
    case: list[str] | None,
    formats: list[str],
    batch: int,
    size: int,
    classes: int,
    warmup: int | None,
    inplace: str,
    rss: bool,
    out: Path | None,
    json_out: bool,
) -> None:
    if compile:
        # Inductor compiles in a pool of worker processes that outlive the compilation and
        # compete with the timed contenders on a small machine; compile in-process.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    if model:
        _bench_models(
            model,
            formats=formats,
            batch=batch or (4 if quick else 32),
            size=size or (32 if quick else 112),
            classes=classes or (10 if quick else 100),
            repeats=repeats or (2 if quick else 7),
            warmup=(1 if quick else 2) if warmup is None else warmup,
            compile=compile,
            inplace=inplace,
            rss=rss,
            out=out,
            json_out=json_out,
        )
        return
    _bench_layers(
        out=out,
        quick=quick,
        compile=compile,
        paths=paths,
        repeats=repeats,
        case=case,
        json_out=json_out,
    )


def _bench_layers(
    *,
    out: Path | None,
    quick: bool,
    compile: bool,
    paths: bool,
    repeats: int,
    case: list[str] | None,
    json_out: bool,
) -> None:
    from normlab import bench as nb
    from normlab.report import write_json

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
    rows = _run_cases(
        cases,
        repeats,
        json_out,
        lambda case: f"{case.name} {case.shape}",
        nb.run_case,
        compile=compile,
        paths=paths,
        sample_seconds=0.002 if quick else 0.02,
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
