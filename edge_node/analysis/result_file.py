"""A result object written to disk, with what a C-STORE of it needs to know (so nobody re-reads the file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from edge_node.protocol.durable_file import write_durably

__all__ = ["ResultFile", "save_result"]


@dataclass(frozen=True)
class ResultFile:
    """One SR or SC file of a run: its path, SOP class and instance, and the transfer syntax it is in."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def save_result(ds: Dataset, out_dir: Path, prefix: str) -> ResultFile:
    """Write a built SR or SC durably as a DICOM file (with file meta) into ``out_dir``."""
    path = out_dir / f"{prefix}-{ds.SOPInstanceUID}.dcm"
    # 0600 like the spool: results carry the patient's name and IDs (a capture also the image).
    write_durably(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True), mode=0o600)
    return ResultFile(
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
    )
