"""A clinic's personal head: a linear layer on the embedding, added to the shared head; it never leaves.

The served logits are ``backbone → embedding → shared head + personal head``: the bundle's own logits (the
shared head) plus ``embedding @ weight.T + bias``. The file lives in the node's data directory; a bundle whose
model or head shape differs retires it (the reason is kept for ``status``), since its embedding means
something else.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_node.protocol.durable_file import write_bytes_durably, write_text_durably
from edge_node.protocol.manifest import Manifest

__all__ = ["PersonalHead", "PersonalHeadStore"]

logger = logging.getLogger(__name__)

HEAD_FILE = "personal_head.npz"
RETIRED_FILE = "personal_head.retired.json"


@dataclass(frozen=True, eq=False)
class PersonalHead:
    """The clinic's own correction of the shared head, for one model's embedding."""

    #: (K, D) float64
    weight: np.ndarray
    #: (K,) float64
    bias: np.ndarray
    model_id: str
    #: The hub round whose task trained it.
    trained_round: int
    trained_at: str

    def logits(self, embedding: np.ndarray) -> np.ndarray:
        """(N, D) embedding → (N, K) logits of the personal head alone."""
        return np.asarray(embedding, dtype=np.float64) @ self.weight.T + self.bias

    def misfit(self, manifest: Manifest) -> str | None:
        """Why this head cannot serve with ``manifest``'s model, or None when it fits."""
        head = manifest.head
        if head is None:
            return f"model {manifest.model_id} {manifest.model_version} has no embedding output"
        if manifest.model_id != self.model_id:
            return f"it was trained for model {self.model_id}, the node now serves {manifest.model_id}"
        if list(self.weight.shape) != list(head.weight.shape) or list(self.bias.shape) != list(
            head.bias.shape
        ):
            return (
                f"its shape {list(self.weight.shape)} differs from the head of {manifest.model_id} "
                f"{manifest.model_version} {head.weight.shape}"
            )
        return None


class PersonalHeadStore:
    """The personal head's durable file in the node's data directory, and the note of a retired one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> PersonalHeadStore:
        return cls(data_dir / "learning")

    @property
    def path(self) -> Path:
        return self.directory / HEAD_FILE

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever the file is rewritten or removed (cheap: one stat), so servers can reload."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def save(self, head: PersonalHead) -> None:
        meta = {"model_id": head.model_id, "trained_round": head.trained_round, "trained_at": head.trained_at}
        buf = io.BytesIO()
        np.savez(
            buf,
            weight=np.asarray(head.weight, dtype=np.float64),
            bias=np.asarray(head.bias, dtype=np.float64),
            meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(self.path, buf.getvalue())
        (self.directory / RETIRED_FILE).unlink(missing_ok=True)
        logger.info("personal head saved (round %d, shape %s)", head.trained_round, list(head.weight.shape))

    def load(self) -> PersonalHead | None:
        """The saved head, or None; an unreadable file is logged and treated as absent (never served)."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                return PersonalHead(
                    weight=np.asarray(data["weight"], dtype=np.float64),
                    bias=np.asarray(data["bias"], dtype=np.float64),
                    model_id=str(meta["model_id"]),
                    trained_round=int(meta["trained_round"]),
                    trained_at=str(meta["trained_at"]),
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("personal head file is unreadable (%s); serving the shared head only", exc)
            return None

    def retire(self, reason: str) -> None:
        """Stop using the head for good (kept nowhere): the note says why, for ``status``."""
        head = self.load()
        note = {
            "reason": reason,
            "retired_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "trained_round": head.trained_round if head is not None else None,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text_durably(self.directory / RETIRED_FILE, json.dumps(note))
        self.path.unlink(missing_ok=True)
        logger.warning("personal head retired: %s", reason)

    def retired(self) -> dict[str, object] | None:
        """The note of the last retired head, or None."""
        path = self.directory / RETIRED_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
