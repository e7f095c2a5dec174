"""Heartbeats: what a node last said about itself (versions, health, counters), kept on its row."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_node.protocol.wire import Heartbeat
from hub.store.schema import Node, utcnow

__all__ = ["EnvelopeCounts", "envelope_counts", "record_heartbeat"]


def record_heartbeat(node: Node, beat: Heartbeat) -> None:
    """Overwrite the node's last-known state (a row in the caller's session); never logged one by one."""
    node.last_heartbeat = utcnow()
    node.edge_version = beat.edge_version
    node.model_id = beat.model_id
    node.model_version = beat.model_version
    node.publication_id = beat.publication_id
    node.health = beat.health
    node.counts = dict(beat.counts)


@dataclass(frozen=True)
class EnvelopeCounts:
    """A node's latest analysed images, how many lay outside its model's input envelope, whether the node's
    drift alarm is raised, whether the images look like negatives of the validation images (None when
    the node did not say: no intensity part, an older edge), and how many images it keeps features of for
    the envelope's refit (None when it did not say: an older edge) (docs/envelope.md)."""

    images: int
    outside: int
    drifting: bool
    negative: bool | None = None
    kept: int | None = None

    def describe(self) -> str:
        notes = [
            note for note, raised in (("drift", self.drifting), ("looks negative", self.negative)) if raised
        ]
        text = f"{self.outside} of {self.images} outside"
        text = f"{text} ({', '.join(notes)})" if notes else text
        return text if self.kept is None else f"{text}; {self.kept} kept"


def envelope_counts(counts: Mapping[str, Any] | None) -> EnvelopeCounts | None:
    """The envelope counters of a node's last heartbeat, or None when it sent none (no envelope, an older
    edge) or sent values that are not counts."""
    sent = counts or {}
    images, outside = _count(sent.get("envelope_images")), _count(sent.get("envelope_outside"))
    if images is None or outside is None or outside > images:
        return None
    negative = sent.get("envelope_negative")
    return EnvelopeCounts(
        images=images,
        outside=outside,
        drifting=sent.get("envelope_drifting") == 1,
        negative=None if negative is None else negative == 1,
        kept=_count(sent.get("envelope_kept")),
    )


def _count(value: object) -> int | None:
    """``value`` when it is a count (a non-negative int, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
