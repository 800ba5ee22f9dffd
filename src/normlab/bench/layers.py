"""The layer benchmark of ``normlab bench``: normlab's batch norm against torch and a plain copy.

For each case (a shape, a layout, BN + ReLU by default), in one process and interleaved
(every repeat times every contender once, in turn, so drifts of a shared machine hit them
alike), the median over repeats of:

* ``train``: forward + backward, ``torch.autograd.grad(out, (x, weight, bias), dy)``
  with a fixed ``dy`` (so no ``.grad`` accumulation is timed);
* ``eval``: inference forward under ``torch.no_grad()`` with running statistics;
* ``copy``: ``out.copy_(x)`` into a preallocated tensor, the memory-bandwidth yardstick
  (a fused forward reads x twice and writes y once; a fused backward reads x and dy
  twice and writes dx once: 4 copies' worth of traffic, of which 2.5 are compulsory).

Contenders: ``normlab`` (``normlab.nn.BatchNorm*d(C, activation='relu')``, the path
:mod:`normlab.kernels` picks), ``torch`` (``torch.nn.BatchNorm*d`` then
``torch.nn.functional.relu(inplace=True)``, the fastest eager spelling), optionally
``compile`` (``torch.compile`` of the torch pair) and, with ``paths``, normlab forced onto
each of its two paths (``NORMLAB_KERNELS=numba`` / ``torch``).

Also recorded: the bytes autograd saves for backward (``saved_tensors_hooks``), how many
of those tensors are activation-sized, and the one-off cost of the kernels' first call
(Numba compilation, or loading its on-disk cache). Results are plain dicts ready for
:func:`normlab.report.write_json`; printing is the CLI's job.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from normlab import kernels
from normlab.bench.memory import saved_for_backward

TimedFn = Callable[[], object]


@dataclass(frozen=True)
class Case:
    """One benchmark case: BN + activation over an input of ``shape`` (N, C, *) of
    ``dtype``, the layers' parameters and buffers of ``param_dtype`` (None: ``dtype``;
    'float32' with a half-precision input is what ``torch.autocast`` leaves them in)."""

    name: str
    shape: tuple[int, ...]
    channels_last: bool = False
    activation: str = "relu"
    dtype: str = "float32"
    param_dtype: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


CASES = (
    Case("resnet-stem", (64, 64, 56, 56)),
    Case("resnet-late", (32, 256, 14, 14)),
    Case("mlp", (256, 512)),
    Case("small", (64, 100)),
    Case("channels-last", (32, 128, 28, 28), channels_last=True),
    # bfloat16 activations with float32 parameters and buffers, as under
    # torch.autocast("cpu", torch.bfloat16): torch's mixed-dtype BN kernel against the
    # kernels reading and writing bfloat16
    Case("bf16", (32, 64, 56, 56), dtype="bfloat16", param_dtype="float32"),
    Case("small-bf16", (64, 100), dtype="bfloat16", param_dtype="float32"),
)
QUICK_CASES = (
    Case("conv", (4, 6, 5, 5)),
    Case("mlp", (16, 12)),
    Case("channels-last", (4, 6, 5, 5), channels_last=True),
    Case("bf16", (4, 6, 5, 5), dtype="bfloat16", param_dtype="float32"),
)


def _layers(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    import normlab.nn as nln

    c = case.shape[1]
    dtype = getattr(torch, case.param_dtype or case.dtype)
    rank = len(case.shape)
    ours_cls = {2: nln.BatchNorm1d, 3: nln.BatchNorm1d, 4: nln.BatchNorm2d, 5: nln.BatchNorm3d}
    theirs_cls = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }
    ours = ours_cls[rank](c, activation=case.activation, dtype=dtype)
    act = {
        "relu": torch.nn.ReLU(inplace=True),
        "identity": torch.nn.Identity(),
        "sigmoid": torch.nn.Sigmoid(),
        "tanh": torch.nn.Tanh(),
        "silu": torch.nn.SiLU(inplace=True),
        "leaky_relu": torch.nn.LeakyReLU(ours.negative_slope, inplace=True),
    }[case.activation]
    theirs = torch.nn.Sequential(theirs_cls[rank](c, dtype=dtype), act)
    return ours, theirs


def _input(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g, dtype=getattr(torch, case.dtype)) * 2 + 1
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def _bn(module: torch.nn.Module) -> torch.nn.Module:
    return module[0] if isinstance(module, torch.nn.Sequential) else module


def _train_step(
    module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, params_of=None
) -> TimedFn:
    bn = _bn(module if params_of is None else params_of)
    xg = x.detach().requires_grad_()
    inputs = (xg, bn.weight, bn.bias)

    def step():
        out = module(xg)
        return torch.autograd.grad(out, inputs, dy)

    return step


def _eval_step(module: torch.nn.Module, x: torch.Tensor) -> TimedFn:
    def step():
        with torch.no_grad():
            return module(x)

    return step


def saved_tensors(fn: TimedFn, activation_numel: int) -> dict:
    """Bytes autograd keeps for backward during ``fn()`` (distinct storages; ``tensors``
    counts those storages) and how many saved tensors are activation-sized
    (``numel >= activation_numel``); see :func:`normlab.bench.memory.saved_for_backward`."""
    saved = saved_for_backward(fn, activation_numel=activation_numel)
    return {
        "bytes": saved["bytes"],
        "tensors": saved["storages"],
        "activation_sized": saved["activation_sized"],
    }


@contextlib.contextmanager
def _kernel_mode(value: str | None) -> Iterator[None]:
    old = os.environ.get(kernels.KERNELS_ENV)
    if value is not None:
        os.environ[kernels.KERNELS_ENV] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(kernels.KERNELS_ENV, None)
            else:
                os.environ[kernels.KERNELS_ENV] = old


def _with_mode(fn: TimedFn, value: str | None) -> TimedFn:
    if value is None:
        return fn

    def run():
        with _kernel_mode(value):
            return fn()

    return run


def _calibrate(fn: TimedFn, target: float) -> int:
    """Calls per sample so that one sample lasts about ``target`` seconds."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(1000, round(target / once)))


