"""Must-show 3: every bad update is refused with its reason, and nothing in the store changes."""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from edge_node.protocol.wire import Task, TaskList, UpdateSubmission
from hub.service.settings import load_settings
from hub.store.artifacts import store_tensors
from hub.store.database import Database, open_database
from hub.store.schema import Base
from tests.hub.service.conftest import SERVICE_ENV, submission, zeros_update
from tests.support.hub_server import EnrolledNode, HubServer

pytestmark = [pytest.mark.hub, pytest.mark.slow]

START = {"conv.weight": np.zeros((4, 1, 3, 3), np.float32), "fc.bias": np.zeros(3, np.float32)}
MAX_UPDATE = int(SERVICE_ENV["FEDCLINIC_HUB_MAX_UPDATE_BYTES"])
MAX_UNPACKED = int(SERVICE_ENV["FEDCLINIC_HUB_MAX_UNPACKED_BYTES"])


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    out = {}
    with db.session() as session:
        for table in Base.metadata.sorted_tables:
            rows = session.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(r) for r in rows]
    return out


def _with_payload(body: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The body with another npz payload whose envelope matches it (size, sha256)."""
    sub = UpdateSubmission.model_validate(body)
    env = sub.envelope.model_copy(
        update={"payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload)}
    )
    return UpdateSubmission(
        task_id=sub.task_id, envelope=env, payload_b64=base64.b64encode(payload).decode()
    ).model_dump(mode="json")


def _bomb() -> bytes:
    """An npz whose one member is far larger unpacked than the hub allows (zeros compress ~1000:1)."""
    buf = io.BytesIO()
    header = (
        b"\x93NUMPY\x01\x00"
        + b"{'descr': '<f4', 'fortran_order': False, 'shape': (4, 1, 3, 3), }".ljust(118)
        + b"\n"
    )
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("conv.weight.npy", "w") as fh,
    ):
        fh.write(header)
        chunk = bytes(1024 * 1024)
        for _ in range(4 * MAX_UNPACKED // len(chunk)):
            fh.write(chunk)
    return buf.getvalue()


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 65536 + 1):
        yield b"x" * 65536


def test_bad_updates_are_refused_and_change_nothing(any_hub: HubServer) -> None:
    server = any_hub
    settings = load_settings(server.data_dir)
    db = open_database(settings.db_url, migrate=False)
    tag = secrets.token_hex(3)
    try:
        with server.client() as client:
            node: EnrolledNode = server.enroll(client, f"bad-{tag}")
            with db.session() as session:
                art = store_tensors(session, START)
            common = {"nodes": [node.node_id], "model_artifact": art, "config": {"max_norm": 10.0}}
            old = client.post(
                "/v1/admin/rounds",
                json={**common, "strategy": "fedavg", "deadline_s": 600},
                headers=server.admin_headers,
            )
            assert old.status_code == 201, old.text
            (old_task,) = TaskList.model_validate(
                client.get("/v1/node/tasks", headers=node.headers).json()
            ).tasks
            assert (
                client.post(
                    f"/v1/admin/rounds/{old.json()['round_id']}/cancel", headers=server.admin_headers
                ).status_code
                == 200
            )
            r = client.post(
                "/v1/admin/rounds",
                json={**common, "strategy": "fedavg", "deadline_s": 600},
                headers=server.admin_headers,
            )
            assert r.status_code == 201, r.text
            (task,) = TaskList.model_validate(client.get("/v1/node/tasks", headers=node.headers).json()).tasks
            good = zeros_update(task, 0.01)

            def post(t: Task, body: Any) -> httpx.Response:
                return client.post(f"/v1/tasks/{t.task_id}/update", json=body, headers=node.headers)

            nan = {**good, "fc.bias": np.array([0.0, np.nan, 0.0], np.float32)}
            inf = {**good, "conv.weight": np.full((4, 1, 3, 3), np.inf, np.float32)}
            renamed = {"conv.weights": good["conv.weight"], "fc.bias": good["fc.bias"]}
            reshaped = {**good, "fc.bias": np.zeros(4, np.float32)}
            huge = {**good, "conv.weight": np.full((4, 1, 3, 3), 100.0, np.float32)}
            tampered = submission(task, node.node_id, good)
            tampered["payload_b64"] = base64.b64encode(b"PK" + bytes(30)).decode()
            cases: list[tuple[str, Task, Any, int, str]] = [
                ("NaN", task, submission(task, node.node_id, nan), 422, "NaN or Inf"),
                ("Inf", task, submission(task, node.node_id, inf), 422, "NaN or Inf"),
                ("wrong names", task, submission(task, node.node_id, renamed), 422, "wrong tensor names"),
                ("wrong shape", task, submission(task, node.node_id, reshaped), 422, "has shape (4,)"),
                ("huge norm", task, submission(task, node.node_id, huge), 422, "exceeds the bound"),
                (
                    "wrong round",
                    task,
                    submission(task, node.node_id, good, rnd=task.round + 7),
                    422,
                    "is for round",
                ),
                ("closed round's task", old_task, submission(old_task, node.node_id, good), 409, "too late"),
                ("tampered payload", task, tampered, 422, "payload refused"),
                (
                    "compression bomb",
                    task,
                    _with_payload(submission(task, node.node_id, good), _bomb()),
                    422,
                    "unpack",
                ),
                (
                    "object array",
                    task,
                    _with_payload(submission(task, node.node_id, good), _pickled()),
                    422,
                    "payload refused",
                ),
            ]
            before = snapshot(db)
            for name, t, body, status, reason in cases:
                r = post(t, body)
                assert r.status_code == status, (name, r.status_code, r.text)
                assert reason in r.json()["reason"], (name, r.json())
                assert snapshot(db) == before, f"{name} changed the store"

            # Bodies over the cap: refused from Content-Length, and while streaming without one.
            big = b"{" + b" " * (2 * MAX_UPDATE) + b"}"
            r = client.post(
                f"/v1/tasks/{task.task_id}/update",
                content=big,
                headers={**node.headers, "Content-Type": "application/json"},
            )
            assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
            r = client.post(
                f"/v1/tasks/{task.task_id}/update",
                content=_chunks(2 * MAX_UPDATE),
                headers={**node.headers, "Content-Type": "application/json"},
            )
            assert r.status_code == 413, r.text
            assert snapshot(db) == before, "a body over the cap changed the store"

            # The good update goes in once; a different one for the same task is a refused replay.
            first = post(task, submission(task, node.node_id, good))
            assert first.status_code == 200 and first.json()["first_time"] is True, first.text
            after_good = snapshot(db)
            replay = post(task, submission(task, node.node_id, zeros_update(task, 0.02)))
            assert replay.status_code == 409 and replay.json()["code"] == "duplicate_update"
            assert snapshot(db) == after_good
    finally:
        db.close()


def _pickled() -> bytes:
    """An npz whose member is an object array: loading it would need pickle."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("conv.weight.npy", buf.getvalue())
        zf.writestr("fc.bias.npy", buf.getvalue())
    return out.getvalue()
