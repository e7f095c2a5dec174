"""The native receive transport: one blocking reader per connection, PDUs and DIMSE parsed by hand.

Why: pynetdicom needs ~3.9 ms to receive a 512x512 CT slice while writing nothing (4 kB reads, two polling
reactors, a state machine and pydicom on every message), more than the whole budget of half of dcmtk's
storescp. Here each accepted connection gets one thread that blocks in ``recv_into``: an idle association
costs nothing (no polling), a busy one does no work but the PS3.8 framing. The acceptor state machine is
small because an SCP that only receives has few paths (PS3.8 9.2):

    Sta2 (connection open, ARTIM = acse_timeout) --A-ASSOCIATE-RQ--> AC (Sta6) or RJ (Sta13: close when
         the requestor closes, or at ARTIM)
    Sta6 --P-DATA-TF--> command fragments, then data fragments straight into a spool slot
         --A-RELEASE-RQ--> A-RELEASE-RP, close (the sender's studies are complete)
         --A-ABORT or EOF--> close (studies wait for quiet time)
         --anything else, a malformed PDU, or no PDU for network_timeout--> A-ABORT, close

Limits are those of the pynetdicom listener: connections per source address counted from accept to close
(over the limit: closed at once, one rate-limited log line), associations at once (over: A-ASSOCIATE-RJ
"local limit exceeded"), the maximum PDU announced and enforced before a PDU's body is read (P-DATA-TF:
max_pdu; any other PDU: ``MAX_CONTROL_PDU``), a command set bounded, an instance bounded by the spool's
max_instance_bytes while it arrives. Logs name the peer's address and AE titles, never a value of what
was received.

Where a connection runs: in a thread of this process (``NativeServer`` without receivers), or in a receiver
process the server hands it to (``receive_processes``; ``edge_node.ingest.receiver_process``), which runs
the same ``Connection`` and asks the server, which keeps the counts, to admit its association.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from edge_node.ingest.command_set import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    MAX_COMMAND_BYTES,
    REQUESTS_WITH_RESPONSES,
    Command,
    CommandError,
    parse_command,
    response,
)
from edge_node.ingest.negotiation import VERIFICATION, Accepted, negotiate
from edge_node.ingest.spool import IncomingInstance, Spool
from edge_node.ingest.upper_layer import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    HEADER,
    MAX_CONTROL_PDU,
    P_DATA_TF,
    PduError,
    abort,
    associate_ac,
    associate_rj,
    p_data,
    parse_associate_rq,
    pdvs,
    release_rp,
)

__all__ = [
    "AssociationSink",
    "Connection",
    "ConnectionHost",
    "HandedConnection",
    "NativeServer",
    "NativeSettings",
    "Receivers",
]

logger = logging.getLogger(__name__)

#: At most one refusal line per address in this many seconds: a flood must not flood the log too.
_LOG_EVERY_S = 10.0
#: Statuses the transport itself answers (PS3.7 C.4.2, C.5): no such SOP class on the context, an operation
#: this node does not perform, a command it cannot read.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_UNRECOGNIZED_OPERATION = 0x0211
STATUS_CANNOT_UNDERSTAND = 0xC000
_UID_CHARS = frozenset("0123456789.")


class AssociationSink(Protocol):
    """What the listener does with what the transport receives (``edge_node.ingest.listener``)."""

    def store(
        self, key: int, calling_ae: str, incoming: IncomingInstance, command: Command
    ) -> tuple[int, str]:
        """Make ``incoming`` durable and return (status, error comment or "")."""

    def settle(self, key: int, incoming: IncomingInstance) -> None:
        """After the response to ``store``: what is left to do with the instance (it must not raise)."""

    def released(self, key: int) -> None: ...

    def aborted(self, key: int) -> None: ...

    def closed(self, key: int) -> None: ...


@dataclass(frozen=True)
class NativeSettings:
    ae_title: str
    allowed_calling: list[str]
    max_associations: int
    per_peer: int
    #: Seconds a connection may take to send its A-ASSOCIATE-RQ (the ARTIM timer).
    acse_timeout: float
    #: Seconds any read inside an association may wait: an idle association, and a message whose next
    #: fragment does not come, are both aborted after it (the acceptor waits for no DIMSE reply, so
    #: pynetdicom's separate dimse_timeout has nothing to bound here).
    network_timeout: float
    max_pdu: int


class ConnectionHost(Protocol):
    """Who runs connections: the in-process ``NativeServer``, or a receiver process
    (``edge_node.ingest.receiver_process``) whose connections the node's server handed over."""

    @property
    def settings(self) -> NativeSettings: ...

    @property
    def spool(self) -> Spool: ...

    @property
    def sink(self) -> AssociationSink: ...

    def admit(self, connection: Connection) -> bool:
        """Count a negotiated association against max_associations; False: reject it (limit, stopping)."""

    def forget(self, connection: Connection) -> None:
        """The connection has closed (it counted against its address, and as an association if admitted)."""


