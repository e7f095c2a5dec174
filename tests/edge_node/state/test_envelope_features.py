"""The features the node keeps of the images it analysed with an envelope bundle (``envelope_results``'
``embedding`` and ``intensity_features``), for the envelope's federated refit: a real run with the real test
bundle keeps exactly what the envelope judged, the latest row per image is read back, only the latest
FEATURES_KEPT rows of a model version keep features, a version-4 database gains the columns, and a bundle
without an envelope keeps nothing."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import zlib
from collections.abc import Callable, Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edge_node.state.envelope_features as kept_features
from edge_node.analysis.preprocessing import preprocess
from edge_node.inference.loaded_model import LoadedModel
from edge_node.protocol.envelope import intensity_features
from edge_node.protocol.manifest import MANIFEST_FILE, SIGNATURE_FILE, canonical_json
from edge_node.state.database import Database
from edge_node.state.envelope_features import FEATURES_KEPT, envelope_features, kept_images
from edge_node.state.envelope_monitor import EnvelopeResult
from edge_node.state.ingest_records import InstanceRecord
from edge_node.state.lifecycle import StudyEvent
from edge_node.state.node_state import NodeState
from edge_node.state.runs import FindingRow, ModelInUse
from edge_node.state.schema import SCHEMA_VERSION
from edge_node.uplink.sync import heartbeat_counts
from tests.edge_node.conftest import TrustedBundle
from tests.edge_node.test_worker import Node
from tests.support.dicomgen import medmnist_studies

MODEL = ("pneumonia-student", "1.0.0")
_studies = count(1)


def _vec(seed: str, n: int) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(seed.encode())).normal(size=n)


def record(
    state: NodeState,
    uids: Sequence[str],
    *,
    model: tuple[str, str] = MODEL,
    embedding: Callable[[str], np.ndarray | None] | None = None,
    grey: Callable[[str], np.ndarray | None] | None = None,
) -> int:
    """One run of ``model`` whose findings are ``uids`` (an image may come again in a later run), recorded as
    the worker does, each with the features ``embedding(uid)`` and ``grey(uid)``."""
    study = f"1.2.826.0.1.3680043.8.498.77.{next(_studies)}"
    state.ingest.record_instance(
        InstanceRecord(study, study + ".1", study + ".1.1", "1.2.840.10008.5.1.4.1.1.1",
                       "1.2.840.10008.1.2.1", "CR", Path("/nonexistent") / study, 10, "TESTSCU")
    )  # fmt: skip
    claim = state.runs.claim_next(quiet_seconds=0.0, now=1e12)
    assert claim is not None and claim.study_uid == study
    findings = [
        FindingRow(
            uid,
            0.5,
            "normal",
            EnvelopeResult(
                uid,
                False,
                0.5,
                embedding=None if embedding is None else embedding(uid),
                intensity_features=None if grey is None else grey(uid),
            ),
        )
        for uid in uids
    ]
    in_use = ModelInUse(model[0], model[1], "CPUExecutionProvider", envelope_quantile=0.99)
    with state.db.tx() as c:
        state.runs.finish(c, claim, StudyEvent.DONE, reason=None, findings=findings, model=in_use)
    return claim.run_id


class Features(TypedDict):
    """``record``'s feature functions, as keywords."""

    embedding: Callable[[str], np.ndarray]
    grey: Callable[[str], np.ndarray]


def with_features(run: int, d: int = 3, levels: int = 2) -> Features:
    """Features that differ per image and per run (a re-analysed image's latest row is told apart)."""
    return {
        "embedding": lambda uid: _vec(f"{uid}/{run}/embedding", d),
        "grey": lambda uid: _vec(f"{uid}/{run}/grey", levels),
    }


def featured_ids(db: Database, model: tuple[str, str] = MODEL) -> list[int]:
    rows = db.query(
        "SELECT id FROM envelope_results WHERE model_id = ? AND model_version = ?"
        " AND (embedding IS NOT NULL OR intensity_features IS NOT NULL) ORDER BY id DESC",
        model,
    )
    return [int(r["id"]) for r in rows]


def latest_ids(db: Database, n: int, model: tuple[str, str] = MODEL) -> list[int]:
    rows = db.query(
        "SELECT id FROM envelope_results WHERE model_id = ? AND model_version = ? ORDER BY id DESC LIMIT ?",
        (*model, n),
    )
    return [int(r["id"]) for r in rows]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[NodeState]:
    s = NodeState.open(tmp_path / "edge.sqlite3")
    yield s
    s.close()


