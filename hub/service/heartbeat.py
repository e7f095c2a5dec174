"""Heartbeats: what a node last said about itself (versions, health, counters), kept on its row."""

from __future__ import annotations

from edge_node.protocol.wire import Heartbeat
from hub.store.schema import Node, utcnow

__all__ = ["record_heartbeat"]


def record_heartbeat(node: Node, beat: Heartbeat) -> None:
    """Overwrite the node's last-known state (a row in the caller's session); never logged one by one."""
    node.last_heartbeat = utcnow()
    node.edge_version = beat.edge_version
    node.model_id = beat.model_id
    node.model_version = beat.model_version
    node.publication_id = beat.publication_id
    node.health = beat.health
    node.counts = dict(beat.counts)
