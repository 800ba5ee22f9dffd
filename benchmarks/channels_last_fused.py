"""Fused BN layers by memory format: why ``fuse`` slows a channels_last MobileNetV2.

One training step (forward + backward) of torch's BN + ReLU6 and of normlab's BN alone,
BN + hardtanh (ReLU6), BN + ReLU and BN + add (``residual=``) at (32, 96, 56, 56), in
channels-first and channels-last layout; median of 5, ms.

    PYTHONPATH=src python benchmarks/channels_last_fused.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as tnn

import normlab.nn as nln


def _median_ms(f, n: int = 5) -> float:
    f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
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
        "normlab BN + add": (nln.BatchNorm2d(96), True),
    }
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

            print(f"{fmt_name:15} {name:28} {_median_ms(step):7.1f} ms")


if __name__ == "__main__":
    main()
