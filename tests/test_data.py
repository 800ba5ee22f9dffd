import pytest
import torch

from normlab import data


def test_digits_split_is_deterministic_and_standardised():
    a, b = data.load_digits(seed=1), data.load_digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (1348, 64) and a.x_test.shape == (449, 64)
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std()) - 1) < 1e-4
    assert set(a.y_train.tolist()) == set(range(10))
    img = data.load_digits(image=True)
    assert img.x_train.shape[1:] == (1, 8, 8) and img.feature_shape == (1, 8, 8)


def test_batches_cover_an_epoch():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    seen = [yb for _, yb in data.batches(x, y, 3, generator=torch.Generator().manual_seed(0))]
    assert [len(b) for b in seen] == [3, 3, 3]
    seen = list(data.batches(x, y, 3, drop_last=False))
    assert sorted(torch.cat([b for _, b in seen]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(x, y, 0))


def test_gaussian_blobs():
    x, y = data.gaussian_blobs(50, 4, 3, seed=0)
    assert x.shape == (50, 4) and y.max() < 3


# -- local MNIST / CIFAR-10 files, written here in their exact formats --------------------


def _write_idx(path, magic: int, array, compress: bool = False):
    import gzip
    import struct

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_mnist_idx(tmp_path, compress):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    ip, lp = tmp_path / "images", tmp_path / "labels"
    _write_idx(ip, 0x00000803, images, compress)
    _write_idx(lp, 0x00000801, labels, compress)
    x, y = data.load_mnist_idx(ip, lp)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[2, 0], torch.from_numpy(images[2]).float() / 255)
    assert y.tolist() == [3, 1, 4, 1, 5] and y.dtype == torch.int64
    xf, _ = data.load_mnist_idx(ip, lp, flatten=True)
    assert xf.shape == (5, 784) and torch.equal(xf[1], x[1].flatten())


def test_load_mnist_idx_errors(tmp_path):
    import numpy as np

    ip, lp = tmp_path / "images", tmp_path / "labels"
    _write_idx(ip, 0x00000803, np.zeros((4, 2, 2)))
    _write_idx(lp, 0x00000801, np.zeros(3))
    with pytest.raises(ValueError, match=r"4 images .* but 3 labels"):
        data.load_mnist_idx(ip, lp)
    with pytest.raises(ValueError, match=r"magic number 0x00000801, expected 0x00000803.*swapped"):
        data.load_mnist_idx(lp, ip)
    ip.write_bytes(ip.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.load_mnist_idx(ip, lp)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(ValueError, match="cannot be decompressed"):
        data.load_mnist_idx(tmp_path / "bad.gz", lp)


def _write_cifar(path, data_array, labels, bytes_keys=True):
    import pickle

    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    batch = {
        k("batch_label"): b"testing batch 1 of 1",
        k("labels"): list(labels),
        k("data"): data_array,
        k("filenames"): [b"x.png"] * len(labels),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def test_load_cifar10_batches(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    _write_cifar(tmp_path / "data_batch_1", a, [0, 9, 2])
    _write_cifar(tmp_path / "data_batch_2", b, [5, 5], bytes_keys=False)
    x, y = data.load_cifar10_batches([tmp_path / "data_batch_1", tmp_path / "data_batch_2"])
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 9, 2, 5, 5]
    # channel-major rows: the first 1024 values are the red plane, row by row
    assert x[1, 0, 0, 5] == a[1, 5] / 255 and x[1, 2, 31, 31] == a[1, 3071] / 255
    assert x[4, 1, 1, 0] == b[1, 1024 + 32] / 255
    x1, _ = data.load_cifar10_batches(tmp_path / "data_batch_1")
    assert x1.shape[0] == 3


def test_load_cifar10_errors_and_refuses_code(tmp_path):
    import pickle

    import numpy as np

    p = tmp_path / "b"
    _write_cifar(p, np.zeros((2, 100), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        data.load_cifar10_batches([p])
    _write_cifar(p, np.zeros((2, 3072), dtype=np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        data.load_cifar10_batches([p])
    _write_cifar(p, np.zeros((1, 3072), dtype=np.uint8), [10])
    with pytest.raises(ValueError, match="labels must be in 0–9"):
        data.load_cifar10_batches([p])
    p.write_bytes(pickle.dumps({b"fine_labels": [1], b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="needs 'data' and 'labels'"):
        data.load_cifar10_batches([p])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load builtins\.print"):
        data.load_cifar10_batches([p])
    with pytest.raises(ValueError, match="paths is empty"):
        data.load_cifar10_batches([])
