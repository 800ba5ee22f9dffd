"""Data: scikit-learn's handwritten digits (the embedded default), synthetic sets.

Nothing here downloads: the digits ship inside scikit-learn (1797 8×8 images, 10 classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """A train/test split of features and integer labels, on the CPU."""

    x_train: torch.Tensor  # (N_train, *feature_shape) float32
    y_train: torch.Tensor  # (N_train,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_digits(
    *, test_fraction: float = 0.25, seed: int = 0, image: bool = False, standardize: bool = True
) -> Split:
    """scikit-learn's digits as a shuffled, stratification-free split.

    Args:
        test_fraction: share of the 1797 samples held out for testing.
        seed: shuffling seed (the split is deterministic for a seed).
        image: return (N, 1, 8, 8) images instead of (N, 64) vectors.
        standardize: scale pixels from [0, 16] to mean 0 / std 1 using the *training* set's
            global mean and std (no per-pixel statistics, so nothing leaks from the test set).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = round(len(x) * test_fraction)
    x_train, x_test, y_train, y_test = x[n_test:], x[:n_test], y[n_test:], y[:n_test]
    if standardize:
        mean, std = x_train.mean(), x_train.std()
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if image:
        x_train, x_test = x_train.view(-1, 1, 8, 8), x_test.view(-1, 1, 8, 8)
    return Split(x_train, y_train, x_test, y_test, 10)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    drop_last: bool = True,
):
    """Yield shuffled (x, y) mini-batches for one epoch."""
    if batch_size <= 0:
        raise ValueError(f"batches: batch_size must be positive, got {batch_size}")
    perm = torch.randperm(len(x), generator=generator)
    stop = len(x) - (len(x) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


def gaussian_blobs(
    n: int, num_features: int, num_classes: int, *, seed: int = 0, separation: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic classification set: one isotropic Gaussian per class."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, num_features, generator=g) * separation
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, num_features, generator=g)
    return x, y
