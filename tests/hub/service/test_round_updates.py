"""`fedclinic-hub rounds updates` on a real SQLite store: each node's update of a training round read
against the others', the node that turns the round's mean named on stderr with the command that leaves it
out, the norm filter's drops said where the round used it, and the rounds it cannot read refused."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from edge_node.protocol.protection import CompressionKind, compressor_for
from edge_node.protocol.wire import RoundProtection, RoundStart, RoundUpdatesInfo, TaskList
from hub.cli import app
from hub.rounds.controller import RoundController
from hub.service.errors import RoundConfigError
from hub.service.settings import load_settings
from hub.store.artifacts import store_tensors
from hub.store.database import open_database
from tests.hub.fl.test_update_audit import honest, scaled
from tests.hub.service.conftest import hub_data_dir, submission
from tests.hub.service.test_rounds import answer, enroll
from tests.support.hub_server import HubServer

pytestmark = pytest.mark.hub

runner = CliRunner()
#: Images per node: one hospital, one mid-sized clinic and three small ones.
IMAGES = [1_000, 300, 60, 40, 30]


def _updates(env: dict[str, str], *args: str, code: int = 0) -> Result:
    result = runner.invoke(app, ["rounds", "updates", *args], env=env)
    assert result.exit_code == code, result.output
    return result


def _round(
    rc: RoundController,
    nodes: list[str],
    *,
    flip: str | None = None,
    rider: str | None = None,
    answering: int | None = None,
    protection: RoundProtection | None = None,
    config: dict[str, float | int | str | bool] | None = None,
    strategy: str = "fedavg",
) -> int:
    """A round of ``strategy`` (FedAvg) over ``nodes`` from a model shaped like the test updates; the first
    ``answering`` nodes (all by default) send an honest update (norm ∝ √images), ``flip`` its own
    sign-flipped, ``rider`` its own ×0.01 claiming 1,000× its images, each through the round's codec."""
    model = {k: np.zeros_like(v) for k, v in honest(0).items() if v.dtype.kind == "f"}
    with rc.db.session() as session:
        art = store_tensors(session, model)
    start = RoundStart(
        strategy=strategy,
        model_artifact=art,
        nodes=nodes,
        deadline_s=600,
        protection=protection,
        config=config or {},
    )
    info = rc.start(start, actor="t")
    codec = compressor_for(protection.compression) if protection else None
    for k, node in enumerate(nodes[:answering]):
        (task,) = [t for t in rc.open_tasks(node) if t.round == info.round]
        asked = {e.name for e in task.expected}  # a head round asks for the head's tensors only
        update = {n: a for n, a in honest(k, scale=float(np.sqrt(IMAGES[k] / 100))).items() if n in asked}
        update = scaled(update, -1.0) if node == flip else update
        update, images = (scaled(update, 0.01), 1_000 * IMAGES[k]) if node == rider else (update, IMAGES[k])
        assert answer(rc, task, node, codec.compress(update) if codec else update, n=images)
    return info.round


def _controller(env: dict[str, str]) -> RoundController:
    settings = load_settings(Path(env["FEDCLINIC_HUB_DATA_DIR"]))
    return RoundController(open_database(settings.db_url, migrate=False), settings)


def test_the_node_that_turns_the_round_round_is_named_with_the_command_that_leaves_it_out(
    tmp_path: Path,
) -> None:
    env = hub_data_dir(tmp_path / "hub")
    rc = _controller(env)
    try:
        nodes = enroll(rc.db, len(IMAGES))
        honest_round = _round(rc, nodes)
        hostile_round = _round(rc, nodes, flip=nodes[0])
        partly = _round(rc, nodes, answering=2)
    finally:
        rc.db.close()

    # Every node honest: a table of five, nobody named, nothing on stderr.
    quiet = _updates(env, str(honest_round), "--format", "json")
    report = json.loads(quiet.stdout)
    assert quiet.stderr == "" and report["warnings"] == []
    assert [n["named"] for n in report["nodes"]] == [None] * len(IMAGES)
    assert (report["round"], report["strategy"], report["state"]) == (honest_round, "fedavg", "published")
    rows = {n["node_id"]: n for n in report["nodes"]}
    assert sorted(rows) == sorted(nodes) and rows[nodes[0]]["name"] == "site-0"
    assert rows[nodes[0]]["examples"] == 1_000 and rows[nodes[0]]["share"] == pytest.approx(1_000 / 1_430)
    assert 0 < rows[nodes[0]]["keeps"] < 0.9 < min(rows[n]["keeps"] for n in nodes[1:])
    # Without a robust reduction the norm filter is only a column: the hospital's update is beyond it.
    assert rows[nodes[0]]["within_filter"] is False and report["robust"] is None

    # The hospital's update sign-flipped at its own norm: it turns the mean round, and is named.
    flipped = _updates(env, str(hostile_round), "--format", "json")
    report = json.loads(flipped.stdout)  # stdout stays the report alone
    (named,) = [n for n in report["nodes"] if n["named"]]
    assert (named["node_id"], named["name"]) == (nodes[0], "site-0") and "point the other way" in named[
        "named"
    ]
    (line,) = flipped.stderr.splitlines()
    assert line.startswith(f"warning: node site-0 ({nodes[0]}): without it the round's mean would point the")
    assert line.endswith(f"(`fedclinic-hub rounds start … --exclude-node {nodes[0]}`) to compare")
    # For people: the table on stdout, the same warning on stderr.
    table = runner.invoke(app, ["rounds", "updates", str(hostile_round)], env={**env, "COLUMNS": "200"})
    assert table.exit_code == 0 and "each node's update" in table.stdout and "named" in table.stdout
    assert "warning" not in table.stdout and "--exclude-node" in table.stderr

    # While a round collects, the updates it holds can be read already; two name nobody.
    early = json.loads(_updates(env, str(partly), "--format", "json").stdout)
    assert early["state"] == "collecting" and len(early["nodes"]) == 2
    assert not any(n["named"] for n in early["nodes"])
    assert early["warnings"] == [
        "with 2 node(s) the reading names nobody: it cannot tell which of them is off"
    ]

    # The next round without the named node: every other active node takes part.
    started = runner.invoke(
        app,
        ["rounds", "start", "--strategy", "fedavg", "--exclude-node", nodes[0], "--format", "json"],
        env=env,
    )
    assert started.exit_code == 0, started.output
    assert sorted(json.loads(started.stdout)["nodes"]) == sorted(nodes[1:])
    mixed = runner.invoke(
        app,
        ["rounds", "start", "--strategy", "fedavg", "--node", nodes[1], "--exclude-node", nodes[0]],
        env=env,
    )
    assert mixed.exit_code == 1 and "not both" in " ".join(mixed.stderr.split())