def test_the_latest_row_of_each_image_is_read_back_newest_first(state: NodeState) -> None:
    assert FEATURES_KEPT == 5000
    e1, e2 = with_features(1), with_features(2)
    record(state, ["a", "b", "c"], **e1)
    record(state, ["b", "d"], **e2)  # b analysed again: its latest row counts
    kept = envelope_features(state.db, *MODEL)
    assert kept.keys == ("d", "b", "c", "a")
    assert kept.embedding.dtype == np.float64 and kept.embedding.shape == (4, 3)
    assert (
        kept.intensity is not None and kept.intensity.dtype == np.float64 and kept.intensity.shape == (4, 2)
    )
    expected = [e2["embedding"]("d"), e2["embedding"]("b"), e1["embedding"]("c"), e1["embedding"]("a")]
    # Stored as float32: equal to the float32 of what was judged.
    np.testing.assert_array_equal(kept.embedding, np.asarray(expected, dtype=np.float32))
    np.testing.assert_array_equal(kept.intensity[1], np.float32(e2["grey"]("b")))
    # At most ``limit`` images, the newest.
    two = envelope_features(state.db, *MODEL, limit=2)
    assert two.keys == ("d", "b") and two.embedding.shape == (2, 3)
    assert two.intensity is not None and two.intensity.shape == (2, 2)
    # Another model version's rows are its own; a version with none gives N = 0.
    record(state, ["a"], model=("pneumonia-student", "2.0.0"), **with_features(3))
    assert envelope_features(state.db, "pneumonia-student", "2.0.0").keys == ("a",)
    assert envelope_features(state.db, *MODEL).keys == kept.keys
    empty = envelope_features(state.db, "other", "1")
    assert empty.keys == () and empty.embedding.shape == (0, 0) and empty.intensity is None
    # The heartbeat's count of them: the same images.
    assert kept_images(state.db, *MODEL) == len(kept.keys) == 4
    assert kept_images(state.db, "pneumonia-student", "2.0.0") == 1
    assert kept_images(state.db, "other", "1") == 0


def test_only_the_latest_rows_of_a_model_version_keep_their_features(
    state: NodeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kept_features, "FEATURES_KEPT", 4)
    other = ("pneumonia-student", "2.0.0")
    record(state, ["x1", "x2", "x3", "x4", "x5", "x6"], model=other, **with_features(0))
    sizes = [1, 2, 3, 1, 6, 2, 0, 5]
    for run, n in enumerate(sizes, start=1):
        record(state, [f"img{run}.{i}" for i in range(n)], **with_features(run))
        kept = featured_ids(state.db)
        assert kept == latest_ids(state.db, 4), (run, n)  # exactly the latest FEATURES_KEPT rows
        assert len(envelope_features(state.db, *MODEL).keys) == min(4, sum(sizes[:run]))
        assert kept_images(state.db, *MODEL) == min(4, sum(sizes[:run]))  # the pruned rows are not counted
    # Pruned rows keep their result, only the features go; another version keeps its own rows.
    rows = state.db.query(
        "SELECT COUNT(*) AS n FROM envelope_results WHERE model_id = ? AND model_version = ?", MODEL
    )
    assert int(rows[0]["n"]) == sum(sizes)
    assert len(featured_ids(state.db, other)) == 4  # its own run kept its latest 4, untouched since
    assert envelope_features(state.db, *MODEL).keys == ("img8.4", "img8.3", "img8.2", "img8.1")
    # A smaller FEATURES_KEPT (a later release) empties the rows beyond it at the next run.
    monkeypatch.setattr(kept_features, "FEATURES_KEPT", 2)
    record(state, ["late"], **with_features(99))
    assert featured_ids(state.db) == latest_ids(state.db, 2)


def test_rows_without_grey_value_features_are_left_out_when_others_have_them(state: NodeState) -> None:
    record(state, ["old1", "old2"], embedding=with_features(1)["embedding"])  # no grey-value features
    kept = envelope_features(state.db, *MODEL)
    assert kept.keys == ("old2", "old1") and kept.intensity is None and kept.embedding.shape == (2, 3)
    record(state, ["new1", "old1"], **with_features(2))
    kept = envelope_features(state.db, *MODEL)
    # old1's latest row has grey-value features; old2's has none: left out, so both arrays have N rows.
    assert kept.keys == ("old1", "new1")
    assert kept.intensity is not None and kept.intensity.shape == (2, 2) and kept.embedding.shape == (2, 3)
    # Results recorded without features (an older node): not read back at all.
    record(state, ["bare"])
    assert envelope_features(state.db, *MODEL).keys == ("old1", "new1")
    # The heartbeat's count skips the grey-value rule (it reads no blob): old2 is counted, bare is not.
    assert kept_images(state.db, *MODEL) == 3


