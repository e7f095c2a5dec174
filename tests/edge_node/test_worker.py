"""Worker and sender in-process: real analysis of real images, outbox to a real storescp, backoff, idling."""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

import pydicom
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.uid import generate_uid

from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox
from edge_node.delivery.sender import LINGER_SECONDS, Sender, backoff_seconds
from edge_node.inference.model_slot import ModelSlot
from edge_node.ingest.spool import Spool
from edge_node.state.node_state import NodeState
from edge_node.worker import MODEL_POLL_SECONDS, Worker, WorkerConfig
from tests.edge_node.conftest import (
    Storescp,
    TrustedBundle,
    dicom_dir,
    free_port,
    make_ct_instances,
    make_signed_bundle,
)
from tests.support.dicomgen import medmnist_studies

DX = dicom_dir() / "highdicom" / "dx_image.dcm"


class Node:
    """The pieces of a node without the listener: state, spool, model slot, worker, sender."""

    def __init__(self, root: Path, bundle: TrustedBundle, destinations: list[Destination]) -> None:
        self.store = NodeState.open(root / "edge.sqlite3")
        self.outbox = Outbox(self.store.db)
        self.spool = Spool(root / "spool", self.store.ingest, max_instance_bytes=10**8, min_free_bytes=0)
        self.models = ModelSlot(
            self.store.models,
            root / "models",
            bundle.public_key,
            providers=["CPUExecutionProvider"],
            threads=1,
        )
        self.sender = Sender(self.outbox, "EDGE", base_seconds=0.2, max_seconds=1.0)
        self.worker = Worker(
            self.store.runs,
            self.outbox,
            self.models,
            WorkerConfig(
                quiet_seconds=0.5,
                results_dir=root / "results",
                destinations=destinations,
                secondary_capture=True,
            ),
            on_results=self.sender.wake,
        )

    def receive(self, files: list[Path]) -> int:
        study_ids = {self.spool.put(f.read_bytes(), calling_ae="TESTSCU").study_id for f in files}
        return self.store.ingest.mark_complete(sorted(study_ids))


def test_study_is_analysed_recorded_and_sent(
    tmp_path: Path, test_bundle: TrustedBundle, pacs: Storescp
) -> None:
    node = Node(tmp_path / "node", test_bundle, [Destination("PACS", "127.0.0.1", pacs.port)])
    node.models.install(test_bundle.bundle)
    assert node.receive(make_ct_instances(tmp_path / "dx", 3, source=DX)) == 1
    assert node.worker.step() == 0.0  # one study processed, look again at once
    summary = node.store.status.recent_studies()[0]
    assert summary.state == "done" and summary.runs == 1
    assert summary.top_label is not None and summary.top_score is not None and 0.0 <= summary.top_score <= 1.0
    assert summary.model is not None and summary.model.startswith(node.models.current().model_id)  # type: ignore[union-attr]
    findings = node.store.db.query("SELECT COUNT(*) FROM findings")[0][0]
    assert findings == 3
    # Everything sent, nothing to retry: the sender sleeps until its association's linger ends (then None).
    assert 0 < (node.sender.step() or 0) <= LINGER_SECONDS
    node.sender.close_links()
    assert node.store.status.counts()["outbox_sent"] > 0 and node.store.status.counts()["outbox_pending"] == 0
    assert node.store.status.recent_studies()[0].results == "sent"
    received = {p.name.split(".", 1)[1] for p in pacs.files()}
    sent = {
        str(pydicom.dcmread(str(r[0]), stop_before_pixels=True).SOPInstanceUID)
        for r in node.store.db.query("SELECT path FROM outbox")
    }
    assert received == sent
    # Idle: nothing waits, so the worker would sleep until woken (no polling).
    assert node.worker.step() is None


