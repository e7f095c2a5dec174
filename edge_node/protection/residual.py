"""ResidualStore: the error-feedback residual of each codec, kept on disk so a restart loses none of it.

What top-k or quantisation dropped from an update is owed to the next round (``ErrorFeedback``); held only
in memory, a node restart would silently forgive that debt. One npz file per codec (kind and top-k fraction)
under the node's data directory, replaced atomically after each compressed release.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_node.protocol.durable_file import write_bytes_durably
from edge_node.protocol.errors import EncodingError
from edge_node.protocol.protection import CompressionKind
from edge_node.protocol.tensors import Tensors, decode_tensors, encode_tensors

__all__ = ["RESIDUAL_DIR", "ResidualStore"]

logger = logging.getLogger(__name__)

#: The residuals' directory under the node's data directory.
RESIDUAL_DIR = "compression-residuals"


class ResidualStore:
    """Residual tensors per codec in ``directory`` (created on the first save)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> ResidualStore:
        return cls(data_dir / RESIDUAL_DIR)

    def path(self, kind: CompressionKind, topk_fraction: float) -> Path:
        # Top-k residuals depend on the fraction; a quantiser's do not.
        suffix = f"-{topk_fraction:g}" if kind in (CompressionKind.TOPK, CompressionKind.TOPK_INT8) else ""
        return self.directory / f"{kind.value}{suffix}.npz"

    def load(self, kind: CompressionKind, topk_fraction: float) -> Tensors:
        """The residual saved for this codec; empty when none was (or the file cannot be read)."""
        path = self.path(kind, topk_fraction)
        if not path.is_file():
            return {}
        try:
            return decode_tensors(path.read_bytes())
        except (OSError, EncodingError) as exc:
            # An unreadable residual only delays nothing more: the next update starts without a carry.
            logger.warning("compression residual %s unreadable (%s); starting without it", path.name, exc)
            return {}

    def save(self, kind: CompressionKind, topk_fraction: float, residual: Tensors) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(self.path(kind, topk_fraction), encode_tensors(residual))
