"""The claims report: results.json → report.html and the terminal claims table.

Everything is drawn from the JSON payload alone (see ``normlab.experiments.runner``), so
``normlab report DIR`` redraws exactly what ``normlab run`` wrote. Rendering is
deterministic: matplotlib runs with its default style plus fixed overrides (not the user's
matplotlibrc), on figures created without pyplot's global state, and PNGs carry no
metadata — the same payload gives the same bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any

from normlab.report.html import Page
from normlab.report.text import verdict_style

# Fixed rendering settings on top of matplotlib's defaults.
_RC = {
    "figure.figsize": (6.4, 3.6),
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "normlab",
    "path.simplify": False,
}


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _cell(value: Any) -> str:
    """A table cell: floats with 4 significant digits, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _draw(plot: dict[str, Any]):
    """A matplotlib Figure for one Plot (as a dict from results.json)."""
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    lines = plot.get("lines", [])
    if plot.get("kind", "line") == "bar":
        # Grouped bars: categories are the x values of the first line, one bar per line.
        cats = [str(x) for x in (lines[0]["x"] if lines else [])]
        width = 0.8 / max(len(lines), 1)
        for k, line in enumerate(lines):
            pos = [i + (k - (len(lines) - 1) / 2) * width for i in range(len(line["y"]))]
            ax.bar(pos, [_num(v) for v in line["y"]], width=width, label=line["label"])
        ax.set_xticks(range(len(cats)), cats)
        ax.grid(False, axis="x")
    else:
        for line in lines:
            ax.plot(
                [_num(v) for v in line["x"]],
                [_num(v) for v in line["y"]],
                line.get("style") or "-",
                label=line["label"],
            )
    for axis, log in ((ax.xaxis, plot.get("logx")), (ax.yaxis, plot.get("logy"))):
        if log:
            _log_axis(ax, axis)
    ax.set_title(plot.get("title", ""))
    ax.set_xlabel(plot.get("xlabel", ""))
    ax.set_ylabel(plot.get("ylabel", ""))
    if any(line.get("label") for line in lines):
        if plot.get("kind") == "bar" or len(lines) > 4:
            # crowded plots: the legend goes beside the axes, not over the data
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    return fig


def _log_axis(ax, axis) -> None:
    """Log scale with plain tick labels (5, 10, 20, 50; 1e-06 for wide ranges)."""
    from matplotlib import ticker

    (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
    lo, hi = ax.get_xlim() if axis is ax.xaxis else ax.get_ylim()
    if lo > 0 and hi / lo < 1e3:  # narrow range: label 1-2-5 steps
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())


def _add_plot(page: Page, plot: dict[str, Any]) -> None:
    import matplotlib.style

    with matplotlib.style.context(["default", _RC]):
        fig = _draw(plot)
        page.figure(fig, alt=plot.get("title", "plot"))


def _section(page: Page, r: dict[str, Any]) -> None:
    page.heading(f"{r['id']}: {r['claim']}", level=2, anchor=r["id"])
    page.verdict(r["verdict"], r["measured"])
    page.table(
        ["", "value"],
        [
            ["our figure", r["measured"]],
            ["reference figure", r["reference"]],
            ["source", r["source"]],
            ["verdict", r["verdict"]],
            ["run time", f"{float(r.get('seconds', 0.0)):.1f} s"],
        ],
        verdict_column=1,
    )
    if r.get("seed_says"):
        page.paragraph("What the seed says", css="muted")
        page.paragraph(r["seed_says"])
    if r.get("setup"):
        page.paragraph("Setup (and what was scaled down)", css="muted")
        page.paragraph(r["setup"])
    page.paragraph("Verdict rule", css="muted")
    page.preformatted(r["rule"])
    if r.get("error"):
        page.paragraph("Error", css="muted")
        page.preformatted(r["error"])
    for plot in r.get("plots", []):
        _add_plot(page, plot)
    for name, table in r.get("tables", {}).items():
        page.paragraph(name, css="muted")
        page.table(
            [str(h) for h in table.get("header", [])],
            [[_cell(v) for v in row] for row in table.get("rows", [])],
        )
    if r.get("notes"):
        page.paragraph("Notes", css="muted")
        page.paragraph(r["notes"])
    page.details("config", json.dumps(r.get("config", {}), indent=1, sort_keys=True))
    if r.get("metrics"):
        page.details("metrics", json.dumps(r["metrics"], indent=1, sort_keys=True))


def render_html(payload: dict[str, Any]) -> str:
    """report.html for a results.json payload: a summary table, then one section per claim
    (what the seed says, setup, plots, our number beside the reference, verdict and rule)."""
    results = payload["results"]
    page = Page("normlab run: the claims of the seeds, measured")
    s = payload.get("summary", {})
    page.paragraph(
        f"{len(results)} experiment(s), {'quick' if payload.get('quick') else 'default'} "
        f"configuration, seed {payload.get('seed')}, {float(payload.get('total_seconds', 0)):.1f} s "
        f"in total on {payload.get('threads')} thread(s). normlab {payload.get('normlab_version')}, "
        f"torch {payload.get('torch_version')}, Python {payload.get('python_version')}. "
        f"Verdicts: {s.get('holds', 0)} holds, {s.get('fails', 0)} fails, "
        f"{s.get('inconclusive', 0)} inconclusive.",
        css="muted",
    )
    page.paragraph(
        "Each claim comes from one of five source articles, the seeds (docs/sources.md), or the "
        "papers behind them (docs/claims.md). Where the paper ran on ImageNet or CIFAR, the "
        "experiment runs at small scale (digits, synthetic data) and compares the direction and "
        "rough size of the effect, not absolute accuracy; each section says what was scaled "
        "down."
    )
    page.table(
        ["claim", "our figure", "reference figure", "verdict", "time"],
        [
            [
                r["id"],
                r["measured"],
                r["reference"],
                r["verdict"],
                f"{float(r.get('seconds', 0.0)):.1f} s",
            ]
            for r in results
        ],
        verdict_column=3,
    )
    for r in results:
        _section(page, r)
    return page.render()


def claims_table(payload: dict[str, Any]):
    """The terminal claims table (rich): claim, our figure, reference figure, verdict, time."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="normlab run: claims", show_lines=True)
    table.add_column("claim", no_wrap=True)
    table.add_column("our figure")
    table.add_column("reference figure")
    table.add_column("verdict", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    for r in payload["results"]:
        style = verdict_style(r["verdict"], bold=True)
        # Text, not markup: measured figures contain brackets ("y = [...]").
        table.add_row(
            Text(r["id"]),
            Text(r["measured"]),
            Text(r["reference"]),
            Text(r["verdict"], style=style),
            Text(f"{float(r.get('seconds', 0.0)):.1f} s"),
        )
    return table


__all__ = ["claims_table", "render_html"]
