"""BN + add + ReLU training step: normlab's fused layer (one kernel each way) against
torch's ``BatchNorm2d`` → ``add`` → ``ReLU(inplace)``, interleaved in one process.

    PYTHONPATH=src python benchmarks/residual.py [--shape 32 64 56 56] [--repeats 11]

Each repeat times every contender once, in turn (a sample: the mean of ``--calls``
forward+backward steps); the ratio is normlab's time over torch's, median over repeats,
with the spread (min/max of the per-repeat ratios) as the noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import normlab as nl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--calls", type=int, default=5)
    a = p.parse_args()
    n, c, h, w = a.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).requires_grad_()
    r = torch.randn(n, c, h, w, generator=g).requires_grad_()
    dy = torch.randn(n, c, h, w, generator=g)
    fused = nl.nn.BatchNorm2d(c, activation="relu")
    bn = torch.nn.BatchNorm2d(c)
    relu = torch.nn.ReLU(inplace=True)

    def step_fused():
        fused(x, r).backward(dy)

    def step_torch():
        relu(bn(x) + r).backward(dy)

    steps = {"normlab": step_fused, "torch": step_torch}
    for f in steps.values():  # warm-up: compile / load the kernels, fault the pool in
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(a.repeats):
        for name, f in steps.items():
            t0 = time.perf_counter()
            for _ in range(a.calls):
                f()
            times[name].append((time.perf_counter() - t0) / a.calls)
    ratios = [t / u for t, u in zip(times["normlab"], times["torch"])]
    print(f"shape {tuple(a.shape)}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()}")  # fmt: skip
    for name, ts in times.items():
        print(f"{name:8s} median {statistics.median(ts) * 1e3:8.2f} ms  "
              f"[{min(ts) * 1e3:.2f}, {max(ts) * 1e3:.2f}]")  # fmt: skip
    print(f"speed-up (torch / normlab): median {1 / statistics.median(ratios):.2f}x, "
          f"per-repeat range [{1 / max(ratios):.2f}, {1 / min(ratios):.2f}]")  # fmt: skip


if __name__ == "__main__":
    main()