def test_damaged_rows_are_left_out_and_named_nowhere(
    state: NodeState, caplog: pytest.LogCaptureFixture
) -> None:
    uids = [f"1.2.826.0.1.3680043.8.498.55.{i}" for i in range(5)]
    record(state, uids, **with_features(1))
    with state.db.tx() as c:
        c.execute(
            "UPDATE envelope_results SET embedding = ? WHERE sop_instance_uid = ?", (b"\x00" * 8, uids[0])
        )
        c.execute(
            "UPDATE envelope_results SET intensity_features = ? WHERE sop_instance_uid = ?",
            (b"\x01" * 3, uids[1]),
        )
        nan = np.array([np.nan, 1.0, 2.0], dtype="<f4").tobytes()
        c.execute("UPDATE envelope_results SET embedding = ? WHERE sop_instance_uid = ?", (nan, uids[2]))
    with caplog.at_level(logging.WARNING, logger="edge_node"):
        kept = envelope_features(state.db, *MODEL)
    assert kept.keys == (uids[4], uids[3]) and kept.embedding.shape == (2, 3)
    assert kept.intensity is not None and kept.intensity.shape == (2, 2)
    assert "left out 3 image(s)" in caplog.text
    assert not any(uid in caplog.text for uid in uids)


def test_the_heartbeat_says_how_many_images_the_active_version_keeps_features_of(
    state: NodeState, tmp_path: Path
) -> None:
    record(state, ["a", "b", "c"], **with_features(1))
    assert "envelope_kept" not in heartbeat_counts(state, {})  # no active model yet
    row = state.models.add(*MODEL, tmp_path, "0" * 64, "test")
    state.models.activate(row, "install")
    counts = heartbeat_counts(state, {"pending": 0, "sent": 0, "refused": 0})
    assert counts["envelope_kept"] == 3 and counts["envelope_images"] == 3
    record(state, ["b", "d"], **with_features(2))  # b analysed again: one image
    record(state, ["bare"])  # a result without features (an older node's row): none kept of it
    record(state, ["e", "f", "g"], model=("pneumonia-student", "2.0.0"), **with_features(3))  # not active
    counts = heartbeat_counts(state, {"pending": 0, "sent": 0, "refused": 0})
    assert counts["envelope_kept"] == 4 == len(envelope_features(state.db, *MODEL).keys)
    assert counts["envelope_images"] == 6 and len(counts) <= 32
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values())
    # Another version active: its own count; one without an envelope (no results): no envelope counters.
    later = state.models.add("pneumonia-student", "2.0.0", tmp_path, "1" * 64, "test")
    state.models.activate(later, "install")
    assert heartbeat_counts(state, {})["envelope_kept"] == 3
    plain = state.models.add("plain", "1.0.0", tmp_path, "2" * 64, "test")
    state.models.activate(plain, "install")
    assert not any(k.startswith("envelope_") for k in heartbeat_counts(state, {}))


