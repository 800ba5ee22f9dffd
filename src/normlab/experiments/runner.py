"""Run experiments by id and save their report: the logic behind ``normlab run``/``report``.

A run is: resolve ids (``all`` = every registered experiment, in docs/claims.md order) → run each
with its default or quick config, catching any exception as an ``inconclusive`` result with
the error, so one broken experiment never stops the others → a JSON payload (the contents
of ``results.json``) → ``report.html`` rendered from that payload alone. Both files are
written atomically and only after the whole run and the rendering succeeded, so a crash,
an interrupt or a rendering error never leaves a half-written or mismatched report behind.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from normlab.experiments import registry
from normlab.experiments.base import Progress, Result, load_schema

SCHEMA_ID = "normlab.results/1"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
DEFAULT_OUT = "normlab-run"


def resolve_ids(ids: Sequence[str]) -> list[str]:
    """Expand ``all`` and check every id; duplicates are dropped, order is kept."""
    if not ids:
        raise ValueError(
            "name at least one experiment, e.g. `normlab run worked-example`, or `normlab run "
            "all`; known: " + ", ".join(registry.all_ids())
        )
    known = registry.all_ids()
    out: list[str] = []
    for claim_id in ids:
        expanded = known if claim_id == "all" else [claim_id]
        for c in expanded:
            if c not in known:
                raise ValueError(f"unknown experiment {c!r}; known: {', '.join(known)}, or 'all'")
            if c not in out:
                out.append(c)
    return out


def _config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def run_one(
    claim_id: str, *, quick: bool = False, seed: int = 0, progress: Progress | None = None
) -> Result:
    """Run one experiment; any exception becomes an 'inconclusive' Result carrying it.

    ``seconds`` is the wall time of the whole call (config + run). KeyboardInterrupt and
    SystemExit are not caught.
    """
    exp = registry.get(claim_id)
    start = time.perf_counter()
    config = None
    try:
        config = exp.quick_config(seed) if quick else exp.default_config(seed)
        result = exp.run(config, progress)
        if not isinstance(result, Result):
            raise TypeError(
                f"{type(exp).__name__}.run returned {type(result).__name__}, not Result"
            )
        if result.id != claim_id:
            raise ValueError(f"{type(exp).__name__}.run returned a Result for {result.id!r}")
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        result = Result(
            id=claim_id,
            claim=getattr(exp, "claim", ""),
            verdict="inconclusive",
            rule="A verdict needs the experiment to run to completion.",
            measured="error: the experiment raised",
            reference=getattr(exp, "reference", ""),
            source=getattr(exp, "source", ""),
            seed_says=getattr(exp, "seed_says", ""),
            config=_config_dict(config),
            notes="The experiment raised an exception; nothing was measured. Rerun with "
            "NORMLAB_DEBUG=1 for the traceback.",
            error=f"{type(e).__name__}: {e}{where}",
        )
    result.seconds = time.perf_counter() - start
    return result


def build_payload(
    results: Sequence[Result],
    *,
    quick: bool,
    seed: int,
    total_seconds: float,
    threads: int | None = None,
) -> dict[str, Any]:
    """The contents of results.json: run metadata and every Result, as plain JSON values
    (round-tripped through ``json``, so rendering from it and from the file is identical)."""
    import torch

    from normlab import __version__
    from normlab.report.io import jsonable

    counts = {v: sum(r.verdict == v for r in results) for v in ("holds", "fails", "inconclusive")}
    payload = {
        "schema": SCHEMA_ID,
        "normlab_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "python_version": platform.python_version(),
        "threads": int(threads if threads is not None else torch.get_num_threads()),
        "quick": bool(quick),
        "seed": int(seed),
        "total_seconds": float(total_seconds),
        "summary": counts,
        "results": [r.to_dict() for r in results],
    }
    return json.loads(json.dumps(jsonable(payload)))


def run_experiments(
    ids: Sequence[str],
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = None,
    progress_for: Callable[[str], Progress | None] | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> dict[str, Any]:
    """Run the experiments ``ids`` (see :func:`resolve_ids`) and return the payload.

    ``threads``: torch's intra-op thread count during the run (restored afterwards); None
    leaves it as it is. The experiments use small tensors, for which one thread is fastest,
    and on a shared machine extra threads mostly wait for each other.
    ``progress_for(id)`` gives each experiment its progress callback; ``on_result(result)``
    is called as each one finishes.
    """
    import torch

    resolved = resolve_ids(ids)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    start = time.perf_counter()
    results = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for claim_id in resolved:
            progress = progress_for(claim_id) if progress_for is not None else None
            result = run_one(claim_id, quick=quick, seed=seed, progress=progress)
            results.append(result)
            if on_result is not None:
                on_result(result)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    return build_payload(
        results,
        quick=quick,
        seed=seed,
        total_seconds=time.perf_counter() - start,
        threads=used_threads,
    )


def schema() -> dict[str, Any]:
    """The JSON schema of results.json (shipped with the package)."""
    return load_schema("results.schema.json")


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """Read ``out_dir/results.json`` with a clear error when it is missing or not ours."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {RESULTS_FILE} in {str(out_dir)!r}; run `normlab run ... --out {out_dir}` first"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun `normlab run`") from e
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_ID:
        got = payload.get("schema") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} is not a normlab results file (schema {got!r}, expected {SCHEMA_ID!r})"
        )
    if not isinstance(payload.get("results"), list):
        raise ValueError(f"{path} has no 'results' list; rerun `normlab run`")
    return payload


def save_report(out_dir: str | Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    """Render report.html from ``payload`` and write it with results.json into ``out_dir``.

    The HTML is rendered before anything is written, and each file is replaced atomically,
    so a failure leaves the previous report as it was. Returns (results.json, report.html).
    """
    from normlab.report import atomic_write_text, write_json
    from normlab.report.claims import render_html

    html = render_html(payload)
    out = Path(out_dir)
    json_path = write_json(out / RESULTS_FILE, payload)
    html_path = atomic_write_text(out / REPORT_FILE, html)
    return json_path, html_path


def rerender(out_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """``normlab report DIR``: redraw report.html from results.json, running nothing."""
    from normlab.report import atomic_write_text
    from normlab.report.claims import render_html

    payload = load_results(out_dir)
    html = render_html(payload)
    return payload, atomic_write_text(Path(out_dir) / REPORT_FILE, html)
