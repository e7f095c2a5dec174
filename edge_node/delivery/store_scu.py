"""C-STORE SCU that delivers result files (SR, SC) to a DICOM destination over an association kept open.

Each C-STORE is a round of hand-offs between three threads (the caller's, pynetdicom's association loop and
its DUL loop, which polls the socket and sleeps ``_run_loop_delay`` between polls); under load every hand-off
also waits for the GIL. The link keeps those rounds short: the file's bytes go out as they are on disk
(pynetdicom's chunked sending: no decode and re-encode per object), the DUL polls every ``ACTIVE_DUL_DELAY_S``
while results flow and every ``RESTING_DUL_DELAY_S`` between batches (``pace(False)``), and pynetdicom's
association loop stays parked while the link holds the association (``ParkedLoop``): it takes no part in the
round trips, cannot take a response meant for ``send_c_store``, and costs no CPU while the association
lingers. The link does that loop's checks (``ParkedLoop.needs_loop``) before it uses or closes the
association.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, _config
from pynetdicom.status import code_to_category

from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.association_failure import why_not_established
from edge_node.delivery.association_loop import ParkedLoop, set_dul_delay
from edge_node.delivery.destination import Destination
from edge_node.errors import SendError
from edge_node.ingest.socket_options import NODELAY_HANDLERS

__all__ = ["RESULT_SOP_CLASSES", "StoreLink", "send_files"]

logger = logging.getLogger(__name__)

#: Result classes always proposed, so one association fits whatever the worker produced.
RESULT_SOP_CLASSES: tuple[UID, ...] = (
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
)
_PROPOSED = frozenset(
    (sop_class, syntax)
    for sop_class in RESULT_SOP_CLASSES
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
)

#: Seconds the DUL loop sleeps between socket polls while results are being sent (pynetdicom's default: 1 ms).
#: Each C-STORE waits on this poll for its response, so a short sleep shortens every round trip.
ACTIVE_DUL_DELAY_S = 0.0002
#: ... and while the association lingers between batches: 50 polls a second. The sender sets the active pace
#: when it is woken, before its batch wait (20 ms), so the first PDU of a batch rarely waits on this sleep.
RESTING_DUL_DELAY_S = 0.02


class StoreLink:
    """One open association to a destination, reused for every result file that is ready for it.

    ``store`` raises SendError naming the destination, the reason and the file; afterwards ``alive`` says
    whether the association survived (a refused object: yes; a lost or aborted association: no).
    """

    def __init__(self, dest: Destination, calling_ae: str, *, timeout: float = 30.0) -> None:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.connection_timeout = timeout
        # Every result class with every syntax results are written in, each pair its own context: one
        # association takes any result, and a peer that supports a file's syntax takes its bytes as they are.
        for sop_class in RESULT_SOP_CLASSES:
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                ae.add_requested_context(sop_class, syntax)
        self.dest = dest
        self._assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=list(NODELAY_HANDLERS)
        )
        if not self._assoc.is_established:
            raise SendError(why_not_established(self._assoc, dest, calling_ae, timeout))
        self._as_is = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in self._assoc.accepted_contexts
        }
        set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S)
        self._loop = ParkedLoop(self._assoc)

    @property
    def alive(self) -> bool:
        if self._loop.needs_loop():
            # The peer aborted, released or went away while the loop was paused: it ends the association now.
            self._loop.wake()
            return False
        return bool(self._assoc.is_established)

    def pace(self, busy: bool) -> None:
        """Busy: the DUL polls fast, results are coming. Not busy: it polls slowly while the link lingers."""
        set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S if busy else RESTING_DUL_DELAY_S)

    def store(self, f: ResultFile) -> None:
        """C-STORE one result file; Warning statuses (0xB000, 0xB007, 0xB006) count as stored."""
        where, name = self.dest.address, f.path.name
        if (UID(f.sop_class_uid), UID(f.transfer_syntax)) not in _PROPOSED:
            raise SendError(f"result file {name} is of a class or syntax results are never sent in")
        if not f.path.is_file():
            raise SendError(f"result file {name} is missing from the results directory; it cannot be sent")
        if self._loop.needs_loop():
            self._loop.wake()
            raise SendError(f"association with {where} was lost before sending {name}")
        set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S)
        # Process-wide pynetdicom setting, read at each send_c_store: a path is sent as its bytes on disk (no
        # decode and re-encode). The node's only C-STORE SCU is this link; result files carry their file meta.
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            if (f.sop_class_uid, f.transfer_syntax) in self._as_is:
                status = self._assoc.send_c_store(f.path)
            else:
                # The peer did not accept the file's own syntax (bytes cannot be converted): the decoded data
                # set goes instead, which pynetdicom re-encodes in a syntax that was accepted.
                status = self._assoc.send_c_store(dcmread(f.path))
        except ValueError as exc:  # no accepted presentation context for this class/syntax
            raise SendError(f"{where} accepted no presentation context for {name}: {exc}") from exc
        except (OSError, AttributeError, InvalidDicomError) as exc:  # unreadable or not a DICOM file
            raise SendError(f"result file {name} cannot be read ({type(exc).__name__})") from exc
        if not self._assoc.is_established and not status:
            raise SendError(f"association with {where} was lost while sending {name}")
        code = int(getattr(status, "Status", -1)) if status else -1
        if code == -1:
            self.close()  # no answer: the association's state is unknown, a new one is cleaner
            raise SendError(f"no C-STORE response from {where} for {name} (timeout or abort)")
        category = code_to_category(code)
        if category not in ("Success", "Warning"):
            comment = str(status.get("ErrorComment", "")) if status else ""
            raise SendError(
                f"{where} refused {name} ({UID(f.sop_class_uid).name}): status 0x{code:04X} {category}"
                + (f" - {comment}" if comment else "")
            )
        if category == "Warning":
            logger.info("%s stored %s with warning 0x%04X", where, name, code)

    def close(self) -> None:
        set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S)
        self._loop.end()


def send_files(
    files: Sequence[ResultFile],
    dest: Destination,
    calling_ae: str,
    *,
    timeout: float = 30.0,
) -> None:
    """Store every file at ``dest`` over one association (TCP_NODELAY on), checking each C-STORE status.

    Raises SendError naming the destination, the reason and the first file that failed (association refused
    or aborted, no accepted presentation context, or a failure/unknown status).
    """
    if not files:
        return
    missing = [f.path.name for f in files if not f.path.is_file()]
    if missing:
        raise SendError(f"result file {missing[0]} is missing from the results directory; it cannot be sent")
    link = StoreLink(dest, calling_ae, timeout=timeout)
    try:
        for f in files:
            link.store(f)
    finally:
        link.close()
    logger.info("sent %d result file(s) to %s", len(files), dest.address)
