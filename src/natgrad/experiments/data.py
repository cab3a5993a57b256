"""Datasets read from local files in their published formats; nothing downloads.

:func:`load` returns an :class:`ImageData`: train/test images kept compact (``uint8`` where
the format stores bytes) and normalised per batch with the training set's per-channel mean
and standard deviation, plus the papers' augmentation where it applies (CIFAR: random crop
with 4-pixel zero padding + horizontal flip). :func:`fashion_mnist` and :func:`digits` also
return ready :class:`~torch.utils.data.TensorDataset` pairs for quick use.

Expected files (``DIR`` is ``--data-dir``; each dataset may also sit in the named sub-folder):

=============  ===========================================================================
fashion-mnist  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in ``DIR``,
               ``DIR/fashion-mnist`` or Debian's ``/usr/share/datasets/fashion-mnist``
cifar10        ``DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles)
cifar100       ``DIR/cifar-100-python/{train,test}`` (python pickles, fine labels)
svhn           ``DIR/{train_32x32.mat,test_32x32.mat}`` or ``DIR/svhn/…`` (MATLAB v5)
digits         scikit-learn's bundled 8×8 digits (always available)
=============  ===========================================================================
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .augment import random_crop_flip

__all__ = [
    "FMNIST_DIR",
    "DATASETS",
    "DatasetMissing",
    "ImageData",
    "load",
    "read_idx",
    "fashion_mnist",
    "digits",
    "cifar10",
    "cifar100",
    "svhn",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR100_DIR = "cifar-100-python"
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


@dataclass
class ImageData:
    """A classification dataset held in memory.

    Attributes:
        name: the dataset's name (a key of :data:`DATASETS`).
        x_train, x_test: images ``(N, C, H, W)``, ``uint8`` (0–255) or float (0–1).
        y_train, y_test: int64 labels ``(N,)``.
        num_classes: number of classes.
        mean, std: per-channel statistics of the training images on the 0–1 scale, ``(C,)``.
        augment: training-batch augmentation ``(x, generator) → x`` on normalised images,
            or ``None``.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: Tensor
    std: Tensor
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def normalise(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` (stored dtype) → float32, per-channel standardised."""
        x = x.float()
        if not torch.is_floating_point(self.x_train):
            x = x / 255.0
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def train_batch(
        self, index: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Normalised (and, with a generator and an ``augment``, augmented) training batch."""
        x = self.normalise(self.x_train[index])
        if self.augment is not None and generator is not None:
            x = self.augment(x, generator)
        return x, self.y_train[index]

    def test_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.normalise(self.x_test[index]), self.y_test[index]


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``(N, C, H, W)`` images on the 0–1 scale (float64 sums)."""
    scale = 1.0 if torch.is_floating_point(x) else 255.0
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in torch.split(x, 10_000):
        c = chunk.to(torch.float64) / scale
        mean += c.sum(dim=(0, 2, 3))
        sq += (c * c).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean /= count
    std = (sq / count - mean**2).clamp_min(1e-16).sqrt()
    return mean.float(), std.float()


def _make(
    name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
    num_classes: int, augment: Callable | None = None,
) -> ImageData:
    mean, std = _channel_stats(x_train)
    return ImageData(name, x_train, y_train, x_test, y_test, num_classes, mean, std, augment)


def _missing(name: str, root: Path, expected: list[Path], how: str) -> DatasetMissing:
    return DatasetMissing(
        f"{name} not found: expected "
        + ", ".join(str(p) for p in expected)
        + f" (looked in --data-dir {root}). {how}"
    )


# ---------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into an array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[
        data[2]
    ]
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def _fmnist_root(data_dir: str | os.PathLike | None) -> Path:
    candidates = [] if data_dir is None else [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    candidates.append(FMNIST_DIR)
    names = [f for pair in _FMNIST_FILES.values() for f in pair]
    for root in candidates:
        if all((root / f).exists() for f in names):
            return root
    root = candidates[0]
    raise _missing(
        "Fashion-MNIST",
        root,
        [root / f for f in names],
        f"Install Debian's package (`apt-get install dataset-fashion-mnist`, files under "
        f"{FMNIST_DIR}) or put the four idx .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion) in --data-dir.",
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> ImageData:
    """Fashion-MNIST (60k/10k 28×28 grey images, 10 classes) from its idx files."""
    root = _fmnist_root(data_dir)
    split = {}
    for key, (images, labels) in _FMNIST_FILES.items():
        x = torch.from_numpy(read_idx(root / images).copy()).unsqueeze(1)
        y = torch.from_numpy(read_idx(root / labels).astype(np.int64))
        split[key] = (x, y)
    return _make("fashion-mnist", *split["train"], *split["test"], num_classes=10)


def fashion_mnist(data_dir: str | os.PathLike | None = None) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST as normalised float ``TensorDataset`` pairs ``(train, test)``."""
    return _as_tensor_datasets(load_fashion_mnist(data_dir))


# ---------------------------------------------------------------------- digits
def load_digits(
    data_dir: str | os.PathLike | None = None, test_fraction: float = 0.2, seed: int = 0
) -> ImageData:
    """scikit-learn's 8×8 digits (1797 images, 10 classes), split with a fixed seed.
    ``data_dir`` is ignored (the data ships with scikit-learn)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return _make("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes=10)


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as normalised float ``TensorDataset`` pairs ``(train, test)``."""
    return _as_tensor_datasets(load_digits(None, test_fraction, seed))


# ---------------------------------------------------------------------- CIFAR
def _find(root: Path, sub: str, names: tuple[str, ...]) -> Path | None:
    for folder in (root / sub, root):
        if all((folder / n).exists() for n in names):
            return folder
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[Tensor, Tensor]:
    """One CIFAR python pickle → uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    batch = _unpickle(path)
    try:
        data, labels = batch[b"data"], batch[label_key]
    except KeyError as e:
        raise ValueError(f"{path}: not a CIFAR python pickle (no key {e.args[0]!r})") from None
    x = torch.from_numpy(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return x, torch.tensor(np.asarray(labels), dtype=torch.int64)


def _cifar_how(archive: str) -> str:
    return (
        f"Download https://www.cs.toronto.edu/~kriz/{archive} (the 'python version') and "
        f"extract it in --data-dir: `tar xzf {archive} -C DIR`."
    )


def cifar10(data_dir: str | os.PathLike, augment: bool = True) -> ImageData:
    """CIFAR-10 (50k/10k 32×32 RGB, 10 classes) from the python pickles; training batches
    get random crop (4-pixel padding) + horizontal flip when ``augment``."""
    root = Path(data_dir)
    names = (*_CIFAR10_TRAIN, "test_batch")
    folder = _find(root, _CIFAR10_DIR, names)
    if folder is None:
        raise _missing(
            "CIFAR-10", root, [root / _CIFAR10_DIR / n for n in names],
            _cifar_how("cifar-10-python.tar.gz"),
        )
    parts = [_cifar_arrays(folder / n, b"labels") for n in _CIFAR10_TRAIN]
    x_test, y_test = _cifar_arrays(folder / "test_batch", b"labels")
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    return _make("cifar10", x_train, y_train, x_test, y_test, 10,
                 random_crop_flip if augment else None)


def cifar100(data_dir: str | os.PathLike, augment: bool = True) -> ImageData:
    """CIFAR-100 (50k/10k 32×32 RGB, 100 fine classes) from the python pickles; same
    augmentation as :func:`cifar10`."""
    root = Path(data_dir)
    folder = _find(root, _CIFAR100_DIR, ("train", "test"))
    if folder is None:
        raise _missing(
            "CIFAR-100", root, [root / _CIFAR100_DIR / n for n in ("train", "test")],
            _cifar_how("cifar-100-python.tar.gz"),
        )
    x_train, y_train = _cifar_arrays(folder / "train", b"fine_labels")
    x_test, y_test = _cifar_arrays(folder / "test", b"fine_labels")
    return _make("cifar100", x_train, y_train, x_test, y_test, 100,
                 random_crop_flip if augment else None)


# ---------------------------------------------------------------------- SVHN
def _svhn_arrays(path: Path) -> tuple[Tensor, Tensor]:
    """One SVHN cropped-digits ``.mat`` → uint8 ``(N, 3, 32, 32)``, labels 0–9 (the file
    stores digit 0 as label 10)."""
    from scipy.io import loadmat

    mat = loadmat(path)
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: not an SVHN .mat file (needs variables 'X' and 'y')")
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))))
    y = torch.from_numpy(mat["y"].reshape(-1).astype(np.int64) % 10)
    return x.to(torch.uint8), y


def svhn(data_dir: str | os.PathLike, augment: bool = False) -> ImageData:
    """SVHN cropped digits (73,257/26,032 32×32 RGB, 10 classes) from the ``.mat`` files.
    No augmentation by default (flips change digits); ``augment=True`` adds random crop +
    flip anyway."""
    root = Path(data_dir)
    folder = _find(root, "svhn", _SVHN_FILES)
    if folder is None:
        raise _missing(
            "SVHN", root, [root / n for n in _SVHN_FILES],
            "Download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and "
            "test_32x32.mat (format 2, cropped digits) into --data-dir.",
        )
    x_train, y_train = _svhn_arrays(folder / _SVHN_FILES[0])
    x_test, y_test = _svhn_arrays(folder / _SVHN_FILES[1])
    return _make("svhn", x_train, y_train, x_test, y_test, 10,
                 random_crop_flip if augment else None)


# ---------------------------------------------------------------------- by name
#: Dataset name → loader ``(data_dir) → ImageData``.
DATASETS: dict[str, Callable[..., ImageData]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "svhn": svhn,
}


def load(name: str, data_dir: str | os.PathLike | None = None, augment: bool | None = None
         ) -> ImageData:
    """Load a dataset by name. ``augment=None`` keeps the dataset's default (papers'
    augmentation for CIFAR, none elsewhere); ``False`` switches it off.

    Raises:
        ValueError: unknown ``name``.
        DatasetMissing: the files are not there (the message lists them and how to get them).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    loader = DATASETS[name]
    if name in ("cifar10", "cifar100", "svhn"):
        if data_dir is None:
            data_dir = Path("data")
        data = loader(data_dir) if augment is None else loader(data_dir, augment=augment)
    else:
        data = loader(data_dir)
        if augment:
            data.augment = random_crop_flip
    return data


def _as_tensor_datasets(data: ImageData) -> tuple[TensorDataset, TensorDataset]:
    return (
        TensorDataset(data.normalise(data.x_train), data.y_train),
        TensorDataset(data.normalise(data.x_test), data.y_test),
    )
