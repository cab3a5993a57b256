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
    "SHAPES",
    "shape_of",
    "DatasetMissing",
    "BadDataset",
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


class BadDataset(ValueError):
    """A dataset file is there but is not what its format promises; the message names the
    file and the problem (one line)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:160] if text else "") or type(err).__name__


def _check_images(path: Path, x: np.ndarray, shape: tuple[int, ...], layout: str) -> None:
    """``x`` must be ``uint8`` with ``shape`` (``-1`` = any count, at least one image)."""
    if x.dtype != np.uint8:
        raise BadDataset(f"{path}: images are {x.dtype}, expected uint8 pixels (0–255)")
    if x.ndim != len(shape) or any(w != -1 and w != g for w, g in zip(shape, x.shape)):
        raise BadDataset(f"{path}: images have shape {tuple(x.shape)}, expected {layout}")
    if x.size == 0:
        raise BadDataset(f"{path}: holds no images")


def _check_labels(path: Path, y: np.ndarray, count: int, low: int, high: int) -> np.ndarray:
    """``y`` as int64 ``(count,)``: integers in ``low … high``."""
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise BadDataset(f"{path}: labels have shape {tuple(y.shape)}, expected ({count},)")
    if y.dtype.kind not in "iub":
        raise BadDataset(f"{path}: labels are {y.dtype}, expected integers")
    if len(y) != count:
        raise BadDataset(f"{path}: {count} images but {len(y)} labels")
    bad = y[(y < low) | (y > high)]
    if bad.size:
        values = ", ".join(str(v) for v in np.unique(bad)[:5])
        raise BadDataset(f"{path}: labels must be in {low}…{high}, found {values}")
    return y.astype(np.int64)


#: ``(in_channels, num_classes, image_size)`` per dataset: what a model for it looks like,
#: known without reading the files.
SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion-mnist": (1, 10, 28),
    "digits": (1, 10, 8),
    "cifar10": (3, 10, 32),
    "cifar100": (3, 100, 32),
    "svhn": (3, 10, 32),
}


def shape_of(name: str) -> tuple[int, int, int]:
    """``(in_channels, num_classes, image_size)`` of dataset ``name``."""
    if name not in SHAPES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


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
    """Read an idx file (optionally gzip-compressed) into an array of its stored shape.

    Raises:
        BadDataset: not an idx file, or truncated (naming the file).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise BadDataset(f"{path} is a folder, expected an idx file") from None
    except (OSError, EOFError) as e:  # gzip: truncated or not gzip at all
        raise BadDataset(f"{path}: cannot be read ({_first_line(e)})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BadDataset(f"{path}: not an idx file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
              0x0E: ">f8"}
    if data[2] not in dtypes:
        raise BadDataset(f"{path}: not an idx file (unknown type code {data[2]:#x})")
    dtype = np.dtype(dtypes[data[2]])
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise BadDataset(f"{path}: {len(data)} bytes, but its header {shape} needs "
                         f"{expected} (truncated or padded)")
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
        x = read_idx(root / images)
        _check_images(root / images, x, (-1, 28, 28), "(N, 28, 28)")
        y = _check_labels(root / labels, read_idx(root / labels), len(x), 0, 9)
        split[key] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y))
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
    """A CIFAR python pickle: a dict (keys are bytes)."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except IsADirectoryError:
        raise BadDataset(f"{path} is a folder, expected a CIFAR python pickle file") from None
    except Exception as e:  # truncated, empty, HTML, garbage: pickle raises many kinds
        raise BadDataset(f"{path}: not a readable python pickle ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise BadDataset(f"{path}: expected a CIFAR python pickle (a dict), got a "
                         f"{type(obj).__name__}")
    return obj


def _cifar_arrays(path: Path, label_key: bytes, num_classes: int) -> tuple[Tensor, Tensor]:
    """One CIFAR python pickle → uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``,
    checked: ``N × 3072`` pixel bytes, ``N`` integer labels in ``0 … num_classes − 1``."""
    batch = _unpickle(path)
    try:
        data, labels = batch[b"data"], batch[label_key]
    except KeyError as e:
        raise BadDataset(f"{path}: not a CIFAR python pickle (no key {e.args[0]!r})") from None
    x = np.asarray(data)
    _check_images(path, x, (-1, 3 * 32 * 32), "(N, 3072): N 32×32 RGB images")
    y = _check_labels(path, np.asarray(labels), len(x), 0, num_classes - 1)
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


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
    parts = [_cifar_arrays(folder / n, b"labels", 10) for n in _CIFAR10_TRAIN]
    x_test, y_test = _cifar_arrays(folder / "test_batch", b"labels", 10)
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
    x_train, y_train = _cifar_arrays(folder / "train", b"fine_labels", 100)
    x_test, y_test = _cifar_arrays(folder / "test", b"fine_labels", 100)
    return _make("cifar100", x_train, y_train, x_test, y_test, 100,
                 random_crop_flip if augment else None)


# ---------------------------------------------------------------------- SVHN
def _svhn_arrays(path: Path) -> tuple[Tensor, Tensor]:
    """One SVHN cropped-digits ``.mat`` → uint8 ``(N, 3, 32, 32)``, labels 0–9 (the file
    stores digits 1–9 as 1–9 and digit 0 as 10), checked: ``X`` uint8 ``(32, 32, 3, N)``,
    ``y`` ``N`` integers in 1 … 10."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except IsADirectoryError:
        raise BadDataset(f"{path} is a folder, expected an SVHN .mat file") from None
    except Exception as e:  # truncated or not MATLAB: scipy raises many kinds
        raise BadDataset(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    if "X" not in mat or "y" not in mat:
        raise BadDataset(f"{path}: not an SVHN .mat file (needs variables 'X' and 'y')")
    images = np.asarray(mat["X"])
    _check_images(path, images, (32, 32, 3, -1), "(32, 32, 3, N)")
    y = _check_labels(path, mat["y"], images.shape[3], 1, 10) % 10
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(images, (3, 2, 0, 1))))
    return x, torch.from_numpy(y)


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