@dataclass(eq=False)
class HandedConnection:
    """A connection the server handed to a receiver process: counted here until the receiver says it ended."""

    number: int
    peer: str
    established: bool = False


class Receivers(Protocol):
    """Receiver processes that run the connections the server accepts (``edge_node.ingest.receiver_pool``)."""

    def start(self, server: NativeServer) -> None:
        """Start every receiver and return once all of them are ready (raise when one cannot start)."""

    def hand(self, sock: socket.socket, connection: HandedConnection) -> bool:
        """Pass ``sock`` to a receiver; False when none can take it (the caller then closes it)."""

    def stop(self) -> None:
        """Abort the receivers' associations and end the processes."""


class _Closed(Exception):
    """The peer closed the connection (or it failed): end the association without another word."""


class _Abort(Exception):
    """A protocol error: send A-ABORT with ``reason``, then close."""

    def __init__(self, why: str, reason: int = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(why)
        self.reason = reason


def _timeout(sock: socket.socket, seconds: float) -> None:
    # A kernel receive/send timeout on a blocking socket: one recv is one system call (a Python socket
    # timeout would poll before every read).
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _valid_uid(text: str) -> bool:
    return 0 < len(text) <= 64 and set(text) <= _UID_CHARS


class Connection:
    """One accepted connection and, once negotiated, its association; run by its own thread.

    ``number`` names it to its host (a receiver process reports it to the node by this number).
    """

    def __init__(self, host: ConnectionHost, sock: socket.socket, peer: str, number: int = 0) -> None:
        self.server = host
        self.sock = sock
        self.peer = peer
        self.number = number
        self.established = False
        self.calling_ae = ""
        self._contexts: dict[int, tuple[str, str]] = {}
        self._buffer = bytearray(64 * 1024)
        # The message being received: its command fragments, then (C-STORE) its instance.
        self._command_bytes = bytearray()
        self._command: Command | None = None
        self._context_id = 0
        self._incoming: IncomingInstance | None = None
        self._discarding = False
        self._refusal: tuple[int, str] | None = None

    @property
    def key(self) -> int:
        return id(self)

    # -- reading -------------------------------------------------------------------------------------

    def _read_into(self, view: memoryview) -> None:
        while view:
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, TimeoutError) as exc:  # SO_RCVTIMEO expired
                raise TimeoutError from exc
            except OSError as exc:
                raise _Closed from exc
            if n == 0:
                raise _Closed
            view = view[n:]

    def _read_pdu(self, data_limit: int) -> tuple[int, memoryview]:
        header = memoryview(self._buffer)[: HEADER.size]
        self._read_into(header)
        pdu_type, _, length = HEADER.unpack_from(self._buffer)
        limit = data_limit if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
        if length > limit:
            logger.warning(
                "closed the connection from %s: a PDU of type 0x%02X claims %d bytes (limit %d)",
                self.peer,
                pdu_type,
                length,
                limit,
            )
            raise _Abort("PDU too long", ABORT_INVALID_PARAMETER)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._read_into(body)
        return pdu_type, body

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Closed from exc

    # -- the association ------------------------------------------------------------------------------

    def run(self) -> None:
        settings = self.server.settings
        outcome = "closed"
        try:
            _timeout(self.sock, settings.acse_timeout)  # ARTIM: the request must come within it
            try:
                if not self._associate():
                    return
                _timeout(self.sock, settings.network_timeout)
                outcome = self._serve()
            except TimeoutError:
                if self.established:  # else ARTIM expired: the connection just closes
                    logger.info("aborted an association from %s: idle beyond the network timeout", self.peer)
                    outcome = "aborted"
                    with contextlib.suppress(_Closed):
                        self._send(abort(ABORT_NOT_SPECIFIED))
            except _Abort as exc:
                logger.warning("aborted the association from %s: %s", self.peer, exc)
                outcome = "aborted"
                with contextlib.suppress(_Closed):
                    self._send(abort(exc.reason))
            except _Closed:
                pass
        except Exception:
            logger.exception("unexpected error on the association from %s", self.peer)
            outcome = "aborted"
            with contextlib.suppress(_Closed):
                self._send(abort(ABORT_NOT_SPECIFIED))
        finally:
            self._drop_message()
            self._end(outcome)

    def _end(self, outcome: str) -> None:
        sink = self.server.sink
        try:
            if self.established:
                if outcome == "released":
                    sink.released(self.key)
                elif outcome == "aborted":
                    sink.aborted(self.key)
            sink.closed(self.key)
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.server.forget(self)

    def _associate(self) -> bool:
        settings = self.server.settings
        pdu_type, body = self._read_pdu(MAX_CONTROL_PDU)
        if pdu_type != A_ASSOCIATE_RQ:
            raise _Abort("the first PDU is not an association request")
        try:
            request = parse_associate_rq(bytes(body))
        except PduError as exc:
            raise _Abort(str(exc), ABORT_INVALID_PARAMETER) from None
        self.calling_ae = request.calling_ae
        outcome = negotiate(request, settings.ae_title, settings.allowed_calling)
        if not isinstance(outcome, Accepted):
            logger.info(
                "rejected an association from %s (%s): %s", self.peer, request.calling_ae, outcome.why
            )
            self._send(associate_rj(outcome.result, outcome.source, outcome.reason))
            self._await_close()
            return False
        if not self.server.admit(self):
            logger.warning(
                "rejected an association from %s: %d associations open (limit)",
                self.peer,
                settings.max_associations,
            )
            self._send(associate_rj(2, 3, 2))  # transient, presentation provider, local limit exceeded
            self._await_close()
            return False
        self._contexts = outcome.contexts
        self._send(associate_ac(request, outcome.results, settings.max_pdu))
        return True

    def _await_close(self) -> None:
        """Sta13 (PS3.8 9.2, AE-8): after an A-ASSOCIATE-RJ the requestor closes the connection; wait for
        that, ARTIM (``acse_timeout``) at most, discarding whatever arrives. Closing at once raced the
        reject: a requestor could see the connection go before it had read why."""
        deadline = time.monotonic() + self.server.settings.acse_timeout
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(4096):
                    return
            except OSError:  # the kernel's receive timeout (ARTIM), or the peer reset the connection
                return

    def _serve(self) -> str:
        max_pdu = self.server.settings.max_pdu
        while True:
            pdu_type, body = self._read_pdu(max_pdu)
            if pdu_type == P_DATA_TF:
                try:
                    for context_id, control, fragment in pdvs(body):
                        self._fragment(context_id, control, fragment)
                except PduError as exc:
                    raise _Abort(str(exc), ABORT_INVALID_PARAMETER) from None
            elif pdu_type == A_RELEASE_RQ:
                self._drop_message()
                self._send(release_rp())
                return "released"
            elif pdu_type == A_ABORT:
                return "aborted"
            else:
                raise _Abort(f"unexpected PDU of type 0x{pdu_type:02X} in an association")

    # -- DIMSE messages -------------------------------------------------------------------------------

    def _fragment(self, context_id: int, control: int, fragment: memoryview) -> None:
        if context_id not in self._contexts:
            raise _Abort("a PDV names a presentation context that was not accepted", ABORT_INVALID_PARAMETER)
        last = bool(control & 2)
        if control & 1:
            if self._command is not None:
                raise _Abort("a command fragment arrived while a data set was expected")
            if len(self._command_bytes) + len(fragment) > MAX_COMMAND_BYTES:
                raise _Abort("a command set longer than the limit", ABORT_INVALID_PARAMETER)
            self._command_bytes += fragment
            if last:
                self._command_complete(context_id)
            return
        if self._command is None or context_id != self._context_id:
            raise _Abort("a data fragment arrived without its command")
        if self._incoming is not None:
            self._incoming.append(fragment)
        if last:
            self._data_set_complete()

    def _command_complete(self, context_id: int) -> None:
        raw = bytes(self._command_bytes)
        self._command_bytes.clear()
        try:
            command = parse_command(raw)
        except CommandError as exc:
            raise _Abort(str(exc), ABORT_INVALID_PARAMETER) from None
        abstract, transfer_syntax = self._contexts[context_id]
        field = command.command_field
        if field == C_STORE_RQ:
            refusal = self._store_refusal(command, abstract)
            if not command.has_data_set:
                self._answer(context_id, command, refusal or (STATUS_CANNOT_UNDERSTAND, "no data set"))
                return
            self._command, self._context_id, self._refusal = command, context_id, refusal
            if refusal is None:
                self._incoming = self.server.spool.receive(
                    command.affected_sop_class, command.affected_sop_instance, transfer_syntax
                )
            return
        if command.has_data_set:
            # Any other request with a data set: read and drop it, then answer as below.
            self._command, self._context_id, self._refusal = command, context_id, None
            return
        self._answer_other(context_id, command, abstract)

    def _store_refusal(self, command: Command, abstract: str) -> tuple[int, str] | None:
        if command.affected_sop_class != abstract or abstract == VERIFICATION:
            return STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted on this context"
        if not _valid_uid(command.affected_sop_instance):
            return STATUS_CANNOT_UNDERSTAND, "the request's SOP Instance UID is not valid"
        return None

    def _answer_other(self, context_id: int, command: Command, abstract: str) -> None:
        field = command.command_field
        if field == C_ECHO_RQ:
            ok = abstract == VERIFICATION
            self._answer(context_id, command, (0x0000, "") if ok else (STATUS_SOP_CLASS_NOT_SUPPORTED, ""))
        elif field in REQUESTS_WITH_RESPONSES:
            self._answer(context_id, command, (STATUS_UNRECOGNIZED_OPERATION, "operation not supported"))
        elif field != C_CANCEL_RQ:
            # A response, or a command field DICOM does not define: nothing to answer it with.
            raise _Abort("a command this node cannot answer", ABORT_INVALID_PARAMETER)
        # C-CANCEL-RQ: nothing to cancel, and it has no response.

    def _data_set_complete(self) -> None:
        command, context_id = self._command, self._context_id
        incoming, refusal = self._incoming, self._refusal
        self._command, self._incoming, self._refusal = None, None, None
        assert command is not None
        if command.command_field != C_STORE_RQ:
            self._answer_other(context_id, command, self._contexts[context_id][0])
            return
        if incoming is None:
            self._answer(context_id, command, refusal or (STATUS_CANNOT_UNDERSTAND, ""))
            return
        try:
            self._answer(
                context_id, command, self.server.sink.store(self.key, self.calling_ae, incoming, command)
            )
        finally:
            self.server.sink.settle(self.key, incoming)  # after the response, out of the sender's wait

    def _answer(self, context_id: int, command: Command, status: tuple[int, str]) -> None:
        self._send(p_data(context_id, True, True, response(command, status[0], status[1] or None)))

    def _drop_message(self) -> None:
        if self._incoming is not None:
            self._incoming.discard()
        self._command, self._incoming, self._refusal = None, None, None
        self._command_bytes.clear()


