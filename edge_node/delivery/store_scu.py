"""C-STORE SCU that delivers result files (SR, SC) to a DICOM destination, one association per call."""

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

__all__ = ["send_files"]

logger = logging.getLogger(__name__)

#: Result classes always proposed, so one association fits whatever the worker produced.
RESULT_SOP_CLASSES: tuple[UID, ...] = (
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
)
_MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


def send_files(
    files: Sequence[ResultFile],
    dest: Destination,
    calling_ae: str,
    *,
    timeout: float = 30.0,
) -> None:
    """Store every file at ``dest`` over one association (TCP_NODELAY on), checking each C-STORE status.

    The presentation contexts come from what each ResultFile says of itself, not from reading the files.
    Raises SendError naming the destination, the reason and the first file that failed (association refused
    or aborted, no accepted presentation context, or a failure/unknown status). Warning statuses (0xB000,
    0xB007, 0xB006) count as stored: the destination kept the object.
    """
    if not files:
        return
    missing = [f.path.name for f in files if not f.path.is_file()]
    if missing:
        raise SendError(f"result file {missing[0]} is missing from the results directory; it cannot be sent")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    contexts: set[tuple[UID, UID]] = {(UID(f.sop_class_uid), UID(f.transfer_syntax)) for f in files}
    contexts |= {(sop_class, ExplicitVRLittleEndian) for sop_class in RESULT_SOP_CLASSES}
    classes = sorted({c for c, _ in contexts})
    if len(classes) > _MAX_CONTEXTS:
        raise SendError(
            f"{len(classes)} SOP classes in one send exceed the 128 presentation contexts of DICOM"
        )
    for sop_class in classes:
        syntaxes = sorted(
            {ts for c, ts in contexts if c == sop_class} | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        )
        ae.add_requested_context(sop_class, syntaxes)

    where = dest.address
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=list(NODELAY_HANDLERS))
    if not assoc.is_established:
        raise SendError(why_not_established(assoc, dest, calling_ae, timeout))
    try:
        for f in files:
            name = f.path.name
            try:
                status = assoc.send_c_store(f.path)
            except ValueError as exc:  # no accepted presentation context for this class/syntax
                raise SendError(f"{where} accepted no presentation context for {name}: {exc}") from exc
            except (OSError, AttributeError) as exc:  # unreadable or not a DICOM file
                raise SendError(f"result file {name} cannot be read ({type(exc).__name__})") from exc
            if not assoc.is_established and not status:
                raise SendError(f"association with {where} was lost while sending {name}")
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == -1:
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
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info("sent %d result file(s) to %s", len(files), where)
