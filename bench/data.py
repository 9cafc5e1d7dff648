"""MNIST and Fashion-MNIST as NumPy arrays, for the demo, the benchmarks and the reproductions.

``load(name)`` returns ``(x_train, y_train, x_test, y_test)``: images as float32 ``(N, 784)``
standardised with the *training* split's mean and standard deviation (the same transform is
applied to the test split — the KLD-WRM paper's code normalised only the training images), and
labels as int64 ``(N,)``.

Where the files come from, in this order:

1. ``name="mnist-subset"`` (the default): the subset shipped in this repository,
   ``bench/data/mnist_subset.npz`` — 10,000 training and 2,000 test images of MNIST drawn at
   random with seed 0 (the indices into the original splits are stored in the file). MNIST is
   by Yann LeCun, Corinna Cortes and Christopher Burges, licensed CC BY-SA 3.0; the subset
   keeps that licence.
2. For ``"mnist"`` and ``"fashion-mnist"``: the directory ``$CURVLINALG_DATA`` if set, then
   ``../shared/data/`` next to the project root, then ``~/.cache/curvlinalg``. Each file is
   verified against its sha256 below.
3. Otherwise the original IDX files are downloaded from the canonical mirrors, verified, and
   converted to ``.npz`` in ``~/.cache/curvlinalg`` (needs internet).

Archives are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SUBSET = Path(__file__).resolve().parent / "data" / "mnist_subset.npz"

# sha256 of the .npz archives (arrays x_train, y_train, x_test, y_test; uint8).
ARCHIVES = {
    "mnist": ("mnist.npz", "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"),
    "fashion-mnist": (
        "fashion_mnist.npz",
        "f5fa0ed7493df56c6dd3d93795c799700efe70b504100cd7d87a10d629fc11ed",
    ),
}
SUBSET_SHA256 = "f0d8e5d21353815a1933ec51f78604af88e4bbcd82d3589f84f81c62daa61d4e"

# The original IDX files, for machines with internet and no local copy.
MIRRORS = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
NAMES = ("mnist-subset", "mnist", "fashion-mnist")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, expected: str) -> Path:
    actual = sha256(path)
    if actual != expected:
        raise ValueError(f"{path}: sha256 {actual} does not match the expected {expected}")
    return path


def _candidates(filename: str) -> list[Path]:
    places = []
    if os.environ.get("CURVLINALG_DATA"):
        places.append(Path(os.environ["CURVLINALG_DATA"]) / filename)
    places.append(ROOT.parent / "shared" / "data" / filename)
    places.append(Path.home() / ".cache" / "curvlinalg" / filename)
    return places


def _parse_idx(raw: bytes) -> np.ndarray:
    # IDX: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then sizes.
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _download(name: str, target: Path) -> None:
    arrays = {}
    for key, filename in IDX_FILES.items():
        url = MIRRORS[name] + filename
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (fixed https/http URL)
            arrays[key] = _parse_idx(gzip.decompress(response.read()))
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, **arrays)


def locate(name: str) -> Path:
    """The verified ``.npz`` archive for ``name`` (see the module docstring for the order)."""
    if name == "mnist-subset":
        return _verified(SUBSET, SUBSET_SHA256)
    if name not in ARCHIVES:
        raise ValueError(f"name must be one of {NAMES}; got {name!r}")
    filename, expected = ARCHIVES[name]
    for path in _candidates(filename):
        if path.is_file():
            return _verified(path, expected)
    target = Path.home() / ".cache" / "curvlinalg" / filename
    _download(name, target)
    # An archive re-made from the IDX files is not byte-identical to the reference one (the zip
    # container differs), so its content is checked instead: split sizes, and for MNIST the
    # published class counts of the training split.
    with np.load(target, allow_pickle=False) as archive:
        sizes = (archive["x_train"].shape, archive["x_test"].shape)
        counts = np.bincount(archive["y_train"], minlength=10).tolist()
    if sizes != ((60000, 28, 28), (10000, 28, 28)) or (
        name == "mnist" and counts != MNIST_TRAIN_COUNTS
    ):
        target.unlink()
        raise ValueError(f"downloaded {name} does not match the reference dataset")
    return target


def load(
    name: str = "mnist-subset",
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    standardise: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: float32 ``(N, 784)`` images standardised with
    the training split's statistics (both splits alike), int64 labels. ``train_size`` /
    ``test_size`` keep the first examples of each split. ``standardise=False``: pixels / 255
    only (in [0, 1]), e.g. to evaluate as code that forgot to normalise its test images."""
    with np.load(locate(name), allow_pickle=False) as archive:
        x_train, y_train = archive["x_train"], archive["y_train"]
        x_test, y_test = archive["x_test"], archive["y_test"]
    if train_size is not None:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    if test_size is not None:
        x_test, y_test = x_test[:test_size], y_test[:test_size]
    x_train = x_train.reshape(len(x_train), -1).astype(np.float32) / 255.0
    x_test = x_test.reshape(len(x_test), -1).astype(np.float32) / 255.0
    if not standardise:
        return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)
    mean, std = float(x_train.mean()), float(x_train.std())
    return (
        (x_train - mean) / std,
        y_train.astype(np.int64),
        (x_test - mean) / std,
        y_test.astype(np.int64),
    )
