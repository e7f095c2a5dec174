"""The spool's slots: files whose names are durable before an instance is written into one, and a reserve of
slots whose blocks are already written, so that the instance's one flush is a data flush only.

Why a reserve. An instance written into an empty file needs the file system to allocate its blocks and
commit that to its journal before the flush returns: measured on this project's machine (ext4 on a
virtual disk; ``bench/bench_flush.py``), write + flush of a 530 KB CT slice into an empty file takes
1.5-1.8 ms (2.3-2.5 ms back to back); into a file whose blocks were written (with zeros) and flushed
beforehand, 0.55-0.77 of that, because only data goes to disk and no journal commit waits. With one
association the sender waits for each response, so this flush is most of the node's time per instance.
``posix_fallocate`` does not help (0.78-1.07 of the empty file's time: its unwritten extents must be
converted at the first write, a journal commit again). Databases do the same with their write-ahead log
segments.

The reserve is made while the spool is idle (no instance being received for ``idle_s``): writing zeros
while instances are flushed would make every flush wait behind them (measured: median flush 1.1 ms alone,
2.9 ms with a priming thread running beside it). So a burst larger than the reserve has its first
``slots`` instances at the data-flush cost and the rest at the empty-file cost, as before the reserve; the
reserve is made again at the next pause. It holds ``slots`` × ``slot_bytes`` of disk (its files count
against ``min_free_bytes`` like any other; none is made when the disk is short of room).

An instance larger than its slot grows the file past the written blocks: correct, at the empty-file cost.
One smaller leaves zeros after it; the spool cuts them off after the sender has its response, in a thread
of its own (the spool's mark, in the preamble, states the instance's length, so recovery cuts what a crash
left; see ``edge_node.ingest.spool``).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge_node.protocol.durable_file import fsync_directory

__all__ = ["POOL_BATCH", "SlotPool", "SpoolReserve"]

logger = logging.getLogger(__name__)

#: Empty slots created (and made durable with one directory fsync) each time the pool runs dry.
POOL_BATCH = 128

_ZEROS = bytes(256 * 1024)


@dataclass(frozen=True)
class SpoolReserve:
    """How many written-through slots a pool keeps ready, how large each is, and the pause that makes them."""

    slots: int = 0
    slot_bytes: int = 1024 * 1024
    #: Seconds without an instance in progress before the reserve is made (again).
    idle_s: float = 0.2


class SlotPool:
    """Slots of one pool directory: handed out one per instance, made again when the pool runs dry, and a
    reserve written through in idle time (``start_reserve``).

    The receive path only takes a plain lock for a moment; the thread that writes the reserve never holds
    it while it writes, sleeps on a timer while instances arrive, and on an event while the reserve is
    full, so it neither wakes per instance nor makes an instance wait for it.
    """

    def __init__(self, directory: Path, reserve: SpoolReserve | None = None, min_free_bytes: int = 0) -> None:
        self.directory = directory
        self.reserve = reserve or SpoolReserve()
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._free: list[Path] = []  # names durable; contents zeros or nothing
        self._primed: list[Path] = []  # names durable; ``slot_bytes`` of zeros written and flushed
        self._in_use = 0
        self._last_use = time.monotonic()
        self._wanted = threading.Event()  # the reserve fell below its size
        self._stopping = threading.Event()
        self._primer: threading.Thread | None = None

    # -- handing out ---------------------------------------------------------------------------------------

    def take(self) -> Path:
        """A slot for one instance (from the reserve first); ``done`` must follow (after its commit or its
        discard)."""
        with self._lock:
            if self._primed:
                slot = self._primed.pop()
                self._wanted.set()
            else:
                if not self._free:
                    self._refill()  # may raise: then no slot was taken and no ``done`` is owed
                slot = self._free.pop()
            self._in_use += 1
            return slot

    def done(self) -> None:
        """An instance finished with its slot (placed or given back): the idle clock starts again."""
        with self._lock:
            self._in_use -= 1
            self._last_use = time.monotonic()

    def give_back(self, slot: Path) -> None:
        """A slot emptied again (its instance refused): its durable name serves the next instance."""
        with self._lock:
            self._free.append(slot)

    def adopt(self, slots: list[Path]) -> None:
        """Unused slots found at start (their names became durable when they were made): those that hold
        ``slot_bytes`` or more join the reserve, the others the empty slots."""
        full = self.reserve.slot_bytes
        with self._lock:
            for slot in slots:
                try:
                    size = slot.stat().st_size
                except FileNotFoundError:
                    continue
                (self._primed if self.reserve.slots and size >= full else self._free).append(slot)

    @property
    def primed(self) -> int:
        """Slots of the reserve ready now."""
        with self._lock:
            return len(self._primed)

    def _refill(self) -> None:
        made = []
        for _ in range(POOL_BATCH):
            path = self.directory / f"{secrets.token_hex(12)}.slot"
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            made.append(path)
        # One flush makes all the new names durable: each slot then costs its instance a single flush.
        fsync_directory(self.directory)
        self._free.extend(made)

    # -- the reserve ---------------------------------------------------------------------------------------

    def start_reserve(self) -> None:
        """Keep ``reserve.slots`` slots written through, in idle time, until ``stop_reserve``."""
        if self.reserve.slots <= 0 or self._primer is not None:
            return
        self._stopping.clear()
        self._wanted.set()
        self._primer = threading.Thread(target=self._prime_loop, name="edge-spool-reserve", daemon=True)
        self._primer.start()

    def stop_reserve(self) -> None:
        self._stopping.set()
        self._wanted.set()
        primer, self._primer = self._primer, None
        if primer is not None:
            primer.join(30)

    def _prime_loop(self) -> None:
        idle = self.reserve.idle_s
        while not self._stopping.is_set():
            if self.primed >= self.reserve.slots:
                self._wanted.wait()  # set by ``take`` when it hands out a reserve slot
                self._wanted.clear()
                continue
            if not self._room():
                self._stopping.wait(30)
                continue
            quiet_for = time.monotonic() - self._last_use
            if self._in_use or quiet_for < idle:
                self._stopping.wait(max(idle - quiet_for, idle / 4))
                continue
            try:
                with self._lock:
                    if not self._free:
                        self._refill()
                    slot = self._free.pop()
            except OSError as exc:
                logger.warning("could not make the spool's reserve (%s); trying again later", exc.strerror)
                self._stopping.wait(30)
                continue
            try:
                primed = self._prime(slot)
            except OSError as exc:
                logger.warning("could not write the spool's reserve (%s); trying again later", exc.strerror)
                primed = False
                self._stopping.wait(30)
            with self._lock:
                (self._primed if primed else self._free).append(slot)

    def _room(self) -> bool:
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize - self.reserve.slot_bytes >= self.min_free_bytes

    def _prime(self, slot: Path) -> bool:
        """Write ``slot_bytes`` of zeros into ``slot`` and flush them; False if an instance arrived first
        (the slot then goes back as it is: zeros, partly written, are what any slot may hold)."""
        fd = os.open(slot, os.O_WRONLY)
        try:
            offset = 0
            while offset < self.reserve.slot_bytes:
                if self._in_use or self._stopping.is_set():
                    return False
                offset += os.pwrite(fd, _ZEROS[: self.reserve.slot_bytes - offset], offset)
            os.fdatasync(fd)
            return True
        finally:
            os.close(fd)