class NativeServer:
    """Accepts connections and runs each in a thread of its own, or hands it to a receiver process.

    Without ``receivers`` every connection runs here (see the module docstring). With them
    (``receive_processes`` > 0, ``edge_node.ingest.receiver_pool``) this process only accepts: it applies
    the per-address limit at accept, hands the socket to a receiver process, answers that process when the
    association asks to be admitted (max_associations, counted here across every receiver) and counts the
    connection until the receiver reports its end (or dies, which ends its connections).
    """

    def __init__(
        self,
        address: tuple[str, int],
        settings: NativeSettings,
        spool: Spool,
        sink: AssociationSink,
        receivers: Receivers | None = None,
    ) -> None:
        self._settings = settings
        self._spool = spool
        self._sink = sink
        self._receivers = receivers
        self._lock = threading.Lock()
        self._connections: set[Connection | HandedConnection] = set()
        self._numbers = itertools.count(1)
        self._established = 0
        self._refused_logged: dict[str, float] = {}
        self._unhanded_logged = -_LOG_EVERY_S
        self._listening = socket.create_server(address, backlog=128)
        self.server_address: tuple[str, int] = self._listening.getsockname()[:2]
        self._acceptor: threading.Thread | None = None
        self._stopping = False

    @property
    def settings(self) -> NativeSettings:
        return self._settings

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def sink(self) -> AssociationSink:
        return self._sink

    @property
    def receivers(self) -> Receivers | None:
        """The receiver processes connections are handed to (None: every connection runs here)."""
        return self._receivers

    def start(self) -> None:
        """Start the receivers (if any; they are ready when this returns), then accept."""
        if self._receivers is not None:
            try:
                self._receivers.start(self)
            except BaseException:
                self._listening.close()
                raise
        self._acceptor = threading.Thread(target=self._accept_loop, name="edge-dicom-acceptor", daemon=True)
        self._acceptor.start()

    def open_connections(self, address: str) -> int:
        """Connections from ``address`` that are accepted and not yet closed (here or in a receiver)."""
        with self._lock:
            return sum(c.peer == address for c in self._connections)

    @property
    def established(self) -> int:
        """Associations admitted and not yet closed, here and in every receiver."""
        with self._lock:
            return self._established

    @property
    def connections(self) -> list[Connection | HandedConnection]:
        with self._lock:
            return list(self._connections)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, address = self._listening.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            self._take(sock, str(address[0]))

    def _take(self, sock: socket.socket, peer: str) -> None:
        connection: Connection | HandedConnection
        with self._lock:
            count = sum(c.peer == peer for c in self._connections)
            if count >= self.settings.per_peer:
                now = time.monotonic()
                log = now - self._refused_logged.get(peer, 0.0) >= _LOG_EVERY_S
                if log:
                    self._refused_logged[peer] = now
                refused = True
            else:
                refused = log = False
                number = next(self._numbers)
                if self._receivers is None:
                    connection = Connection(self, sock, peer, number)
                else:
                    connection = HandedConnection(number, peer)
                self._connections.add(connection)
        if refused:
            sock.close()
            if log:
                logger.warning(
                    "refused connections from %s: %d already open from that address (limit %d)",
                    peer,
                    count,
                    self.settings.per_peer,
                )
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            logger.warning("could not set TCP_NODELAY on an association socket: %s", exc)
        if isinstance(connection, Connection):
            threading.Thread(target=connection.run, name="edge-dicom-association", daemon=True).start()
            return
        assert self._receivers is not None
        try:
            if not self._receivers.hand(sock, connection):
                self.forget(connection)
                now = time.monotonic()
                if now - self._unhanded_logged >= _LOG_EVERY_S:  # a sender retrying must not flood the log
                    self._unhanded_logged = now
                    logger.warning("closed a connection from %s: no receiver process can take it now", peer)
        finally:
            sock.close()  # the receiver holds its own descriptor of the connection now

    def admit(self, connection: Connection | HandedConnection) -> bool:
        with self._lock:
            if (
                self._established >= self.settings.max_associations
                or self._stopping
                or connection not in self._connections
            ):
                return False
            if not connection.established:
                self._established += 1
                connection.established = True
            return True

    def forget(self, connection: Connection | HandedConnection) -> None:
        with self._lock:
            if connection not in self._connections:
                return
            self._connections.discard(connection)
            if connection.established:
                self._established -= 1

    def stop(self) -> None:
        """Stop accepting; abort open associations (senders retry what was not acknowledged)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listening.shutdown(socket.SHUT_RDWR)
        self._listening.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        for connection in self.connections:
            if not isinstance(connection, Connection):
                continue
            with contextlib.suppress(OSError):
                if connection.established:
                    connection.sock.sendall(abort(ABORT_NOT_SPECIFIED))
                connection.sock.shutdown(socket.SHUT_RDWR)
        if self._receivers is not None:
            self._receivers.stop()
