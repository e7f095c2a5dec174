"""Deterministic result UIDs: the same study, model and version always give the same UIDs.

A node that crashes after sending but before recording the send analyses the study again on restart; with
derived UIDs the PACS receives the same SOP instance again (an idempotent overwrite or an ignored duplicate)
instead of a second copy of the result.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

__all__ = ["result_uid"]

#: pydicom's registered root for UIDs derived by hashing (generate_uid with entropy sources).
_PREFIX = "1.2.826.0.1.3680043.8.498."


def result_uid(kind: str, study_uid: str, model_id: str, model_version: str, *extra: str) -> str:
    """A UID from a SHA-512 of its inputs; ``kind`` separates SR/SC series and instances."""
    return str(
        generate_uid(
            prefix=_PREFIX, entropy_srcs=["fedclinic", kind, study_uid, model_id, model_version, *extra]
        )
    )
