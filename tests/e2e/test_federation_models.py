"""Models travel from hub to clinics: publish, canary, rollback; a tampered bundle and a replayed old
publication are refused while every node keeps serving its model (real hub and node processes, HTTPS)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from edge_node.protocol.manifest import Manifest
from tests.e2e.federation import (
    STORES,
    Federation,
    HubProcess,
    active_model,
    enroll,
    hub_for_store,
    make_node,
    signed_bundle,
    uplink_state,
    wait_for,
)
from tests.edge_node.conftest import EdgeProcess, TrustedBundle, echoscu, require_test_bundle

pytestmark = pytest.mark.slow

NAMES = ("clinic-north", "clinic-south", "clinic-east")


@pytest.fixture(scope="module")
def test_bundle() -> TrustedBundle:
    return require_test_bundle()


@pytest.fixture(params=STORES)
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Federation]:
    hub = hub_for_store(request.param, tmp_path / "hub", request)
    hub.start()
    nodes = {name: make_node(tmp_path, name) for name in NAMES}
    try:
        for name, node in nodes.items():
            enroll(hub, node, name)
        for node in nodes.values():
            node.start()
        yield Federation(hub, nodes)
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()


def _versions(fed: Federation) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, node in fed.nodes.items():
        active = active_model(node)
        out[name] = active[1] if active else None
    return out


def _all_at(fed: Federation, version: str) -> bool:
    return set(_versions(fed).values()) == {version}


@pytest.mark.timeout(1800)  # two hub restarts and many CLI runs: > 10 min on PostgreSQL on a busy 2-core box
def test_publish_canary_rollback_and_refusals(
    federation: Federation, test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    hub = federation.hub
    key = hub.signing_key()
    v1 = signed_bundle(test_bundle.bundle, tmp_path / "v1", key, version="1.0.0")
    v2 = signed_bundle(test_bundle.bundle, tmp_path / "v2", key, version="1.1.0")
    v3 = signed_bundle(test_bundle.bundle, tmp_path / "v3", key, version="1.2.0")
    model_id = Manifest.model_validate_json((v1 / "manifest.json").read_bytes()).model_id

    # Publish → every node pulls, verifies and swaps.
    hub.cli("models", "publish", str(v1))
    wait_for("all nodes on 1.0.0", lambda: _all_at(federation, "1.0.0"), timeout=90)
    assert {active_model(n) for n in federation.nodes.values()} == {(model_id, "1.0.0")}

    # Canary: one node of three first.
    ids = federation.node_ids()
    canary_id = sorted(ids.values())[0]
    canary = next(name for name, nid in ids.items() if nid == canary_id)
    hub.cli("models", "publish", str(v2), "--canary", "33")
    wait_for("the canary on 1.1.0", lambda: _versions(federation)[canary] == "1.1.0", timeout=60)
    time.sleep(3.0)  # several heartbeats: the others must stay where they are
    assert {n: v for n, v in _versions(federation).items() if n != canary} == {
        n: "1.0.0" for n in NAMES if n != canary
    }
    # Then the whole cohort.
    hub.cli("models", "publish", str(v2))
    wait_for("all nodes on 1.1.0", lambda: _all_at(federation, "1.1.0"), timeout=60)

    # Rollback: a signed rollback may lower the version.
    hub.cli("models", "rollback")
    wait_for("all nodes back on 1.0.0", lambda: _all_at(federation, "1.0.0"), timeout=60)
    wait_for(
        "the hub to see 1.0.0 everywhere",
        lambda: {n["model_version"] for n in hub.nodes().values()} == {"1.0.0"},
    )

    # A tampered bundle: publish 1.2.0 while the hub is down, then change its stored zip.
    hub.stop()
    hub.cli("models", "publish", str(v3))
    ((sha,),) = hub.query(
        "SELECT a.sha256 FROM publications p JOIN artifacts a ON a.id = p.artifact_id"
        " ORDER BY p.seq DESC LIMIT 1"
    )
    stored = hub.data_dir / "artifacts" / f"bundle-{sha}.zip"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    hub.start()
    for name, node in federation.nodes.items():

        def last_refusal(n: EdgeProcess = node) -> str | None:
            return uplink_state(n).get("last_refusal")

        # The nodes lost the hub while it was down and retry with backoff (≤ 60 s, jittered).
        wait_for(f"{name} to refuse the tampered bundle", last_refusal, timeout=180)
        assert "sha256" in uplink_state(node)["last_refusal"]
    assert _all_at(federation, "1.0.0")

    # A replayed old publication (the canary record of 1.1.0, signature intact) served as the newest.
    old = hub.admin_call("GET", "/v1/admin/publications")["publications"]
    replayed = next(p for p in old if p["record"]["nodes"])  # the canary publication
    hub.stop()
    _serve_as_newest(hub, replayed)
    hub.start()
    node = federation.nodes[canary]
    pid = replayed["record"]["publication_id"]
    wait_for(
        "the canary to refuse the replay",
        lambda: pid in (uplink_state(node).get("last_refusal") or ""),
        timeout=180,
    )
    assert "replay" in uplink_state(node)["last_refusal"]
    assert _all_at(federation, "1.0.0")

    # Every node kept serving: alive, answering DICOM, model in place, and its status says what happened.
    for name, edge in federation.nodes.items():
        assert edge.alive(), name
        assert echoscu(edge.port, called="EDGE")
        status = edge.cli("status")
        assert "1.0.0" in status.stdout and "last refused publication" in status.stdout


def _serve_as_newest(hub: HubProcess, signed: dict[str, Any]) -> None:
    """What an attacker with write access to the hub's store (but not its key) could do: serve an old,
    validly signed record as the newest publication."""
    record = signed["record"]
    ((artifact,),) = hub.query(
        "SELECT artifact_id FROM publications WHERE id = :p", {"p": record["publication_id"]}
    )
    ((top,),) = hub.query("SELECT MAX(seq) FROM publications")
    postgres = hub.database_url is not None
    now = datetime.now(timezone.utc)
    hub.execute(
        "INSERT INTO publications (id, seq, cohort, artifact_id, signed, created_at) VALUES "
        + (
            "(:id, :seq, :cohort, :artifact, CAST(:signed AS json), :at)"
            if postgres
            else "(:id, :seq, :cohort, :artifact, :signed, :at)"
        ),
        {
            "id": f"replay{top + 1}",
            "seq": top + 1,
            "cohort": record["cohort"],
            "artifact": artifact,
            "signed": json.dumps(signed),
            "at": now if postgres else now.strftime("%Y-%m-%d %H:%M:%S.%f"),
        },
    )
