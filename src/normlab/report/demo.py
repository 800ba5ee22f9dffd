"""``normlab demo``'s report: results → report.html (plots embedded) and results.json.

Works from the results dict alone (``DemoResults.to_dict()`` of
:mod:`normlab.experiments.demo`, or a loaded results.json, whose JSON Schema is
``normlab/experiments/demo.schema.json``), so a report can be redrawn without re-running.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from normlab.report.html import Page
from normlab.report.io import atomic_write_text, jsonable, write_json
from normlab.report.text import describe_ratio


def _fmt(x: Any, spec: str = ".2e") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _range(low: Any, high: Any) -> str:
    return f"[{_fmt(low, '.3g')}, {_fmt(high, '.3g')}]"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{x:.1%}"


def headline_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measurement, plain, BN) rows shared by the terminal table and the HTML report."""
    h, cfg = results["headline"], results["config"]
    act = cfg["activation"]
    bound = h.get("saturation_bound")
    tl = results["trace_unit"]["layer"]
    rows = [
        (
            "first-layer gradient norm at init",
            _fmt(h["plain_first_grad"]),
            _fmt(h["bn_first_grad"]),
        ),
        (
            f"layer-{cfg['depth']} gradient norm at init",
            _fmt(h["plain_last_grad"]),
            _fmt(h["bn_last_grad"]),
        ),
        (
            f"first / layer-{cfg['depth']} gradient",
            _fmt(h["plain_first_over_last"], ".1e"),
            _fmt(h["bn_first_over_last"], ".2f"),
        ),
        (
            f"layer-{tl} {act} input range at init",
            _range(h["plain_trace_layer_min"], h["plain_trace_layer_max"]),
            _range(h["bn_trace_layer_min"], h["bn_trace_layer_max"]),
        ),
    ]
    if bound is not None:
        rows.append(
            (
                f"saturated |z| > {bound:g}, layers 2–{cfg['depth']}, at init",
                _pct(h["plain_saturated_fraction"]),
                _pct(h["bn_saturated_fraction"]),
            )
        )
    rows += [
        (
            f"test accuracy after {cfg['steps']} steps",
            _pct(h["plain_final_accuracy"]),
            _pct(h["bn_final_accuracy"]),
        ),
        (
            "training loss (last 20 steps)",
            _fmt(h["plain_final_loss"], ".3f"),
            _fmt(h["bn_final_loss"], ".3f"),
        ),
    ]
    return rows


# -- plots -------------------------------------------------------------------------------
_PLAIN, _BN = "#cf222e", "#0969da"


def _figure(ncols: int, width: float = 11.0, height: float = 3.6, **kw):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, **kw)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers and steps
    return fig, axes


