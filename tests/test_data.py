"""Dataset loaders on small files written in each published format, the missing-dataset
errors, and the CIFAR augmentation against a per-image reference."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from natgrad.experiments import data as D
from natgrad.experiments.augment import random_crop_flip

pytestmark = pytest.mark.usefixtures("one_thread")


def _cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, classes: int) -> dict:
    batch = {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
        label_key: [int(v) for v in rng.integers(0, classes, size=n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, size=n)]
    return batch


def _write_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": _cifar_batch(rng, 3, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(rng, 4, b"labels", 10)
    for name, batch in batches.items():
        _write_pickle(folder / name, batch)
    return tmp_path, batches


def test_cifar10_reads_python_pickles_exactly(cifar10_dir):
    root, batches = cifar10_dir
    data = D.load("cifar10", root)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    expected_x = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    expected_y = np.concatenate([b[b"labels"] for b in train])
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(data.x_train.numpy(), expected_x)
    np.testing.assert_array_equal(data.y_train.numpy(), expected_y)
    np.testing.assert_array_equal(
        data.x_test.numpy(), batches["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    assert data.num_classes == 10 and data.in_channels == 3 and data.image_size == 32
    # Normalisation uses the training set's per-channel statistics on the 0–1 scale.
    scaled = expected_x.astype(np.float64) / 255
    mean, std = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))
    np.testing.assert_allclose(data.mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(data.std.numpy(), std, rtol=1e-5)
    x, y = data.test_batch(torch.arange(4))
    ref = (batches["test_batch"][b"data"].reshape(-1, 3, 32, 32) / 255 - mean[:, None, None]
           ) / std[:, None, None]
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-5, atol=1e-5)
    # Also found when --data-dir is the extracted folder itself; augmentation is on.
    assert D.load("cifar10", root / "cifar-10-batches-py").augment is random_crop_flip
    assert D.load("cifar10", root, augment=False).augment is None


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_batch(rng, 6, b"fine_labels", 100)
    test = _cifar_batch(rng, 2, b"fine_labels", 100)
    _write_pickle(folder / "train", train)
    _write_pickle(folder / "test", test)
    data = D.load("cifar100", tmp_path)
    assert data.num_classes == 100
    np.testing.assert_array_equal(data.y_train.numpy(), train[b"fine_labels"])
    np.testing.assert_array_equal(data.x_test.numpy(), test[b"data"].reshape(-1, 3, 32, 32))


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    arrays = {}
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0] = 10
        savemat(tmp_path / name, {"X": x, "y": y})
        arrays[name] = (x, y)
    data = D.load("svhn", tmp_path)
    x, y = arrays["train_32x32.mat"]
    assert data.x_train.shape == (5, 3, 32, 32) and data.x_train.dtype == torch.uint8
    # The file stores (H, W, C, N); we hold (N, C, H, W).
    np.testing.assert_array_equal(data.x_train.numpy(), np.transpose(x, (3, 2, 0, 1)))
    np.testing.assert_array_equal(data.y_train.numpy(), y.reshape(-1) % 10)
    assert data.y_train[0] == 0
    assert data.augment is None  # flips would change digits


def test_bad_pickle_names_the_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_pickle(folder / "train", {b"data": np.zeros((1, 3072), np.uint8)})
    _write_pickle(folder / "test", {b"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(ValueError, match="train.*fine_labels"):
        D.load("cifar100", tmp_path)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch",
                     "cifar-10-python.tar.gz"]),
        ("cifar100", ["cifar-100-python/train", "cifar-100-python/test",
                      "cifar-100-python.tar.gz"]),
        ("svhn", ["train_32x32.mat", "test_32x32.mat", "ufldl.stanford.edu/housenumbers"]),
    ],
)
def test_missing_dataset_says_which_files_where_and_how(tmp_path, name, expected):
    with pytest.raises(D.DatasetMissing) as err:
        D.load(name, tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for part in expected:
        assert part in message


def test_missing_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FMNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(D.DatasetMissing) as err:
        D.load("fashion-mnist", tmp_path)
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files_in_data_dir(tmp_path):
    rng = np.random.default_rng(3)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (2, 28, 28))}
    labels = {"train": rng.integers(0, 10, 6), "t10k": rng.integers(0, 10, 2)}
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[split])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
    data = D.load("fashion-mnist", tmp_path)
    np.testing.assert_array_equal(data.x_train[:, 0].numpy(), images["train"])
    np.testing.assert_array_equal(data.y_test.numpy(), labels["t10k"])
    np.testing.assert_array_equal(D.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"),
                                  labels["t10k"])


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="bad magic"):
        D.read_idx(path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10"):
        D.load("mnist")


def test_digits_tensor_datasets_are_standardised():
    train, test = D.digits()
    x = train.tensors[0]
    assert x.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3


def _reference_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Per image: zero-pad, crop at the drawn offset, flip if drawn (same draw order)."""
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        padded = torch.zeros(x.shape[1], h + 2 * pad, w + 2 * pad)
        padded[:, pad : pad + h, pad : pad + w] = x[i]
        r, c = int(offsets[0, i]), int(offsets[1, i])
        crop = padded[:, r : r + h, c : c + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


@pytest.mark.parametrize("pad, size", [(4, 32), (2, 8), (0, 5)])
def test_random_crop_flip_matches_per_image_reference(pad, size):
    x = torch.randn(16, 3, size, size)
    got = random_crop_flip(x, torch.Generator().manual_seed(7), pad=pad)
    want = _reference_crop_flip(x, torch.Generator().manual_seed(7), pad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, x)  # something moved (flips at least)


def test_random_crop_flip_rejects_bad_input():
    with pytest.raises(ValueError, match="x must be"):
        random_crop_flip(torch.zeros(3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="pad must be"):
        random_crop_flip(torch.zeros(1, 3, 8, 8), torch.Generator(), pad=-1)


# ---------------------------------------------------------------------- broken files
def _cifar10_with(tmp_path, name: str, batch) -> None:
    """A CIFAR-10 folder whose file ``name`` is replaced by ``batch`` (an object to pickle,
    or bytes written as they are)."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(folder / n, _cifar_batch(rng, 3, b"labels", 10))
    target = folder / name
    if isinstance(batch, bytes):
        target.write_bytes(batch)
    elif batch == "folder":
        target.unlink()
        target.mkdir()
    else:
        _write_pickle(target, batch)


def _good(n=3, labels=None, data=None):
    rng = np.random.default_rng(6)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None
            else data, b"labels": list(range(n)) if labels is None else labels}


@pytest.mark.parametrize(
    "batch, problem",
    [
        # More images than labels (before: the labels of later images shifted silently).
        (_good(data=np.zeros((4, 3072), np.uint8)), "4 images but 3 labels"),
        (_good(n=3, labels=list(range(2))), "3 images but 2 labels"),
        # A flat byte string whose length is a multiple of 3072 but not a (N, 3072) table.
        (_good(data=np.zeros(3 * 3072 + 3072, np.uint8)), r"shape \(12288,\), expected"),
        (_good(data=np.zeros((3, 3000), np.uint8)), r"shape \(3, 3000\), expected \(N, 3072\)"),
        # Float pixels in 0–1 (before: cast to uint8, every image black).
        (_good(data=np.full((3, 3072), 0.5)), "images are float64, expected uint8"),
        (_good(labels=[0, 10, 1]), "labels must be in 0…9, found 10"),
        (_good(labels=[0, -1, 1]), "labels must be in 0…9, found -1"),
        (_good(labels=[99, 1, 2]), "labels must be in 0…9, found 99"),
        (_good(labels=[0.0, 1.0, 2.0]), "labels are float64, expected integers"),
        (b"", "not a readable python pickle"),
        (b"\x80\x02}q\x00(X\x04\x00\x00\x00da", "not a readable python pickle"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "not a readable python pickle"),
        (b"\x00\x01garbage\xff" * 10, "not a readable python pickle"),
        ([1, 2, 3], "expected a CIFAR python pickle \\(a dict\\), got a list"),
        ("folder", "is a folder, expected a CIFAR python pickle file"),
    ],
)
def test_broken_cifar_files_are_one_line_errors_naming_the_file(tmp_path, batch, problem):
    _cifar10_with(tmp_path, "data_batch_2", batch)
    with pytest.raises(D.BadDataset, match=problem) as err:
        D.load("cifar10", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_2") in message
    assert "\n" not in message


def _svhn(tmp_path, x, y):
    from scipy.io import savemat

    rng = np.random.default_rng(7)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    savemat(tmp_path / "test_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8),
             "y": np.array([[1], [10]], np.uint8)})


@pytest.mark.parametrize(
    "n_images, labels, problem",
    [
        (3, [[1], [15], [2]], "labels must be in 1…10, found 15"),  # before: became 5
        (3, [[1], [0], [2]], "labels must be in 1…10, found 0"),
        (300, [[1]] * 200, "300 images but 200 labels"),
    ],
)
def test_broken_svhn_files(tmp_path, n_images, labels, problem):
    x = np.zeros((32, 32, 3, n_images), np.uint8)
    _svhn(tmp_path, x, np.array(labels, np.uint8))
    with pytest.raises(D.BadDataset, match=problem) as err:
        D.load("svhn", tmp_path)
    assert str(tmp_path / "train_32x32.mat") in str(err.value)


def test_truncated_and_odd_svhn_files(tmp_path):
    _svhn(tmp_path, np.zeros((32, 32, 3, 4), np.uint8), np.ones((4, 1), np.uint8))
    whole = (tmp_path / "train_32x32.mat").read_bytes()
    (tmp_path / "train_32x32.mat").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(D.BadDataset, match="train_32x32.mat: not a readable MATLAB .mat file"):
        D.load("svhn", tmp_path)
    _svhn(tmp_path, np.zeros((32, 32, 3, 4), np.float32), np.ones((4, 1), np.uint8))
    with pytest.raises(D.BadDataset, match="images are float32, expected uint8"):
        D.load("svhn", tmp_path)


def test_broken_fashion_mnist_files(tmp_path):
    rng = np.random.default_rng(8)
    for split, n in (("train", 6), ("t10k", 2)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(labels, np.array([0, 1, 2, 3, 4, 12]))
    with pytest.raises(D.BadDataset, match="labels must be in 0…9, found 12"):
        D.load("fashion-mnist", tmp_path)
    _write_idx(labels, np.array([0, 1, 2, 3, 4]))
    with pytest.raises(D.BadDataset, match="6 images but 5 labels"):
        D.load("fashion-mnist", tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(images, "rb") as f:
        raw = f.read()
    with gzip.open(images, "wb") as f:
        f.write(raw[:-100])  # a truncated download
    with pytest.raises(D.BadDataset, match="header .* needs .* \\(truncated or padded\\)"):
        D.load("fashion-mnist", tmp_path)
    images.write_bytes(gzip.compress(raw)[:50])  # a truncated gzip stream
    with pytest.raises(D.BadDataset, match="train-images-idx3-ubyte.gz: cannot be read"):
        D.load("fashion-mnist", tmp_path)


def test_shapes_table_matches_the_loaders():
    for name in ("digits",):
        data = D.load(name)
        assert D.shape_of(name) == (data.in_channels, data.num_classes, data.image_size)