def test_the_robust_reductions_say_which_updates_they_left_out(tmp_path: Path) -> None:
    env = hub_data_dir(tmp_path / "hub")
    rc = _controller(env)
    try:
        nodes = enroll(rc.db, len(IMAGES))
        filtered = _round(rc, nodes, config={"robust": "norm_filter_weighted"})
        audited = _round(rc, nodes, flip=nodes[0], config={"robust": "audited"})
        result = rc.result(str(audited))
        ridden = _round(rc, nodes, rider=nodes[-1], config={"robust": "audited"})
        ridden_result = rc.result(str(ridden))
        # A clip at the nodes makes a long honest update read short for its size: refused together.
        with pytest.raises(RoundConfigError, match="robust=audited reads how long each update is"):
            _round(rc, nodes, config={"robust": "audited"}, protection=RoundProtection(clip_norm=1.0))
    finally:
        rc.db.close()
    report = json.loads(_updates(env, str(filtered), "--format", "json").stdout)
    assert report["robust"] == "norm_filter_weighted" and report["norm_filter_factor"] == 3.0
    # An honest hospital: the filter drops it, the reading does not name it.
    assert not any(n["named"] for n in report["nodes"])
    (warning,) = report["warnings"]
    assert warning.startswith(f"the round's norm filter left out node site-0 ({nodes[0]}): its update is")
    assert "a large clinic's honest update can be this long" in warning
    # robust=audited: the round's mean is FedAvg over the nodes the reading does not name.
    report = json.loads(_updates(env, str(audited), "--format", "json").stdout)
    assert [n["node_id"] for n in report["nodes"] if n["named"]] == [nodes[0]]
    (warning,) = report["warnings"]
    assert "the round's audited mean left it out" in warning
    # From a model of zeros: FedAvg's weighted mean of the other four nodes' updates.
    others = [honest(k, scale=float(np.sqrt(IMAGES[k] / 100))) for k in range(1, len(IMAGES))]
    for name in result:
        expected = np.average([u[name] for u in others], axis=0, weights=IMAGES[1:])
        np.testing.assert_allclose(result[name], expected, rtol=1e-4, atol=1e-6)
    # A free rider claiming 1,000× its images turns nothing, and is named for what it claims; the audited
    # mean is FedAvg over the four others.
    report = json.loads(_updates(env, str(ridden), "--format", "json").stdout)
    (rider,) = [n for n in report["nodes"] if n["named"]]
    assert rider["node_id"] == nodes[-1] and rider["keeps"] > 0.9 and rider["share"] > 0.9
    assert "claims far more images than its update shows" in rider["named"]
    (warning,) = report["warnings"]
    assert "the round's audited mean left it out" in warning and f"--exclude-node {nodes[-1]}" in warning
    others = [honest(k, scale=float(np.sqrt(IMAGES[k] / 100))) for k in range(len(IMAGES) - 1)]
    for name in ridden_result:
        expected = np.average([u[name] for u in others], axis=0, weights=IMAGES[:-1])
        np.testing.assert_allclose(ridden_result[name], expected, rtol=1e-4, atol=1e-6)


