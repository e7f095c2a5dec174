"""The clinician page: a real node's page in headless Chromium sets labels; the API's guards hold."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from edge_node.errors import ConfigError
from edge_node.page.password import hash_password, verify_password
from edge_node.page.server import ClinicianPage, PageConfig
from edge_node.page.thumbnail import study_thumbnail
from edge_node.protection.floor import PrivacyFloor
from edge_node.settings import load_settings
from edge_node.state.database import Database
from edge_node.state.envelope_monitor import EnvelopeResult
from edge_node.state.ingest_records import InstanceRecord
from edge_node.state.labels import LabelStore
from edge_node.state.lifecycle import StudyEvent
from edge_node.state.node_state import NodeState
from edge_node.state.runs import FindingRow, ModelInUse
from tests.edge_node.conftest import EDGE_BIN, EdgeProcess, TrustedBundle, free_port, storescu, until
from tests.support.chromium import chromium_paths, headless_chromium
from tests.support.dicomgen import medmnist_studies

STUDY = "1.2.826.0.1.3680043.8.498.1"


def test_a_clinician_confirms_and_corrects_in_chromium(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path, shared_data: Path
) -> None:
    if chromium_paths() is None:
        pytest.fail("needs Debian's chromium and chromium-driver (make system)")
    page_port = free_port()
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key),
        study_quiet_seconds=0.2,
        page_port=page_port,
        send_secondary_capture=True,
    )
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    edge.start()
    written = medmnist_studies("pneumoniamnist", "test", [0, 1, 2], tmp_path / "studies", root=shared_data)
    assert storescu(edge.port, [w.path for w in written]).returncode == 0
    edge.wait_idle(120)
    keys = {str(uid): cast(int, key) for key, uid in edge.query("SELECT id, study_uid FROM studies")}
    findings = {
        str(uid): str(label)
        for uid, label in edge.query(
            "SELECT s.study_uid, f.label FROM studies s JOIN runs r ON r.study_id = s.id"
            " JOIN findings f ON f.run_id = r.id"
        )
    }
    confirm_uid, correct_uid = written[0].study_instance_uid, written[1].study_instance_uid
    other = {"normal": "pneumonia", "pneumonia": "normal"}
    base = f"http://127.0.0.1:{page_port}"

    with headless_chromium(tmp_path / "profile") as browser:
        browser.get(base + "/")
        browser.wait_for(f'.study[data-key="{keys[written[2].study_instance_uid]}"]')
        assert len(browser.find_all(".study")) == 3
        assert "No update has left this clinic yet" in browser.text(browser.find("#left-summary"))
        card = f'.study[data-key="{keys[confirm_uid]}"]'
        browser.click(browser.find(f"{card} button.confirm"))
        browser.wait_for(f'{card} .label[data-label="{findings[confirm_uid]}"]')
        card = f'.study[data-key="{keys[correct_uid]}"]'
        browser.click(browser.find(f"{card} button.correct"))
        browser.wait_for(f'{card} .label[data-label="{other[findings[correct_uid]]}"]')
        # After a reload the page shows the labels from the node's store.
        browser.get(base + "/")
        browser.wait_for(f'{card} .label[data-label="{other[findings[correct_uid]]}"]')

    thumb = httpx.get(f"{base}/thumbnails/{keys[confirm_uid]}.png", timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert min(Image.open(io.BytesIO(thumb.content)).size) >= 96
    updates = httpx.get(f"{base}/api/updates", timeout=30).json()
    assert updates["updates"] == [] and updates["hub_url"] is None
    assert edge.stop() == 0

    db = Database(edge.data_dir / "edge.sqlite3")
    try:
        store = LabelStore(db)
        got = {(r.uid, r.label, r.source, r.who) for r in store.labels()}
        labeled = {li.sop_instance_uid: li.label for li in store.labeled_instances()}
    finally:
        db.close()
    assert got == {
        (confirm_uid, findings[confirm_uid], "page", "clinician@127.0.0.1"),
        (correct_uid, other[findings[correct_uid]], "page", "clinician@127.0.0.1"),
    }
    assert labeled == {
        written[0].sop_instance_uid: findings[confirm_uid],
        written[1].sop_instance_uid: other[findings[correct_uid]],
    }
    log = edge.log_text()
    assert "clinician page on http://127.0.0.1" in log
    for w in written:
        ds = pydicom.dcmread(w.path)
        for value in (w.study_instance_uid, w.sop_instance_uid, str(ds.PatientID), str(ds.PatientName)):
            assert value not in log


@pytest.fixture
def node_db(tmp_path: Path, test_bundle: TrustedBundle) -> Iterator[NodeState]:
    """A node database with the test bundle's model active and one received study."""
    state = NodeState.open(tmp_path / "edge.sqlite3")
    row = state.models.add("pneumonia-student", "1.0.0", test_bundle.bundle, "0" * 64, "test")
    state.models.activate(row, "install")
    state.ingest.record_instance(
        InstanceRecord(
            STUDY,
            STUDY + ".1",
            STUDY + ".1.1",
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.1.2.1",
            "CR",
            tmp_path / "missing.dcm",
            10,
            "TESTSCU",
        )
    )
    yield state
    state.close()


