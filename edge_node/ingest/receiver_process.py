"""A receiver process: runs the DICOM associations the node hands it, into the node's spool and database.

Why: the node is one Python process, and with several associations at once their reader threads share one
interpreter lock; a PACS sending with four associations got little more than with one. The node's process
now only accepts (``edge_node.ingest.native_transport.NativeServer``) and hands each connection, by its file
descriptor, to one of ``receive_processes`` receivers (``edge_node.ingest.receiver_pool`` starts them, and
starts one again when it dies). Each receiver runs the same association code as the node would
(``Connection``: a thread per connection blocked in its socket read, each fragment written into a spool
slot) with its own slot pool (``spool/.pool/r<index>``) and its own connection to the SQLite database (WAL,
a busy timeout: writers of several processes wait for each other, briefly), so the durability rule is the
node's: an instance is fsynced under a durable name before its success status leaves, then placed and
recorded (``edge_node.ingest.spool``).

What the receiver asks of the node, over its control channel (``edge_node.ingest.receiver_channel``):
whether a negotiated association may count against ``max_associations`` (counted in the node across every
receiver), and it tells the node when a connection has ended (per-address limit) and when the worker
should look again. It dies with the node: the node's end of the channel closes (end-of-file here, then
every association is aborted) and the kernel also sends it SIGKILL when the node's thread that started it
ends (Linux ``PR_SET_PDEATHSIG``), so a node restarted after kill -9 never recovers a spool a receiver is
still writing.

Started by the pool as ``python -c <bootstrap>`` with the node's own ``sys.path`` (so it runs the very
code the node runs), never by forking the threaded node.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_node.ingest.native_transport import Connection, NativeSettings
from edge_node.ingest.receiver_channel import Channel, ChannelClosed
from edge_node.ingest.slot_pool import SpoolReserve
from edge_node.ingest.spool import Spool
from edge_node.ingest.storage_sink import StorageSink
from edge_node.ingest.upper_layer import ABORT_NOT_SPECIFIED, abort
from edge_node.log_privacy import install_log_privacy
from edge_node.state.database import Database
from edge_node.state.ingest_records import IngestRecords

__all__ = ["BOOTSTRAP", "LOG_FORMAT", "ChannelLogHandler", "Receiver", "ReceiverSpec", "main"]

logger = logging.getLogger(__name__)

#: The format of a receiver's log lines when the node is gone (they go to stderr then).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: What ``python -c`` runs: the node's sys.path first, then ``main`` (argv: path JSON, fd, node pid, index,
#: spec JSON).
BOOTSTRAP = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from edge_node.ingest.receiver_process import main; sys.exit(main(sys.argv[2:]))"
)
#: Seconds to finish (abort) the associations in hand when told to stop.
STOP_WAIT_S = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ReceiverSpec:
    """What a receiver needs to run associations into the node's spool; it travels as JSON on the argv."""

    settings: NativeSettings
    spool_root: str
    db_path: str
    max_instance_bytes: int
    min_free_bytes: int
    log_level: int
    #: Each receiver's reserve of written-through slots (``edge_node.ingest.slot_pool``).
    reserve_slots: int = 0
    slot_bytes: int = SpoolReserve().slot_bytes

    @classmethod
    def of(cls, settings: NativeSettings, spool: Spool) -> ReceiverSpec:
        """The spec for receivers of ``spool`` (its database, its limits, its reserve each) logging at the
        node's level."""
        return cls(
            settings=settings,
            spool_root=str(spool.root),
            db_path=str(spool.records.db.path),
            max_instance_bytes=spool.max_instance_bytes,
            min_free_bytes=spool.min_free_bytes,
            log_level=logging.getLogger().getEffectiveLevel(),
            reserve_slots=spool.reserve.slots,
            slot_bytes=spool.reserve.slot_bytes,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ReceiverSpec:
        data: dict[str, Any] = json.loads(text)
        return cls(**{**data, "settings": NativeSettings(**data["settings"])})


class ChannelLogHandler(logging.Handler):
    """Sends this process's log records to the node (``log`` messages), which emits them as its own.

    The privacy guard sits on this handler like on any other, so a record leaves this process with its
    message already withheld where it must be. Without the node (it is gone), a record goes to stderr.
    """

    #: Longest message and traceback text sent (a message longer than the channel allows would be lost).
    MAX_TEXT = 16 * 1024

    def __init__(self, channel: Channel, level: int) -> None:
        super().__init__(level)
        self._channel = channel
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            exc_text = record.exc_text
            if record.exc_info and not exc_text:
                exc_text = self.formatter.formatException(record.exc_info) if self.formatter else None
            self._channel.send(
                {
                    "op": "log",
                    "name": record.name,
                    "level": record.levelno,
                    "message": message[: self.MAX_TEXT],
                    "exc_text": exc_text[-self.MAX_TEXT :] if exc_text else None,
                    "func": record.funcName,
                    "created": record.created,
                }
            )
        except ChannelClosed:
            with contextlib.suppress(Exception):
                sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class Receiver:
    """The receiver process's side: the ``ConnectionHost`` of the connections the node hands over."""

    def __init__(self, settings: NativeSettings, spool: Spool, channel: Channel) -> None:
        self._settings = settings
        self._spool = spool
        self._channel = channel
        self._sink = StorageSink(spool, self._studies)
        self._lock = threading.Lock()
        self._connections: dict[int, tuple[Connection, threading.Thread]] = {}
        # Associations waiting for the node's answer to ``admit``: number -> (answered, [ok]).
        self._answers: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._stopping = False

    @property
    def settings(self) -> NativeSettings:
        return self._settings

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def sink(self) -> StorageSink:
        return self._sink

    def admit(self, connection: Connection) -> bool:
        answered, box = threading.Event(), list[bool]()
        with self._lock:
            if self._stopping:
                return False
            self._answers[connection.number] = (answered, box)
        try:
            self._channel.send({"op": "admit", "number": connection.number})
            wait = self._settings.acse_timeout
            if not answered.wait(wait):
                logger.warning("no answer from the node to an admission within %.0f s", wait)
        except ChannelClosed:
            pass
        finally:
            with self._lock:
                self._answers.pop(connection.number, None)
        connection.established = bool(box and box[0])
        return connection.established

    def forget(self, connection: Connection) -> None:
        with self._lock:
            self._connections.pop(connection.number, None)
        with contextlib.suppress(ChannelClosed):
            self._channel.send({"op": "ended", "number": connection.number})

    def _studies(self) -> None:
        with contextlib.suppress(ChannelClosed):
            self._channel.send({"op": "studies"})

    def serve(self) -> None:
        """Take connections and answers from the node until it says stop or is gone; then abort and return."""
        while True:
            try:
                message, sock = self._channel.receive()
            except ChannelClosed:
                break
            op = message.get("op")
            if op == "take" and sock is not None:
                self._take(sock, int(message["number"]), str(message["peer"]))
                continue
            if sock is not None:
                sock.close()
            if op == "admitted":
                self._answer(int(message["number"]), bool(message["ok"]))
            elif op == "stop":
                break
            else:
                logger.warning("ignored a control message the receiver does not know (%s)", op)
        self._stop()

    def _take(self, sock: socket.socket, number: int, peer: str) -> None:
        connection = Connection(self, sock, peer, number)
        thread = threading.Thread(target=connection.run, name="edge-dicom-association", daemon=True)
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._connections[number] = (connection, thread)
        thread.start()

    def _answer(self, number: int, ok: bool) -> None:
        with self._lock:
            waiting = self._answers.get(number)
        if waiting is not None:
            waiting[1].append(ok)
            waiting[0].set()

    def _stop(self) -> None:
        """Abort every association (the senders retry what was not acknowledged) and wait for the threads."""
        with self._lock:
            self._stopping = True
            held = list(self._connections.values())
            for answered, _ in self._answers.values():
                answered.set()  # no answer: not admitted
        for connection, _ in held:
            with contextlib.suppress(OSError):
                if connection.established:
                    connection.sock.sendall(abort(ABORT_NOT_SPECIFIED))
                connection.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_WAIT_S
        for _, thread in held:
            thread.join(max(0.0, deadline - time.monotonic()))


def _die_with_the_node(node_pid: int) -> None:
    """SIGKILL this process when the node's thread that started it ends (Linux); exit if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != node_pid:  # the node died before the line above took effect
        os._exit(0)


def main(argv: list[str]) -> int:
    """The receiver process (argv: channel fd, node pid, receiver index, spec JSON); see the module doc."""
    fd, node_pid, index, spec_json = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    _die_with_the_node(node_pid)
    spec = ReceiverSpec.from_json(spec_json)
    channel = Channel(socket.socket(fileno=fd))
    root = logging.getLogger()
    root.setLevel(spec.log_level)
    root.addHandler(ChannelLogHandler(channel, spec.log_level))
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    # No element value of an input reaches a log line: the guard on the handler, before a record leaves.
    install_log_privacy()
    # The node decides when a receiver ends (its stop message, or its death): a SIGTERM to the whole service
    # or a Ctrl-C to the terminal's process group reaches the node, which then stops its receivers in order.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        db = Database(Path(spec.db_path))
        spool = Spool(
            Path(spec.spool_root),
            IngestRecords(db),
            max_instance_bytes=spec.max_instance_bytes,
            min_free_bytes=spec.min_free_bytes,
            pool_name=f"r{index}",
            reserve=SpoolReserve(slots=spec.reserve_slots, slot_bytes=spec.slot_bytes),
        )
        spool.recover_own_slots()
    except Exception:
        logger.exception("receiver process %d cannot open the spool or the database", index)
        return 1
    receiver = Receiver(spec.settings, spool, channel)
    try:
        channel.send({"op": "ready"})
    except ChannelClosed:
        return 0
    spool.start_reserve()
    receiver.serve()
    spool.stop_reserve()
    channel.close()
    return 0
