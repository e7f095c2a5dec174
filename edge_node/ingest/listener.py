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

Statuses sent (PS3.4 B.2.3, PS3.7 C):

=========  =====================================================================================
0x0000     success: on disk (fsync) and recorded
0xA700     refused, out of resources: instance larger than max_instance_bytes, disk (nearly) full
0xA701     refused, out of resources: the spool cannot be written (I/O error, data_dir unwritable)
0xA900     error, data set does not match SOP class: SOP Class/Instance UID differ from the request
0xC000     error, cannot understand: the data set cannot be parsed, or a mandatory UID (study, series,
           instance) is missing or invalid
0x0110     processing failure: anything unexpected (a bug), logged with a traceback
=========  =====================================================================================
"""

from __future__ import annotations

import logging
import threading
import time
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

from edge_node.errors import BadInstanceError, InstanceMismatchError, SpoolError, SpoolFullError
from edge_node.ingest.command_set import Command
from edge_node.ingest.native_transport import NativeServer, NativeSettings
from edge_node.ingest.pdu_limit import limit_pdus
from edge_node.ingest.peer_limit import PeerLimitedServer
from edge_node.ingest.poll_pacer import PollPacer
from edge_node.ingest.socket_options import NODELAY_HANDLERS
from edge_node.ingest.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from edge_node.ingest.spool import IncomingInstance, Spool, SpoolReceipt

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SPOOL_FAILURE",
    "STATUS_SUCCESS",
    "Listener",
    "ListenerConfig",
    "ReceiveTransport",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SPOOL_FAILURE = 0xA701
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

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


class Listener:
    """Accepts associations, C-ECHO and C-STORE; calls ``on_complete`` when a sender releases."""

    def __init__(self, config: ListenerConfig, spool: Spool, on_complete: Callable[[], None]) -> None:
        self.config = config
        self.spool = spool
        self._on_complete = on_complete
        self._server: PeerLimitedServer | None = None
        self._native: NativeServer | None = None
        self._ae = self._make_ae()
        # Studies touched by each open association, queued together when it is released.
        self._touched: dict[int, set[int]] = {}
        self._touched_lock = threading.Lock()
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
        server = NativeServer((config.host, config.port), settings, self.spool, self)
        server.start()
        self._native = server
        host, port = self.address
        logger.info("DICOM listener %s on %s:%d (native transport)", config.ae_title, host, port)
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
        threading.Thread(target=server.serve_forever, name="edge-dicom-acceptor", daemon=True).start()
        self._server = server
        self._pacer.start()
        host, port = self.address
        logger.info("DICOM listener %s on %s:%d", self.config.ae_title, host, port)
        return host, port

    def stop(self) -> None:
        """Stop accepting and abort open associations (senders retry what was not acknowledged)."""
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

        code, comment = self._stored(id(event.assoc), calling, spool_it)
        return code if code == STATUS_SUCCESS else _status(code, comment)

    def _stored(self, key: int, calling: str, spool_it: Callable[[], SpoolReceipt]) -> tuple[int, str]:
        """Run ``spool_it`` and turn its outcome into (status, error comment): every transport's C-STORE."""
        t0 = time.perf_counter()
        try:
            receipt = spool_it()
        except SpoolFullError as exc:
            logger.warning("refused an instance from %s: %s", calling, exc)
            return STATUS_OUT_OF_RESOURCES, "refused: out of resources"
        except SpoolError as exc:
            logger.error("could not spool an instance from %s: %s", calling, exc)
            return STATUS_SPOOL_FAILURE, "refused: cannot store the instance now"
        except InstanceMismatchError as exc:
            logger.warning("rejected an instance from %s: %s", calling, exc)
            return STATUS_MISMATCH, "data set does not match the request"
        except BadInstanceError as exc:
            logger.warning("rejected an instance from %s: %s", calling, exc)
            return STATUS_CANNOT_UNDERSTAND, str(exc)
        except Exception:
            logger.exception("unexpected error while storing an instance from %s", calling)
            return STATUS_PROCESSING_FAILURE, "internal error; see the edge node log"
        with self._touched_lock:
            self._touched.setdefault(key, set()).add(receipt.study_id)
        logger.debug(
            "spooled %d bytes from %s in %.1f ms", receipt.size, calling, (time.perf_counter() - t0) * 1000
        )
        return STATUS_SUCCESS, ""

    # -- the native transport's sink (``edge_node.ingest.native_transport.AssociationSink``) ---------------

    def store(
        self, key: int, calling_ae: str, incoming: IncomingInstance, command: Command
    ) -> tuple[int, str]:
        return self._stored(
            key,
            calling_ae,
            lambda: incoming.commit(
                calling_ae=calling_ae,
                expected_sop_class=command.affected_sop_class,
                expected_sop_instance=command.affected_sop_instance,
            ),
        )

    def released(self, key: int) -> None:
        self._complete(self._take(key))

    def aborted(self, key: int) -> None:
        self._waiting(self._take(key))

    def closed(self, key: int) -> None:
        self._take(key)

    def _take(self, key: int) -> set[int]:
        with self._touched_lock:
            return self._touched.pop(key, set())

    def _on_released(self, event: Event) -> None:
        self._complete(self._take(id(event.assoc)))

    def _complete(self, studies: set[int]) -> None:
        try:
            if studies:
                queued = self.spool.records.mark_complete(sorted(studies))
                logger.info("association released: %d studies complete, %d queued", len(studies), queued)
                self._on_complete()
        except Exception:
            # The studies stay RECEIVED and become ready after quiet_seconds; nothing is lost.
            logger.exception("could not queue the studies of a released association")

    def _on_aborted(self, event: Event) -> None:
        # An aborted association may be retried by the sender, so its studies are not complete yet: they wait
        # for quiet_seconds without a new instance (the worker's timer), like studies whose sender vanished.
        self._waiting(self._take(id(event.assoc)))

    def _waiting(self, studies: set[int]) -> None:
        if studies:
            logger.info("association aborted: %d studies wait for quiet time", len(studies))

    def _on_closed(self, event: Event) -> None:
        # Drop the bookkeeping of connections that ended without release or abort (peer vanished).
        self._take(id(event.assoc))
