"""Datasets read from local files; nothing downloads.

Each loader returns ``(train, test)`` as :class:`torch.utils.data.TensorDataset` of
float images ``(N, C, H, W)`` normalised per channel and int64 labels.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["FMNIST_DIR", "DatasetMissing", "read_idx", "fashion_mnist", "digits"]

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into an array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[
        data[2]
    ]
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, 2, 3]
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def fashion_mnist(data_dir: str | os.PathLike | None = None) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST from idx files (default: Debian's ``dataset-fashion-mnist``)."""
    root = Path(data_dir) if data_dir is not None else FMNIST_DIR
    missing = [
        str(root / f) for pair in _FMNIST_FILES.values() for f in pair if not (root / f).exists()
    ]
    if missing:
        raise DatasetMissing(
            "Fashion-MNIST files not found: " + ", ".join(missing) + ". Install Debian's "
            "package (`apt-get install dataset-fashion-mnist`, files under "
            f"{FMNIST_DIR}) or pass a folder holding the four idx .gz files."
        )
    arrays = {}
    for split, (images, labels) in _FMNIST_FILES.items():
        x = torch.from_numpy(read_idx(root / images).astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(read_idx(root / labels).astype(np.int64))
        arrays[split] = (x, y)
    x_train, x_test = _standardise(arrays["train"][0], arrays["test"][0])
    return TensorDataset(x_train, arrays["train"][1]), TensorDataset(x_test, arrays["test"][1])


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8×8 digits (1797 images), split with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x_train, x_test = _standardise(x[train_idx], x[test_idx])
    return TensorDataset(x_train, y[train_idx]), TensorDataset(x_test, y[test_idx])