def test_each_analysed_image_feeds_the_input_envelope_monitor(
    tmp_path: Path, test_bundle: TrustedBundle, shared_data: Path
) -> None:
    node = Node(tmp_path / "node", test_bundle, [])
    node.models.install(test_bundle.bundle)
    model = node.models.current()
    assert model is not None and model.manifest.envelope is not None
    assert model.manifest.envelope.intensity is not None, "rebuild the test bundle: it has no intensity part"
    written = medmnist_studies("pneumoniamnist", "test", [0, 1, 2, 3], tmp_path / "cr", root=shared_data)
    # Test image 3 again in a study of its own, its header saying MONOCHROME1 for MONOCHROME2 pixels: its
    # grey values look like a negative of the validation images' (tests/edge_node/analysis/test_envelope.py).
    ds = pydicom.dcmread(written[3].path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "negative.dcm", enforce_file_format=True)
    node.receive([*(w.path for w in written), tmp_path / "negative.dcm"])  # five one-image studies
    assert node.worker.step() == 0.0  # analysed in one batch
    rows = node.store.db.query(
        "SELECT e.sop_instance_uid, e.outside, e.ratio, e.model_id, e.model_version, e.quantile,"
        " e.intensity_outside, e.negative"
        " FROM envelope_results e JOIN findings f ON f.run_id = e.run_id"
        " AND f.sop_instance_uid = e.sop_instance_uid"
    )
    assert sorted(r[0] for r in rows) == sorted([*(w.sop_instance_uid for w in written), ds.SOPInstanceUID])
    quantile = model.manifest.envelope.quantile
    assert all((r[3], r[4], r[5]) == (model.model_id, model.model_version, quantile) for r in rows)
    assert all(bool(r[1]) == (r[2] > 1.0) for r in rows)  # the flag and the ratio tell the same
    assert all(r[6] in (0, 1) and r[7] in (0, 1) for r in rows)  # every image's grey values were judged
    assert all(r[1] >= r[6] >= r[7] for r in rows)  # outside the intensity part is outside; negative too
    assert [(r[6], r[7]) for r in rows if r[0] == ds.SOPInstanceUID] == [(1, 1)]
    assert sum(r[7] for r in rows) == 1  # only the image with the wrong header looks negative
    window = node.store.envelope.window_of(model.model_id, model.model_version)
    assert window is not None and (window.images, window.outside) == (5, sum(r[1] for r in rows))
    assert (window.intensity_outside, window.negative) == (sum(r[6] for r in rows), 1)
    assert not window.looks_negative  # one image of five: too few to say


def test_skipped_study_records_the_reason(tmp_path: Path, test_bundle: TrustedBundle) -> None:
    node = Node(tmp_path / "node", test_bundle, [])
    node.models.install(test_bundle.bundle)
    node.receive(make_ct_instances(tmp_path / "ct", 2))  # CT for a chest X-ray model
    node.worker.step()
    summary = node.store.status.recent_studies()[0]
    assert summary.state == "skipped" and summary.reason and "CT" in summary.reason


def test_worker_waits_for_quiet_time_and_for_a_model(tmp_path: Path, test_bundle: TrustedBundle) -> None:
    node = Node(tmp_path / "node", test_bundle, [])
    files = make_ct_instances(tmp_path / "dx", 1, source=DX)
    node.spool.put(files[0].read_bytes(), calling_ae="TESTSCU")  # no release: quiet time decides
    wait = node.worker.step()  # not quiet yet: sleep until it will be
    assert wait is not None and 0.0 < wait <= 0.52
    time.sleep(wait)
    assert node.worker.step() == MODEL_POLL_SECONDS  # ready, but no model: poll for an install, don't spin
    node.models.install(test_bundle.bundle)
    assert node.worker.step() == 0.0
    assert node.store.status.recent_studies()[0].state == "done"


