"""Float32 BatchNorm accuracy at large channel offsets: normlab vs torch, against a float64
two-pass reference on the same float32 input (issue 2's bound: 1e-4 normalised units).

    .venv/bin/python benchmarks/accuracy.py
"""

from __future__ import annotations

import torch

import normlab.functional as NF


def reference(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    mean = x.mean((0, 2, 3), keepdim=True)
    var = (x - mean).pow(2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def main() -> None:
    print(f"{'offset':>8} {'std':>6} {'normlab':>9} {'torch':>9}   max |error|, normalised units")
    for offset in (1e2, 1e3, 1e4, 1e5, 1e6):
        for std in (1e-2, 1e-1, 1.0):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(64, 3, 7, 7, generator=g, dtype=torch.float64) * std + offset).float()
            ref = reference(x)
            ours = NF.batch_norm(x, None, None, training=True).double()
            theirs = torch.nn.functional.batch_norm(x, None, None, training=True).double()
            print(
                f"{offset:8.0e} {std:6.0e} {(ours - ref).abs().max():9.1e} "
                f"{(theirs - ref).abs().max():9.1e}"
            )


if __name__ == "__main__":
    main()
