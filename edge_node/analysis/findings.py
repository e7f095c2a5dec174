"""One model finding on one source instance: what the SR and SC report and what the node stores."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Finding"]


@dataclass(frozen=True)
class Finding:
    """The model's answer for one analysed source instance (the frame in ``frame_index``)."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    score: float
    #: The class name reported (binary: the positive class when present, else the other one).
    label: str
    present: bool
    frame_index: int = 0
    #: Number of frames of the source instance; frame references are written only for multi-frame sources.
    number_of_frames: int = 1
