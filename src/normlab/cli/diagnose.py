"""``normlab diagnose FILE``: gradient flow, saturation and dead units of your own model.

FILE is a Python file that defines::

    def model() -> torch.nn.Module: ...
    def batch():  # -> (inputs, target) or inputs
        ...
    def loss_fn(output, target): ...   # optional; default cross-entropy / MSE by target dtype
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from normlab.cli import _output

_EXAMPLE = (
    "For example:\n"
    "    import torch\n"
    "    def model():\n"
    "        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Sigmoid(),"
    " torch.nn.Linear(16, 3))\n"
    "    def batch():\n"
    "        return torch.randn(32, 8), torch.randint(0, 3, (32,))"
)


class DiagnoseFileError(ValueError):
    """The file given to ``normlab diagnose`` does not define what it must."""


def load_user_file(path: Path) -> tuple[Any, Any, Any]:
    """Import ``path`` as a module (from its path, not ``sys.path``) and return
    ``(model, batch, loss_fn)``: the results of its ``model()`` and ``batch()`` and its
    optional ``loss_fn``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DiagnoseFileError(
            f"{path}: no such file. Pass a Python file that defines model() and batch().\n"
            + _EXAMPLE
        )
    name = f"_normlab_diagnose_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DiagnoseFileError(f"{path}: cannot be imported as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise DiagnoseFileError(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(name, None)

    def call(fn_name: str, what: str):
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise DiagnoseFileError(
                f"{path} must define {fn_name}(), returning {what}; found "
                f"{'nothing' if fn is None else type(fn).__name__} by that name.\n" + _EXAMPLE
            )
        try:
            return fn()
        except Exception as e:
            raise DiagnoseFileError(f"{path}: {fn_name}() raised {type(e).__name__}: {e}") from e

    model = call("model", "a torch.nn.Module")
    if not isinstance(model, torch.nn.Module):
        raise DiagnoseFileError(
            f"{path}: model() must return a torch.nn.Module, got {type(model).__name__}"
        )
    batch = call("batch", "(inputs, target) or an inputs tensor")
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise DiagnoseFileError(
            f"{path}: loss_fn must be a function loss_fn(output, target) -> scalar tensor, got "
            f"{type(loss_fn).__name__}"
        )
    return model, batch, loss_fn


def _fmt(x: float | None, spec: str = ".2e") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


_STYLE = {
    "healthy": "green",
    "saturated": "yellow",
    "vanishing": "yellow",
    "dead": "red",
    "exploding": "red",
}


def diagnose(
    file: Annotated[
        Path,
        typer.Argument(help="A Python file defining model(), batch() and optionally loss_fn."),
    ],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the diagnosis as JSON instead of the table.")
    ] = False,
    eval_mode: Annotated[
        bool,
        typer.Option("--eval", help="Probe in eval mode (default: the mode model() returns)."),
    ] = False,
    saturation: Annotated[
        float,
        typer.Option(
            "--saturation", help="|z| bound of a saturated sigmoid input (tanh: half).", min=0.0
        ),
    ] = 5.0,
) -> None:
    """Probe one forward/backward pass of your model and say what to change.

    FILE defines model(), batch() returning (inputs, target) or inputs, and maybe loss_fn.

    Per layer: gradient norm, pre-activation range, saturated and dead fractions, a verdict.

    Your model's weights, running statistics and modes are left untouched.
    """
    from normlab.diagnostics import diagnose as run_diagnosis

    model, batch, loss_fn = load_user_file(file)
    result = run_diagnosis(
        model,
        batch,
        loss_fn,
        training=False if eval_mode else None,
        saturation_threshold=saturation,
    )
    if json_out:
        _output.emit_json({"file": str(file), **result.to_dict()})
        return
    flows = {r.name: r for r in result.flow.layers}
    pre = [flows[v.name].preact for v in result.layers]
    show_sat = any(p is not None and p.saturated_fraction is not None for p in pre)
    show_dead = any(p is not None and p.dead_fraction is not None for p in pre)
    table = Table(title=f"{file}: one batch", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("layer")
    table.add_column("‖∂L/∂W‖", justify="right")
    table.add_column("÷ output", justify="right")
    table.add_column("activation input", justify="right")
    if show_sat:
        table.add_column("saturated", justify="right")
    if show_dead:
        table.add_column("dead", justify="right")
    table.add_column("verdict")
    for v, p in zip(result.layers, pre):
        f = flows[v.name]
        row = [
            f"{v.name or '(model)'} {v.kind}",
            _fmt(f.weight_grad_norm, ".1e"),
            _fmt(v.relative_grad, ".0e"),
            "–" if p is None else f"{p.activation} [{p.min:.2g}, {p.max:.2g}]",
        ]
        if show_sat:
            sat = None if p is None else p.saturated_fraction
            row.append("–" if sat is None else f"{sat:.0%}")
        if show_dead:
            dead = None if p is None else p.dead_fraction
            row.append("–" if dead is None else f"{dead:.0%}")
        row.append(f"[{_STYLE[v.verdict]}]{v.verdict}[/]")
        table.add_row(*row)
    c = _output.console
    c.print(table)
    for v in result.layers:
        if v.reasons:
            c.print(f"  [bold]{v.name}[/] ({v.verdict}): " + "; ".join(v.reasons), highlight=False)
    verdict = "healthy" if result.healthy else "problems found"
    c.print(f"[bold {'green' if result.healthy else 'yellow'}]{verdict}[/]")
    for rec in result.recommendations:
        c.print(f"→ {rec}", highlight=False)
