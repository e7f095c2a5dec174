"""The durable spool: a received instance is on disk (one fsync) under a durable name before success is sent.

One flush per instance. A new file needs two flushes to be durable where it lies (its data, then its
directory's entry); measured here, write + fsync + rename + directory fsync cost ~12 ms against ~4 ms for one
fsync. So the directory entries are made durable *ahead of time*, in batches: the spool keeps a pool of empty
"slot" files under ``spool/.pool`` whose names were fsynced together (one directory fsync per
``POOL_BATCH`` slots). Receiving an instance then writes it into a slot and flushes that file (fdatasync):
its data, its size and its (already durable) name are all on disk after that one flush. Where instances are
received, a reserve of slots whose blocks were written with zeros in idle time makes that flush a data
flush only (``edge_node.ingest.slot_pool``; ``bench/bench_flush.py``).

Order of an instance received by the native transport (``IncomingInstance``) and what a crash (kill -9 or
power cut) at each point leaves behind:

1. write the stream into a slot, with its mark in the preamble (see below), and flush it
       -> a slot with a partial or complete instance: ``recover`` moves a complete one into place (cutting
          a reserve slot's zeros after it: its mark states its length) and indexes it, and removes a
          partial one (it was never acknowledged)
2. the listener returns 0x0000 -> only now does the PACS consider it delivered; the instance is complete,
   checksummed and flushed under the slot's durable name, which is all ``recover`` needs
3. commit the instance row (synchronous=NORMAL), naming the file's place (``IncomingInstance.settle``,
   after the response, out of the sender's wait)
       -> a row whose file is still in its slot: ``recover`` (or, for a receiver process killed here,
          the receiver started in its place: ``recover_own_slots``) moves the slot into place without
          recording it again
4. rename the slot to ``spool/<study>/<sop>.dcm`` (no directory fsync)
       -> after a power cut the rename may be lost: the inode is then still under its slot name (rename
          is atomic), complete and checksummed, and ``recover`` handles it as in 3; after kill -9 it is
          in place. If the row was lost and the rename kept, a file in place without a row: ``recover``
          indexes it (see ``edge_node.state.database``)
5. a reserve slot's zeros after the stream are cut, by a thread of the spool's -> a file in place longer
   than its row says: ``recover`` cuts it

The row comes before the rename so that whatever a killed receiver leaves of an acknowledged instance is in
its own pool, where the receiver started in its place looks (the study directories are only gone through
when the node starts). A whole-stream ``put`` (the pynetdicom transport) renames (cutting before it), then
records, then returns for the listener's 2: nothing of it is acknowledged before both are done. So every
acknowledged instance is fsynced under a durable name before its response; a crash at any point loses
nothing acknowledged. A new study directory's entry is still fsynced (once per study).

How ``recover`` tells a complete slot from a partial one: PS3.10 7.1 leaves the 128-byte preamble to the
implementation, so the spool writes its own there: a magic string, the stream's length and a CRC-32 of
everything after the preamble. A slot is complete only if all three match; this holds whatever order the
file system writes blocks in after a power cut (zeros or a short file fail the check). The rest of the file
is the Part 10 stream exactly as built from what was received.

File names are salted hashes of the Study and SOP Instance UIDs: stable (a resend overwrites the same
file) and free of identifiers.

Receiver processes (``edge_node.ingest.receiver_process``) write into the same spool, each with a slot pool
of its own under ``spool/.pool/<name>`` (``Spool(..., pool_name=...)``), so no two processes ever hand out
the same slot. A receiver that starts (again, after one died) recovers its own pool as ``recover`` does
(``recover_own_slots``); the node's ``recover`` at start goes through every pool, so a slot left by a
receiver is never lost, whatever ``receive_processes`` says now.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import queue
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_node.errors import BadInstanceError, InstanceMismatchError, SpoolError, SpoolFullError
from edge_node.ingest.part10 import Header, file_meta, parse_header
from edge_node.ingest.slot_pool import POOL_BATCH, SlotPool, SpoolReserve
from edge_node.protocol.durable_file import fsync_directory
from edge_node.state.ingest_records import IngestRecords, InstanceRecord

__all__ = ["POOL_BATCH", "IncomingInstance", "Spool", "SpoolReceipt", "SpoolReserve"]

logger = logging.getLogger(__name__)

_PREAMBLE = 128
_MAGIC = b"FEDCLINIC-SPOOL1"
_MARK = struct.Struct("<16sQI")  # magic, stream length, CRC-32 of stream[128:]
_ENOSPC, _EDQUOT = 28, 122


@dataclass(frozen=True)
class SpoolReceipt:
    study_id: int
    path: Path
    size: int


def _marked(stream: bytes) -> bytes:
    """The spool's preamble for ``stream``: magic, length and CRC-32, so recovery can prove it complete."""
    view = memoryview(stream)
    mark = _MARK.pack(_MAGIC, len(stream), zlib.crc32(view[_PREAMBLE:]))
    return mark + bytes(_PREAMBLE - len(mark))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _spool_error(exc: OSError) -> SpoolError:
    if exc.errno in (_ENOSPC, _EDQUOT):
        return SpoolFullError(f"the spool's disk is full: {exc.strerror}")
    return SpoolError(f"cannot write to the spool: {exc.strerror}")


