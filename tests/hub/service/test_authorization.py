"""Must-show 2, over real HTTPS: who may call what (SQLite, and PostgreSQL behind two workers)."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_node.protocol.wire import EnrollRequest, TaskList, decode_join_code
from hub.service.datadir import load_signing_key
from hub.service.enrollment import issue_join_code
from hub.service.publishing import publish_bundle
from hub.service.settings import load_settings
from hub.store.artifacts import store_tensors
from hub.store.database import open_database
from tests.hub.service.conftest import bundle_root, submission, zeros_update
from tests.support.hub_server import HubServer

pytestmark = [pytest.mark.hub, pytest.mark.slow]

NODE_ROUTES = [
    ("POST", "/v1/node/heartbeat", {"edge_version": "1"}),
    ("POST", "/v1/node/credential", {"new_credential": "x" * 43}),
    ("GET", "/v1/node/bundle", None),
    ("GET", "/v1/bundles/0123456789abcdef/archive", None),
    ("GET", "/v1/node/tasks", None),
    ("GET", "/v1/tasks/t-0/params", None),
]
ADMIN_ROUTES = [
    ("GET", "/v1/admin/nodes", None),
    ("POST", "/v1/admin/nodes", {"node_name": "someone"}),
    ("POST", "/v1/admin/nodes/n-0/revoke", None),
    ("GET", "/v1/admin/rounds", None),
    ("POST", "/v1/admin/rounds", {"strategy": "stats", "config": {"num_classes": 2}}),
    ("GET", "/v1/admin/rounds/r-0", None),
    ("GET", "/v1/admin/rounds/r-0/updates", None),
    ("POST", "/v1/admin/rounds/r-0/cancel", None),
    ("GET", "/v1/admin/publications", None),
    ("POST", "/v1/admin/publications/rollback", {"to_publication_id": "00"}),
    ("GET", "/v1/admin/status", None),
]


def _call(
    client: httpx.Client, method: str, path: str, body: object, headers: dict[str, str]
) -> httpx.Response:
    return client.request(method, path, json=body, headers=headers)


def test_authorization_matrix(any_hub: HubServer, tmp_path: Path) -> None:
    server = any_hub
    settings = load_settings(server.data_dir)
    db = open_database(settings.db_url, migrate=False)
    tag = secrets.token_hex(3)
    try:
        with server.client() as client:
            a = server.enroll(client, f"auth-a-{tag}", cohort=f"ca{tag}")
            b = server.enroll(client, f"auth-b-{tag}", cohort=f"cb{tag}")
            revoked = server.enroll(client, f"auth-r-{tag}", cohort=f"ca{tag}")

            # No credential, or a made-up one: 401 on every node and admin route.
            for method, path, body in NODE_ROUTES + ADMIN_ROUTES:
                for headers in (
                    {},
                    {"Authorization": "Bearer n-nobody.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
                ):
                    r = _call(client, method, path, body, headers)
                    assert r.status_code == 401, (method, path, r.status_code, r.text)
                    assert r.json()["code"] == "unauthenticated"

            # Admin routes refuse a valid node credential with 403.
            for method, path, body in ADMIN_ROUTES:
                r = _call(client, method, path, body, a.headers)
                assert r.status_code == 403, (method, path, r.text)
                assert r.json()["code"] == "forbidden"

            # A round for A and B: A cannot read B's task, nor submit to it, nor submit in B's name.
            with db.session() as session:
                art = store_tensors(session, {"w": np.zeros((2, 2), np.float32)})
            r = client.post(
                "/v1/admin/rounds",
                json={
                    "strategy": "fedavg",
                    "nodes": [a.node_id, b.node_id],
                    "deadline_s": 600,
                    "model_artifact": art,
                },
                headers=server.admin_headers,
            )
            assert r.status_code == 201, r.text
            round_id = r.json()["round_id"]
            (task_a,) = TaskList.model_validate(client.get("/v1/node/tasks", headers=a.headers).json()).tasks
            (task_b,) = TaskList.model_validate(client.get("/v1/node/tasks", headers=b.headers).json()).tasks
            assert task_a.task_id != task_b.task_id
            r = client.get(f"/v1/tasks/{task_b.task_id}/params", headers=a.headers)
            assert r.status_code == 403 and r.json()["code"] == "forbidden"
            r = client.post(
                f"/v1/tasks/{task_b.task_id}/update",
                json=submission(task_b, a.node_id, zeros_update(task_b)),
                headers=a.headers,
            )
            assert r.status_code == 403, r.text
            r = client.post(
                f"/v1/tasks/{task_a.task_id}/update",
                json=submission(task_a, b.node_id, zeros_update(task_a)),
                headers=a.headers,
            )
            assert r.status_code == 403 and "another node" in r.json()["reason"]

            # B's cohort bundle: B gets it, A does not (neither the record nor the archive).
            signed = publish_bundle(
                db,
                load_signing_key(settings),
                settings.artifacts_dir,
                bundle_root() / "bundle",
                cohort=f"cb{tag}",
            )
            pub = signed.record.publication_id
            assert client.get("/v1/node/bundle", headers=b.headers).json()["record"]["publication_id"] == pub
            assert client.get(f"/v1/bundles/{pub}/archive", headers=b.headers).status_code == 200
            assert client.get("/v1/node/bundle", headers=a.headers).status_code == 404
            r = client.get(f"/v1/bundles/{pub}/archive", headers=a.headers)
            assert r.status_code == 404 and r.json()["code"] == "not_found"

            # Revocation takes effect on the node's very next request; others are untouched.
            assert (
                client.post(
                    "/v1/node/heartbeat", json={"edge_version": "1"}, headers=revoked.headers
                ).status_code
                == 200
            )
            r = client.post(f"/v1/admin/nodes/{revoked.node_id}/revoke", headers=server.admin_headers)
            assert r.status_code == 200 and r.json()["state"] == "revoked"
            r = client.post("/v1/node/heartbeat", json={"edge_version": "1"}, headers=revoked.headers)
            assert r.status_code == 401 and r.json()["code"] == "revoked"
            assert client.get("/v1/node/tasks", headers=revoked.headers).status_code == 401
            assert (
                client.post("/v1/node/heartbeat", json={"edge_version": "1"}, headers=a.headers).status_code
                == 200
            )

            # Rotation: the new secret works at once and the old one no longer does.
            new_secret = secrets.token_urlsafe(32)
            r = client.post("/v1/node/credential", json={"new_credential": new_secret}, headers=a.headers)
            assert r.status_code == 204, r.text
            assert (
                client.post("/v1/node/heartbeat", json={"edge_version": "1"}, headers=a.headers).status_code
                == 401
            )
            a.secret = new_secret
            assert (
                client.post("/v1/node/heartbeat", json={"edge_version": "1"}, headers=a.headers).status_code
                == 200
            )

            # A used join code, and an expired one, are refused.
            issued = server.join_code(client, f"auth-j-{tag}")
            code = decode_join_code(issued.join_code)
            enrollment = EnrollRequest(
                join_secret=code.secret, credential=secrets.token_urlsafe(32), edge_version="1"
            )
            assert client.post("/v1/enroll", json=enrollment.model_dump(mode="json")).status_code == 200
            again = enrollment.model_copy(update={"credential": secrets.token_urlsafe(32)})
            r = client.post("/v1/enroll", json=again.model_dump(mode="json"))
            assert r.status_code == 401 and r.json()["code"] == "invalid_join_code"
            assert "already used" in r.json()["reason"]
            with db.session() as session:
                expired, _node, _exp = issue_join_code(
                    session,
                    name=f"auth-x-{tag}",
                    cohort="default",
                    ttl_s=-1,
                    hub_url=server.url,
                    tls_sha256="0" * 64,
                    actor="test",
                )
            late = EnrollRequest(
                join_secret=decode_join_code(expired).secret,
                credential=secrets.token_urlsafe(32),
                edge_version="1",
            )
            r = client.post("/v1/enroll", json=late.model_dump(mode="json"))
            assert r.status_code == 401 and "expired" in r.json()["reason"]

            r = client.post(f"/v1/admin/rounds/{round_id}/cancel", headers=server.admin_headers)
            assert r.status_code == 200 and r.json()["state"] == "failed"
    finally:
        db.close()