def test_a_version_4_database_keeps_its_rows_and_gains_the_feature_columns(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite3"
    state = NodeState.open(path)
    record(state, ["a", "b", "c"])
    state.close()
    # The envelope_results table as schema version 4 had it: no feature columns.
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE envelope_results DROP COLUMN embedding")
    conn.execute("ALTER TABLE envelope_results DROP COLUMN intensity_features")
    conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    conn.commit()
    columns = [r[1] for r in conn.execute("PRAGMA table_info(envelope_results)")]
    before = conn.execute("SELECT * FROM envelope_results ORDER BY id").fetchall()
    conn.close()
    assert "embedding" not in columns and "intensity_features" not in columns and len(before) == 3

    state = NodeState.open(path)
    try:
        assert SCHEMA_VERSION == 5
        version = state.db.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"]
        assert version == "5"
        rows = state.db.query(
            f"SELECT {', '.join(columns)}, embedding, intensity_features FROM envelope_results ORDER BY id"
        )
        assert [tuple(r)[: len(columns)] for r in rows] == before  # every row as it was
        assert all((r["embedding"], r["intensity_features"]) == (None, None) for r in rows)
        assert envelope_features(state.db, *MODEL).keys == ()
        w = state.envelope.window_of(*MODEL)
        assert w is not None and w.images == 3
        record(state, ["b", "d"], **with_features(1))
        assert envelope_features(state.db, *MODEL).keys == ("d", "b")
    finally:
        state.close()
    Database(path).close()  # opened again (as every receiver process does), nothing is added twice


# The real path: the worker analyses real images with the real test bundle (ONNX Runtime).


def _resigned(
    test_bundle: TrustedBundle, dest: Path, change: Callable[[dict[str, Any]], None]
) -> TrustedBundle:
    """The test bundle with its manifest changed by ``change``, re-signed with the key that signed it."""
    key_file = test_bundle.bundle.parent / "keys" / "hub.key"
    if not key_file.is_file():
        pytest.fail(f"no hub key at {key_file} to re-sign the test bundle with (make test-bundle writes it)")
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    shutil.copytree(test_bundle.bundle, dest)
    data = json.loads((dest / MANIFEST_FILE).read_text())
    change(data)
    (dest / MANIFEST_FILE).write_text(json.dumps(data, indent=2))
    (dest / SIGNATURE_FILE).write_bytes(key.sign(canonical_json(data)))
    return TrustedBundle(dest, test_bundle.public_key)


def _analysed(
    tmp_path: Path, bundle: TrustedBundle, shared_data: Path, indices: list[int]
) -> tuple[Node, LoadedModel, dict[str, Path]]:
    """A node that installed ``bundle`` and analysed PneumoniaMNIST test images ``indices`` (a study each)."""
    node = Node(tmp_path / "node", bundle, [])
    node.models.install(bundle.bundle)
    model = node.models.current()
    assert model is not None
    written = medmnist_studies("pneumoniamnist", "test", indices, tmp_path / "cr", root=shared_data)
    node.receive([w.path for w in written])
    assert node.worker.step() == 0.0  # analysed in one batch
    return node, model, {w.sop_instance_uid: w.path for w in written}


def test_a_run_keeps_the_features_its_envelope_judged(
    tmp_path: Path, test_bundle: TrustedBundle, shared_data: Path
) -> None:
    node, model, paths = _analysed(tmp_path, test_bundle, shared_data, [0, 1, 2, 3, 4])
    try:
        envelope = model.manifest.envelope
        assert envelope is not None and envelope.intensity is not None, "rebuild the test bundle"
        kept = envelope_features(node.store.db, model.model_id, model.model_version)
        assert sorted(kept.keys) == sorted(paths)
        # Computed here by the loaded model itself, from each image's model input.
        batch = np.stack(
            [
                preprocess(pydicom.dcmread(paths[uid]), model.preprocessing, channels=model.channels).tensor
                for uid in kept.keys
            ]
        )
        _, embedding = model.logits_and_embedding(batch)
        grey = intensity_features(model.grey(batch), envelope.intensity.levels)
        assert model.head is not None
        d, n_levels = len(envelope.mean), len(envelope.intensity.levels)
        assert kept.embedding.shape == (5, d) and embedding.shape == (5, d)
        assert kept.intensity is not None and kept.intensity.shape == (5, n_levels)
        np.testing.assert_allclose(kept.embedding, embedding, rtol=1e-6, atol=1e-6)  # to float32 precision
        np.testing.assert_allclose(kept.intensity, grey, rtol=1e-6, atol=1e-7)  # to float32 precision
        blobs = node.store.db.query(
            "SELECT LENGTH(embedding) AS e, LENGTH(intensity_features) AS g FROM envelope_results"
        )
        assert {(int(r["e"]), int(r["g"])) for r in blobs} == {(4 * d, 4 * n_levels)}
    finally:
        node.store.close()


def test_without_an_envelope_no_features_and_without_its_grey_part_no_grey_features(
    tmp_path: Path, test_bundle: TrustedBundle, shared_data: Path
) -> None:
    def no_envelope(data: dict[str, Any]) -> None:
        del data["envelope"]

    plain = _resigned(test_bundle, tmp_path / "plain", no_envelope)
    node, model, paths = _analysed(tmp_path / "a", plain, shared_data, [0, 1])
    try:
        assert model.manifest.envelope is None
        assert int(node.store.db.query("SELECT COUNT(*) FROM findings")[0][0]) == 2
        assert node.store.db.query("SELECT * FROM envelope_results") == []  # no result, no features
        assert envelope_features(node.store.db, model.model_id, model.model_version).keys == ()
    finally:
        node.store.close()

    def no_grey_part(data: dict[str, Any]) -> None:
        del data["envelope"]["intensity"]

    embedding_only = _resigned(test_bundle, tmp_path / "embedding-only", no_grey_part)
    node, model, paths = _analysed(tmp_path / "b", embedding_only, shared_data, [0, 1])
    try:
        assert model.manifest.envelope is not None and model.intensity is None
        rows = node.store.db.query("SELECT embedding, intensity_features FROM envelope_results")
        assert len(rows) == 2 and all(
            r["embedding"] is not None and r["intensity_features"] is None for r in rows
        )
        kept = envelope_features(node.store.db, model.model_id, model.model_version)
        assert sorted(kept.keys) == sorted(paths) and kept.intensity is None
        assert kept.embedding.shape == (2, len(model.manifest.envelope.mean))
    finally:
        node.store.close()
