"""torch.compile against torch.compile: a BN+ReLU training step at (32, 64, 56, 56).

normlab's layer compiles to its custom ops (normlab::batch_norm_train and its backward),
which run the fused kernels inside the compiled graph; torch's BatchNorm2d + ReLU compile
to inductor's generated code. Both are timed interleaved in one process (eager too, for
reference), median of the repeats; ratios are torch / normlab.

    .venv/bin/python benchmarks/compiled.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn as tnn

import normlab as nl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=4, default=(32, 64, 56, 56))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)
    theirs = tnn.Sequential(tnn.BatchNorm2d(shape[1]), tnn.ReLU())
    ours = nl.nn.BatchNorm2d(shape[1], activation="relu")
    contenders = {
        "torch compiled": torch.compile(theirs, fullgraph=True),
        "normlab compiled": torch.compile(ours, fullgraph=True),
        "torch eager": theirs,
        "normlab eager": ours,
    }

    def step(module) -> None:
        module(x).backward(g)
        x.grad = None

    for module in contenders.values():  # compile, JIT, allocator
        for _ in range(3):
            step(module)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for name, module in contenders.items():
            t0 = time.perf_counter()
            step(module)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, ms in med.items():
        print(f"{name:18s} {ms:8.2f} ms")
    print(f"compiled: torch / normlab = {med['torch compiled'] / med['normlab compiled']:.2f}x")
    print(f"eager:    torch / normlab = {med['torch eager'] / med['normlab eager']:.2f}x")


if __name__ == "__main__":
    main()
