"""Files a kill never leaves half-written, and the hashes that name caches.

A write goes to a temp file in the target's folder, is flushed to disk, then ``os.replace``d over the
target and the folder is synced: a reader, or a process killed mid-write, sees the old file or the new
one, never a mix. Leftover temps are named ``.<target>.<random>.tmp``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path next to ``path`` for a writer that takes a file name (safetensors, torch.save);
    it replaces ``path`` when the block ends without an exception and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A staging folder next to ``target`` that becomes ``target`` (absent or empty) when the block
    ends without an exception, and is removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX))
    try:
        yield staging
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data, indent: int = 2, allow_nan: bool = False) -> None:
    """Strict JSON unless ``allow_nan`` (a NaN or inf is then written as JavaScript's NaN / Infinity)."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True, allow_nan=allow_nan) + "\n")


def drop_torn_tail(path: str | os.PathLike) -> None:
    """A kill during an append can leave a last line without its newline; cut it so the next append
    starts a fresh line instead of gluing a record onto the torn one."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def key_digest(key, length: int = 24) -> str:
    """The hash of ``key``'s canonical JSON: a cache entry's file name, what a plot was drawn from."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:length]
