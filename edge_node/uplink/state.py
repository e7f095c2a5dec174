"""What the uplink remembers across runs: the last publication accepted (anti-replay), refusals, contact.

One small JSON file (``data_dir/uplink/state.json``), replaced atomically. ``fedclinic-edge status`` reads
it to say when the node last reached the hub and, if it could not, why.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_node.uplink.credential import write_private

__all__ = ["StateFile", "UplinkState"]

#: Refused publications remembered (so the same bad record is not downloaded on every heartbeat).
MAX_REFUSED = 32


class UplinkState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: ``seq`` of the last publication this node accepted: anything not newer is a replay.
    last_seq: int | None = None
    publication_id: str | None = None
    #: ETag of the last publication answer handled (accepted or refused), sent as If-None-Match.
    etag: str | None = None
    #: publication_id -> why it was refused.
    refused: dict[str, str] = Field(default_factory=dict)
    last_refusal: str | None = None
    #: Unix times: the last request that reached the hub, the last attempt, and the last failure.
    last_ok_at: float | None = None
    last_attempt_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    tasks_answered: int = 0


class StateFile:
    """The state of one node, guarded by a lock; every change is written through."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.state = self.read(path)

    @staticmethod
    def read(path: Path) -> UplinkState:
        """The saved state; a missing or damaged file reads as a fresh state (nothing in it is irreplaceable
        except ``last_seq``, which the next accepted publication restores)."""
        try:
            return UplinkState.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return UplinkState()

    def _save(self) -> None:
        write_private(self.path, self.state.model_dump_json(indent=1).encode())

    def reached(self, now: float | None = None) -> None:
        with self._lock:
            now = time.time() if now is None else now
            self.state = self.state.model_copy(
                update={"last_ok_at": now, "last_attempt_at": now, "last_error": None}
            )
            self._save()

    def failed(self, reason: str, now: float | None = None) -> None:
        with self._lock:
            now = time.time() if now is None else now
            self.state = self.state.model_copy(
                update={"last_attempt_at": now, "last_error": reason, "last_error_at": now}
            )
            self._save()

    def accepted(self, publication_id: str, seq: int, etag: str | None) -> None:
        with self._lock:
            self.state = self.state.model_copy(
                update={"last_seq": seq, "publication_id": publication_id, "etag": etag}
            )
            self._save()

    def refused(self, publication_id: str, reason: str, etag: str | None) -> None:
        with self._lock:
            refused = dict(list(self.state.refused.items())[-(MAX_REFUSED - 1) :])
            refused[publication_id] = reason
            self.state = self.state.model_copy(
                update={"refused": refused, "last_refusal": f"{publication_id}: {reason}", "etag": etag}
            )
            self._save()

    def answered(self) -> None:
        with self._lock:
            self.state = self.state.model_copy(update={"tasks_answered": self.state.tasks_answered + 1})
            self._save()
