"""The DICOM listener: a Storage SCP whose handlers spool, record and answer, and nothing more.

Two receive transports, chosen by ``ListenerConfig.transport`` (the ``receive_transport`` setting), share
everything above the network: the statuses, the policy, the bookkeeping of which studies an association
touched. ``native`` (``edge_node.ingest.native_transport``) reads each connection with one blocking thread
and writes every data fragment straight into a spool slot as it arrives; ``pynetdicom`` is the pynetdicom
3.0 server described below.

With pynetdicom, the C-STORE handler takes the data set exactly as received (no decode and re-encode), which
pynetdicom's chunked receive has written behind a File Meta header, makes it durable through the spool (one
fsync, see ``edge_node.ingest.spool``), and only then answers success. Everything slow (parsing pixels, the
model) happens in the worker, queued when the association is released. Every failure becomes a DICOM status
with a short comment for the sender, and a log line without identifiers; no exception reaches pynetdicom's
thread.

With the native transport, ``receive_processes`` > 0 moves the associations out of this process: the native
server here accepts and applies the limits, and hands each connection to one of that many receiver
processes (``edge_node.ingest.receiver_pool``), which run the same association code into the same spool and
database; this process then only learns when the worker should look again.

Every C-STORE's outcome becomes a status through ``edge_node.ingest.storage_sink`` (the table of statuses is
there), and every association's studies are queued or left to their quiet time there too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom import (
    _config as pynetdicom_config,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edge_node.ingest.native_transport import NativeServer, NativeSettings
from edge_node.ingest.pdu_limit import limit_pdus
from edge_node.ingest.peer_limit import PeerLimitedServer
from edge_node.ingest.poll_pacer import PollPacer
from edge_node.ingest.receiver_pool import ReceiverPool, ReceiverSpec
from edge_node.ingest.socket_options import NODELAY_HANDLERS
from edge_node.ingest.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from edge_node.ingest.spool import Spool, SpoolReceipt
from edge_node.ingest.storage_sink import STATUS_SUCCESS, StorageSink

__all__ = [
    "Listener",
    "ListenerConfig",
    "ReceiveTransport",
]

logger = logging.getLogger(__name__)

#: Seconds pynetdicom's DUL reactor sleeps when it finds nothing to do (pynetdicom's default: 1 ms). Every
#: C-STORE waits on this poll twice (the data set's last PDU, then our response), so a shorter sleep shortens
#: each round trip; measured with 300 CT slices: +8-26 % throughput for a receiver that writes nothing. The
#: price is CPU while an association is open and idle: ~17 % of a core instead of ~10 % (the association's
#: own 1 ms loop), for at most the network timeout; a closed association costs nothing.
DUL_LOOP_DELAY_S = 0.0002
#: ... and once an association has received nothing for a sweep (0.25 s): its association loop is then parked
#: and its DUL polls 10 times a second instead of 5,000 (``edge_node.ingest.poll_pacer``), and the first PDU
#: after a pause waits at most this long.
IDLE_DUL_LOOP_DELAY_S = 0.1


#: The listener's maximum PDU length by default. dcmtk senders (storescu, Orthanc) send PDUs of at most
#: 128 KiB whatever we allow: 6 per 512x512 CT slice from 128 KiB up, 34 at 16 KiB (dcmtk's and pynetdicom's
#: own default), and every PDU is a turn of pynetdicom's DUL loop and state machine. 1 MiB lets senders that
#: honour larger limits (pynetdicom) use few PDUs, while receiving one still costs at most a few MiB.
DEFAULT_MAX_PDU = 1024 * 1024

ReceiveTransport = Literal["native", "pynetdicom"]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # Error Comment is LO: at most 64 characters, and it must not carry identifiers.
    ds.ErrorComment = comment[:64]
    return ds


@dataclass(frozen=True)
class ListenerConfig:
    """The listener's part of the settings (separate, so tests can build one without a data dir)."""

    ae_title: str
    host: str
    port: int
    allowed_calling_aes: list[str] | None = None
    max_associations: int = 10
    #: Open connections one source address may hold (negotiated or not): a flood cannot starve the PACS.
    max_associations_per_peer: int = 4
    #: Seconds a connection may wait for its A-ASSOCIATE-RQ (and an association for release answers).
    acse_timeout: float = 10.0
    #: Seconds to wait for a DIMSE message inside an association (pynetdicom transport; the native one
    #: bounds every read by network_timeout).
    dimse_timeout: float = 30.0
    #: Seconds an association may stay idle on the network before it is aborted.
    network_timeout: float = 30.0
    #: Largest P-DATA-TF PDU accepted (announced in the A-ASSOCIATE-AC, enforced while receiving).
    max_pdu: int = DEFAULT_MAX_PDU
    #: Which receive transport runs under the handlers (see the module docstring).
    transport: ReceiveTransport = "native"
    #: Receiver processes the native transport hands connections to (0: every association is a thread of
    #: this process). The pynetdicom transport always receives in this process.
    receive_processes: int = 0


