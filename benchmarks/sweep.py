"""normlab vs torch over a grid of sizes: where the dispatch rule holds ("never slower").

The five `normlab bench` cases are points; this sweeps BatchNorm + ReLU (float32) over
sizes from 2^10 to 2^22 elements in three families — (N, C) MLP activations,
(N, C, 8, 8) and (N, C, 28, 28) conv activations — with the same measuring code
(interleaved medians, `normlab.bench.run_case`) and prints ×torch (torch / normlab) for
training (forward + backward) and eval. Run:

    .venv/bin/python benchmarks/sweep.py [--threads N] [--repeats R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from normlab import bench


def grid() -> list[bench.Case]:
    cases = []
    for n, c in ((16, 64), (64, 64), (128, 128), (128, 256), (256, 512), (1024, 512), (4096, 1024)):
        cases.append(bench.Case(f"mlp {n}x{c}", (n, c)))
    for n, c in ((4, 16), (8, 64), (32, 64), (64, 128), (256, 128)):
        cases.append(bench.Case(f"conv8 {n}x{c}", (n, c, 8, 8)))
    for n, c in ((2, 8), (4, 32), (8, 64), (32, 64)):
        cases.append(bench.Case(f"conv28 {n}x{c}", (n, c, 28, 28)))
    return sorted(cases, key=lambda case: case.numel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench.jit_warmup()
    rows = []
    print(f"BatchNorm + ReLU, float32, {args.threads} threads; x torch = torch / normlab")
    print(f"{'case':>20} {'numel':>9} {'path':>10} {'train':>7} {'eval':>7}")
    for case in grid():
        r = bench.run_case(case, repeats=args.repeats)
        row = {
            "case": case.name,
            "shape": list(case.shape),
            "numel": case.numel,
            "path": r["normlab_path"],
            "train": r["train"]["torch_over_normlab"],
            "eval": r["eval"]["torch_over_normlab"],
        }
        rows.append(row)
        print(
            f"{case.name:>20} {case.numel:>9} {row['path']:>10} "
            f"{row['train']:>7.2f} {row['eval']:>7.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