def _gradient_plot(results):
    fig, axes = _figure(2, sharey=True)
    for ax, key, when in zip(
        axes, ("init_layers", "after_layers"), ("at initialisation", "after training")
    ):
        for run, color, label in ((results["plain"], _PLAIN, "plain"), (results["bn"], _BN, "BN")):
            rows = run[key]
            xs = [r["layer"] for r in rows if r.get("weight_grad_norm")]
            ys = [r["weight_grad_norm"] for r in rows if r.get("weight_grad_norm")]
            ax.semilogy(xs, ys, "o-", color=color, label=label, ms=3.5)
        ax.set_title(f"weight-gradient norm per layer, {when}")
        ax.set_xlabel(f"layer (1 = input side, {len(rows)} = output layer)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("‖∂L/∂W‖")
    axes[0].legend()
    return fig


def _band(ax, xs, rows, keys, color, alpha, label):
    """Shade between two fields of each row (``keys = (low, high)``) at ``xs``."""
    low, high = keys
    lows, highs = [r[low] for r in rows], [r[high] for r in rows]
    ax.fill_between(xs, lows, highs, color=color, alpha=alpha, lw=0, label=label)


def _preact_plot(results):
    cfg = results["config"]
    bound = results["headline"].get("saturation_bound")
    fig, axes = _figure(3, width=12.0)
    hidden = cfg["depth"]
    top = 0.0
    for ax, run, color, label in (
        (axes[0], results["plain"], _PLAIN, "plain"),
        (axes[1], results["bn"], _BN, "BN"),
    ):
        rows = [r for r in run["init_layers"][:hidden] if r.get("p50") is not None]
        xs = [r["layer"] for r in rows]
        _band(ax, xs, rows, ("preact_min", "preact_max"), color, 0.15, "min–max")
        _band(ax, xs, rows, ("p15", "p85"), color, 0.35, "15th–85th pct")
        ax.plot(xs, [r["p50"] for r in rows], color=color, lw=1.5, label="median")
        top = max(top, *(abs(r["preact_min"]) for r in rows), *(abs(r["preact_max"]) for r in rows))
        ax.set_title(f"{label}: {cfg['activation']} input per layer at init")
        ax.set_xlabel("layer")
    for ax in axes[:2]:
        if bound is not None:
            for s in (bound, -bound):
                ax.axhline(s, color="k", ls="--", lw=0.8)
        ax.set_ylim(-1.05 * top, 1.05 * top)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("pre-activation z")
    axes[0].legend(loc="lower left", fontsize=8)
    ax = axes[2]
    key = "saturated_fraction" if bound is not None else "active_fraction"
    for run, color, label in ((results["plain"], _PLAIN, "plain"), (results["bn"], _BN, "BN")):
        rows = [r for r in run["init_layers"][:hidden] if r.get(key) is not None]
        ax.plot(
            [r["layer"] for r in rows],
            [100 * r[key] for r in rows],
            "o-",
            color=color,
            ms=3.5,
            label=label,
        )
    ax.set_title(
        f"saturated share |z| > {bound:g} at init" if bound is not None else "active share z > 0"
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("% of inputs")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def _nums(values: list) -> list[float]:
    """JSON nulls (NaN or ±inf in the run: a diverged network) → NaN, which matplotlib skips."""
    return [math.nan if v is None else v for v in values]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _training_plot(results):
    fig, (ax_loss, ax_acc) = _figure(2)
    for run, color, label in ((results["plain"], _PLAIN, "plain"), (results["bn"], _BN, "BN")):
        loss = _nums(run["loss"])
        ax_loss.plot(run["loss_steps"], loss, color=color, alpha=0.2, lw=0.7)
        ax_loss.plot(run["loss_steps"], _moving_average(loss, 20), color=color, label=label)
        ax_acc.plot(
            run["eval_steps"],
            [100 * a for a in run["test_accuracy"]],
            "-",
            color=color,
            label=label,
        )
    ax_acc.axhline(
        100 * results["data"]["chance_accuracy"], color="k", ls=":", lw=1, label="chance"
    )
    ax_loss.set_title("training loss (light: per step, dark: 20-step mean)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_yscale("log")
    ax_acc.set_title("test accuracy (eval mode)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("%")
    ax_acc.set_ylim(0, 100)
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
    return fig


def _trace_plot(results):
    cfg = results["config"]
    unit = results["trace_unit"]
    fig, axes = _figure(2, sharey=True)
    for ax, run, color, label in (
        (axes[0], results["plain"], _PLAIN, "plain"),
        (axes[1], results["bn"], _BN, "with BN"),
    ):
        t = run["trace"]
        t = {k: _nums(v) for k, v in t.items()}
        ax.fill_between(t["steps"], t["p15"], t["p85"], color=color, alpha=0.2, lw=0)
        for key, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
            ax.plot(t["steps"], t[key], style, color=color, lw=1.3, label=f"{key[1:]}th pct")
        bound = results["headline"].get("saturation_bound")
        if bound is not None:
            for s in (bound, -bound):
                ax.axhline(s, color="k", ls=":", lw=0.8)
        ax.set_title(f"{label}: layer {unit['layer']}, unit {unit['unit']}")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{cfg['activation']} input z (test set)")
    axes[0].legend(fontsize=8)
    return fig


# the derivative at the saturation bound (sigmoid |z| = 5, tanh |z| = 2.5)
_FLAT = {"sigmoid": "σ'(z) < 0.007", "tanh": "tanh'(z) < 0.027"}
_SLOPE = {"sigmoid": "σ'(z) ≤ 1/4", "tanh": "tanh'(z) ≤ 1", "relu": "relu'(z) ∈ {0, 1}"}


def _trace_sentence(results: dict[str, Any]) -> str:
    """What the two traces show, from their last points (no claim the numbers don't make)."""
    bound = results["headline"].get("saturation_bound")
    flat = _FLAT.get(results["config"]["activation"])
    parts = []
    for key, label in (("plain", "Without BN"), ("bn", "With BN")):
        t = results[key]["trace"]
        p15, p50, p85 = t["p15"][-1], t["p50"][-1], t["p85"][-1]
        if None in (p15, p50, p85):
            parts.append(f"{label} the unit's input ends non-finite: the network diverged")
            continue
        if bound is None:
            where = "active on most images" if p50 > 0 else "inactive on most images"
        elif min(abs(p15), abs(p85)) > bound and p15 * p85 > 0:
            where = f"in the flat tail, where {flat}"
        elif max(abs(p15), abs(p85)) < bound:
            where = "in the responsive region"
        else:
            where = "partly in the tails"
        parts.append(
            f"{label} the unit's input ends at a median of {p50:.2f}, with 70 % of the test "
            f"images within [{p15:.2f}, {p85:.2f}] — {where}"
        )
    same = results["plain"]["trace"]
    if None in (same["p15"][-1], same["p50"][-1], same["p85"][-1]):
        pass
    elif same["p85"][-1] - same["p15"][-1] < 0.05 * max(abs(same["p50"][-1]), 1.0):
        parts.append(
            "Without BN the spread is so small that the unit computes nearly the same value for "
            "every image: it carries almost nothing about the input forward, and passes almost "
            "no gradient back"
        )
    return ". ".join(parts) + "."


def _why_imbalance(results: dict[str, Any]) -> str:
    act = results["config"]["activation"]
    slope = _SLOPE.get(act, "its derivative")
    if results["headline"]["plain_first_over_last"] < 1:
        return (
            f"at every layer the backward signal is multiplied by the {act}'s slope "
            f"({slope}) and the weights, and by ≈ 0 where z is saturated."
        )
    return (
        f"at every layer the weights amplify the backward signal more than the {act}'s slope "
        f"({slope}) damps it."
    )


# -- page --------------------------------------------------------------------------------
def render_html(results: dict[str, Any]) -> str:
    """The self-contained report page (PNG plots as data URIs, no scripts)."""
    results = jsonable(results)
    cfg, h = results["config"], results["headline"]
    act = cfg["activation"]
    page = Page(f"normlab demo: a {cfg['depth']}-layer {act} network with and without BatchNorm")
    page.paragraph(
        "The story of the first source article (docs/sources.md#seed-000), measured: in a deep "
        "sigmoid network the inputs of the deep activations spread into the flat tails "
        "(|z| > 5), the gradient vanishes on its way back and learning stalls; a BatchNorm "
        "layer before every sigmoid pulls each mini-batch back to mean 0 and variance 1, and "
        "the same network trains."
    )
    page.verdict(results["verdict"], results["summary"])
    page.paragraph(f"Verdict rule: {results['rule']}.", css="muted")

    page.heading("Headline numbers")
    page.table(["measurement", "plain", "BN"], [list(r) for r in headline_rows(results)])

    page.heading("Setup")
    init = results["init"]
    data = results["data"]
    page.definitions(
        [
            ("data", f"{data['name']}: {data['n_train']} training / {data['n_test']} test images"),
            (
                "networks",
                f"[Linear({cfg['width']}) → {act}] × {cfg['depth']} → Linear(10); the BN net has "
                f"normlab.nn.BatchNorm1d between each Linear and its {act}",
            ),
            ("initialisation", f"{init['name']}, the same weights in both nets"),
            ("why this initialisation", init["why"]),
            (
                "training",
                f"{init['optimizer']}, batch {cfg['batch_size']}, {cfg['steps']} steps, the same "
                f"batch order for both nets, seed {cfg['seed']}",
            ),
            (
                "probes",
                "normlab.diagnostics.gradient_flow on the whole training set as one batch "
                "(training mode; the running statistics are left untouched)",
            ),
            (
                "compute",
                f"CPU, torch {results.get('versions', {}).get('torch', '?')}, "
                f"{results.get('versions', {}).get('intra_op_threads', '?')} intra-op thread(s): "
                "the matrices are tiny, and extra threads only contend on a shared machine",
            ),
            (
                "wall time",
                f"{results['seconds']:.1f} s (training: plain {results['plain']['seconds']:.1f} s, "
                f"BN {results['bn']['seconds']:.1f} s)",
            ),
        ]
    )

    page.heading("1. Gradients at initialisation and after training")
    page.paragraph(
        f"The weight-gradient norm of each layer, from the output back to the input. Without "
        f"BN the first layer's is {describe_ratio(h['plain_first_over_last'])} than layer "
        f"{cfg['depth']}'s: {_why_imbalance(results)} With BN the first layer's is "
        f"{describe_ratio(h['bn_first_over_last'])} layer {cfg['depth']}'s."
    )
    page.figure(_gradient_plot(results), "per-layer gradient norms, plain vs BN")

    page.heading(f"2. What the {act}s see at initialisation")
    page.paragraph(
        "Per layer: the range (light), the 15th–85th percentiles (dark) and the median of the "
        f"{act} inputs over the training set"
        + (
            f"; dashed lines at ±{h['saturation_bound']:g}, the saturation bound of "
            "docs/sources.md#seed-000"
            + (
                " (for tanh, half the sigmoid's 5: the same relative slope)"
                if act == "tanh"
                else ""
            )
            if h.get("saturation_bound") is not None
            else ""
        )
        + ". BN keeps every layer's inputs centred with unit variance per batch."
    )
    page.figure(_preact_plot(results), "pre-activation ranges and saturated share per layer")
    rows = []
    for p, b in zip(results["plain"]["init_layers"], results["bn"]["init_layers"]):
        if p.get("p50") is None:
            continue
        rows.append(
            [
                p["layer"],
                _fmt(p["weight_grad_norm"]),
                _fmt(b["weight_grad_norm"]),
                _range(p["preact_min"], p["preact_max"]),
                _pct(p.get("saturated_fraction")),
                _range(b["preact_min"], b["preact_max"]),
                _pct(b.get("saturated_fraction")),
            ]
        )
    page.table(
        [
            "layer",
            "plain ‖∂L/∂W‖",
            "BN ‖∂L/∂W‖",
            "plain z range",
            "plain saturated",
            "BN z range",
            "BN saturated",
        ],
        rows,
    )

    page.heading("3. Training")
    page.paragraph(
        f"The same optimizer, steps and batches. Without BN the loss stays near ln 10 ≈ 2.30 "
        f"and the test accuracy near chance; with BN the network learns "
        f"({h['bn_final_accuracy']:.1%} after {cfg['steps']} steps, plain "
        f"{h['plain_final_accuracy']:.1%})."
    )
    page.figure(_training_plot(results), "training loss and test accuracy")

    page.heading("4. One deep unit over training (Ioffe & Szegedy 2015, Fig. 1)")
    unit = results["trace_unit"]
    page.paragraph(
        f"The 15th, 50th and 85th percentiles of one {act} input over the test set as training "
        f"proceeds: {unit['selection']}. {_trace_sentence(results)}"
    )
    page.figure(_trace_plot(results), "percentile traces of one deep unit")

    page.heading("5. The initial weight scale decides the failure")
    page.paragraph(
        "The plain network at initialisation for other gains g in N(0, (g/√fan_in)²): "
        f"small weights keep the inputs near 0 but the gradient shrinks at every layer "
        f"({_SLOPE.get(act, 'the derivative')} times small weights); large weights saturate "
        "more units but also amplify the backward signal. The demo uses "
        f"g = {init['gain']:g}, where both symptoms of docs/sources.md#seed-000 show for the "
        "sigmoid."
    )
    page.table(
        [
            "gain g",
            f"saturated |z| > {h['saturation_bound']:g} (layers 2–{cfg['depth']})"
            if h.get("saturation_bound") is not None
            else "saturated (not a saturating activation)",
            f"max |z| at layer {unit['layer']}",
            f"first / layer-{cfg['depth']} gradient",
        ],
        [
            [
                f"{r['gain']:g}",
                _pct(r["saturated_fraction"]),
                _fmt(r["trace_layer_max_abs"], ".1f"),
                _fmt(r["first_over_last_hidden_grad"], ".1e"),
            ]
            for r in results["init_sweep"]
        ],
    )
    page.paragraph(
        "Caveats: one seed and one small data set; an adaptive optimizer (Adam) partly "
        "compensates vanishing gradients and narrows the gap, which is why the comparison "
        "uses SGD with momentum, as Ioffe & Szegedy did.",
        css="muted",
    )
    page.paragraph(
        f"normlab demo --depth {cfg['depth']} --width {cfg['width']} --steps {cfg['steps']} "
        f"--activation {act} --seed {cfg['seed']} reproduces these numbers.",
        css="muted",
    )
    return page.render()


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json and report.html into ``out_dir`` (atomically, each file)."""
    out = Path(out_dir)
    payload = jsonable(results)
    html = render_html(payload)  # render first: a plotting error leaves no partial report
    json_path = write_json(out / "results.json", payload)
    html_path = atomic_write_text(out / "report.html", html)
    return {"results": json_path, "report": html_path}
