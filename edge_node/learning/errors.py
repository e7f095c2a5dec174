"""Errors of the node's learners: each says why the node cannot learn from what it has."""

from __future__ import annotations

from edge_node.errors import EdgeError

__all__ = ["LearningError"]


class LearningError(EdgeError):
    """The node cannot train for this task (too few labels, a model without an embedding, a head that does
    not fit); the message is the reason the node gives the hub when it refuses."""
