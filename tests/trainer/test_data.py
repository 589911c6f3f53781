from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import data as data_mod
from trainer.data import MNIST_SHA256, batches, load_dataset, make_regression, regression_function
from trainer.errors import BnnError, ErrorCode


def test_regression_is_seeded_and_follows_the_function() -> None:
    a = make_regression(200, 50, seed=3)
    b = make_regression(200, 50, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (200, 1) and a.y_train.shape == (200, 1)
    resid = a.y_train - regression_function(a.x_train)
    assert 0.07 < float(resid.std()) < 0.13  # the noise sigma is 0.1
    assert not torch.equal(make_regression(200, 50, seed=4).x_train, a.x_train)


def test_mnist_loads_offline_with_the_known_split() -> None:
    ds = load_dataset("mnist", n_train=1000, n_test=300)
    assert ds.x_train.shape == (1000, 784) and ds.x_test.shape == (300, 784)
    assert ds.y_train.dtype == torch.int64 and set(ds.y_train.unique().tolist()) == set(range(10))
    assert abs(float(ds.x_train.mean())) < 0.2  # normalised
    full = data_mod.load_mnist()
    assert [s[0].shape[0] for s in full] == [50_000, 10_000, 10_000]
    images = load_dataset("mnist", flatten=False, n_train=10, n_test=10)
    assert images.x_train.shape == (10, 1, 28, 28)


def test_mnist_with_the_wrong_hash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "data" / "mnist.pkl.gz"
    fake.parent.mkdir()
    fake.write_bytes(b"not mnist")
    monkeypatch.setattr(data_mod, "_mnist_file", lambda: fake)
    with pytest.raises(BnnError) as info:
        data_mod.load_mnist()
    assert info.value.code is ErrorCode.CORRUPT
    assert MNIST_SHA256 in str(info.value) and str(fake) in str(info.value)


def test_unknown_dataset_is_named() -> None:
    with pytest.raises(BnnError, match="'svhn'"):
        load_dataset("svhn")


def test_missing_torchvision_files_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BnnError) as info:
        load_dataset("fashion_mnist", root=tmp_path)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert str(tmp_path) in str(info.value)


def test_batches_cover_every_example_once() -> None:
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    seen = torch.cat(
        [yb for _, yb in batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    )
    assert sorted(seen.tolist()) == list(range(10))
    sizes = [len(yb) for _, yb in batches(x, y, 4, shuffle=False)]
    assert sizes == [4, 4, 2]
    assert np.array_equal(next(iter(batches(x, y, 4, shuffle=False)))[1].numpy(), [0, 1, 2, 3])