def _complete_length(data: bytes) -> int | None:
    """The length of the complete stream at the start of ``data`` (a slot may hold its reserve's zeros after
    it), or None when the spool's mark is missing or does not match what follows it."""
    if len(data) < _PREAMBLE + 4:
        return None
    magic, length, crc = _MARK.unpack_from(data)
    if magic != _MAGIC or not _PREAMBLE < length <= len(data):
        return None
    return length if crc == zlib.crc32(memoryview(data)[_PREAMBLE:length]) else None


def _is_complete(data: bytes) -> bool:
    return _complete_length(data) is not None


def _unused(slot: Path) -> bool:
    """A slot no instance was written into: empty, or only zeros where the preamble and ``DICM`` would be
    (a reserve slot). An instance's first write puts ``DICM`` at offset 128, so a slot with anything there
    was used: complete (its mark matches) or cut short by a crash."""
    with slot.open("rb") as f:
        head = f.read(_PREAMBLE + 4)
    return not head.strip(b"\0")


def _cut_to(path: Path, size: int) -> None:
    """A recorded spool file longer than its row says (a crash before ``IncomingInstance.settle``): cut the
    reserve zeros after its stream, if its mark agrees."""
    try:
        if path.stat().st_size <= size:
            return
        with path.open("rb") as f:
            head = f.read(_MARK.size)
        if len(head) == _MARK.size and _MARK.unpack(head)[:2] == (_MAGIC, size):
            os.truncate(path, size)
    except OSError as exc:
        logger.warning("spool recovery could not cut a file to its instance (%s)", exc.strerror)


def _cut(fd: int, size: int) -> None:
    """Cut a slot's reserve zeros after its ``size``-byte stream (a metadata change: not flushed here)."""
    if os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)


