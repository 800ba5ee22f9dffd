"""Small pieces several experiments share: seeding, digits, an MLP, a training loop.

Nothing here prints or writes; training loops report through the optional ``progress``
callback of :mod:`normlab.experiments.base`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from normlab.data import Split, batches, load_digits
from normlab.experiments.base import Progress, notify


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore the caller's state after it, so
    an experiment is deterministic for its seed and leaves no trace on the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@functools.lru_cache(maxsize=8)
def digits(seed: int = 0, image: bool = False) -> Split:
    """scikit-learn's digits (standardised with training statistics), cached per split."""
    return load_digits(seed=seed, image=image)


def mlp(
    sizes: list[int] | tuple[int, ...],
    *,
    norm: Callable[[int], nn.Module] | None = None,
    activation: Callable[[], nn.Module] = nn.ReLU,
    bias: bool | None = None,
) -> nn.Sequential:
    """Linear → [norm] → activation for each hidden layer, then a linear readout.

    ``sizes`` = (in, hidden..., out). With a norm layer, the linear layers before it have no
    bias by default (the norm's mean subtraction would cancel it).
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        use_bias = last or ((norm is None) if bias is None else bias)
        layers.append(nn.Linear(a, b, bias=use_bias))
        if not last:
            if norm is not None:
                layers.append(norm(b))
            layers.append(activation())
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was_training)


def train(
    model: nn.Module,
    split: Split,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    progress: Progress | None = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
) -> list[float]:
    """SGD with cross-entropy for ``steps`` mini-batches (epochs reshuffled with a generator
    seeded by ``seed``). ``on_step(step, loss)`` runs after each update (step counts from 1).
    Returns the training loss per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    model.train()
    lo, hi = progress_span
    step = 0
    while step < steps:
        for xb, yb in batches(split.x_train, split.y_train, batch_size, generator=g):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
            if step % max(1, steps // 50) == 0:
                notify(progress, lo + (hi - lo) * step / steps, f"step {step}/{steps}")
            if step >= steps:
                break
    return losses


def fmt(values, digits: int = 3) -> str:
    """[a, b, c] with a fixed number of decimals, for the human-readable figures."""
    return "[" + ", ".join(f"{float(v):.{digits}f}" for v in values) + "]"
