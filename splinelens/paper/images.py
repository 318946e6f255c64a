"""Image-folder datasets: ``train/<class>/*`` and ``test/<class>/*`` images in a folder or a
.tar / .tar.gz / .tar.xz archive of one, decoded once and cached as uint8 (``SPLINELENS_CACHE``,
default ~/.cache/splinelens).

Hidden and system files (``.DS_Store``, ``Thumbs.db``) are skipped; a file under train/ or test/
outside a class folder, a test class with no training images, a file that is no image and images
of different sizes are refused, each named.

>>> # decode_folder(Path("cifar10-jpeg.tar.xz"))["train_x"].shape -> (50000, 3, 32, 32)
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from splinelens._io import array_sha256, write_npz
from splinelens.errors import DataError

__all__ = ["decode_folder"]

_LAYOUT = 2  # how folders are read (2: misplaced files refused, not skipped): part of cache keys


def decode_folder(source: Path) -> dict[str, np.ndarray]:
    """Decode an image folder or archive once; later loads read the uint8 cache."""
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    stamp = "".join(
        f"{p.relative_to(source.parent)}:{p.stat().st_size}:{p.stat().st_mtime_ns};"
        for p in files
        if p.is_file()
    )  # any added, removed or changed file
    key = hashlib.sha256(f"{_LAYOUT}|{source.resolve()}|{stamp}".encode())
    cache_dir = Path(os.environ.get("SPLINELENS_CACHE", Path.home() / ".cache" / "splinelens"))
    cache = cache_dir / f"images-{key.hexdigest()[:16]}.npz"
    if cache.exists():
        arrays = _read_cache(cache)
        if arrays is not None:
            return arrays
        warnings.warn(f"{cache}: a damaged image cache (decoding {source} again)", stacklevel=2)
    arrays = _decode_images(_image_files(source))
    write_npz(cache, **arrays, sha256=np.array(_digest(arrays)))
    return arrays


def _read_cache(cache: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an image cache whose checksum holds; None if it is damaged (truncated,
    edited) or from an older version without one."""
    try:
        with np.load(cache, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k != "sha256"}
            stored = str(f["sha256"]) if "sha256" in f.files else ""
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    return arrays if stored == _digest(arrays) else None


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the arrays by name (``array_sha256`` of each)."""
    each = "".join(f"{k}:{array_sha256(arrays[k])};" for k in sorted(arrays))
    return hashlib.sha256(each.encode()).hexdigest()


def _image_files(source: Path) -> dict[str, list[tuple[str, bytes, str]]]:
    """{'train': [(class, bytes, path), ...], 'test': [...]} from a folder or a tar archive."""
    out: dict[str, list[tuple[str, bytes, str]]] = {"train": [], "test": []}
    if source.is_dir():
        entries = [
            (p.relative_to(source).parts, p.read_bytes()) for p in source.rglob("*") if p.is_file()
        ]
    else:
        try:
            with tarfile.open(source, "r|*") as tar:  # one sequential pass: xz cannot seek
                entries = [
                    (Path(m.name).parts, tar.extractfile(m).read()) for m in tar if m.isfile()
                ]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"{source} is not a readable tar archive ({e}): give an image folder or a whole "
                f"archive (train/<class>/*, test/<class>/*)"
            ) from None
    return _collect(entries, out, source)


def _collect(entries: list, out: dict, source: Path) -> dict[str, list[tuple[str, bytes, str]]]:
    """Each split's (class, bytes, path) from (path parts, bytes) entries; hidden and system
    files are skipped, a file under train/ or test/ outside a class folder is refused."""
    for parts, data in sorted(entries, key=lambda e: e[0]):
        parts = [p for p in parts if p not in (".", "")]
        if any(p.startswith(".") for p in parts) or parts[-1] in _SYSTEM_FILES:
            continue  # .DS_Store, ._name (macOS), .git/, Thumbs.db
        under = [i for i, p in enumerate(parts[:-1]) if p in out]  # train/ or test/ folders
        if not under:
            continue  # not under train/ or test/ (a README beside them)
        split = next((i for i in under if len(parts) - i == 3), under[0])  # <split>/<class>/f
        if len(parts) - split != 3:
            raise DataError(
                f"{source}: {'/'.join(parts)} is not in a class folder directly under "
                f"{parts[split]}/ (expected {parts[split]}/<class>/<image>); move or remove it"
            )
        out[parts[split]].append((parts[split + 1], data, "/".join(parts)))
    if not out["train"] or not out["test"]:
        raise DataError(f"{source}: expected images under train/<class>/ and test/<class>/")
    extra = sorted({c for c, *_ in out["test"]} - {c for c, *_ in out["train"]})
    if extra:
        raise DataError(
            f"{source}: test/ has classes with no training images ({', '.join(extra)}); "
            "a misspelt folder name? Each test class needs a train/<class>/ folder"
        )
    return out


_SYSTEM_FILES = frozenset({"Thumbs.db", "desktop.ini"})


def _decode_images(files: dict[str, list[tuple[str, bytes, str]]]) -> dict[str, np.ndarray]:
    from PIL import Image

    classes = sorted({c for split in files.values() for c, *_ in split})
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, items in files.items():
        imgs = [_decoded(Image, b, where) for _, b, where in items]
        odd = next((i for i, im in enumerate(imgs) if im.shape != imgs[0].shape), None)
        if odd is not None:
            raise DataError(
                f"images in {split}/ have different sizes: {items[0][2]} is "
                f"{_size(imgs[0])}, {items[odd][2]} is {_size(imgs[odd])}; resize them to one"
            )
        arrays[f"{split}_x"] = np.stack(imgs).transpose(0, 3, 1, 2)  # (N, 3, H, W) uint8
        arrays[f"{split}_y"] = np.array([classes.index(c) for c, *_ in items])
    if all(
        np.all(arrays[f"{s}_x"][:, 0] == arrays[f"{s}_x"][:, c]) for s in files for c in (1, 2)
    ):  # grey images stored as RGB, in every split
        for split in files:
            arrays[f"{split}_x"] = arrays[f"{split}_x"][:, :1]
    return arrays


def _size(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}"  # width x height


def _decoded(image: Any, data: bytes, where: str) -> np.ndarray:
    """One image file's pixels, (H, W, 3) uint8; a file that is no image is refused, naming
    it (``where``)."""
    try:
        return np.asarray(image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # (PIL's UnidentifiedImageError is OSError)
        why = str(e).split(" <_io.")[0]  # (PIL names the buffer, not the file)
        raise DataError(f"{where} is not an image ({why}); remove it or replace it") from None
