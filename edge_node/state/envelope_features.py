"""The features the node keeps of the images it analysed with an envelope bundle, for the envelope's
federated refit: the hub asks for sums over them (``edge_node.uplink.envelope_answer``), never for the
features themselves, and they never leave the node.

Each row of ``envelope_results`` written by a bundle with an input envelope carries the features its result
was judged on: the image's embedding (``embedding``, D values) and, with an intensity part, its own
grey-value features (``intensity_features``, L values: the quantiles at the envelope's levels, not those of
its inverse), each as float32 little-endian bytes. Only the latest ``FEATURES_KEPT`` rows of each model
version keep them: the run that records its rows sets both columns to NULL in the rows that fall beyond
(``prune_features``, in the same transaction), so the table's size in features stays bounded.

``envelope_features`` reads them back: per image (SOP Instance UID) its latest row that has features, newest
first; ``kept_images`` counts those images, for the heartbeat.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_node.state.database import Database

__all__ = [
    "FEATURES_KEPT",
    "EnvelopeFeatures",
    "envelope_features",
    "feature_blob",
    "kept_images",
    "prune_features",
]

logger = logging.getLogger(__name__)

#: Rows per (model_id, model_version) whose features are kept: the latest ones (at least one).
FEATURES_KEPT = 5000

#: The stored form of one value: float32, little-endian.
_STORED = np.dtype("<f4")


def feature_blob(vector: np.ndarray | None) -> bytes | None:
    """One image's feature vector as stored: float32 little-endian bytes (None stays None, NULL)."""
    if vector is None:
        return None
    return np.ascontiguousarray(np.asarray(vector).reshape(-1), dtype=_STORED).tobytes()


def prune_features(c: sqlite3.Connection, model_id: str, model_version: str) -> None:
    """Inside the caller's transaction (the one that records a run's rows): set the features to NULL in the
    model version's rows beyond its latest ``FEATURES_KEPT``.

    One UPDATE, bounded by the index ``envelope_results_by_model``: the cutoff is the ``FEATURES_KEPT``-th
    latest row (an index-only walk of that many entries), and the rows pruned are those between it and the
    nearest older row that has no features left. As every recording prunes, that band holds exactly the
    rows that have just fallen beyond the latest ``FEATURES_KEPT``; the older ones were emptied before, and
    are never read again. (A row without features among older rows that still have some, which only a
    node of schema 4 writing into this database makes, stops the band there: the rows older than it keep
    their features, at most ``FEATURES_KEPT`` of them.)
    """
    c.execute(
        "WITH cutoff AS (SELECT id FROM envelope_results WHERE model_id = :m AND model_version = :v"
        " ORDER BY id DESC LIMIT 1 OFFSET :skip)"
        " UPDATE envelope_results SET embedding = NULL, intensity_features = NULL"
        " WHERE model_id = :m AND model_version = :v AND id < (SELECT id FROM cutoff)"
        " AND id > COALESCE((SELECT id FROM envelope_results WHERE model_id = :m AND model_version = :v"
        " AND id < (SELECT id FROM cutoff) AND embedding IS NULL AND intensity_features IS NULL"
        " ORDER BY id DESC LIMIT 1), 0)"
        " AND (embedding IS NOT NULL OR intensity_features IS NOT NULL)",
        {"m": model_id, "v": model_version, "skip": max(FEATURES_KEPT, 1) - 1},
    )


#: The rows that keep features: the model version's latest ``FEATURES_KEPT`` (by id) that have an embedding.
#: Parameters: model id, model version, model id, model version, ``FEATURES_KEPT`` - 1.
_KEPT_ROWS = (
    "FROM envelope_results WHERE model_id = ? AND model_version = ? AND embedding IS NOT NULL"
    " AND id >= COALESCE((SELECT id FROM envelope_results WHERE model_id = ? AND model_version = ?"
    " ORDER BY id DESC LIMIT 1 OFFSET ?), 0)"
)


def _kept_rows_params(model_id: str, model_version: str) -> tuple[str, str, str, str, int]:
    return (model_id, model_version, model_id, model_version, max(FEATURES_KEPT, 1) - 1)


