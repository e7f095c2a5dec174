"""What the running node serves: the model file, precision and execution provider it really got, on disk.

The serving process writes this record each time it loads a model; ``fedclinic-edge status`` (another
process) reads it, so the clinic's IT person sees "CPUExecutionProvider" when a GPU build silently fell back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_node.inference.loaded_model import LoadedModel
from edge_node.protocol.durable_file import write_text_durably

__all__ = ["ServingRecord", "read_serving", "write_serving"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingRecord:
    """One model load by the serving process."""

    model_id: str
    model_version: str
    #: The bundle file in use (model.onnx or a variant such as model.int8.onnx) and its precision.
    model_file: str
    precision: str
    #: The precision the settings asked for (differs from ``precision`` when the bundle ships no variant).
    requested_precision: str
    #: The provider the session really runs on, and the one that was asked for first.
    provider: str
    requested_provider: str
    loaded_at: float
    pid: int

    @classmethod
    def of(cls, model: LoadedModel, requested_precision: str) -> ServingRecord:
        return cls(
            model_id=model.model_id,
            model_version=model.model_version,
            model_file=model.model_file,
            precision=model.precision,
            requested_precision=requested_precision,
            provider=model.provider,
            requested_provider=model.requested_provider,
            loaded_at=time.time(),
            pid=os.getpid(),
        )

    @property
    def fell_back(self) -> bool:
        """The session did not get the provider it asked for (e.g. a GPU build running on the CPU)."""
        return self.provider != self.requested_provider


def write_serving(path: Path, record: ServingRecord) -> None:
    """Replace the record atomically (a reader never sees half a file)."""
    write_text_durably(path, json.dumps(asdict(record), indent=1, sort_keys=True) + "\n")


def read_serving(path: Path) -> ServingRecord | None:
    """The last record; None when there is none (no model loaded yet) or it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ServingRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("cannot read %s (%s); it is rewritten at the next model load", path, exc)
        return None
