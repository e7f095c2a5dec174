"""Credential rotation over real HTTPS: ``fedclinic-edge credential rotate`` against a real hub process.

After a rotation the node's old secret is refused on its very next request, the new one works, the other
node is untouched, a running node carries on with the new secret by itself, and the operator sees when each
credential was set. A rotation whose answer from the hub was lost is finished by the next run.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_node.protocol.wire import node_authorization
from edge_node.uplink.credential import NodeCredential, new_secret
from edge_node.uplink.rotation import pending_dir
from edge_node.uplink.transport import pinned_context
from tests.e2e.federation import HubProcess, enroll, make_node, uplink_state, wait_for

pytestmark = pytest.mark.slow


def _credential(data_dir: Path) -> NodeCredential:
    credential = NodeCredential.load(data_dir / "uplink")
    assert credential is not None
    return credential


def _tasks_status(hub: HubProcess, node_id: str, secret: str) -> tuple[int, dict[str, Any]]:
    with httpx.Client(base_url=hub.url, verify=pinned_context(hub.cert_pem), timeout=30) as client:
        r = client.get(
            "/v1/node/tasks",
            params={"wait": "0"},
            headers={"Authorization": node_authorization(node_id, secret)},
        )
    return r.status_code, r.json()


def test_rotation_refuses_the_old_secret_at_once_and_touches_no_other_node(
    hub: HubProcess, tmp_path: Path
) -> None:
    north, south = make_node(tmp_path, "north"), make_node(tmp_path, "south")
    enroll(hub, north, "north")
    enroll(hub, south, "south")
    before = _credential(north.data_dir)
    other = _credential(south.data_dir)
    listed_before = hub.nodes(cli=True)

    done = north.cli("credential", "rotate", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["node_id"] == before.node_id and report["rotated"] is True and report["resumed"] is False
    after = _credential(north.data_dir)
    assert after.secret != before.secret
    assert before.secret not in done.stdout + done.stderr and after.secret not in done.stdout + done.stderr
    assert (north.data_dir / "uplink" / "credential.json").stat().st_mode & 0o777 == 0o600
    assert not NodeCredential.path_in(pending_dir(north.data_dir / "uplink")).exists()

    # The old secret is refused on its next request, with the reason; the new one works.
    status, body = _tasks_status(hub, before.node_id, before.secret)
    assert status == 401 and "rotated" in body["reason"], body
    assert _tasks_status(hub, after.node_id, after.secret)[0] == 200
    # The other node is untouched: same secret, still accepted, its credential date unchanged.
    assert _credential(south.data_dir).secret == other.secret
    assert _tasks_status(hub, other.node_id, other.secret)[0] == 200

    # The operator's view: when each node's credential was set.
    listed = hub.nodes(cli=True)
    moved = datetime.fromisoformat(listed["north"]["credential_since"])
    assert moved > datetime.fromisoformat(listed_before["north"]["credential_since"])
    assert listed["south"]["credential_since"] == listed_before["south"]["credential_since"]


def test_a_rotation_whose_answer_was_lost_is_finished_by_the_next_run(
    hub: HubProcess, tmp_path: Path
) -> None:
    node = make_node(tmp_path, "west")
    enroll(hub, node, "west")
    uplink = node.data_dir / "uplink"
    current = _credential(node.data_dir)

    # The hub took a new secret but the node never saw the answer: the pending secret is all it has of it.
    lost = current.model_copy(update={"secret": new_secret()})
    lost.save(pending_dir(uplink))
    with httpx.Client(base_url=hub.url, verify=pinned_context(hub.cert_pem), timeout=30) as client:
        r = client.post(
            "/v1/node/credential",
            json={"new_credential": lost.secret},
            headers={"Authorization": node_authorization(current.node_id, current.secret)},
        )
    assert r.status_code == 204, r.text
    assert _tasks_status(hub, current.node_id, current.secret)[0] == 401  # the saved secret no longer works

    done = node.cli("credential", "rotate", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed"] is True
    assert _credential(node.data_dir).secret == lost.secret
    assert _tasks_status(hub, current.node_id, lost.secret)[0] == 200

    # A pending secret the hub never took is discarded, and a fresh rotation happens.
    never = lost.model_copy(update={"secret": new_secret()})
    never.save(pending_dir(uplink))
    done = node.cli("credential", "rotate", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed"] is False
    final = _credential(node.data_dir)
    assert final.secret not in (lost.secret, never.secret)
    assert _tasks_status(hub, final.node_id, final.secret)[0] == 200
    assert _tasks_status(hub, final.node_id, lost.secret)[0] == 401
    assert not NodeCredential.path_in(pending_dir(uplink)).exists()


@pytest.mark.timeout(600)
def test_a_running_node_carries_on_with_the_rotated_secret(hub: HubProcess, tmp_path: Path) -> None:
    node = make_node(tmp_path, "east")
    enroll(hub, node, "east")
    node.start()
    try:
        wait_for("the first heartbeat", lambda: hub.nodes()["east"]["last_heartbeat"], timeout=60)
        done = node.cli("credential", "rotate")
        assert done.returncode == 0, done.stderr
        assert "rotated the credential" in done.stdout
        rotated_at = time.time()

        # Heartbeats keep arriving (every second here): the running node uses the new secret by itself.
        def beat_after_rotation() -> bool:
            beat = datetime.fromisoformat(hub.nodes()["east"]["last_heartbeat"])
            return beat.timestamp() > rotated_at + 1

        wait_for("a heartbeat after the rotation", beat_after_rotation, timeout=60)
        state = uplink_state(node)
        assert state.get("last_ok_at", 0) > rotated_at, state
    finally:
        node.stop()
