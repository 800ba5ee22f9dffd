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
