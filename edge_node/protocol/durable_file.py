"""Durable file writes: fsync the data, rename into place atomically, fsync the directory entry.

A reader sees the old file or the new one, never half of one; after the call returns, a power cut keeps
the new one. The one helper for the node, the hub and the exporter (they may import only the protocol).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "fsync_directory",
    "fsync_file",
    "replace_durably",
    "write_bytes_durably",
    "write_durably",
    "write_text_durably",
]


def fsync_file(path: Path) -> None:
    """Flush a file's data (and size) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Flush a directory, so that the names created, renamed or removed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path, target: Path) -> None:
    """Move ``source`` (a file, or a directory whose files are already flushed) onto ``target`` durably."""
    if source.is_file():
        fsync_file(source)
    os.replace(source, target)
    fsync_directory(target.parent)


def write_durably(path: Path, write: Callable[[Path], object], *, mode: int | None = None) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then put it in place durably; returns ``path``.

    For writers that want a path (``Dataset.save_as``, ``numpy.savez``). The temporary name is unique, so
    several processes may write the same target; the last rename wins, whole. ``mode`` (e.g. 0o600 for a
    file with patient data) holds from the file's creation on, not only once it is in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The target's suffix last: some writers append their own otherwise (numpy.savez adds ".npz").
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        if mode is not None:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)  # in case the writer replaced the file instead of truncating it
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_durably(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data``, durably and atomically."""
    return write_durably(path, lambda tmp: tmp.write_bytes(data))


def write_text_durably(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text``, durably and atomically."""
    return write_durably(path, lambda tmp: tmp.write_text(text, encoding=encoding))
