"""The operator's contract: `fedclinic-hub init|nodes|rounds|models|status` with --data-dir or the env var."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge_node.protocol.wire import EnrollRequest, decode_join_code
from hub.cli import app
from hub.service.enrollment import enroll_node
from hub.service.settings import load_settings
from hub.store.database import open_database
from hub.store.schema import Node
from tests.hub.service.conftest import bundle_root

pytestmark = pytest.mark.hub

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None, code: int = 0) -> str:
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == code, f"{args}: {result.output}"
    return result.output


def run_json(*args: str, env: dict[str, str] | None = None) -> Any:
    return json.loads(run(*args, "--format", "json", env=env))


def test_operator_contract(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    (data / "keys").mkdir(parents=True)
    shutil.copy(bundle_root() / "keys" / "hub.key", data / "keys" / "hub.key")
    os.chmod(data / "keys" / "hub.key", 0o600)
    shutil.copy(bundle_root() / "keys" / "hub.pub", data / "keys" / "hub.pub")
    env = {"FEDCLINIC_HUB_DATA_DIR": str(data)}

    report = run_json("init", "--public-url", "https://127.0.0.1:9443", env=env)
    assert report["migration"] == "0003" and len(report["tls_sha256"]) == 64
    assert not any(p.endswith("hub.key") for p in report["created"])  # an existing key is never replaced
    assert run_json("init", "--data-dir", str(data))["created"] == []

    issued = run_json("nodes", "enroll", "clinic-a", env=env)
    code = decode_join_code(issued["join_code"])
    assert code.hub_url == "https://127.0.0.1:9443" and code.tls_sha256 == report["tls_sha256"]
    assert issued["node"]["state"] == "pending"
    db = open_database(load_settings(data).db_url, migrate=False)
    try:
        with db.session() as session:
            node = enroll_node(
                session,
                EnrollRequest(
                    join_secret=code.secret, credential=secrets.token_urlsafe(32), edge_version="0.1"
                ),
            )
            # As its last heartbeat would leave them: 30 of its latest 120 images outside the envelope, and
            # they look like negatives of the validation images; it keeps the features of 45 images.
            node.counts = {
                "envelope_images": 120,
                "envelope_outside": 30,
                "envelope_drifting": 1,
                "envelope_negative": 1,
                "envelope_kept": 45,
            }
            node_id = node.id
    finally:
        db.close()
    listed = run_json("nodes", "list", "--data-dir", str(data))["nodes"]
    assert [(n["node_id"], n["state"], n["last_heartbeat"]) for n in listed] == [(node_id, "active", None)]
    assert [
        (
            n["envelope_images"],
            n["envelope_outside"],
            n["envelope_drifting"],
            n["envelope_negative"],
            n["envelope_kept"],
        )
        for n in listed
    ] == [(120, 30, True, True, 45)]
    table = run("nodes", "list", env={**env, "COLUMNS": "300"})
    assert "clinic-a" in table and "30 of 120 outside (drift, looks negative); 45 kept" in table
    # An older edge's heartbeat says nothing about negatives or the images it keeps: none is shown.
    db = open_database(load_settings(data).db_url, migrate=False)
    try:
        with db.session() as session:
            older_node = session.get(Node, node_id)
            assert older_node is not None
            older_node.counts = {"envelope_images": 120, "envelope_outside": 30, "envelope_drifting": 1}
    finally:
        db.close()
    (older,) = run_json("nodes", "list", "--data-dir", str(data))["nodes"]
    assert older["envelope_drifting"] is True
    assert older["envelope_negative"] is None and older["envelope_kept"] is None
    table = run("nodes", "list", env={**env, "COLUMNS": "300"})
    assert "30 of 120 outside (drift)" in table and "negative" not in table and "kept" not in table

    started = run_json(
        "rounds", "start", "--strategy", "stats", "--config", "num_classes=2", "--deadline", "600", env=env
    )
    assert started["state"] == "collecting" and started["nodes"] == [node_id]
    assert run_json("rounds", "status", str(started["round"]), env=env)["round_id"] == started["round_id"]
    assert [r["round_id"] for r in run_json("rounds", "list", env=env)["rounds"]] == [started["round_id"]]
    cancelled = run_json("rounds", "cancel", started["round_id"], env=env)
    assert cancelled["state"] == "failed" and "cancelled" in cancelled["reason"]
    run("rounds", "status", started["round_id"], env=env, code=2)  # a failed round exits non-zero for scripts
    assert "aggregating" in run("rounds", "states")
    assert "no round" in " ".join(run("rounds", "status", "99", env=env, code=1).split())

    first = run_json("models", "publish", str(bundle_root() / "bundle"), env=env)
    second = run_json("models", "publish", str(bundle_root() / "bundle"), "--canary", "50", env=env)
    assert second["record"]["seq"] > first["record"]["seq"] and second["record"]["nodes"] == [node_id]
    back = run_json("models", "rollback", "--to", first["record"]["publication_id"], env=env)
    assert back["record"]["rollback"] is True
    assert [p["record"]["seq"] for p in run_json("models", "list", env=env)["publications"]] == [1, 2, 3]
    (row,) = run_json("models", "status", env=env)["nodes"]
    assert row["should_serve"] == back["record"]["publication_id"] and row["in_sync"] is False

    revoked = run_json("nodes", "revoke", "clinic-a", env=env)
    assert revoked["state"] == "revoked"
    status = run_json("status", env=env)
    assert (status["nodes_revoked"], status["rounds_failed"], status["publications"]) == (1, 1, 3)
    refused = run("nodes", "list", "--data-dir", str(tmp_path / "nowhere"), code=1)
    assert "not a hub data directory" in " ".join(refused.split())  # rich wraps long lines
