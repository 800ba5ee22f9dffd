"""The model benchmark of ``normlab bench --model``: a whole training step, not one layer.

For a :mod:`normlab.bench.zoo` model at a batch, image size, class count and memory
format, the contenders ("variants") are

* ``torch``: the model as built, torch's BatchNorm2d, eager;
* ``normlab``: ``normlab.convert(model, to="normlab")``;
* ``normlab+fuse``: ``normlab.fuse(model)``, when normlab has ``fuse``;
* ``normlab+fuse(save=output)``: ``normlab.fuse(model, save="output")`` (In-Place ABN:
  each fused layer keeps only its output), for models whose activations after BN are all
  invertible (:data:`SAVE_OUTPUT_MODELS`: the LeakyReLU ResNet-18);
* with ``compile``, each of those under ``torch.compile`` (``torch+compile``, ...).

Every variant is a deep copy of one model, so all start from the same weights and
running statistics, and gets its own ``SGD(lr=0.01, momentum=0.9)``. Timed:

* ``train``: ``cross_entropy(model(x), y).backward()``, ``optimizer.step()``,
  ``optimizer.zero_grad()`` — what a user's loop pays per step;
* ``eval``: ``model.eval()`` forward under ``torch.no_grad()``.

Each variant first takes one training step from the shared initial state, with the same
random state (dropout): its loss must equal torch's within ``LOSS_RTOL`` (relative); the
same loss in float64 is recorded beside it, to tell which side is off when they differ
(a batch norm that sees two values per channel — batch 2 at a 1x1 feature map — has a
variance below ``eps`` and amplifies float32 rounding far beyond 1e-4 on either side).
Then ``warmup`` untimed steps each, then ``repeats`` rounds in which every variant takes
one timed step in turn (**interleaved in one process**, so a shared machine's drift hits
all alike; each round starts one variant later, so none always follows the same
neighbour); the median is reported, with the spread (max − min) / median, and ``×torch``
= torch's median / the variant's. The process's CPU time per step
(``time.process_time``, all threads) is reported beside the wall time: on a shared machine
the wall time includes time the process sat descheduled, the CPU time does not (it does
count OpenMP threads spinning while they wait, so it is the cleaner yardstick on one
thread).

Memory, for the eager variants: the bytes autograd saves for backward in one training
forward (distinct storages, parameters reported apart;
:func:`normlab.bench.memory.saved_for_backward`) and the peak resident set size of
training, measured in a **fresh subprocess per variant** (interleaved variants share one
heap and one allocator, so an in-process peak would be the largest variant's, and freed
memory is not returned to the OS in a way that makes RSS deltas attributable). The child
builds the same model and data (setup RSS), loads normlab's kernels first for normlab
variants (``kernel_load_bytes``, reported apart), runs ``warmup`` steps, resets the peak
with ``/proc/self/clear_refs`` and takes the peak (``VmHWM``) over further steps:
``peak_bytes`` is what the process needed, ``peak_bytes − setup_bytes`` what training
added (activations, gradients, momentum, allocator caches).

In-place ops: torchvision's models apply ReLU in place and add residuals in place. A
norm layer whose output autograd may not modify in place makes such a model fail; with
``inplace="auto"`` (default) a variant that fails so on its first step is rebuilt with
every in-place op out-of-place (:func:`normlab.bench.zoo.set_inplace`) and the JSON says
so (``inplace: false`` and the error); ``"on"``/``"off"`` force one setting on all.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normlab.bench import memory, zoo

MODEL_NAMES = tuple(zoo.MODELS)
MEMORY_FORMATS = ("contiguous", "channels_last")
INPLACE_MODES = ("auto", "on", "off")
LOSS_RTOL = 1e-4
LR, MOMENTUM = 0.01, 0.9
RECOMPILE_LIMIT = 64
_INPLACE_ERROR = "modified inplace"  # autograd's message for a forbidden in-place write


@dataclass(frozen=True)
class ModelCase:
    """One model benchmark: a zoo model on a random (batch, 3, size, size) float32 batch
    of ``classes`` labels, in ``memory_format``."""

    model: str
    batch: int = 32
    size: int = 112
    classes: int = 100
    memory_format: str = "contiguous"

    def __post_init__(self) -> None:
        if self.model not in zoo.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {list(MODEL_NAMES)}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(
                f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}"
            )
        if self.batch < 2:
            raise ValueError(
                f"batch must be >= 2, got {self.batch}: training-mode batch norm needs more "
                f"than one value per channel where the network ends at 1x1"
            )
        if self.size < 1 or self.classes < 1:
            raise ValueError(
                f"size and classes must be positive, got size={self.size}, classes={self.classes}"
            )

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"


def base_model(case: ModelCase, seed: int = 0) -> nn.Module:
    """The shared starting point: the zoo model, torch BN, in-place ops as torchvision,
    weights drawn from ``seed`` (the same in every process)."""
    torch.manual_seed(seed)
    model = zoo.build(case.model, num_classes=case.classes, inplace=True)
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def batch(case: ModelCase, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): x (batch, 3, size, size) standard normal, y uniform labels."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=g)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randint(case.classes, (case.batch,), generator=g)


SAVE_OUTPUT = "normlab+fuse(save=output)"
# Zoo models whose every activation after a BN is invertible (save="output" applies).
SAVE_OUTPUT_MODELS = frozenset({"resnet18_leaky"})


def eager_variants(model: str | None = None) -> tuple[str, ...]:
    """The eager variants timed for zoo ``model`` (the save-output one only where it
    applies)."""
    import normlab

    names = ("torch", "normlab", *(("normlab+fuse",) if hasattr(normlab, "fuse") else ()))
    if model in SAVE_OUTPUT_MODELS and hasattr(normlab, "fuse"):
        names += (SAVE_OUTPUT,)
    return names


def build_variant(name: str, base: nn.Module, inplace: bool) -> nn.Module:
    """A fresh copy of ``base`` turned into eager variant ``name`` (``+compile`` is not
    part of it), with in-place ops on or off."""
    import normlab

    model = zoo.set_inplace(copy.deepcopy(base), inplace)
    if name == "torch":
        return model
    if name == "normlab":
        return normlab.convert(model, to="normlab")
    if name in ("normlab+fuse", SAVE_OUTPUT):
        fused = normlab.fuse(model, **({"save": "output"} if name == SAVE_OUTPUT else {}))
        return model if fused is None else fused
    raise ValueError(f"unknown variant {name!r}; choose from {(*eager_variants(), SAVE_OUTPUT)}")


@dataclass
class _Variant:
    name: str
    eager: str  # the eager variant it is built from
    compiled: bool
    inplace: bool
    model: nn.Module | None = field(default=None, repr=False)
    inplace_note: str | None = None
    train_call: Callable = field(default=None, repr=False)
    eval_call: Callable = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer = field(default=None, repr=False)
    first_loss: float = float("nan")
    graph_breaks: int | None = None
    samples: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "eval": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "eval": []})


def _prepare(v: _Variant, base: nn.Module, compile_backend: str | None) -> None:
    v.model = build_variant(v.eager, base, v.inplace)
    v.optimizer = torch.optim.SGD(v.model.parameters(), lr=LR, momentum=MOMENTUM)
    if v.compiled:
        # One compiled wrapper per phase: grad mode and train/eval are guards.
        v.train_call = torch.compile(v.model, backend=compile_backend or "inductor")
        v.eval_call = torch.compile(v.model, backend=compile_backend or "inductor")
    else:
        v.train_call = v.eval_call = v.model


def _train_step(v: _Variant, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(v.train_call(x), y)
    loss.backward()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _eval_step(v: _Variant, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return v.eval_call(x)


def _first_step(
    v: _Variant, base: nn.Module, x, y, seed: int, inplace_mode: str, backend: str | None
) -> None:
    """The variant's first training step from the shared state; under ``auto``, a
    forbidden in-place write rebuilds it with in-place ops off and steps again."""
    torch.manual_seed(seed + 2)  # the same dropout masks for every variant
    try:
        v.first_loss = _train_step(v, x, y).item()
    except RuntimeError as e:
        if inplace_mode != "auto" or not v.inplace or _INPLACE_ERROR not in str(e):
            raise
        v.inplace = False
        v.inplace_note = str(e).split(". ")[0]
        _prepare(v, base, backend)  # the failed forward updated some running statistics
        torch.manual_seed(seed + 2)
        v.first_loss = _train_step(v, x, y).item()


def _time_phases(
    variants: list[_Variant],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    repeats: int,
    warmup: int,
    on_repeat: Callable[[], None] | None,
) -> None:
    """Train phase, then eval (the modules' mode is part of the state): ``warmup`` untimed
    rounds (at least one for eval), then ``repeats`` timed rounds of one step per variant, each round starting one
    variant later. Appends to each variant's ``samples``."""
    fns = {
        "train": [(v, lambda v=v: _train_step(v, x, y)) for v in variants],
        "eval": [(v, lambda v=v: _eval_step(v, x)) for v in variants],
    }
    for phase, order in fns.items():
        for v in variants:
            v.model.train(phase == "train")
        # Eval gets at least one untimed round: its first call may compile (train's first
        # step was taken, untimed, before).
        for _ in range(max(warmup, 1 if phase == "eval" else 0)):
            for _v, fn in order:
                fn()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside one variant's sample would be charged to it
        try:
            for r in range(repeats):
                k = r % len(order)
                for v, fn in order[k:] + order[:k]:
                    start, cpu = time.perf_counter(), time.process_time()
                    fn()
                    v.samples[phase].append(time.perf_counter() - start)
                    v.cpu[phase].append(time.process_time() - cpu)
                if on_repeat is not None:
                    on_repeat()
        finally:
            if gc_was_enabled:
                gc.enable()
    for v in variants:
        v.model.train()


@contextlib.contextmanager
def _recompile_limit(limit: int) -> Iterator[None]:
    """Raise dynamo's per-code-object recompile limit for the run: normlab's layers break
    the graph, so each layer's forward is a frame of its own, recompiled per input shape;
    past the default limit (8) dynamo silently runs the rest eagerly."""
    import torch._dynamo.config as dynamo_config

    old = dynamo_config.recompile_limit
    dynamo_config.recompile_limit = max(old, limit)
    try:
        yield
    finally:
        dynamo_config.recompile_limit = old


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _timing(v: _Variant, torch_v: _Variant, phase: str) -> dict:
    samples, cpu = v.samples[phase], v.cpu[phase]
    med, cpu_med = statistics.median(samples), statistics.median(cpu)
    return {
        "seconds": med,
        "min": min(samples),
        "max": max(samples),
        "spread": (max(samples) - min(samples)) / med,
        "samples": samples,
        "torch_over": statistics.median(torch_v.samples[phase]) / med,
        "cpu_seconds": cpu_med,
        "cpu_samples": cpu,
        "cpu_torch_over": statistics.median(torch_v.cpu[phase]) / cpu_med if cpu_med > 0 else None,
    }


def run_model(
    case: ModelCase,
    *,
    repeats: int = 7,
    warmup: int = 2,
    compile: bool = False,
    compile_backend: str | None = None,
    inplace: str = "auto",
    rss: bool = True,
    rss_steps: int = 3,
    seed: int = 0,
    on_repeat: Callable[[], None] | None = None,
) -> dict:
    """Benchmark ``case``; see the module docstring. Returns a plain dict (seconds, ratios,
    bytes) ready for :func:`normlab.report.write_json`. ``compile_backend`` (default
    inductor) exists so that tests can exercise the compiled path with ``"eager"``."""
    if repeats < 1 or warmup < 0 or rss_steps < 1:
        raise ValueError(
            f"repeats and rss_steps must be >= 1 and warmup >= 0, got repeats={repeats}, "
            f"warmup={warmup}, rss_steps={rss_steps}"
        )
    if inplace not in INPLACE_MODES:
        raise ValueError(f"inplace must be one of {INPLACE_MODES}, got {inplace!r}")
    base = base_model(case, seed)
    x, y = batch(case, seed)
    names = eager_variants(case.model)
    variants = [_Variant(name, name, False, inplace != "off") for name in names]
    for v in variants:
        _prepare(v, base, compile_backend)
        _first_step(v, base, x, y, seed, inplace, compile_backend)
    if compile:
        with _recompile_limit(RECOMPILE_LIMIT):
            for eager in list(variants):
                # Compiled from the eager variant's settled in-place setting: a failure
                # inside a compiled graph is no place to retry.
                v = _Variant(f"{eager.name}+compile", eager.name, True, eager.inplace)
                _prepare(v, base, compile_backend)
                before = _graph_breaks()
                _first_step(v, base, x, y, seed, "on", compile_backend)
                v.graph_breaks = _graph_breaks() - before
                variants.append(v)

    limit = _recompile_limit(RECOMPILE_LIMIT) if compile else contextlib.nullcontext()
    if compile:
        # normlab's layers break dynamo's graph, and their frames recompile on the second
        # call (measured: a 2 s eval sample after one warm-up round); two rounds settle them.
        warmup = max(warmup, 2)
    with limit:
        _time_phases(variants, x, y, repeats=repeats, warmup=warmup, on_repeat=on_repeat)

    torch_v = variants[0]
    reference = _reference_loss(base, x, y, seed)
    result: dict = {
        **asdict(case),
        "dtype": "float32",
        "params": sum(p.numel() for p in base.parameters()),
        "repeats": repeats,
        "warmup": warmup,
        "inplace_mode": inplace,
        "variants": {},
        "skipped": {} if "normlab+fuse" in names else {"normlab+fuse": "normlab has no fuse() yet"},
    }
    worst = 0.0
    for v in variants:
        rel = abs(v.first_loss - torch_v.first_loss) / abs(torch_v.first_loss)
        worst = max(worst, rel)
        row: dict = {
            "compiled": v.compiled,
            "inplace": v.inplace,
            "inplace_note": v.inplace_note,
            "first_loss": v.first_loss,
            "loss_rel_diff": rel,
            "loss_rel_err_f64": abs(v.first_loss - reference) / abs(reference),
            "graph_breaks": v.graph_breaks,
        }
        for phase in ("train", "eval"):
            row[phase] = _timing(v, torch_v, phase)
        row["saved"] = None if v.compiled else _saved(v, x, y)
        row["rss"] = None
        result["variants"][v.name] = row
    result["loss_check"] = {
        "rtol": LOSS_RTOL,
        "max_rel_diff": worst,
        "ok": worst <= LOSS_RTOL,
        "reference_loss": reference,
    }
    if rss and memory.rss_bytes() is None:
        result["skipped"]["rss"] = "peak RSS needs Linux's /proc/self/status"
    elif rss:
        # After the timing, one variant at a time: the children would compete with it.
        for v in variants:
            if not v.compiled:
                result["variants"][v.name]["rss"] = measure_rss(
                    case,
                    v.name,
                    inplace=v.inplace,
                    warmup=max(1, warmup),
                    steps=rss_steps,
                    seed=seed,
                )
    return result


def _reference_loss(base: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """The first step's loss in float64 (torch's layers, same dropout masks): the yardstick
    when torch and normlab disagree, e.g. where a batch norm sees two values per channel
    and float32 rounding is amplified."""
    model = copy.deepcopy(base).double()
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        return F.cross_entropy(model(x.double()), y).item()


def _saved(v: _Variant, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Saved-for-backward of one training forward + loss (no backward: the graph is
    dropped). The variant's running statistics take one more update, which is harmless
    after the timing."""
    state = [*v.model.parameters(), *v.model.buffers()]
    saved = memory.saved_for_backward(lambda: F.cross_entropy(v.model(x), y), exclude=state)
    saved["param_bytes"] = saved.pop("excluded_bytes")
    saved["activation_bytes"] = saved["bytes"] - saved["param_bytes"]
    return saved


# --- peak RSS, one subprocess per variant -----------------------------------------------


def measure_rss(
    case: ModelCase,
    variant: str,
    *,
    inplace: bool,
    warmup: int = 1,
    steps: int = 3,
    seed: int = 0,
    threads: int | None = None,
    timeout: float = 900.0,
) -> dict:
    """Peak RSS of training eager ``variant`` on ``case``, in a fresh Python process (see
    the module docstring). Returns bytes: ``setup_bytes``, ``kernel_load_bytes``,
    ``retained_bytes`` (after the warm-up steps), ``peak_bytes``, ``training_bytes``
    (peak − setup − kernel load) and ``method``."""
    spec = {
        "case": asdict(case),
        "variant": variant,
        "inplace": inplace,
        "warmup": warmup,
        "steps": steps,
        "seed": seed,
        "threads": threads or torch.get_num_threads(),
    }
    code = "import sys; from normlab.bench.models import _rss_child; _rss_child(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(
            f"peak-RSS subprocess for {variant!r} failed (exit {proc.returncode}): {tail[0]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    case = ModelCase(**spec["case"])
    base = base_model(case, spec["seed"])
    x, y = batch(case, spec["seed"])
    v = _Variant(spec["variant"], spec["variant"], False, spec["inplace"])
    _prepare(v, base, None)
    del base
    gc.collect()
    setup = memory.rss_bytes()
    kernel_load = 0
    if v.name.startswith("normlab"):
        # The kernels' code (a Numba cache load) is a one-off cost of the library, not of
        # a training step: loaded first and reported apart.
        from normlab.bench.layers import jit_warmup

        jit_warmup(threaded=torch.get_num_threads() > 1)
        gc.collect()
        kernel_load = memory.rss_bytes() - setup
    for _ in range(spec["warmup"]):
        _train_step(v, x, y)
    gc.collect()
    retained = memory.rss_bytes()
    exact = memory.reset_peak_rss()
    for _ in range(spec["steps"]):
        _train_step(v, x, y)
    peak = memory.peak_rss_bytes()
    out = {
        "method": "VmHWM over the timed steps (reset via /proc/self/clear_refs)"
        if exact
        else "ru_maxrss over the whole process (peak could not be reset)",
        "setup_bytes": setup,
        "kernel_load_bytes": kernel_load,
        "retained_bytes": retained,
        "peak_bytes": peak,
        "training_bytes": peak - setup - kernel_load,
    }
    sys.stdout.write(json.dumps(out) + "\n")