class Listener:
    """Accepts associations, C-ECHO and C-STORE; calls ``on_complete`` when the worker should look again
    (a release queued studies, a new study arrived, an association ended: ``StorageSink``)."""

    def __init__(self, config: ListenerConfig, spool: Spool, on_complete: Callable[[], None]) -> None:
        self.config = config
        self.spool = spool
        self._on_complete = on_complete
        self._server: PeerLimitedServer | None = None
        self._native: NativeServer | None = None
        self._ae = self._make_ae()
        self.sink = StorageSink(spool, on_complete)
        self._pacer = PollPacer(
            lambda: [] if self._server is None else self._server.active_associations,
            active_s=DUL_LOOP_DELAY_S,
            idle_s=IDLE_DUL_LOOP_DELAY_S,
        )

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        # Our maximum PDU length, announced to the sender (and enforced: ``edge_node.ingest.pdu_limit``).
        ae.maximum_pdu_size = self.config.max_pdu
        ae.maximum_associations = self.config.max_associations
        ae.acse_timeout = self.config.acse_timeout
        ae.dimse_timeout = self.config.dimse_timeout
        ae.network_timeout = self.config.network_timeout
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aes or [])
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when the config asked for 0."""
        server = self._native or self._server
        if server is None:
            raise RuntimeError("the listener is not running")
        host, port = server.server_address[:2]
        return str(host), int(port)

    @property
    def native_server(self) -> NativeServer | None:
        """The native transport's server while it runs (None with pynetdicom or when stopped)."""
        return self._native

    def open_connections(self, address: str) -> int:
        """Connections from ``address`` accepted and not yet closed, whichever transport runs."""
        if self._native is not None:
            return self._native.open_connections(address)
        if self._server is not None:
            return self._server.open_connections(address)
        return 0

    def start(self) -> tuple[str, int]:
        if self.config.transport == "native":
            return self._start_native()
        return self._start_pynetdicom()

    def _start_native(self) -> tuple[str, int]:
        config = self.config
        settings = NativeSettings(
            ae_title=config.ae_title,
            allowed_calling=list(config.allowed_calling_aes or []),
            max_associations=config.max_associations,
            per_peer=config.max_associations_per_peer,
            acse_timeout=config.acse_timeout,
            network_timeout=config.network_timeout,
            max_pdu=config.max_pdu,
        )
        receivers = None
        if config.receive_processes > 0:
            spec = ReceiverSpec.of(settings, self.spool)
            receivers = ReceiverPool(config.receive_processes, spec, on_studies=self._on_complete)
        server = NativeServer((config.host, config.port), settings, self.spool, self.sink, receivers)
        server.start()
        if receivers is None:  # receiving here: the reserve is this process's to keep
            self.spool.start_reserve()
        self._native = server
        host, port = self.address
        where = (
            f"{config.receive_processes} receiver processes" if config.receive_processes > 0 else "threads"
        )
        logger.info("DICOM listener %s on %s:%d (native transport, %s)", config.ae_title, host, port, where)
        return host, port

    def _start_pynetdicom(self) -> tuple[str, int]:
        # Receive each data set into a temporary file as its PDUs arrive instead of into memory: the
        # C-STORE handler then sees its size first and refuses one over max_instance_bytes without ever
        # reading it, so a 200 MB (or 20 GB) instance costs no memory. pynetdicom's switch is per process;
        # a node runs one listener.
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        handlers: list[evt.EventHandlerType] = [
            *NODELAY_HANDLERS,
            (evt.EVT_CONN_OPEN, limit_pdus(self.config.max_pdu)),
            (evt.EVT_CONN_OPEN, self._pacer.on_activity),
            (evt.EVT_DATA_RECV, self._pacer.on_activity),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._pacer.on_closed),
        ]
        server = cast(
            PeerLimitedServer,
            self._ae.make_server(
                (self.config.host, self.config.port),
                evt_handlers=handlers,
                server_class=PeerLimitedServer,
                per_peer=self.config.max_associations_per_peer,
            ),
        )
        # What AE.start_server(block=False) does, with the per-peer server class.
        self._ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
        self.spool.start_reserve()
        threading.Thread(target=server.serve_forever, name="edge-dicom-acceptor", daemon=True).start()
        self._server = server
        self._pacer.start()
        host, port = self.address
        logger.info("DICOM listener %s on %s:%d", self.config.ae_title, host, port)
        return host, port

    def stop(self) -> None:
        """Stop accepting and abort open associations (senders retry what was not acknowledged)."""
        self.spool.stop_reserve()
        if self._native is not None:
            native, self._native = self._native, None
            native.stop()
            logger.info("DICOM listener stopped")
            return
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()  # no new associations
        self._pacer.stop()
        # Abort only established associations: AE.shutdown() aborts every one, and an association already
        # closing (state Sta13, e.g. just rejected) then raises InvalidEventError in its pynetdicom thread.
        for assoc in server.active_associations:
            if assoc.is_established:
                assoc.abort()
        logger.info("DICOM listener stopped")

    # -- handlers: each one is guarded; an exception must never reach pynetdicom's association thread --------

    def _on_echo(self, event: Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Event) -> int | Dataset:
        calling = str(event.assoc.requestor.ae_title).strip()
        request = cast(C_STORE, event.request)

        def spool_it() -> SpoolReceipt:
            received = event.dataset_path
            # Before reading a byte of it: an instance too large (or a full disk) is refused here.
            self.spool.check_room(received.stat().st_size)
            # pynetdicom's file is already the Part 10 stream we keep: its File Meta (from the request's UIDs
            # and the context's transfer syntax) in front of the data set as received. Spooled as it is:
            # re-wrapping it cost two more copies of every instance for the same bytes.
            return self.spool.put(
                received.read_bytes(),
                calling_ae=calling,
                expected_sop_class=str(request.AffectedSOPClassUID),
                expected_sop_instance=str(request.AffectedSOPInstanceUID),
            )

        code, comment = self.sink.stored(id(event.assoc), calling, spool_it)
        return code if code == STATUS_SUCCESS else _status(code, comment)

    def _on_released(self, event: Event) -> None:
        self.sink.released(id(event.assoc))

    def _on_aborted(self, event: Event) -> None:
        self.sink.aborted(id(event.assoc))

    def _on_closed(self, event: Event) -> None:
        self.sink.closed(id(event.assoc))
