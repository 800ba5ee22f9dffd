"""Data: scikit-learn's handwritten digits (the embedded default), synthetic sets.

Nothing here downloads: the digits ship inside scikit-learn (1797 8×8 images, 10 classes);
MNIST (IDX) and CIFAR-10 (python pickle batches) are read from files the user has.
"""

from __future__ import annotations

import math
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


# -- local MNIST (IDX) and CIFAR-10 (python pickle batches) files -------------------------
# Nothing is downloaded: these read files the user already has.

_IDX_UBYTE = 0x08


def _read_maybe_gzip(path) -> bytes:
    import gzip
    from pathlib import Path

    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(
                f"{path}: looks gzip-compressed but cannot be decompressed: {e}"
            ) from e
    return raw


def _read_idx(path, expected_ndim: int, what: str) -> torch.Tensor:
    """An IDX file of unsigned bytes: magic 0x000008NN (NN = number of dimensions), then NN
    big-endian int32 sizes, then the data (LeCun et al., the MNIST database format)."""
    import struct

    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    magic = 0x800 + expected_ndim
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim != expected_ndim:
        raise ValueError(
            f"{path}: not an IDX {what} file: magic number 0x{int.from_bytes(raw[:4], 'big'):08x}, "
            f"expected 0x{magic:08x} ({expected_ndim}-D unsigned bytes). MNIST {what} files "
            f"are e.g. 'train-{'images-idx3' if expected_ndim == 3 else 'labels-idx1'}-ubyte(.gz)'; "
            f"check the two paths are not swapped."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes in all) but the file has "
            f"{len(raw)} bytes: truncated or not an IDX file"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def load_mnist_idx(images_path, labels_path, *, flatten: bool = False):
    """Read MNIST-format IDX files (raw or gzip-compressed, detected by content).

    Args:
        images_path: an ``idx3-ubyte`` file: magic 0x00000803, N, rows, cols, pixels.
        labels_path: an ``idx1-ubyte`` file: magic 0x00000801, N, labels.
        flatten: return (N, rows·cols) instead of (N, 1, rows, cols).

    Returns:
        ``(x, y)``: x float32 in [0, 1] (pixel / 255), y int64.
    """
    images = _read_idx(images_path, 3, "images")
    labels = _read_idx(labels_path, 1, "labels")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"load_mnist_idx: {images.shape[0]} images in {images_path} but {labels.shape[0]} "
            f"labels in {labels_path}; pass the images and labels of the same split"
        )
    x = images.float().div_(255.0)
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    return x, labels.long()


_CIFAR_PIXELS = 3 * 32 * 32


def _safe_unpickle(path):
    """Unpickle a CIFAR batch allowing only numpy arrays and builtins: pickle runs code,
    and a data file must not."""
    import pickle

    allowed = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store bytes
        ("builtins", "list"),
        ("builtins", "dict"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(
                    f"{path}: refusing to load {module}.{name} (a CIFAR-10 batch holds only "
                    f"numpy arrays, lists and bytes)"
                )
            return super().find_class(module, name)

    with open(path, "rb") as f:
        try:
            return _Restricted(f, encoding="bytes").load()
        except pickle.UnpicklingError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch (unpickling failed: {e})") from e


def load_cifar10_batches(paths):
    """Read CIFAR-10 "python version" batch files (``data_batch_1`` … ``test_batch``).

    Each file is a pickled dict with ``data``, a (10000, 3072) uint8 array (1024 red, then
    green, then blue values per image, row-major 32×32), and ``labels``, a list of ints in
    0–9 (Krizhevsky 2009). Keys may be bytes (the original Python 2 pickles) or str.

    Returns:
        ``(x, y)`` over all files concatenated: x float32 (N, 3, 32, 32) in [0, 1], y int64.
    """
    import numpy as np

    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("load_cifar10_batches: paths is empty; pass e.g. ['data_batch_1']")
    xs, ys = [], []
    for path in paths:
        batch = _safe_unpickle(path)
        if not isinstance(batch, dict):
            raise ValueError(f"{path}: a CIFAR-10 batch is a dict, got {type(batch).__name__}")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(
                f"{path}: a CIFAR-10 batch needs 'data' and 'labels', found {sorted(batch)} "
                f"(CIFAR-100 uses 'fine_labels' and is not supported here)"
            )
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
            raise ValueError(
                f"{path}: 'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}), got "
                f"{data.dtype} {data.shape}"
            )
        if labels.shape != (data.shape[0],):
            raise ValueError(f"{path}: {data.shape[0]} images but {labels.size} labels")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{path}: labels must be in 0–9, got {labels.min()}–{labels.max()}")
        xs.append(torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32))
        ys.append(torch.from_numpy(labels))
    return torch.cat(xs).float().div_(255.0), torch.cat(ys)