def _page(state: NodeState, tmp_path: Path, password_hash: str | None = None) -> ClinicianPage:
    config = PageConfig("127.0.0.1", 0, password_hash, tmp_path, tmp_path / "results", PrivacyFloor())
    page = ClinicianPage(config, state.db, hub_url=lambda: None)
    page.start()
    return page


def test_the_api_takes_labels_only_from_the_page_itself(node_db: NodeState, tmp_path: Path) -> None:
    page = _page(node_db, tmp_path)
    host, port = page.address
    base = f"http://{host}:{port}"
    body = {"study_instance_uid": STUDY, "label": "pneumonia"}
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            studies = http.get("/api/studies").json()
            assert studies["classes"] == ["normal", "pneumonia"]
            assert [s["study_instance_uid"] for s in studies["studies"]] == [STUDY]
            # A form another site posts, a cross-origin fetch, a rebinding Host: all refused.
            assert http.post("/api/labels", data=body).status_code == 415
            evil = http.post("/api/labels", json=body, headers={"Origin": "http://evil.example"})
            assert evil.status_code == 403
            site = http.post("/api/labels", json=body, headers={"Sec-Fetch-Site": "cross-site"})
            assert site.status_code == 403
            assert http.get("/api/studies", headers={"Host": f"evil.example:{port}"}).status_code == 403
            assert LabelStore(node_db.db).labels() == []
            # Wrong class, unknown study: clear refusals.
            wrong = http.post("/api/labels", json={**body, "label": "cat"})
            assert wrong.status_code == 400 and "'normal', 'pneumonia'" in wrong.json()["error"]
            assert http.post("/api/labels", json={**body, "study_instance_uid": "1.2.3"}).status_code == 404
            same_origin = {"Origin": base, "Sec-Fetch-Site": "same-origin"}
            ok = http.post("/api/labels", json=body, headers=same_origin)
            assert ok.status_code == 200 and ok.json()["changed"] is True
            assert http.get("/thumbnails/999.png").status_code == 404
            assert "no-store" in http.get("/").headers["cache-control"]
    finally:
        page.stop()
    assert [(r.uid, r.label) for r in LabelStore(node_db.db).labels()] == [(STUDY, "pneumonia")]


def _analysed(state: NodeState, findings: list[FindingRow], quantile: float | None) -> None:
    """The ready study's run, finished with ``findings`` by a model with (or without) an input envelope."""
    claim = state.runs.claim_next(quiet_seconds=0.0, now=1e12)
    assert claim is not None
    model = ModelInUse("pneumonia-student", "1.0.0", "CPUExecutionProvider", envelope_quantile=quantile)
    with state.db.tx() as c:
        state.runs.finish(c, claim, StudyEvent.DONE, reason=None, findings=findings, model=model)


def test_a_study_with_images_outside_the_input_envelope_is_marked(node_db: NodeState, tmp_path: Path) -> None:
    if chromium_paths() is None:
        pytest.fail("needs Debian's chromium and chromium-driver (make system)")
    _analysed(
        node_db,
        [
            FindingRow(STUDY + ".1.1", 0.81, "pneumonia", EnvelopeResult(STUDY + ".1.1", True, 4.2)),
            FindingRow(STUDY + ".1.2", 0.30, "normal", EnvelopeResult(STUDY + ".1.2", False, 0.4)),
            FindingRow(  # a negative image
                STUDY + ".1.3", 0.55, "pneumonia", EnvelopeResult(STUDY + ".1.3", True, 9.0, True, True)
            ),
        ],
        0.99,
    )
    plain = STUDY + "2"  # analysed by a bundle without an envelope: no mark, whatever its images
    node_db.ingest.record_instance(
        InstanceRecord(plain, plain + ".1", plain + ".1.1", "1.2.840.10008.5.1.4.1.1.1",
                       "1.2.840.10008.1.2.1", "CR", tmp_path / "missing2.dcm", 10, "TESTSCU")
    )  # fmt: skip
    _analysed(node_db, [FindingRow(plain + ".1.1", 0.9, "pneumonia")], None)
    page = _page(node_db, tmp_path)
    host, port = page.address
    base = f"http://{host}:{port}"
    try:
        studies = {
            s["study_instance_uid"]: s for s in httpx.get(f"{base}/api/studies", timeout=30).json()["studies"]
        }
        marked, unmarked = studies[STUDY], studies[plain]
        assert (marked["envelope_images"], marked["outside_envelope"], marked["negative_images"]) == (3, 2, 1)
        assert (unmarked["envelope_images"], unmarked["outside_envelope"]) == (None, None)
        assert unmarked["negative_images"] is None
        with headless_chromium(tmp_path / "profile") as browser:
            browser.get(base + "/")
            note = browser.wait_for(f'.study[data-key="{marked["key"]}"] .envelope')
            assert browser.text(note) == (
                "2 of 3 images outside the model's input envelope: result less reliable (1 looks like a"
                " negative image: check the display header)"
            )
            assert browser.find_all(f'.study[data-key="{unmarked["key"]}"] .envelope') == []
    finally:
        page.stop()


