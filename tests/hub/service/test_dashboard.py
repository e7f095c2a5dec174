"""The hub dashboard in a real headless Chromium over HTTPS: sign-in, enrolled nodes, a finished round."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from edge_node.protocol.tensors import encode_tensors
from edge_node.protocol.wire import EnrollRequest, decode_join_code
from hub.api.dashboard import Readings, dashboard_router, render_dashboard
from hub.service.enrollment import enroll_node, issue_join_code
from hub.store.database import Database, open_database
from hub.store.schema import Artifact, Round, Task, Update, utcnow
from tests.hub.fl.test_update_audit import honest, scaled
from tests.support.chromium import chromium_paths, headless_chromium
from tests.support.tls import Certificate, self_signed

pytestmark = pytest.mark.skipif(
    chromium_paths() is None, reason="needs Debian's chromium and chromium-driver"
)

ADMIN_TOKEN = secrets.token_urlsafe(32)


def _is_admin(token: str) -> bool:
    want = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), want)


def _populate(db: Database) -> None:
    """Three clinics enrolled through the real enrollment path, one still pending, a round that finished
    with two of its three nodes' updates, and a training round in which clinic-east claims 1,000× its images
    for an update a hundredth as long (a free rider), the others honest."""
    nodes = []
    for name in ("clinic-north", "clinic-south", "clinic-east", "clinic-west"):
        with db.session() as s:
            code, _, _ = issue_join_code(
                s,
                name=name,
                cohort="default",
                ttl_s=600,
                hub_url="https://127.0.0.1:1",
                tls_sha256="0" * 64,
                actor="admin",
            )
        if name == "clinic-west":
            continue  # issued a code, never used it
        request = EnrollRequest(
            join_secret=decode_join_code(code).secret,
            credential=secrets.token_urlsafe(32),
            edge_version="0.1.0",
        )
        with db.session() as s:
            node = enroll_node(s, request)
            node.last_heartbeat = utcnow() - timedelta(seconds=12)
            node.model_id, node.model_version = "pneumonia-student", "1.0.0"
            # What the nodes' last heartbeats said of their images and the model's input envelope.
            heartbeat_counts: dict[str, dict[str, Any]] = {
                "clinic-north": {
                    "envelope_images": 200,
                    "envelope_outside": 3,
                    "envelope_drifting": 0,
                    "envelope_negative": 0,
                    "envelope_kept": True,  # not a count: not shown
                },
                "clinic-south": {
                    "envelope_images": 200,
                    "envelope_outside": 41,
                    "envelope_drifting": 1,
                    "envelope_negative": 1,
                    "envelope_kept": 180,
                },
                "clinic-east": {"envelope_images": "200", "envelope_outside": -1},  # not counts: ignored
            }
            node.counts = heartbeat_counts[name]
            nodes.append(node.id)
    now = utcnow()
    with db.session() as s:
        s.add(Artifact(id="a-start", kind="tensors", sha256="0" * 64, size=0, data=b"", created_at=now))
    # A stats round that finished with two of its three nodes' answers.
    _add_round(db, "r-1", 1, "stats", "published", nodes, {n: (b"", 10) for n in nodes[:2]}, min_results=2)
    # A training round: the two larger clinics honest, clinic-east the free rider.
    images = [1_000, 300, 60]
    answers = {}
    for i, node_id in enumerate(nodes):
        update = honest(i, scale=float(np.sqrt(images[i] / 100)))
        if i == 2:
            answers[node_id] = (encode_tensors(scaled(update, 0.01)), 1_000 * images[i])
        else:
            answers[node_id] = (encode_tensors(update), images[i])
    _add_round(db, "r-2", 2, "fedavg", "collecting", nodes, answers, min_results=3, kind="weights_delta")


def _add_round(
    db: Database,
    round_id: str,
    number: int,
    strategy: str,
    state: str,
    nodes: list[str],
    answers: dict[str, tuple[bytes, int]],
    *,
    min_results: int,
    kind: str | None = None,
) -> None:
    """A round from the artifact "a-start" with a task per node; ``answers`` (node → payload, images) are
    its accepted updates, the other nodes' tasks closed unanswered."""
    now = utcnow()
    with db.session() as s:
        s.add(
            Round(
                id=round_id,
                number=number,
                strategy=strategy,
                kind=kind or strategy,
                config={},
                state=state,
                nodes=nodes,
                min_results=min_results,
                deadline=now + timedelta(minutes=5),
                created_at=now,
                updated_at=now,
                model_artifact="a-start",
            )
        )
        s.flush()
        for i, node_id in enumerate(nodes):
            s.add(
                Task(
                    id=f"{round_id}-t{i}",
                    round_id=round_id,
                    node_id=node_id,
                    state="done" if node_id in answers else "closed",
                    config={},
                    params_artifact="a-start",
                    expected=[],
                    created_at=now,
                )
            )
        s.flush()
        for i, node_id in enumerate(nodes):
            if node_id not in answers:
                continue
            payload, images = answers[node_id]
            s.add(
                Update(
                    task_id=f"{round_id}-t{i}",
                    round_id=round_id,
                    node_id=node_id,
                    payload_sha256=hashlib.sha256(payload).hexdigest(),
                    payload=payload,
                    num_examples=images,
                    metrics={},
                    received_at=now,
                )
            )


