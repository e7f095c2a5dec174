"""C-STORE SCU that delivers result files (SR, SC) to a DICOM destination over an association kept open.

Each C-STORE is a round of hand-offs between three threads (the caller's, pynetdicom's association loop and
its DUL loop, which polls the socket and sleeps ``_run_loop_delay`` between polls); under load every hand-off
also waits for the GIL. The link keeps those rounds short: the file's bytes go out as they are on disk
(pynetdicom's chunked sending: no decode and re-encode per object), the DUL polls every ``ACTIVE_DUL_DELAY_S``
while results flow and every ``RESTING_DUL_DELAY_S`` between batches (``pace(False)``), and pynetdicom's
association loop stays paused while the link holds the association: it takes no part in the round trips and
costs no CPU while the association lingers. The link does that loop's checks itself (abort, release request,
ended DUL, network timeout) before it uses or closes the association.
"""

from __future__ import annotations

import logging
import threading
import time
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
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.association_failure import why_not_established
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


def _set_dul_delay(assoc: Association, seconds: float) -> None:
    # ``_run_loop_delay`` is pynetdicom 3.0's documented knob ("Controls the minimum delay between loops"),
    # private, hence pinned (pynetdicom<3.1); without it only the speed changes, never correctness.
    if hasattr(assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = seconds


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
        _set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S)
        self._parked: threading.Event | None = None
        self._park_its_loop()

    def _park_its_loop(self) -> None:
        """Take pynetdicom's association loop out of every C-STORE round trip while this link holds it.

        ``send_c_store`` clears ``_reactor_checkpoint``, waits (polling every 0.1 ms) until the loop paused
        on it, and sets it again when the response is in: per object, two more threads to wake, each waiting
        for the GIL under load. Here the loop is paused once, on its own event, and ``send_c_store`` is given
        a separate event to clear and set: the loop stays paused, and the link does its checks
        (``_needs_its_loop``) before it uses or closes the association. Should the loop look the attribute up
        again before it waits, it pauses on the new event and behaves as without the link's help.
        """
        assoc = self._assoc
        checkpoint = assoc._reactor_checkpoint
        checkpoint.clear()
        deadline = time.monotonic() + 1.0
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0001)
        if not assoc._is_paused:
            checkpoint.set()  # the loop did not pause (it may be ending): leave it as pynetdicom runs it
            return
        self._parked = checkpoint
        assoc._reactor_checkpoint = threading.Event()

    def _wake_its_loop(self) -> None:
        parked, self._parked = self._parked, None
        if parked is None:
            return
        given = self._assoc._reactor_checkpoint
        self._assoc._reactor_checkpoint = parked
        parked.set()
        given.set()  # in case the loop paused on the given event after all

    def _needs_its_loop(self) -> bool:
        """True when pynetdicom's association loop has work that came without our asking."""
        assoc = self._assoc
        return bool(
            assoc.is_aborted
            or assoc.is_released
            or not assoc.dul.is_alive()
            or assoc.dul.idle_timer_expired()
            or assoc.acse.is_aborted()
            or assoc.acse.is_release_requested()
        )

    @property
    def alive(self) -> bool:
        if self._needs_its_loop():
            # The peer aborted, released or went away while the loop was paused: it ends the association now.
            self._wake_its_loop()
            return False
        return bool(self._assoc.is_established)

    def pace(self, busy: bool) -> None:
        """Busy: the DUL polls fast, results are coming. Not busy: it polls slowly while the link lingers."""
        _set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S if busy else RESTING_DUL_DELAY_S)

    def store(self, f: ResultFile) -> None:
        """C-STORE one result file; Warning statuses (0xB000, 0xB007, 0xB006) count as stored."""
        where, name = self.dest.address, f.path.name
        if (UID(f.sop_class_uid), UID(f.transfer_syntax)) not in _PROPOSED:
            raise SendError(f"result file {name} is of a class or syntax results are never sent in")
        if not f.path.is_file():
            raise SendError(f"result file {name} is missing from the results directory; it cannot be sent")
        if self._needs_its_loop():
            self._wake_its_loop()
            raise SendError(f"association with {where} was lost before sending {name}")
        _set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S)
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
        gone = self._needs_its_loop()
        self._wake_its_loop()
        _set_dul_delay(self._assoc, ACTIVE_DUL_DELAY_S)
        if gone:
            self._assoc.abort()  # gone or going: an A-RELEASE would only wait for an answer that never comes
            return
        if self._assoc.is_established:
            self._assoc.release()
        if self._assoc.is_established:
            self._assoc.abort()


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
