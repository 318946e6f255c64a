"""Atomic file writes, and exclusive lock files that processes on one or many machines share.

A write goes to a temporary file beside the target, renamed over it when complete:

>>> import tempfile, pathlib
>>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
>>> with atomic_path(target) as tmp:
...     _ = tmp.write_text("done")
>>> target.read_text()
'done'

``write_npz`` writes arrays that way; ``array_sha256`` is the checksum files keep of each array.

A lock file is created with O_EXCL (one creator wins, also over NFS), names its owner (host, pid,
a random nonce) and is kept fresh by a heartbeat; a stale one (dead owner, or no heartbeat for
``timeout`` seconds) is taken over by exactly one of the processes that find it (see ``Locks``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; if the block succeeds, rename it over ``path``,
    its bytes synced to disk first and the rename after. The file gets the mode that writing it
    in place would give: an existing file's own, else 0666 less the umask; a symbolic link is
    followed (its target is written, the link kept). An interrupted write leaves no file behind;
    one killed outright (SIGKILL) leaves its hidden ``.name.*.tmp``, removed by a later write of
    the same file once it is an hour old (younger ones may be another process's write)."""
    path = _target(Path(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of a file to write")
    for parent in path.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = _new_temporary(path)
    mode = tmp.stat().st_mode & 0o777  # 0666 less the umask (a writer may replace tmp: 0600)
    try:
        yield tmp
        with contextlib.suppress(FileNotFoundError):  # (no file yet: the umask's mode)
            mode = path.stat().st_mode & 0o777  # an existing file's, as in place
        os.chmod(tmp, mode)
        _sync(tmp)  # its bytes on disk before the name points at them (a crash, a power loss)
        os.replace(tmp, path)
        _sync(path.parent)  # and the new name
    finally:
        with contextlib.suppress(OSError):  # (not to hide the error that got here)
            tmp.unlink(missing_ok=True)


def _target(path: Path) -> Path:
    """The file a write of ``path`` writes: a symbolic link's target (as ``open`` follows it;
    its folder must exist, as for ``open``), else ``path``."""
    if not path.is_symlink():
        return path
    try:
        target = path.resolve(strict=False)
    except RuntimeError as e:  # (Python < 3.13 says so for a loop)
        raise OSError(errno.ELOOP, f"{path} is a loop of symbolic links") from e
    if target.is_symlink():  # (Python >= 3.13 stops at the loop)
        raise OSError(errno.ELOOP, f"{path} is a loop of symbolic links")
    if not target.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"{path} links to {target}, in no folder")
    return target


def _new_temporary(path: Path) -> Path:
    """A new empty hidden file beside ``path``, of mode 0666 less the umask (as ``open``)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # (another write's name: draw again)
            continue


def _sync(path: Path) -> None:
    """fsync a file or a directory (where the system allows opening one: not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # (some file systems refuse fsync on a directory)
        pass
    finally:
        os.close(fd)


_STALE = 3600.0  # seconds after which a temporary file of a write is taken as abandoned


def _remove_stale(path: Path) -> None:
    """Remove the temporary files of writes of ``path`` abandoned over ``_STALE`` seconds ago."""
    now = time.time()
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):  # (another process may remove it first)
            if now - old.stat().st_mtime > _STALE:
                old.unlink()


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """``np.savez`` of ``arrays`` to ``path``, atomically (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read at once (checkpoints: a few MB)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order), as files record it.

    >>> array_sha256(np.zeros(2)) == array_sha256(np.zeros(2)) != array_sha256(np.zeros(3))
    True
    """
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Locks:
    """Exclusive lock files held by this process, touched every ``beat`` seconds by one thread.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.lock"
    >>> with Locks() as mine, Locks() as theirs:
    ...     mine.acquire(path), theirs.acquire(path)  # a live owner's fresh lock is kept
    (True, False)
    >>> path.exists()  # released when the block ends
    False
    """

    def __init__(self, timeout: float = 120.0, beat: float | None = None) -> None:
        self.timeout = timeout  # seconds without a heartbeat after which a lock is stale
        self.beat = min(10.0, timeout / 4) if beat is None else beat
        self.nonce = secrets.token_hex(8)  # this holder's mark inside its lock files
        self._held: set[Path] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def acquire(self, path: str | Path) -> bool:
        """Create the lock, or take it over if stale; False while another live owner holds it."""
        path = Path(path)
        for _ in range(3):  # a lock released between our looks: try again
            if _create(path, self._owner()):
                break
            seen = _read(path)
            if seen is None:
                continue
            if not _is_stale(*seen, self.timeout) or not _steal(
                path, seen, self._owner(), self.timeout
            ):
                return False
            break
        else:
            return False
        with self._mutex:
            self._held.add(path)
        return True

    def release(self, path: str | Path) -> None:
        """Remove our lock (only if it is still ours) and the steal markers beside it."""
        path = Path(path)
        with self._mutex:
            self._held.discard(path)
        seen = _read(path)
        if seen is not None and seen[0].get("nonce") == self.nonce:
            path.unlink(missing_ok=True)
        for marker in path.parent.glob(f"{path.name}.steal-*"):
            marker.unlink(missing_ok=True)

    def close(self) -> None:
        """Release every lock still held and stop the heartbeat."""
        with self._mutex:
            held = list(self._held)
        for path in held:
            self.release(path)
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Locks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _owner(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "nonce": self.nonce,
            "started": time.time(),
        }

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat):
            with self._mutex:
                held = list(self._held)
            for path in held:
                with contextlib.suppress(OSError):
                    os.utime(path)


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Create ``path`` exclusively with ``owner`` inside; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _read(path: Path) -> tuple[dict[str, Any], float] | None:
    """The lock's owner (with a nonce, also for an unreadable lock) and mtime; None if gone."""
    try:
        with open(path, "rb") as f:  # mtime and content of the same file, even if replaced
            mtime = os.fstat(f.fileno()).st_mtime
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(raw)
        if isinstance(owner, dict) and _is_nonce(owner.get("nonce")):
            return owner, mtime
    except ValueError:
        pass
    digest = hashlib.sha256(raw + repr(mtime).encode()).hexdigest()[:16]
    return {"nonce": f"garbage-{digest}", "garbage": True}, mtime  # same for all its readers


