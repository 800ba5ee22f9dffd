"""Fused BN layers by memory format: why ``fuse`` slows a channels_last MobileNetV2.

One training step (forward + backward) of torch's BN + ReLU6 and of normlab's BN alone,
BN + hardtanh (ReLU6), BN + ReLU, BN + hardswish / elu / silu and BN + add
(``residual=``) at (32, 96, 56, 56), in
channels-first and channels-last layout: every row timed in turn within each of the
``--repeats`` rounds (so that a busy machine slows all rows alike), median ms and the
ratio to torch's BN + ReLU6 step in the same layout.

    PYTHONPATH=src python benchmarks/channels_last_fused.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as tnn

import normlab.nn as nln


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = {
        "torch BN + ReLU6": (tnn.Sequential(tnn.BatchNorm2d(96), tnn.ReLU6()), False),
        "normlab BN": (nln.BatchNorm2d(96), False),
        "normlab BN + hardtanh(0, 6)": (
            nln.BatchNorm2d(96, activation="hardtanh", min_val=0.0, max_val=6.0),
            False,
        ),
        "normlab BN + relu": (nln.BatchNorm2d(96, activation="relu"), False),
        "normlab BN + hardswish": (nln.BatchNorm2d(96, activation="hardswish"), False),
        "normlab BN + elu": (nln.BatchNorm2d(96, activation="elu"), False),
        "normlab BN + silu": (nln.BatchNorm2d(96, activation="silu"), False),
        "normlab BN + add": (nln.BatchNorm2d(96), True),
    }
    steps = {}
    for fmt_name, fmt in (
        ("channels-first", torch.contiguous_format),
        ("channels-last", torch.channels_last),
    ):
        x = torch.randn(32, 96, 56, 56).to(memory_format=fmt).requires_grad_()
        r = torch.randn(32, 96, 56, 56).to(memory_format=fmt).requires_grad_()
        dy = torch.randn(32, 96, 56, 56).to(memory_format=fmt)
        for name, (module, residual) in layers.items():

            def step(module=module, residual=residual, x=x, r=r, dy=dy):
                y = module(x, residual=r) if residual else module(x)
                torch.autograd.grad(y, (x, r) if residual else (x,), dy)

            steps[fmt_name, name] = step
    times = {key: [] for key in steps}
    for step in steps.values():  # first calls: compile or load the kernels
        step()
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    for (fmt_name, name), ts in times.items():
        ms = sorted(ts)[len(ts) // 2] * 1e3
        torch_ms = sorted(times[fmt_name, "torch BN + ReLU6"])[len(ts) // 2] * 1e3
        print(f"{fmt_name:15} {name:28} {ms:7.1f} ms  {ms / torch_ms:5.2f}x torch")


if __name__ == "__main__":
    main()