@pytest.fixture
def dashboard_url(tmp_path: Path) -> Iterator[str]:
    db = open_database(f"sqlite:///{tmp_path / 'hub.db'}")
    _populate(db)
    app = FastAPI()
    app.include_router(dashboard_router(db, _is_admin))
    cert: Certificate = self_signed(tmp_path / "tls")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ssl_certfile=str(cert.cert_path),
            ssl_keyfile=str(cert.key_path),
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "dashboard server did not start"
        time.sleep(0.05)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        db.close()


def test_dashboard_needs_the_admin_token(dashboard_url: str) -> None:
    with httpx.Client(verify=False) as client:
        assert client.get(f"{dashboard_url}/dashboard").status_code == 401
        wrong = client.get(f"{dashboard_url}/dashboard", headers={"Authorization": "Bearer n-1.abc"})
        assert wrong.status_code == 401 and "clinic-north" not in wrong.text
        ok = client.get(f"{dashboard_url}/dashboard", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert ok.status_code == 200 and "clinic-north" in ok.text


def test_the_drift_alarm_stands_out_on_the_dashboard(dashboard_url: str) -> None:
    with httpx.Client(verify=False) as client:
        page = client.get(f"{dashboard_url}/dashboard", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert page.status_code == 200
    alarms = re.findall(r'<span class="alarm" title="([^"]*)">([^<]*)</span>', page.text)
    assert [text for _, text in alarms] == ["41 of 200 outside (drift, looks negative); 180 kept"]
    assert "check the display header" in alarms[0][0]  # the likely cause, on hover
    assert "3 of 200 outside</td>" in page.text  # clinic-north: nothing to note


def test_a_node_the_reading_names_stands_out_in_its_round(dashboard_url: str) -> None:
    with httpx.Client(verify=False) as client:
        page = client.get(f"{dashboard_url}/dashboard", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        again = client.get(f"{dashboard_url}/dashboard", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert page.status_code == 200
    named = re.findall(r'<span class="alarm named" title="([^"]*)">([^<]*)</span>', page.text)
    assert [text for _, text in named] == ["named: clinic-east"]
    assert "claims far more images than its update shows" in named[0][0]  # the reason, on hover
    # The stats round holds no model updates: its cell is empty; a reload reads the same.
    assert "nobody named" not in page.text and again.text.count("named: clinic-east") == 1


def test_a_round_s_reading_is_kept_until_its_updates_or_state_change(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        _populate(db)
        readings: Readings = {}
        assert "named: clinic-east" in render_dashboard(db, readings=readings)
        key = ("r-2", 3, "collecting")
        assert readings[key].startswith('<span class="alarm named"') and len(readings) == 2
        readings[key] = "kept-cell"  # a reload shows what was kept, without reading the updates again
        assert "kept-cell" in render_dashboard(db, readings=readings)
        with db.session() as s:
            r2 = s.get(Round, "r-2")
            assert r2 is not None
            r2.state = "published"
        page = render_dashboard(db, readings=readings)
        assert "kept-cell" not in page and "named: clinic-east" in page
        assert key not in readings and ("r-2", 3, "published") in readings
    finally:
        db.close()


def test_dashboard_in_headless_chromium(dashboard_url: str, tmp_path: Path) -> None:
    with headless_chromium(tmp_path / "profile") as browser:
        browser.get(f"{dashboard_url}/dashboard")
        assert browser.find_all("#nodes") == []  # nothing shown before signing in
        browser.type(browser.find("#token"), "not-the-token")
        browser.click(browser.find("#sign-in"))
        assert "not the admin token" in browser.text(browser.wait_for("#login-error"))
        browser.type(browser.wait_for("#token"), ADMIN_TOKEN)
        browser.click(browser.find("#sign-in"))
        nodes = browser.text(browser.wait_for("#nodes"))
        rounds = browser.text(browser.find("#rounds"))
        (tmp_path / "dashboard.png").write_bytes(browser.screenshot_png())
    for name in ("clinic-north", "clinic-south", "clinic-east"):
        assert name in nodes
    assert "clinic-west" in nodes and "pending" in nodes  # issued a code, never enrolled
    assert nodes.count("active") == 3
    ages = [int(a) for a in re.findall(r"(\d+) s ago", nodes)]
    assert len(ages) == 3 and all(12 <= a < 120 for a in ages)  # the heartbeats, 12 s old when written
    assert "pneumonia-student 1.0.0" in nodes
    assert "3 of 200 outside" in nodes and "41 of 200 outside (drift, looks negative)" in nodes
    assert nodes.count("outside") == 2  # clinic-east sent values that are not counts
    assert "published" in rounds and "2 of 3 (needs 2)" in rounds
    assert "collecting" in rounds and "3 of 3 (needs 3)" in rounds and "named: clinic-east" in rounds