def _sample(fn: TimedFn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def jit_warmup(threaded: bool = True) -> dict:
    """Run every kernel once (float32, float64 and bfloat16, both layouts, the serial
    twins and, if ``threaded``, the threaded kernels): the first calls' cost, which is
    Numba's compilation on a fresh install and a load of its on-disk cache afterwards,
    and the cache statistics."""
    import normlab.nn as nln

    sizes = (64, max(kernels.PARALLEL_MIN_NUMEL, 4096)) if threaded else (64,)
    start = time.perf_counter()
    with _kernel_mode("numba"):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for numel in sizes:
                for cl in (False, True):
                    x = torch.randn(numel // 16, 4, 2, 2, dtype=dtype)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    bn = nln.BatchNorm2d(4, activation="relu", dtype=dtype)
                    out = bn(x.requires_grad_())
                    torch.autograd.grad(out, (x, bn.weight, bn.bias), torch.ones_like(out))
                    with torch.no_grad():
                        bn.eval()(x)
    seconds = time.perf_counter() - start
    from normlab.kernels import _numba

    hits = misses = 0
    for name in _numba.KERNELS:
        stats = getattr(_numba, name).stats
        hits += sum(stats.cache_hits.values())
        misses += sum(stats.cache_misses.values())
    return {"seconds": seconds, "cache_hits": hits, "cache_misses": misses}


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != 1)


def _path(plan: kernels.Plan | None) -> str:
    return "torch-ops" if plan is None else f"kernel-{plan.layout}"


def run_case(
    case: Case,
    *,
    repeats: int,
    compile: bool = False,
    paths: bool = False,
    sample_seconds: float = 0.02,
    on_repeat: Callable[[], None] | None = None,
) -> dict:
    """Time one case; see the module docstring. Returns medians in seconds and ratios."""
    x = _input(case)
    ours, theirs = _layers(case)
    dy = torch.randn_like(x)
    out = torch.empty_like(x)
    contenders: dict[str, dict[str, TimedFn]] = {
        "normlab": {"train": _train_step(ours, x, dy), "eval": _eval_step(ours, x)},
        "torch": {"train": _train_step(theirs, x, dy), "eval": _eval_step(theirs, x)},
    }
    if paths:
        for mode in ("numba", "torch"):
            contenders[f"normlab[{mode}]"] = {
                k: _with_mode(v, mode) for k, v in contenders["normlab"].items()
            }
    if compile:
        # One compiled module per phase: grad mode and train/eval are guards, and sharing
        # one across them (and across cases: dynamo caches by code object) runs into the
        # recompile limit, after which dynamo silently falls back to eager.
        torch._dynamo.reset()
        train_mod, eval_mod = torch.compile(theirs), torch.compile(theirs)
        contenders["compile"] = {
            "train": _train_step(train_mod, x, dy, params_of=theirs),
            "eval": _eval_step(eval_mod, x),
        }
    copy = {"train": lambda: out.copy_(x), "eval": lambda: out.copy_(x)}

    # Train-mode timings first, then eval (the modules' mode is part of the state).
    result: dict = {**asdict(case), "numel": case.numel}
    result["normlab_path"] = _path(kernels.plan_batch(x, _dims(x), None, None, center=True))
    with torch.no_grad():
        keep = [x.shape[1] if d == 1 else 1 for d in range(x.dim())]
        stat = torch.zeros(keep, dtype=x.dtype)
        result["normlab_eval_path"] = _path(kernels.plan_affine(x, stat, stat, None, None))
    timings: dict[str, dict[str, list[float]]] = {}
    for phase in ("train", "eval"):
        for module in (ours, theirs):
            module.train(phase == "train")
        fns = {name: c[phase] for name, c in contenders.items()} | {"copy": copy[phase]}
        for fn in fns.values():  # warm-up: JIT, torch.compile, allocator
            fn()
            fn()
        inner = {name: _calibrate(fn, sample_seconds) for name, fn in fns.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(repeats):
                for name, fn in fns.items():
                    samples[name].append(_sample(fn, inner[name]))
                if on_repeat is not None:
                    on_repeat()
        finally:
            if gc_was_enabled:
                gc.enable()
        timings[phase] = samples
    for module in (ours, theirs):
        module.train()

    for phase, samples in timings.items():
        med = {name: statistics.median(v) for name, v in samples.items()}
        row: dict = {"seconds": med}
        row["torch_over_normlab"] = med["torch"] / med["normlab"]
        row["normlab_copies"] = med["normlab"] / med["copy"]
        row["torch_copies"] = med["torch"] / med["copy"]
        if "compile" in med:
            row["compile_over_normlab"] = med["compile"] / med["normlab"]
        result[phase] = row
    numel = case.numel
    result["saved"] = {
        "normlab": saved_tensors(contenders["normlab"]["train"], numel),
        "torch": saved_tensors(contenders["torch"]["train"], numel),
        "activation_bytes": numel * x.element_size(),
    }
    return result


def environment() -> dict:
    import numba

    return {
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "kernel_mode": kernels.mode(),
        "kernel_min_numel": kernels.MIN_NUMEL,
        "kernel_parallel_min_numel": kernels.PARALLEL_MIN_NUMEL,
    }
