"""C-STORE SCU that delivers result files (SR, SC) to a DICOM destination over an association kept open."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
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
        # Every result class with every syntax results are written in: one association takes any result.
        for sop_class in RESULT_SOP_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.dest = dest
        self._assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=list(NODELAY_HANDLERS)
        )
        if not self._assoc.is_established:
            raise SendError(why_not_established(self._assoc, dest, calling_ae, timeout))

    @property
    def alive(self) -> bool:
        return bool(self._assoc.is_established)

    def store(self, f: ResultFile) -> None:
        """C-STORE one result file; Warning statuses (0xB000, 0xB007, 0xB006) count as stored."""
        where, name = self.dest.address, f.path.name
        if (UID(f.sop_class_uid), UID(f.transfer_syntax)) not in _PROPOSED:
            raise SendError(f"result file {name} is of a class or syntax results are never sent in")
        if not f.path.is_file():
            raise SendError(f"result file {name} is missing from the results directory; it cannot be sent")
        try:
            status = self._assoc.send_c_store(f.path)
        except ValueError as exc:  # no accepted presentation context for this class/syntax
            raise SendError(f"{where} accepted no presentation context for {name}: {exc}") from exc
        except (OSError, AttributeError) as exc:  # unreadable or not a DICOM file
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
