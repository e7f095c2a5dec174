"""One node per data directory: an flock'ed lock file that holds the serving process's pid.

The kernel drops an flock when its process ends, however it ends (kill -9, power cut), so a stale lock
file never blocks a restart; the pid written into it is only for people and ``status``.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from edge_node.errors import ConfigError

__all__ = ["LOCK_FILE", "NodeLock", "NodeRunning", "running_node"]

LOCK_FILE = "node.lock"


@dataclass(frozen=True)
class NodeRunning:
    """A node that holds the lock of a data directory."""

    pid: int | None


class NodeLock:
    """The lock of one data directory, held from ``acquire`` until ``release`` (or the process ends)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder is not None else "another process"
            raise ConfigError(
                f"another fedclinic-edge serve ({who}) already runs on data_dir {self.path.parent}; "
                "stop it first (systemctl stop fedclinic-edge), or give this node its own data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def running_node(data_dir: Path) -> NodeRunning | None:
    """The node serving ``data_dir`` now, or None (tested with the lock itself, not a stale pid)."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return NodeRunning(pid=_read_pid(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