class _Cutter:
    """Cuts the reserve zeros after committed streams in a thread of its own, started at its first cut.

    The receive path only puts on a C queue and counts; the thread that cuts does the waking."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._cond = threading.Condition()

    def cut(self, fd: int, size: int) -> None:
        """Cut the file open as ``fd`` to ``size`` bytes, then close ``fd``."""
        with self._cond:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edge-spool-cut", daemon=True)
                self._thread.start()
        self._queue.put((fd, size))

    def wait(self) -> None:
        """Until every cut asked for so far is done."""
        with self._cond:
            while self._pending:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            fd, size = self._queue.get()
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                logger.warning("could not cut a spool file to its instance (%s); recovery will", exc.strerror)
            finally:
                os.close(fd)
                with self._cond:
                    self._pending -= 1
                    if not self._pending:
                        self._cond.notify_all()


class Spool:
    """Writes received instances durably under ``root`` and indexes them in the store."""

    def __init__(
        self,
        root: Path,
        records: IngestRecords,
        *,
        max_instance_bytes: int,
        min_free_bytes: int,
        pool_name: str | None = None,
        reserve: SpoolReserve | None = None,
    ) -> None:
        self.root = root
        self.records = records
        self.max_instance_bytes = max_instance_bytes
        self.min_free_bytes = min_free_bytes
        pools = root / ".pool"
        self._pool = SlotPool(pools / pool_name if pool_name else pools, reserve, min_free_bytes)
        self._cutter = _Cutter()
        try:
            if not self._pool.directory.is_dir():
                self._pool.directory.mkdir(parents=True, exist_ok=True)
                # The pool's own entry must be durable too: its slots' names are what a power cut keeps.
                fsync_directory(root)
                if pool_name:
                    fsync_directory(pools)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool at {root}: {exc}; make data_dir writable") from exc

    @contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        # A lock file, opened per use: flock is per open file, so each writer thread holds its own share,
        # and a purge in another process (the CLI) excludes them all.
        fd = os.open(self.root / ".write.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every write into the spool (in this process and others) while files are removed."""
        with self._flock(fcntl.LOCK_EX):
            yield

    @property
    def pool_dir(self) -> Path:
        return self._pool.directory

    @property
    def reserve(self) -> SpoolReserve:
        return self._pool.reserve

    @property
    def reserve_ready(self) -> int:
        """Slots of the reserve ready now (``edge_node.ingest.slot_pool``)."""
        return self._pool.primed

    def settled(self) -> None:
        """Until every committed instance of this process is cut to its length (``IncomingInstance.settle``):
        before its study goes to the worker."""
        self._cutter.wait()

    def start_reserve(self) -> None:
        """Keep the reserve of written-through slots in idle time (where instances are received)."""
        self._pool.start_reserve()

    def stop_reserve(self) -> None:
        self._pool.stop_reserve()

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        return (
            self.root
            / self.records.db.uid_hash(study_uid, 32)
            / f"{self.records.db.uid_hash(sop_instance_uid, 32)}.dcm"
        )

    def check_room(self, size: int) -> None:
        """Raise SpoolFullError when an instance of ``size`` bytes must be refused for lack of room."""
        if size > self.max_instance_bytes:
            raise SpoolFullError(
                f"instance of {size} bytes exceeds max_instance_bytes={self.max_instance_bytes}"
            )
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free - size < self.min_free_bytes:
            raise SpoolFullError(
                f"only {free} bytes free in the spool (min_free_bytes={self.min_free_bytes})"
            )

    def put(
        self,
        stream: bytes,
        *,
        calling_ae: str,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
    ) -> SpoolReceipt:
        """Make one Part 10 instance durable and record it; return only when it is on disk (fsync)."""
        self.check_room(len(stream))
        header = parse_header(stream)
        if expected_sop_class is not None and header.sop_class_uid != expected_sop_class:
            raise InstanceMismatchError("the data set's SOP Class UID differs from the C-STORE request's")
        if expected_sop_instance is not None and header.sop_instance_uid != expected_sop_instance:
            raise InstanceMismatchError("the data set's SOP Instance UID differs from the C-STORE request's")
        dest = self.path_for(header.study_uid, header.sop_instance_uid)
        with self._flock(fcntl.LOCK_SH):  # a purge waits until the file and its row are both there
            self._write_durably(dest, stream)
            study_id = self._record(header, dest, len(stream), calling_ae)
        return SpoolReceipt(study_id=study_id, path=dest, size=len(stream))

    def _record(self, header: Header, path: Path, size: int, calling_ae: str) -> int:
        record = InstanceRecord(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax=header.transfer_syntax,
            modality=header.modality,
            path=path,
            size=size,
            calling_ae=calling_ae,
        )
        study_id, superseded = self.records.record_instance(record)
        if superseded is not None:
            # The same SOP instance came again under another study: the new copy wins, the old file goes.
            superseded.unlink(missing_ok=True)
        return study_id

    def _write_durably(self, dest: Path, data: bytes) -> None:
        slot: Path | None = None
        try:
            slot = self._pool.take()
            fd = os.open(slot, os.O_WRONLY)
            try:
                _write_all(fd, _marked(data))
                _write_all(fd, memoryview(data)[_PREAMBLE:])
                # The one flush: data and size; the slot's name was made durable before it was handed out.
                os.fdatasync(fd)
                _cut(fd, len(data))
            finally:
                os.close(fd)
            self._place(slot, dest)
        except OSError as exc:
            if slot is not None:
                slot.unlink(missing_ok=True)
            raise _spool_error(exc) from exc
        finally:
            if slot is not None:
                self._pool.done()

    def _place(self, slot: Path, dest: Path) -> None:
        """Move a complete, fsynced slot to its durable name (step 4 of the module docstring)."""
        if not dest.parent.is_dir():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.root)  # the new study directory's entry (once per study)
        # No directory fsync: if a power cut loses this rename, the complete, checksummed instance is
        # still under the slot's durable name, and ``recover`` moves it here (see the module docstring).
        os.replace(slot, dest)

    def receive(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> IncomingInstance:
        """An instance about to arrive in fragments, written into a slot as they come (IncomingInstance)."""
        return IncomingInstance(self, file_meta(sop_class_uid, sop_instance_uid, transfer_syntax))

    def recover(self) -> tuple[int, int]:
        """At start, before the listener runs: drop partial writes, index complete files that have no row.

        Returns (partial files removed, files indexed again). Unreadable files without a row are removed.
        """
        sizes = self.records.spool_sizes()
        known = set(sizes)
        partial, indexed = self._recover_slots(self._pool.directory, known, adopt=True)
        # Receivers' pools: what a receiver left (complete or partial) is handled here; their empty slots
        # stay where they are, for the receiver that owns the pool.
        for pool in sorted(p for p in self._pool.directory.iterdir() if p.is_dir()):
            more_partial, more_indexed = self._recover_slots(pool, known, adopt=False)
            partial, indexed = partial + more_partial, indexed + more_indexed
        for study_dir in self.root.iterdir():
            if study_dir.name.startswith(".") or not study_dir.is_dir():
                continue
            for f in study_dir.iterdir():
                if f in sizes:
                    _cut_to(f, sizes[f])
                    continue
                if f in known:
                    continue
                try:
                    self._index(f, f.read_bytes())
                    indexed += 1
                except (BadInstanceError, OSError) as exc:
                    logger.warning("spool recovery removed an unreadable file: %s", exc)
                    f.unlink(missing_ok=True)
            if not any(study_dir.iterdir()):
                shutil.rmtree(study_dir, ignore_errors=True)
        if partial or indexed:
            logger.warning(
                "spool recovery: %d partial writes removed, %d files indexed again", partial, indexed
            )
        return partial, indexed

    def recover_own_slots(self) -> tuple[int, int]:
        """A receiver process at its start: its pool's slots, as ``recover`` handles them (while others run).

        Returns (partial slots removed, instances indexed again). A complete slot here was fsynced and maybe
        acknowledged (the receiver died before it was placed), so it is placed like any resend would be.
        """
        slots = sorted(self._pool.directory.glob("*.slot"))
        if all(_unused(slot) for slot in slots):
            self._pool.adopt(slots)
            return 0, 0
        with self._flock(fcntl.LOCK_SH):  # as for a new instance: a purge waits for the file and its row
            known = self.records.spool_paths()
            partial, indexed = self._recover_slots(self._pool.directory, known, adopt=True)
        if partial or indexed:
            logger.warning(
                "receiver pool recovery: %d partial writes removed, %d instances indexed again",
                partial,
                indexed,
            )
        return partial, indexed

    def _recover_slots(self, directory: Path, known: set[Path], *, adopt: bool) -> tuple[int, int]:
        """Slots in ``directory``: complete ones into place, partial ones away, empty ones back to the pool
        (``adopt``, the pool this spool hands out) or left for the pool's owner.

        A complete slot whose row exists (a power cut lost only its rename, or a receiver was killed between
        its row and its rename) is moved without recording it again, so its study does not get a new
        revision and run a second time.
        """
        empty: list[Path] = []
        partial = indexed = 0
        for slot in sorted(directory.glob("*.slot")):
            if _unused(slot):
                empty.append(slot)
                continue
            data = slot.read_bytes()
            length = _complete_length(data)
            if length is None:
                slot.unlink()  # cut short by the crash, hence never acknowledged
                partial += 1
                continue
            try:
                header = parse_header(data[:length])
            except BadInstanceError as exc:
                logger.warning("spool recovery removed an unreadable slot: %s", exc)
                slot.unlink()
                continue
            dest = self.path_for(header.study_uid, header.sop_instance_uid)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.root)
            os.truncate(slot, length)  # a reserve slot's zeros after the stream
            os.replace(slot, dest)
            fsync_directory(dest.parent)  # at start only, rare: make the move durable before indexing
            if dest not in known:
                self._record(header, dest, length, "(recovered)")
                known.add(dest)
                indexed += 1
        if partial or indexed:
            fsync_directory(directory)
        if adopt:
            self._pool.adopt(empty)
        return partial, indexed

    def _index(self, path: Path, stream: bytes) -> None:
        length = _complete_length(stream)
        if length is not None and length < len(stream):
            # A reserve slot in place without its row and without its cut: a crash between the rename and the
            # row (the cut comes after the response).
            os.truncate(path, length)
            stream = stream[:length]
        header = parse_header(stream)
        if path != self.path_for(header.study_uid, header.sop_instance_uid):
            raise BadInstanceError(f"{path.name} does not belong where it lies in the spool")
        self._record(header, path, len(stream), "(recovered)")


