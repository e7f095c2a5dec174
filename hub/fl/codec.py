"""The update path shared by simulated and real nodes: ClientResult <-> (UpdateEnvelope, npz bytes).

The node encodes its result (``encode_result``); the hub checks the payload against the envelope (size,
sha256, an optional size cap, npz without pickle) before anything is decoded (``decode_result``). What a
benchmark reports as "bytes uploaded" is ``upload_bytes(envelope)``: the size of the npz payload.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections import defaultdict

from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.updates import UpdateEnvelope, UpdateKind
from hub.fl.errors import PayloadError
from hub.fl.strategy import ClientFailure, ClientResult

__all__ = ["UploadLedger", "decode_or_failure", "decode_result", "encode_result", "upload_bytes"]

logger = logging.getLogger(__name__)


def encode_result(
    result: ClientResult, kind: UpdateKind = UpdateKind.WEIGHTS_DELTA, *, compress: bool = True
) -> tuple[UpdateEnvelope, bytes]:
    """The envelope and npz payload a node uploads for this result; object arrays raise PayloadError."""
    try:
        payload = encode_tensors(result.update, compress=compress)
    except EncodingError as exc:
        raise PayloadError(f"update of client {result.client_id} cannot be encoded: {exc}") from exc
    envelope = UpdateEnvelope(
        node_id=result.client_id,
        round=result.round,
        kind=kind,
        num_examples=result.num_examples,
        metrics={k: float(v) for k, v in result.metrics.items()},
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_bytes=len(payload),
    )
    return envelope, payload


def _unpacked_size(payload: bytes) -> int:
    """Sum of the npz members' uncompressed sizes, read from the zip directory without decompressing."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            return sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise PayloadError(f"payload is not an npz archive: {exc}") from exc


def decode_result(
    envelope: UpdateEnvelope,
    payload: bytes,
    *,
    max_bytes: int | None = None,
    max_unpacked_bytes: int | None = None,
) -> ClientResult:
    """Check the payload against its envelope and rebuild the ClientResult.

    Raises PayloadError if the size differs from ``payload_bytes``, the sha256 differs, the payload is
    larger than ``max_bytes`` or would unpack to more than ``max_unpacked_bytes``, or it is not an npz
    readable without pickle (object arrays are refused).
    """
    if len(payload) != envelope.payload_bytes:
        raise PayloadError(f"payload is {len(payload)} bytes, the envelope says {envelope.payload_bytes}")
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != envelope.payload_sha256:
        raise PayloadError(
            "payload sha256 does not match the envelope: refusing a tampered or corrupt update"
        )
    if max_unpacked_bytes is not None and _unpacked_size(payload) > max_unpacked_bytes:
        raise PayloadError(f"payload would unpack to more than {max_unpacked_bytes} bytes")
    try:
        tensors = decode_tensors(payload)
    except EncodingError as exc:
        raise PayloadError(str(exc)) from exc
    return ClientResult(
        client_id=envelope.node_id,
        round=envelope.round,
        num_examples=envelope.num_examples,
        update=tensors,
        metrics=dict(envelope.metrics),
    )


def decode_or_failure(
    envelope: UpdateEnvelope,
    payload: bytes,
    *,
    max_bytes: int | None = None,
    max_unpacked_bytes: int | None = None,
) -> ClientResult | ClientFailure:
    """``decode_result``, with a refused payload turned into a ClientFailure carrying the reason."""
    try:
        return decode_result(envelope, payload, max_bytes=max_bytes, max_unpacked_bytes=max_unpacked_bytes)
    except PayloadError as exc:
        logger.warning(
            "round %d: refused the payload of client %s: %s", envelope.round, envelope.node_id, exc
        )
        return ClientFailure(envelope.node_id, envelope.round, f"payload refused: {exc}")


def upload_bytes(envelope: UpdateEnvelope) -> int:
    """Bytes this upload cost on the wire (the npz payload; the small JSON envelope is not counted)."""
    return envelope.payload_bytes


class UploadLedger:
    """Counts uploaded payload bytes per client and round, for the benchmark's communication column."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, int], int] = defaultdict(int)

    def record(self, envelope: UpdateEnvelope) -> None:
        """Add one upload."""
        self._bytes[(envelope.node_id, envelope.round)] += upload_bytes(envelope)

    def total(self, client_id: str | None = None) -> int:
        """All bytes uploaded (by one client, if given)."""
        return sum(b for (cid, _), b in self._bytes.items() if client_id is None or cid == client_id)

    def per_client_round(self) -> dict[tuple[str, int], int]:
        """Bytes per (client, round) that had an upload."""
        return dict(self._bytes)

    def mean_per_client_round(self) -> float:
        """Mean bytes per upload slot (client, round) that had an upload; 0.0 when nothing was recorded."""
        return sum(self._bytes.values()) / len(self._bytes) if self._bytes else 0.0
