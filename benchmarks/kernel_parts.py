"""Where a BN+ReLU training step's time goes at (64, 64, 56, 56), float32.

Times, in one process and in copies of a plain ``copy_`` of the tensor:

* the kernels alone on preallocated outputs (forward, backward, eval), and the
  forward's two passes run separately (statistics only; normalise-and-write only): if
  the forward costs their sum, its second read of a channel did not come from cache;
* the same after a large allocation and free by other code (numpy, 2x the tensor), which
  is what a torch step does between two normlab steps in ``normlab bench``;
* a fresh ``torch.empty_like`` written once (the page faults a fresh output costs) against
  normlab's pooled ``empty_like``;
* whole steps: normlab's layer and torch's ``BatchNorm2d`` + ``ReLU(inplace=True)``.

Run: ``.venv/bin/python benchmarks/kernel_parts.py [--threads N]``
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import torch
from numba import njit, prange

import normlab.nn as nln
from normlab.kernels import _memory
from normlab.kernels import _numba as K

N, C, H, W = 64, 64, 56, 56
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(parallel=True, fastmath=FASTMATH)
def _stats_only(x, out):  # the forward's first pass
    for c in prange(x.shape[1]):
        k = np.float64(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        for i in range(x.shape[0]):
            for j in range(x.shape[2]):
                d = np.float64(x[i, c, j]) - k
                s1 += d
                s2 += d * d
        out[0, c] = s1
        out[1, c] = s2


@njit(parallel=True, fastmath=FASTMATH)
def _write_only(x, y):  # the forward's second pass (a relu of an affine map)
    for c in prange(x.shape[1]):
        k = x[0, c, 0]
        for i in range(x.shape[0]):
            for j in range(x.shape[2]):
                z = (x[i, c, j] - k) * np.float32(1.1) + np.float32(0.1)
                y[i, c, j] = z if z > np.float32(0) else np.float32(0)


def _median_ms(fn, before=None, repeats=11) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    x = torch.randn(N, C, H, W) * 2 + 1
    dy = torch.randn_like(x)
    out = torch.empty_like(x)
    xa, dya = x.numpy().reshape(N, C, H * W), dy.numpy().reshape(N, C, H * W)
    y, dx = np.empty_like(xa), np.empty_like(xa)
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    act = K.activation_params("relu")
    stats, moments = np.empty((4, C)), np.empty((2, C), np.float32)
    sums, tmp = np.empty((2, C), np.float32), np.empty((2, C))
    mean, var = np.zeros(C, np.float32), np.ones(C, np.float32)

    def churn():  # another library's large allocation and free
        a = np.ones(2 * x.numel(), np.float32)
        del a

    fwd = lambda: K.forward_cf(xa, w, b, 1e-5, act, y, stats, moments)  # noqa: E731
    fwd()
    torch.set_num_threads(args.threads)  # Numba's first thread launch can reset torch's
    rows = {
        "copy_ into a preallocated tensor": lambda: out.copy_(x),
        "forward kernel": fwd,
        "  statistics pass only": lambda: _stats_only(xa, tmp),
        "  normalise-and-write pass only": lambda: _write_only(xa, y),
        "backward kernel": lambda: K.backward_cf(dya, xa, w, b, stats, act, True, dx, sums),
        "eval kernel": lambda: K.affine_cf(xa, mean, var, w, b, 1e-5, act, y),
    }
    results = {name: (_median_ms(fn), _median_ms(fn, churn)) for name, fn in rows.items()}
    copy = results["copy_ into a preallocated tensor"][0]

    results["fresh torch.empty_like, written"] = (
        _median_ms(lambda: torch.empty_like(x).fill_(0)),
        float("nan"),
    )
    results["pooled empty_like, written"] = (
        _median_ms(lambda: _memory.empty_like(x).fill_(0)),
        float("nan"),
    )
    xr = x.clone().requires_grad_()
    ours = nln.BatchNorm2d(C, activation="relu")
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(C), torch.nn.ReLU(inplace=True))

    def step(module, bn):
        return lambda: torch.autograd.grad(module(xr), (xr, bn.weight, bn.bias), dy)

    results["normlab step (fwd+bwd)"] = (_median_ms(step(ours, ours)), float("nan"))
    results["torch step (fwd+bwd)"] = (_median_ms(step(theirs, theirs[0])), float("nan"))

    print(
        f"(64, 64, 56, 56) float32, {args.threads} threads; ms and copies (copy_ = {copy:.2f} ms)"
    )
    print(f"{'':38s} {'ms':>7s} {'copies':>7s} {'after churn':>12s}")
    for name, (ms, churned) in results.items():
        after = "" if np.isnan(churned) else f"{churned:12.2f}"
        print(f"{name:38s} {ms:7.2f} {ms / copy:7.2f} {after}")


if __name__ == "__main__":
    main()
