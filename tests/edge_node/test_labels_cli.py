"""``fedclinic-edge labels``: a labeled folder imports into a node once; a bad archive is refused whole."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pydicom

from edge_node.state.database import Database
from edge_node.state.labels import LabelStore
from tests.edge_node.conftest import EdgeProcess, TrustedBundle
from tests.support.dicomgen import WrappedImage, medmnist_studies


def _archive(root: Path, shared_data: Path) -> list[WrappedImage]:
    """Six pneumonia studies; labels.csv labels three by study, two by SOP instance, leaves one out."""
    written = medmnist_studies("pneumoniamnist", "test", [0, 1, 2, 3, 4, 5], root, root=shared_data)
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_instance_uid", "sop_instance_uid", "label"])
        for item, label in zip(written[:3], ["normal", "pneumonia", "pneumonia"], strict=True):
            w.writerow([item.study_instance_uid, "", label])
        for item, label in zip(written[3:5], ["normal", "normal"], strict=True):
            w.writerow(["", item.sop_instance_uid, label])
    return written


def _values_of(paths: list[Path]) -> set[str]:
    """The UIDs and patient identity of the files: none may appear in any output."""
    found: set[str] = set()
    for p in paths:
        ds = pydicom.dcmread(p)
        found |= {str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID), str(ds.PatientName)}
    return found


def test_a_labeled_folder_imports_once_and_is_learned_from(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path, shared_data: Path
) -> None:
    edge = edge_factory(trusted_keys=str(test_bundle.public_key), study_quiet_seconds=0.2)
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    written = _archive(tmp_path / "archive", shared_data)

    first = edge.cli("labels", "import", str(tmp_path / "archive"), "--format", "json")
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert (doc["rows"], doc["files"], doc["spooled"], doc["labels_changed"]) == (5, 6, 6, 5)
    again = edge.cli("labels", "import", str(tmp_path / "archive"), "--format", "json")
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert (doc["spooled"], doc["already_spooled"], doc["labels_changed"]) == (0, 6, 0)
    assert edge.query("SELECT COUNT(*), COUNT(DISTINCT study_id) FROM instances") == [(6, 6)]
    assert edge.query("SELECT COUNT(*) FROM label_history") == [(5,)]
    # The imported studies wait for analysis like any from the PACS; the node analyses them when it runs.
    assert edge.query("SELECT DISTINCT state FROM studies") == [("queued",)]
    edge.start()
    edge.wait_idle(120)
    assert edge.query("SELECT DISTINCT state FROM studies") == [("done",)]
    assert edge.stop() == 0

    db = Database(edge.data_dir / "edge.sqlite3")
    try:
        labeled = LabelStore(db).labeled_instances()
    finally:
        db.close()
    want = {
        w.sop_instance_uid: lab
        for w, lab in zip(written, ["normal", "pneumonia", "pneumonia", "normal", "normal"], strict=False)
    }
    assert {li.sop_instance_uid: li.label for li in labeled} == want
    assert all(li.source == "import" and li.path.is_file() for li in labeled)

    listed = edge.cli("labels", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["labeled_instances"] == 5
    table = edge.cli("labels", "list")
    assert table.returncode == 0 and "pneumonia" in table.stdout
    exported = tmp_path / "audit.csv"
    out = edge.cli("labels", "export", "--out", str(exported))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(exported.open()))
    assert len(rows) == 5 and {r["source"] for r in rows} == {"import"}
    # The export is itself a labels CSV: importing it changes nothing.
    back = edge.cli("labels", "import", str(exported), "--format", "json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["labels_changed"] == 0
    history = edge.cli("labels", "export", "--history")
    assert history.returncode == 0 and history.stdout.count("\n") == 6
    # The table and the node's log carry no UID and no patient identity.
    files = [w.path for w in written]
    for text in (first.stdout + first.stderr, table.stdout, edge.log_text()):
        assert not any(v in text for v in _values_of(files))


def test_a_bad_archive_is_refused_whole(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path, shared_data: Path
) -> None:
    edge = edge_factory(trusted_keys=str(test_bundle.public_key))
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    folder = tmp_path / "archive"
    written = _archive(folder, shared_data)
    with (folder / "labels.csv").open("a", newline="") as f:
        csv.writer(f).writerow([written[5].study_instance_uid, "", "cat"])  # line 7: not a class
        csv.writer(f).writerow(["1.2.3.4", "", "normal"])  # line 8: no such file
    (folder / "notes.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")

    refused = edge.cli("labels", "import", str(folder))
    assert refused.returncode == 1
    text = refused.stderr
    assert "nothing was imported: 3 problem(s)" in text
    assert "labels.csv line 7: unknown label 'cat'" in text and "'normal', 'pneumonia'" in text
    assert "labels.csv line 8: matches no DICOM file" in text
    assert "notes.dcm: not a readable DICOM instance" in text
    assert not any(v in text for v in _values_of([w.path for w in written]))
    assert edge.query("SELECT COUNT(*) FROM instances") == [(0,)]
    assert edge.query("SELECT COUNT(*) FROM labels") == [(0,)]

    as_json = edge.cli("labels", "import", str(folder), "--format", "json")
    assert as_json.returncode == 1 and len(json.loads(as_json.stdout)["problems"]) == 3

    # A CSV on its own may only label what the node already has.
    alone = tmp_path / "alone.csv"
    alone.write_text(f"study_instance_uid,label\n{written[0].study_instance_uid},normal\n")
    refused = edge.cli("labels", "import", str(alone))
    assert refused.returncode == 1 and "line 2: this node has no such study" in refused.stderr