def test_rounds_it_cannot_read_node_by_node_are_refused_saying_why(tmp_path: Path) -> None:
    env = hub_data_dir(tmp_path / "hub")
    rc = _controller(env)
    try:
        nodes = enroll(rc.db, 3)
        stats = rc.start(RoundStart(strategy="stats", config={"num_classes": 2}), actor="t").round
        unanswered = _round(rc, nodes, answering=0)
        secagg = RoundProtection(secure_aggregation=True, clip_norm=5.0)
        masked = _round(rc, nodes, answering=0, protection=secagg)
        compressed = _round(rc, nodes, protection=RoundProtection(compression=CompressionKind.INT8))
        clipped = _round(rc, nodes, protection=RoundProtection(clip_norm=1_000.0))
        noised = _round(rc, nodes, protection=RoundProtection(clip_norm=1_000.0, epsilon=8.0))
        head_config: dict[str, float | int | str | bool] = {"head": "fc.weight,fc.bias"}
        head = _round(rc, nodes, flip=nodes[0], strategy="head_avg", config=head_config)
    finally:
        rc.db.close()

    def said(ref: str) -> str:
        return " ".join(_updates(env, ref, code=1).stderr.split())

    assert "collects stats answers, not model updates" in said(str(stats))
    assert "no node has answered round" in said(str(unanswered))
    assert "used secure aggregation: the hub holds masked inputs" in said(str(masked))
    assert "no round '99'" in said("99")
    # A compressed round's updates are read as the aggregation reads them: dense, after the codec.
    report = json.loads(_updates(env, str(compressed), "--format", "json").stdout)
    assert len(report["nodes"]) == 3 and not any(n["named"] for n in report["nodes"])
    assert report["warnings"] == []
    # Clipped, or clipped and noised, at the nodes: read all the same, with the caveat said.
    (clip_warning,) = json.loads(_updates(env, str(clipped), "--format", "json").stdout)["warnings"]
    assert clip_warning.startswith("every node clipped its update at 1000")
    (noise_warning,) = json.loads(_updates(env, str(noised), "--format", "json").stdout)["warnings"]
    assert noise_warning.startswith("every node clipped its update at 1000 and added noise (ε 8 per round)")
    assert "names nobody for the length of an update" in clip_warning + noise_warning
    # A head round (the light learner's): read, but nobody named, even the node that turns the mean round.
    report = json.loads(_updates(env, str(head), "--format", "json").stdout)
    assert len(report["nodes"]) == 3 and not any(n["named"] for n in report["nodes"])
    (head_warning,) = report["warnings"]
    assert head_warning.startswith("a head_delta round: the reading names nobody here")
    assert min(n["keeps"] for n in report["nodes"]) < 0


def test_the_admin_api_reads_a_round_s_updates_on_either_store(any_hub: HubServer) -> None:
    """Over HTTPS, on SQLite and on PostgreSQL with two workers: nodes answer through the API, the operator
    reads the round through ``GET /v1/admin/rounds/{id}/updates``."""
    server = any_hub
    db = open_database(load_settings(server.data_dir).db_url, migrate=False)
    model = {k: np.zeros_like(v) for k, v in honest(0).items() if v.dtype.kind == "f"}
    try:
        with db.session() as session:
            art = store_tensors(session, model)
    finally:
        db.close()
    tag = secrets.token_hex(3)
    with server.client() as client:
        enrolled = [server.enroll(client, f"updates-{k}-{tag}") for k in range(len(IMAGES))]
        ids = [n.node_id for n in enrolled]
        start = {"strategy": "fedavg", "nodes": ids, "deadline_s": 600, "model_artifact": art}
        r = client.post("/v1/admin/rounds", json=start, headers=server.admin_headers)
        assert r.status_code == 201, r.text
        round_id = r.json()["round_id"]
        for k, node in enumerate(enrolled):
            (task,) = [
                t
                for t in TaskList.model_validate(
                    client.get("/v1/node/tasks", headers=node.headers).json()
                ).tasks
                if t.round_id == round_id
            ]
            update = {n: a for n, a in honest(k, scale=float(np.sqrt(IMAGES[k] / 100))).items() if n in model}
            update = scaled(update, -1.0) if k == 0 else update
            body = submission(task, node.node_id, update, num_examples=IMAGES[k])
            r = client.post(f"/v1/tasks/{task.task_id}/update", json=body, headers=node.headers)
            assert r.status_code == 200, r.text
        r = client.get(f"/v1/admin/rounds/{round_id}/updates", headers=server.admin_headers)
        assert r.status_code == 200, r.text
        report = RoundUpdatesInfo.model_validate(r.json())
        assert report.round_id == round_id and [n.node_id for n in report.nodes] == sorted(ids)
        assert [n.node_id for n in report.nodes if n.named] == [ids[0]]
        assert len(report.warnings) == 1 and f"--exclude-node {ids[0]}" in report.warnings[0]
        stats = client.post(
            "/v1/admin/rounds",
            json={"strategy": "stats", "config": {"num_classes": 2}, "nodes": ids},
            headers=server.admin_headers,
        )
        r = client.get(f"/v1/admin/rounds/{stats.json()['round_id']}/updates", headers=server.admin_headers)
        assert r.status_code == 409 and "not model updates" in r.json()["reason"]
        r = client.get("/v1/admin/rounds/no-such-round/updates", headers=server.admin_headers)
        assert r.status_code == 404
