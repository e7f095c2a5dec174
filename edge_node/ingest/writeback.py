"""Start writing a file's newest bytes to disk without waiting for them (Linux ``sync_file_range``).

An instance arrives in fragments over a millisecond or more; asking the kernel to write each part as it
arrives leaves the final flush less to wait for. Measured here (530 KB into an empty slot, in 64 KiB
writes): write + fsync 2.5 ms, 1.9 ms with the write-back started after each part. Only a head start: the
flush (``os.fdatasync``) still decides durability, and where the call is missing (not Linux) or fails,
nothing changes but the speed.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["WRITEBACK_STEP", "start_writeback"]

#: Bytes written since the last start before the next one (one system call per step).
WRITEBACK_STEP = 128 * 1024

_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd``; never waits, never raises."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
