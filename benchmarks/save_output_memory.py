"""Bytes autograd keeps for backward in a LeakyReLU ResNet-18-like net (BasicBlocks,
widths 64-128-256-512, two blocks each, a 7x7 stem): torch's layers, normlab's fused
model (``nl.fuse``), and ``nl.fuse(..., save="output")`` (In-Place ABN).

    PYTHONPATH=src python benchmarks/save_output_memory.py [--batch 8] [--size 112]

Counts the distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks``
during one training forward (parameters included; they are small next to activations).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import normlab as nl


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.LeakyReLU(0.01)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.LeakyReLU(0.01)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(h)) + identity)


def resnet18_leaky() -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.LeakyReLU(0.01),
        nn.MaxPool2d(3, 2, 1),
    ]  # fmt: skip
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    a = p.parse_args()
    torch.manual_seed(0)
    model = resnet18_leaky()
    x = torch.randn(a.batch, 3, a.size, a.size, requires_grad=True)
    results = {
        "torch": saved_bytes(model, x),
        "nl.fuse": saved_bytes(nl.fuse(model), x),
        "nl.fuse save=output": saved_bytes(nl.fuse(model, save="output"), x),
    }
    base = results["torch"]
    print(f"input {tuple(x.shape)}")
    for name, b in results.items():
        print(f"{name:20s} {b / 2**20:8.1f} MiB  {b / base:.2f}x torch")


if __name__ == "__main__":
    main()
