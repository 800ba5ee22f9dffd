"""Half precision on the kernels: reading and writing bf16/fp16 in the kernels ("native")
against converting the whole tensor to float32 in torch around the float32 kernels
("convert": ``bn(x.float()).to(x.dtype)``, two extra passes and a float32 copy), and
torch's own BN + ReLU, all with float32 parameters (autocast's layout).

Interleaved in one process (each repeat times every contender once, in turn), median of
the repeats, each sample averaging enough calls to last ~20 ms; prints the medians, the
samples' spread (min/median, max/median) and the ratios. Run:

    .venv/bin/python benchmarks/half_convert.py [--repeats R] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ["NORMLAB_KERNELS"] = "numba"  # before normlab reads it: the kernels at every size

import normlab.nn as nln


def _layers(shape):
    c = shape[1]
    ours = nln.BatchNorm2d if len(shape) == 4 else nln.BatchNorm1d
    theirs = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    relu = torch.nn.ReLU(inplace=True)
    return (
        ours(c, activation="relu"),
        ours(c, activation="relu"),
        torch.nn.Sequential(theirs(c), relu),
    )


def _timed(fns: dict, repeats: int) -> dict:
    for f in fns.values():  # warm-up: JIT, allocator
        f()
        f()
    inner = {}
    for name, f in fns.items():
        start = time.perf_counter()
        f()
        inner[name] = max(1, min(1000, round(0.02 / max(time.perf_counter() - start, 1e-6))))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                f()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def run(shape, dtype, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    native, convert, theirs = _layers(shape)
    xg = x.detach().requires_grad_()
    phases = {
        "train": {
            "native": lambda: torch.autograd.grad(native(xg), (xg, native.weight, native.bias), dy),
            "convert": lambda: torch.autograd.grad(
                convert(xg.float()).to(dtype), (xg, convert.weight, convert.bias), dy
            ),
            "torch": lambda: torch.autograd.grad(theirs(xg), (xg, *theirs[0].parameters()), dy),
        },
        "eval": {
            "native": lambda: native(x),
            "convert": lambda: convert(x.float()).to(dtype),
            "torch": lambda: theirs(x),
        },
    }
    for phase, fns in phases.items():
        for m in (native, convert, theirs):
            m.train(phase == "train")
        with torch.set_grad_enabled(phase == "train"):
            samples = _timed(fns, repeats)
        med = {k: statistics.median(v) for k, v in samples.items()}
        cells = "  ".join(
            f"{k} {med[k] * 1e6:9.1f} µs [{min(v) / med[k]:.2f}-{max(v) / med[k]:.2f}]"
            for k, v in samples.items()
        )
        print(
            f"{tuple(shape)!s:18} {str(dtype)[6:]:9} {phase:5} {cells}   "
            f"convert/native {med['convert'] / med['native']:.2f}  "
            f"torch/native {med['torch'] / med['native']:.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()}")
    for shape in ((32, 64, 56, 56), (64, 100)):
        for dtype in (torch.bfloat16, torch.float16):
            run(shape, dtype, args.repeats)


if __name__ == "__main__":
    main()