def _is_nonce(text: Any) -> bool:
    """A nonce as ``Locks`` writes it (safe inside a file name)."""
    return isinstance(text, str) and 0 < len(text) <= 64 and text.isascii() and text.isalnum()


def _is_stale(owner: dict[str, Any], mtime: float, timeout: float) -> bool:
    """No heartbeat for ``timeout`` seconds, or an owner on this host that no longer runs."""
    if time.time() - mtime > timeout:
        return True
    if owner.get("garbage") or owner.get("host") != socket.gethostname():
        return False
    return not _alive(owner.get("pid"))


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_STEAL_DEPTH = 8  # takers that died one after another mid-takeover, at most


def _steal(
    path: Path, seen: tuple[dict[str, Any], float], owner: dict[str, Any], timeout: float
) -> bool:
    """Take over a stale lock: of all who saw the same owner, the one that creates the marker
    ``<lock>.steal-<its nonce>`` wins and replaces the lock with its own. A marker whose taker
    died before replacing the lock is stale in turn: its successors compete for the marker
    named after it (``...-<the dead taker's nonce>``), so the lock is never blocked for good."""
    name = f"{path.name}.steal-{seen[0]['nonce']}"
    for _ in range(_STEAL_DEPTH):
        if _create(path.with_name(name), owner):
            break
        held = _read(path.with_name(name))
        if held is None or not _is_stale(*held, timeout):
            return False  # (another taker is at work, or has just finished)
        name = f"{name}-{held[0]['nonce']}"
    else:
        return False
    now = _read(path)
    if now is None:  # released meanwhile: an ordinary claim
        return _create(path, owner)
    if now[0]["nonce"] != seen[0]["nonce"]:  # replaced meanwhile
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(owner))
    return True
