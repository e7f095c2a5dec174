"""Whole federation over real HTTPS on loopback: a real hub process and three real edge node processes.

Must-shows: three nodes enroll with join codes; a round closes at k of n when one node drops out, and a
kill -9 of the hub mid-round plus a restart finish that round with each accepted update counted once; the
dashboard in headless Chromium shows the nodes and the finished round.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edge_node.protocol.tensors import decode_tensors
from tests.e2e.federation import (
    STORES,
    Federation,
    HubProcess,
    enroll,
    hub_for_store,
    make_node,
    uplink_state,
    wait_for,
)
from tests.support.chromium import chromium_paths, headless_chromium

pytestmark = pytest.mark.slow

NAMES = ("clinic-north", "clinic-south", "clinic-east")


@pytest.fixture(params=STORES)
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    hub = hub_for_store(request.param, tmp_path / "hub", request)
    hub.start()
    nodes = {name: make_node(tmp_path, name) for name in NAMES}
    fed = Federation(hub, nodes)
    try:
        for i, (name, node) in enumerate(nodes.items()):
            enroll(hub, node, name, cli=i == 0)  # the operator's command once, the admin API for the rest
        for node in nodes.values():
            node.start()
        wait_for(
            "three nodes' first heartbeats",
            lambda: all(n["last_heartbeat"] for n in hub.nodes().values()) and len(hub.nodes()) == 3,
        )
        yield fed
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()


def _round(hub: HubProcess, round_id: str) -> dict[str, Any]:
    return dict(hub.admin_call("GET", f"/v1/admin/rounds/{round_id}"))


def test_enrollment_writes_a_private_credential_and_codes_work_once(federation: Federation) -> None:
    hub = federation.hub
    listed = hub.nodes(cli=True)
    assert sorted(listed) == sorted(NAMES)
    assert {n["state"] for n in listed.values()} == {"active"}
    node = federation.nodes["clinic-north"]
    credential = node.data_dir / "uplink" / "credential.json"
    assert credential.stat().st_mode & 0o777 == 0o600
    assert "secret" in credential.read_text()
    # A used join code is refused, and the node that tried stays unenrolled.
    code = hub.join_code("clinic-west", cli=True)
    late = make_node(node.root.parent, "clinic-west")
    assert late.cli("enroll", code).returncode == 0
    again = make_node(node.root.parent, "clinic-west-copy")
    refused = again.cli("enroll", code)
    assert refused.returncode != 0 and "join code" in (refused.stderr + refused.stdout)
    assert not (again.data_dir / "uplink" / "credential.json").exists()
    # status tells when the node last reached its hub.
    status = node.cli("status")
    assert status.returncode == 0, status.stderr
    assert "last reached" in status.stdout and hub.url in status.stdout


@pytest.mark.timeout(1200)
def test_round_closes_at_k_of_n_and_survives_a_hub_kill9(federation: Federation, tmp_path: Path) -> None:
    hub = federation.hub
    federation.nodes["clinic-east"].kill9()  # drops out without a word
    started = hub.cli_json(
        "rounds", "start", "--strategy", "stats", "--config", "num_classes=2", "-k", "2", "--deadline", "12"
    )
    round_id = started["round_id"]
    assert len(started["nodes"]) == 3

    two_in = wait_for(
        "the two live nodes' updates",
        lambda: (r := _round(hub, round_id))["accepted"] == 2 and r,
        timeout=30,
    )
    assert two_in["state"] == "collecting"  # still waiting for the third node until the deadline

    hub.kill9()  # mid-round: collecting, two updates accepted, deadline not reached
    north = federation.nodes["clinic-north"]
    wait_for("the node to notice the hub is gone", lambda: uplink_state(north).get("last_error"), timeout=30)
    assert "unreachable" in north.cli("status").stdout
    time.sleep(1.0)
    hub.start()

    done = wait_for(
        "the round to finish after the restart",
        lambda: (r := _round(hub, round_id))["state"] in ("published", "failed") and r,
        timeout=60,
    )
    assert done["state"] == "published", done
    assert done["accepted"] == 2
    # Each accepted update counted once: two rows, and the aggregate says two nodes.
    assert hub.query("SELECT COUNT(*) FROM updates WHERE round_id = :r", {"r": round_id}) == [(2,)]
    (blob,) = hub.query("SELECT data FROM artifacts WHERE id = :a", {"a": done["result_artifact"]})[0]
    aggregate = decode_tensors(bytes(blob))
    assert int(aggregate["nodes"]) == 2
    assert aggregate["label_counts"].shape == (2,)
    # The nodes have nothing left to send, and reached the hub again.
    wait_for(
        "north to reach the hub again", lambda: uplink_state(north).get("last_error") is None, timeout=120
    )
    for name in ("clinic-north", "clinic-south"):
        node = federation.nodes[name]
        assert node.alive()
        assert uplink_state(node)["tasks_answered"] == 1

    # The dashboard shows the enrolled nodes and the finished round (must-show 7).
    if chromium_paths() is None:
        pytest.skip("needs Debian's chromium and chromium-driver for the dashboard check")
    with headless_chromium(tmp_path / "profile") as browser:
        browser.get(f"{hub.url}/dashboard")
        browser.type(browser.find("#token"), hub.admin_token)
        browser.click(browser.find("#sign-in"))
        nodes_text = browser.text(browser.wait_for("#nodes"))
        rounds_text = browser.text(browser.find("#rounds"))
        (tmp_path / "dashboard.png").write_bytes(browser.screenshot_png())
    for name in NAMES:
        assert name in nodes_text
    assert nodes_text.count("active") == 3
    assert "published" in rounds_text and "2 of 3 (needs 2)" in rounds_text
