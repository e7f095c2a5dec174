"""C-STORE SCU that delivers result files (SR, SC) to a DICOM destination, one association per call."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
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

from edge_node.dicom.nodelay import NODELAY_HANDLERS
from edge_node.errors import SendError

__all__ = ["Destination", "SendError", "send_files"]

logger = logging.getLogger(__name__)

#: Result classes always proposed, so one association fits whatever the worker produced.
RESULT_SOP_CLASSES: tuple[UID, ...] = (
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
)
_MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class Destination:
    """A DICOM node that takes results: its AE title, host and port."""

    ae_title: str
    host: str
    port: int


def _read_meta(path: Path) -> tuple[UID, UID, str]:
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise SendError(
            f"result file {path.name} cannot be read ({exc}); it is not a valid DICOM file"
        ) from exc
    meta = getattr(ds, "file_meta", Dataset())
    sop_class = UID(str(meta.get("MediaStorageSOPClassUID", ds.get("SOPClassUID", ""))))
    tsyntax = UID(str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    sop_instance = str(ds.get("SOPInstanceUID", ""))
    if not sop_class or not sop_instance:
        raise SendError(f"result file {path.name} has no SOP Class/Instance UID; it cannot be stored")
    return sop_class, tsyntax, sop_instance


def send_files(
    paths: Sequence[Path],
    dest: Destination,
    calling_ae: str,
    *,
    timeout: float = 30.0,
) -> None:
    """Store every file at ``dest`` over one association (TCP_NODELAY on), checking each C-STORE status.

    Raises SendError naming the destination and the first file that failed (association refused or
    aborted, no accepted presentation context, or a failure/unknown status). Warning statuses (0xB000,
    0xB007, 0xB006) count as stored: the destination kept the object.
    """
    if not paths:
        return
    files = [Path(p) for p in paths]
    metas = [_read_meta(p) for p in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    contexts: set[tuple[UID, UID]] = set()
    for sop_class, tsyntax, _ in metas:
        contexts.add((sop_class, tsyntax))
    for sop_class in RESULT_SOP_CLASSES:
        contexts.add((sop_class, ExplicitVRLittleEndian))
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

    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=list(NODELAY_HANDLERS))
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(
            f"association with {where} {why}; check that the destination is running and knows AE title "
            f"{calling_ae!r}"
        )
    try:
        for path, (sop_class, _, _) in zip(files, metas, strict=True):
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context for this class/syntax
                raise SendError(f"{where} accepted no presentation context for {path.name}: {exc}") from exc
            if not assoc.is_established and not status:
                raise SendError(f"association with {where} was lost while sending {path.name}")
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == -1:
                raise SendError(f"no C-STORE response from {where} for {path.name} (timeout or abort)")
            category = code_to_category(code)
            if category not in ("Success", "Warning"):
                comment = str(status.get("ErrorComment", "")) if status else ""
                raise SendError(
                    f"{where} refused {path.name} ({UID(sop_class).name}): status 0x{code:04X} {category}"
                    + (f" - {comment}" if comment else "")
                )
            if category == "Warning":
                logger.info("%s stored %s with warning 0x%04X", where, path.name, code)
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info("sent %d result file(s) to %s", len(files), where)