def kept_images(db: Database, model_id: str, model_version: str) -> int:
    """How many images (distinct SOP Instance UIDs) the node keeps features of for ``model_id``
    ``model_version``, for the heartbeat (``envelope_kept``): the images ``envelope_features`` reads, from the
    same rows (the version's latest ``FEATURES_KEPT``, those with an embedding), an image analysed more than
    once counted once.

    It reads no blob, so it ignores two rules of ``envelope_features``: an image whose latest row has damaged
    features, or lacks grey-value features where other rows have them, is counted here and left out there.
    So the count can be above what a round reads, never below; as the node writes its rows, they are equal.
    One query, over the index ``envelope_results_by_model`` (at most ``FEATURES_KEPT`` entries)."""
    rows = db.query(
        f"SELECT COUNT(DISTINCT sop_instance_uid) AS n {_KEPT_ROWS}",
        _kept_rows_params(model_id, model_version),
    )
    return int(rows[0]["n"]) if rows else 0


@dataclass(frozen=True)
class EnvelopeFeatures:
    """The kept features of one model version's analysed images, one row per image, newest first."""

    #: One per image: its SOP Instance UID.
    keys: tuple[str, ...]
    #: (N, D) float64: each image's embedding, as the envelope judged it (to float32 precision).
    embedding: np.ndarray
    #: (N, L) float64: each image's grey-value features; None when these rows have none (an envelope
    #: without an intensity part).
    intensity: np.ndarray | None


def _majority(lengths: Sequence[int]) -> int | None:
    """The most common byte length of the blobs (the largest among equals), None without any."""
    counts = Counter(n for n in lengths if n > 0 and n % _STORED.itemsize == 0)
    if not counts:
        return None
    top = max(counts.values())
    return max(n for n, k in counts.items() if k == top)


def _vector(blob: bytes, length: int | None) -> np.ndarray | None:
    """The stored vector, or None when the blob is not ``length`` bytes or holds a non-finite value."""
    if length is None or len(blob) != length:
        return None
    v = np.frombuffer(blob, dtype=_STORED).astype(np.float64)
    return v if np.isfinite(v).all() else None


def envelope_features(
    db: Database, model_id: str, model_version: str, limit: int = FEATURES_KEPT
) -> EnvelopeFeatures:
    """The kept features of ``model_id`` ``model_version``'s analysed images: at most ``limit`` images,
    newest first (by the row of each image's latest analysis), from the version's latest ``FEATURES_KEPT``
    rows (the rows that keep features).

    An image analysed more than once counts once, by its latest row that has an embedding. When any of
    those rows has grey-value features, the rows without (written before the node kept them, or by an
    envelope without that part: none with today's bundles) are left out, so that both arrays have one row
    per key. A row whose stored features are damaged (a blob of another length than most rows', or a
    non-finite value) is left out too, and counted in a warning that names no image. Nothing kept: N = 0,
    an embedding of shape (0, D) ((0, 0) when D is unknown), intensity features of shape (0, L) when L is
    known, else None.
    """
    # Only the latest FEATURES_KEPT rows keep features (``prune_features``): the read walks those alone, not
    # every row the model version ever wrote.
    rows = db.query(
        f"SELECT sop_instance_uid, embedding, intensity_features {_KEPT_ROWS} ORDER BY id DESC",
        _kept_rows_params(model_id, model_version),
    )
    latest: dict[str, tuple[bytes, bytes | None]] = {}
    for r in rows:
        uid = str(r["sop_instance_uid"])
        if uid not in latest:  # newest first: the first row of an image is its latest
            grey = r["intensity_features"]
            latest[uid] = (bytes(r["embedding"]), None if grey is None else bytes(grey))
    d_bytes = _majority([len(e) for e, _ in latest.values()])
    l_bytes = _majority([len(g) for _, g in latest.values() if g is not None])
    keys: list[str] = []
    embeddings: list[np.ndarray] = []
    greys: list[np.ndarray] = []
    damaged = 0
    for uid, (emb_blob, grey_blob) in latest.items():
        if len(keys) >= limit:
            break
        if l_bytes is not None and grey_blob is None:
            continue  # no grey-value features where the others have them: left out (see above)
        emb = _vector(emb_blob, d_bytes)
        grey = None if grey_blob is None else _vector(grey_blob, l_bytes)
        if emb is None or (grey_blob is not None and grey is None):
            damaged += 1
            continue
        keys.append(uid)
        embeddings.append(emb)
        if grey is not None:
            greys.append(grey)
    if damaged:
        logger.warning(
            "left out %d image(s) of %s %s whose kept envelope features are damaged",
            damaged,
            model_id,
            model_version,
        )
    d = 0 if d_bytes is None else d_bytes // _STORED.itemsize
    embedding = np.stack(embeddings) if embeddings else np.zeros((0, d))
    intensity: np.ndarray | None = None
    if l_bytes is not None:
        intensity = np.stack(greys) if greys else np.zeros((0, l_bytes // _STORED.itemsize))
    return EnvelopeFeatures(keys=tuple(keys), embedding=embedding, intensity=intensity)