def test_failed_send_backs_off_and_keeps_the_entry(tmp_path: Path, test_bundle: TrustedBundle) -> None:
    dead = Destination("PACS", "127.0.0.1", free_port())  # nobody listens here
    node = Node(tmp_path / "node", test_bundle, [dead])
    node.models.install(test_bundle.bundle)
    node.receive(make_ct_instances(tmp_path / "dx", 1, source=DX))
    node.worker.step()
    before = time.time()
    wait = node.sender.step()
    assert wait is not None and 0.0 < wait <= 0.2
    rows = node.store.db.query("SELECT attempts, next_try, last_error, state FROM outbox")
    assert rows and all(r[0] == 1 and r[1] >= before + 0.19 and r[2] and r[3] == "pending" for r in rows)
    assert "PACS@127.0.0.1" in str(node.store.status.last_send_error())


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_seconds(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_threads_idle_without_work_and_stop_promptly(tmp_path: Path, test_bundle: TrustedBundle) -> None:
    node = Node(tmp_path / "node", test_bundle, [])
    node.worker.start()
    node.sender.start()
    time.sleep(0.3)
    t0 = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - t0 < 0.05, "idle threads must sleep, not spin"
    t1 = time.monotonic()
    node.worker.stop()
    node.sender.stop()
    assert time.monotonic() - t1 < 2.0


def test_a_model_that_fails_to_load_leaves_the_previous_one_serving(
    tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = signing_key
    store = NodeState.open(tmp_path / "edge.sqlite3")
    slot = ModelSlot(store.models, tmp_path / "models", pub, providers=["CPUExecutionProvider"], threads=1)
    slot.install(make_signed_bundle(tmp_path / "v1", key, version="1.0.0", seed=1))
    first = slot.current()
    assert first is not None and first.model_version == "1.0.0"
    second = slot.install(make_signed_bundle(tmp_path / "v2", key, version="2.0.0", seed=2))
    # The installed copy is damaged on disk after installation: verification at load time refuses it.
    onnx = second.path / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\x00")
    serving = slot.current()
    assert serving is first  # still the previous model, not None and not the damaged one
    slot.rollback()
    assert slot.current() is not None and slot.current().model_version == "1.0.0"  # type: ignore[union-attr]


class _FullDiskOutbox(Outbox):
    """An outbox whose write fails as on a full disk (SQLite raises "database or disk is full")."""

    @staticmethod
    def enqueue(*args: object, **kwargs: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")


def test_a_run_whose_outcome_cannot_be_recorded_ends_failed_not_processing(
    tmp_path: Path, test_bundle: TrustedBundle
) -> None:
    node = Node(tmp_path / "node", test_bundle, [Destination("PACS", "127.0.0.1", free_port())])
    node.models.install(test_bundle.bundle)
    node.worker.outbox = _FullDiskOutbox(node.store.db)
    assert node.receive(make_ct_instances(tmp_path / "dx", 2, source=DX)) == 1
    assert node.worker.step() == 0.0
    (summary,) = node.store.status.recent_studies()
    assert summary.state == "failed"
    (reason,) = node.store.db.query("SELECT reason FROM runs")
    assert "could not be recorded" in str(reason[0]) and "check the disk" in str(reason[0])
    assert node.store.db.query("SELECT COUNT(*) FROM outbox")[0][0] == 0
    assert not any((tmp_path / "node" / "results").glob("run-*/*"))  # no orphan result files


def test_results_are_private_and_a_skipped_run_leaves_no_directory(
    tmp_path: Path, test_bundle: TrustedBundle
) -> None:
    node = Node(tmp_path / "node", test_bundle, [])
    node.models.install(test_bundle.bundle)
    assert node.receive(make_ct_instances(tmp_path / "dx", 1, source=DX)) == 1
    assert node.worker.step() == 0.0
    files = list((tmp_path / "node" / "results").glob("run-*/*.dcm"))
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(stat.S_IMODE(p.parent.stat().st_mode) & 0o077 == 0 for p in files)
    # A CT study is skipped by this CR/DX model: no result directory for its run.
    assert node.receive(make_ct_instances(tmp_path / "ct", 1)) == 1
    assert node.worker.step() == 0.0
    assert len(list((tmp_path / "node" / "results").iterdir())) == 1


def test_ready_studies_go_through_together_in_bounded_batches(
    tmp_path: Path, test_bundle: TrustedBundle
) -> None:
    node = Node(tmp_path / "node", test_bundle, [Destination("PACS", "127.0.0.1", free_port())])
    node.models.install(test_bundle.bundle)
    node.worker.config.batch_max = 3
    for i in range(4):
        assert node.receive(make_ct_instances(tmp_path / f"dx{i}", 2, source=DX)) == 1
    assert node.receive(make_ct_instances(tmp_path / "ct", 1)) == 1  # refused by this CR/DX model
    assert node.worker.step() == 0.0
    assert len(node.store.db.query("SELECT id FROM runs")) == 3  # the first batch: three studies
    assert node.worker.step() == 0.0
    states = sorted(str(r[0]) for r in node.store.db.query("SELECT state FROM studies"))
    assert states == ["done", "done", "done", "done", "skipped"]
    assert node.store.db.query("SELECT COUNT(*) FROM findings")[0][0] == 4 * 2
    # One SR per done study, each in its own run's directory; the skipped one left none.
    assert node.store.db.query("SELECT COUNT(DISTINCT run_id) FROM outbox")[0][0] == 4
    assert len(list((tmp_path / "node" / "results").iterdir())) == 4
    assert node.worker.step() is None
