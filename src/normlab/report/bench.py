"""``normlab bench --model`` results → a bar chart of step times (PNG beside the JSON)."""

from __future__ import annotations

import io
from pathlib import Path

from normlab.report.io import atomic_write_bytes

_PHASES = (("train", "train step (fwd + loss + bwd + SGD)"), ("eval", "eval forward"))
_COLOURS = {"torch": "#6e7781", "normlab": "#0969da", "normlab+fuse": "#1a7f37"}


def models_figure(results: dict):
    """One panel per phase; per run (model, memory format) a group of bars, one per
    variant: median milliseconds, min–max as the error bar, ×torch above each bar."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    runs = results["runs"]
    names = list(dict.fromkeys(n for r in runs for n in r["variants"]))
    fig = Figure(figsize=(max(6.0, 1.2 + 1.1 * len(runs) * len(names)), 7.0), layout="constrained")
    axes = fig.subplots(2, 1)
    width = 0.8 / len(names)
    for ax, (phase, title) in zip(axes, _PHASES):
        for j, name in enumerate(names):
            xs, ms, lo, hi, ratios = [], [], [], [], []
            for i, run in enumerate(runs):
                v = run["variants"].get(name)
                if v is None:
                    continue
                t = v[phase]
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ms.append(t["seconds"] * 1e3)
                lo.append((t["seconds"] - t["min"]) * 1e3)
                hi.append((t["max"] - t["seconds"]) * 1e3)
                ratios.append(t["torch_over"])
            base = name.removesuffix("+compile")
            bars = ax.bar(
                xs,
                ms,
                width,
                yerr=[lo, hi],
                capsize=3,
                label=name,
                color=_COLOURS.get(base, "#8250df"),
                hatch="//" if name.endswith("+compile") else None,
            )
            for bar, ratio in zip(bars, ratios):
                ax.annotate(
                    f"{ratio:.2f}×",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{r['model']}\n{r['memory_format']}" for r in runs])
        ax.set_ylabel("ms (median; bar: min–max)")
        ax.set_title(f"{title}; label: torch / variant")
        ax.grid(True, axis="y", alpha=0.3)
    env = results["environment"]
    run0 = runs[0]
    fig.suptitle(
        f"batch {run0['batch']}, {run0['size']}×{run0['size']}, {env['threads']} threads, "
        f"median of {results['repeats']}"
    )
    axes[0].legend(fontsize=8)
    return fig


def write_models_plot(path: str | Path, results: dict) -> Path:
    """Render :func:`models_figure` to a PNG at ``path`` (atomically, no metadata)."""
    buf = io.BytesIO()
    models_figure(results).savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())