class IncomingInstance:
    """One instance received fragment by fragment straight into a spool slot, then made durable (``commit``)
    and placed (``settle``), or dropped.

    The native receive transport appends each P-DATA fragment as it arrives (the CRC of the spool's
    preamble computed on the way), so an instance is never held in memory; one larger than
    max_instance_bytes stops being written at the first fragment over the budget and is refused at the end.
    Errors do not raise here: they are kept and raised by ``commit``, where the listener turns every error
    into its status, so the transport only has to keep reading the sender's fragments.

    The stream in the slot is the same as ``Spool.put`` writes: the spool's preamble (written last, at
    offset 0, just before the one fsync: a slot cut short by a crash has none and is removed by
    ``recover``), ``DICM``, a File Meta group built from the request, then the data set as received.
    """

    def __init__(self, spool: Spool, prefix: bytes) -> None:
        self._spool = spool
        self._size = _PREAMBLE + len(prefix)
        self._crc = zlib.crc32(prefix)
        self._error: SpoolError | None = None
        self._slot: Path | None = None
        self._taken = False  # a slot was taken from the pool: ``SlotPool.done`` is owed, once
        self._fd = -1
        # A committed instance (flushed under its slot's name) until ``settle`` records and places it: its
        # header and calling AE title (its slot stays open: the cut of reserve zeros uses it).
        self._committed: tuple[Header, str] | None = None
        self._study_id: int | None = None  # ``settle`` recorded it (the rename may still be missing)
        try:
            spool.check_room(self._size)
            self._slot = spool._pool.take()
            self._taken = True
            self._fd = os.open(self._slot, os.O_RDWR)
            _write_all(self._fd, bytes(_PREAMBLE) + prefix)
        except SpoolError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(_spool_error(exc))

    @property
    def size(self) -> int:
        return self._size

    def append(self, fragment: memoryview) -> None:
        """Write one data fragment (after the ones before it); past the size budget, drop it."""
        self._size += len(fragment)
        if self._error is not None:
            return
        if self._size > self._spool.max_instance_bytes:
            self._fail(
                SpoolFullError(
                    f"instance of more than {self._spool.max_instance_bytes} bytes exceeds max_instance_bytes"
                )
            )
            return
        try:
            _write_all(self._fd, fragment)
        except OSError as exc:
            self._fail(_spool_error(exc))
            return
        self._crc = zlib.crc32(fragment, self._crc)

    def _fail(self, error: SpoolError) -> None:
        """Keep the first error for ``commit`` and give the slot back emptied: nothing more is written."""
        if self._error is None:
            self._error = error
        self.discard()

    def discard(self) -> None:
        """Drop what was written (an aborted transfer, a refused instance); the slot serves again."""
        slot, fd = self._slot, self._fd
        self._slot, self._fd = None, -1
        if fd >= 0:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                slot = None  # cannot empty it: leave it to ``recover`` (partial, never acknowledged)
            finally:
                os.close(fd)
        if slot is not None:
            self._spool._pool.give_back(slot)
        self._done()

    def _done(self) -> None:
        if self._taken:
            self._taken = False
            self._spool._pool.done()

    def commit(self, *, calling_ae: str, expected_sop_class: str, expected_sop_instance: str) -> None:
        """Check and flush the instance under its slot's durable name; return only when it is on disk.

        Raises SpoolFullError, SpoolError, BadInstanceError or InstanceMismatchError (the instance is then
        dropped), like ``Spool.put``. The caller answers the sender, then calls ``settle``, which places and
        records the instance (steps 3 to 5 of the module docstring).
        """
        try:
            if self._error is not None:
                raise self._error
            spool = self._spool
            spool.check_room(self._size)
            with mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ) as view:
                header = parse_header(view)  # type: ignore[arg-type]  # a read-only buffer, as bytes
            if header.sop_class_uid != expected_sop_class:
                raise InstanceMismatchError("the data set's SOP Class UID differs from the C-STORE request's")
            if header.sop_instance_uid != expected_sop_instance:
                raise InstanceMismatchError(
                    "the data set's SOP Instance UID differs from the C-STORE request's"
                )
            mark = _MARK.pack(_MAGIC, self._size, self._crc)
            try:
                os.pwrite(self._fd, mark, 0)
                # The one flush: data, size and preamble; the slot's name was made durable beforehand.
                # A data flush: the name needs nothing, and the size (the only metadata that matters) is
                # flushed with the data when it changed (the reserve's slots keep theirs: no journal wait).
                os.fdatasync(self._fd)
            except OSError as exc:
                raise _spool_error(exc) from exc
            self._committed = (header, calling_ae)
        except BaseException:
            self.discard()
            raise
        finally:
            self._done()

    def settle(self) -> SpoolReceipt | None:
        """After the sender has its response: record a committed instance, then move it into place.

        Returns its receipt, or None when nothing was committed (or it was settled already). Out of the
        sender's wait: the purge lock, the row (a SQLite transaction, shared with every receiving process)
        and the rename were a fifth of the time between an instance's last byte and its response (py-spy,
        four associations). Nothing acknowledged depends on them: a crash before they are done leaves a
        complete, flushed slot that ``recover`` places, and indexes unless its row was written. When they
        fail (a full or broken database, an I/O error) this raises SpoolError and keeps the instance as it
        is (a row once written is not written again), for another ``settle`` (``StorageSink`` tries again
        before it acknowledges anything else) or the next start's ``recover``.

        A reserve slot's zeros after the stream are cut by a thread of the spool's (``Spool.settled`` waits
        for it before a study goes to the worker): cutting frees blocks, ~0.8 ms on this project's disk
        (mounted with ``discard``). Not flushed: a file left uncut (a crash before the cut) still parses
        (pydicom reads the zeros as one empty element after the data set), and ``Spool.recover`` cuts it.
        The cut applies to the file written here, through its descriptor, never to whatever has its name
        now (a resend of the same instance placed meanwhile).
        """
        committed, slot, fd = self._committed, self._slot, self._fd
        if committed is None or slot is None:
            return None
        header, calling_ae = committed
        spool = self._spool
        dest = spool.path_for(header.study_uid, header.sop_instance_uid)
        try:
            with spool._flock(fcntl.LOCK_SH):  # a purge waits until the file and its row are both there
                if self._study_id is None:  # the row first: see steps 3 and 4 of the module docstring
                    self._study_id = spool._record(header, dest, self._size, calling_ae)
                study_id = self._study_id
                spool._place(slot, dest)
        except Exception as exc:
            raise SpoolError(f"an acknowledged instance could not be recorded and placed ({exc})") from exc
        self._committed, self._slot, self._fd = None, None, -1
        try:
            zeros_after = os.fstat(fd).st_size > self._size
        except OSError:
            zeros_after = False  # left uncut, which ``recover`` mends: recorded and placed is what counts
        if zeros_after:
            spool._cutter.cut(fd, self._size)  # closes fd
        else:
            os.close(fd)
        return SpoolReceipt(study_id=study_id, path=dest, size=self._size)