def test_a_password_guards_the_page_and_a_lan_bind_needs_one(node_db: NodeState, tmp_path: Path) -> None:
    hashed = hash_password("correct horse battery")
    assert verify_password("correct horse battery", hashed) and not verify_password("wrong", hashed)
    assert "correct horse" not in hashed
    page = _page(node_db, tmp_path, hashed)
    host, port = page.address

    def auth(password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"dr:{password}".encode()).decode()}

    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as http:
            bare = http.get("/api/studies")
            assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic")
            assert http.get("/api/studies", headers=auth("wrong password")).status_code == 401
            assert http.get("/api/studies", headers=auth("correct horse battery")).status_code == 200
            labeled = http.post(
                "/api/labels",
                json={"study_instance_uid": STUDY, "label": "normal"},
                headers=auth("correct horse battery"),
            )
            assert labeled.status_code == 200 and labeled.json()["labeled_by"] == "dr@127.0.0.1 (page)"
    finally:
        page.stop()

    with pytest.raises(ConfigError, match="page_password_hash"):
        PageConfig("0.0.0.0", 0, None, tmp_path, tmp_path, PrivacyFloor())
    with pytest.raises(ConfigError, match=r"page_host '0\.0\.0\.0' is not a loopback address"):
        load_settings(data_dir=tmp_path, page_host="0.0.0.0")
    with pytest.raises(ConfigError, match="page-password"):
        load_settings(data_dir=tmp_path, page_host="127.0.0.1", page_password_hash="plain text")
    assert (
        load_settings(data_dir=tmp_path, page_host="0.0.0.0", page_password_hash=hashed).page_host
        == "0.0.0.0"
    )
    # `serve` refuses such a setting at start, naming the key.
    config = tmp_path / "edge.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\npage_host = "10.1.2.3"\n')
    refused = subprocess.run(
        [str(EDGE_BIN), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "page_password_hash" in refused.stderr
    made = subprocess.run(
        [str(EDGE_BIN), "page-password"],
        input="a long secret\na long secret\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip()
    assert line.startswith('page_password_hash = "scrypt$') and "a long secret" not in made.stdout
    assert verify_password("a long secret", line.split('"')[1])


def test_without_a_capture_the_thumbnail_comes_from_the_spooled_image(
    tmp_path: Path, shared_data: Path
) -> None:
    [item] = medmnist_studies("pneumoniamnist", "test", [7], tmp_path / "spool", root=shared_data)
    state = NodeState.open(tmp_path / "edge.sqlite3")
    try:
        study_id, _ = state.ingest.record_instance(
            InstanceRecord(
                item.study_instance_uid,
                item.series_instance_uid,
                item.sop_instance_uid,
                "1.2.840.10008.5.1.4.1.1.1",
                "1.2.840.10008.1.2.1",
                "CR",
                item.path,
                10,
                "TESTSCU",
            )
        )
        png = study_thumbnail(state.db, tmp_path / "results", study_id)
    finally:
        state.close()
    assert png is not None
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (112, 112)  # 28 px enlarged 4x for a person to see
    want = pydicom.dcmread(item.path).pixel_array
    # A nearest-neighbour enlargement of a linear stretch: every 4th pixel is the source image, rescaled.
    got = np.asarray(image)[::4, ::4].astype(np.float64)
    assert np.corrcoef(got.ravel(), want.astype(np.float64).ravel())[0, 1] > 0.999


def test_a_node_whose_page_port_is_taken_still_serves_its_pacs(
    edge_factory: Callable[..., EdgeProcess], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        edge = edge_factory(page_port=taken.getsockname()[1])
        edge.start()  # returns once the DICOM listener answers C-ECHO; the page starts after it
        refused = "the clinician page cannot listen on 127.0.0.1"
        until(lambda: refused in edge.log_text() or not edge.alive(), within=30)
        assert refused in edge.log_text()
        assert edge.alive()  # still serving its PACS
        assert edge.stop() == 0
