"""The two envelope rounds at the hub, on a real SQLite store: tasks, sums, the held-out envelopes sent back,
an answer over too few images left out, the protection they refuse, and what `envelope start` warns about
the nodes from their last heartbeats (how many images each keeps features of)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_node.protocol.envelope_rounds import (
    EMBEDDING,
    INTENSITY,
    EnvelopeRounds,
    fitted_envelope,
    held_out_params,
    node_histograms,
    node_moments,
)
from edge_node.protocol.manifest import Manifest
from edge_node.protocol.tensors import decode_tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Heartbeat, RoundProtection, RoundStart, RoundState
from hub.rounds.controller import RoundController
from hub.service.errors import RoundConfigError, UpdateRejected
from hub.service.heartbeat import envelope_counts, record_heartbeat
from hub.service.settings import HubSettings
from hub.store.database import Database
from hub.store.schema import Node
from tests.hub.service.conftest import bundle_root, hub_data_dir
from tests.hub.service.test_rounds import answer, enroll

pytestmark = pytest.mark.hub

ROUNDS = EnvelopeRounds("chest", "1.0.0", embedding_dim=6, levels=(0.1, 0.5, 0.9), folds=4)


def _features(n: int, seed: int) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    grey = np.sort(rng.uniform(size=(n, 3)), axis=1)
    return [f"2.25.{seed}.{i}" for i in range(n)], {EMBEDDING: rng.normal(size=(n, 6)), INTENSITY: grey}


def test_both_rounds_give_the_envelope_of_the_nodes_images(db: Database, settings: HubSettings) -> None:
    nodes = enroll(db, 3)
    data = {nodes[0]: _features(30, 0), nodes[1]: _features(25, 1)}
    rc = RoundController(db, settings)
    first = rc.start(RoundStart(strategy="envelope_moments", config=dict(ROUNDS.to_config())), actor="t")
    assert first.kind is UpdateKind.ENVELOPE_MOMENTS
    sent = {}
    for node, (keys, features) in data.items():
        (task,) = rc.open_tasks(node)
        assert EnvelopeRounds.from_config(task.config) == ROUNDS
        assert {e.name: e.shape for e in task.expected}["embedding/s2"] == [4, 6, 6]
        sent[node] = node_moments(features, keys, ROUNDS)
        assert answer(rc, task, node, sent[node], n=len(keys))
    # The third node answers with what no node sends: each is refused on arrival, with the reason, and its
    # task stays open; it then refuses the round, as a node with too few images does.
    (task,) = rc.open_tasks(nodes[2])
    small_keys, small_features = _features(12, 2)
    honest = node_moments(small_features, small_keys, ROUNDS)
    wrong = {
        "a fold of fewer than 10 images": {"embedding/n": [3.0, 9.0, 0.0, 0.0]},
        "not a count of images": {"intensity/n": [12.5, 0.0, 0.0, 0.0]},
        "different numbers of images": {"intensity/n": [0.0, 12.0, 0.0, 0.0]},
        "counts no image": {"embedding/n": [0.0] * 4, "intensity/n": [0.0] * 4},
    }
    for reason, changed in wrong.items():
        sent_wrong = {**honest, **{name: np.array(value) for name, value in changed.items()}}
        with pytest.raises(UpdateRejected, match=reason):
            answer(rc, task, nodes[2], sent_wrong)
    assert rc.info(first.round_id).state is RoundState.COLLECTING
    rc.refuse(nodes[2], task.task_id, "fewer than 10 images")
    assert rc.info(first.round_id).state is RoundState.PUBLISHED
    moments = rc.result(first.round_id)
    assert int(moments["nodes"]) == 2
    np.testing.assert_allclose(
        moments["embedding/s2"], sent[nodes[0]]["embedding/s2"] + sent[nodes[1]]["embedding/s2"]
    )

    second = rc.start(
        RoundStart(
            strategy="envelope_distances",
            config=dict(ROUNDS.to_config()),
            nodes=list(data),
            model_artifact=_artifact_of(db, first.round_id),
        ),
        actor="t",
    )
    want_params = held_out_params(moments, ROUNDS)
    counts = []
    # A node reporting negative counts is refused on arrival too.
    (task,) = rc.open_tasks(nodes[0])
    keys, features = data[nodes[0]]
    negative = node_histograms(features, keys, ROUNDS, want_params)
    negative["embedding/histogram"][0] = -1
    with pytest.raises(UpdateRejected, match=r"negative counts in \['embedding/histogram'\]"):
        answer(rc, task, nodes[0], negative)
    for node, (keys, features) in data.items():
        (task,) = rc.open_tasks(node)
        params = decode_tensors(rc.task_params(node, task.task_id))
        for name, value in want_params.items():
            np.testing.assert_array_equal(params[name], value)
        counts.append(node_histograms(features, keys, ROUNDS, params))
        assert answer(rc, task, node, counts[-1], n=len(keys))
    histograms = rc.result(second.round_id)
    np.testing.assert_array_equal(
        histograms["intensity/histogram"], counts[0]["intensity/histogram"] + counts[1]["intensity/histogram"]
    )
    envelope = fitted_envelope(moments, histograms, ROUNDS, 0.9)
    assert envelope.fitted_on == 55 and envelope.intensity is not None and envelope.intensity.fitted_on == 55


def _artifact_of(db: Database, round_id: str) -> str:
    from hub.store.schema import Round

    with db.session() as session:
        row = session.get(Round, round_id)
        assert row is not None and row.result_artifact is not None
        return row.result_artifact


def test_envelope_rounds_refuse_what_would_not_fit_the_envelope(db: Database, settings: HubSettings) -> None:
    enroll(db, 3)
    rc = RoundController(db, settings)
    with pytest.raises(RoundConfigError, match="no clipping, noise, compression or secure aggregation"):
        rc.start(
            RoundStart(
                strategy="envelope_moments",
                config=dict(ROUNDS.to_config()),
                protection=RoundProtection(secure_aggregation=True),
            ),
            actor="t",
        )
    with pytest.raises(RoundConfigError, match="lacks 'levels'"):
        rc.start(RoundStart(strategy="envelope_moments", config={"model_id": "m"}), actor="t")
    with pytest.raises(RoundConfigError, match="starts from an envelope_moments round's aggregate"):
        rc.start(RoundStart(strategy="envelope_distances", config=dict(ROUNDS.to_config())), actor="t")


def test_the_envelope_commands_say_what_stands_in_the_way(tmp_path: Path) -> None:
    from tests.hub.service.test_cli import run

    env = hub_data_dir(tmp_path / "hub")
    bundle = bundle_root() / "bundle"

    def said(*args: str) -> str:  # what the command printed, as one line (rich wraps it)
        return " ".join(run(*args, env=env, code=1).split())

    assert "no active node" in said("envelope", "start", "--bundle", str(bundle))
    (tmp_path / "other").mkdir()
    other = _signed_by_another_key(bundle, tmp_path / "other")
    assert "does not verify with this hub's key" in said("envelope", "start", "--bundle", str(other))
    assert "there is no round 7" in said("envelope", "threshold", "--round", "7")
    built = said(
        "envelope", "build", "--moments-round", "1", "--distances-round", "2", "--bundle", str(bundle),
        "--out", str(tmp_path / "out"), "--model-version", "9.0.0",
    )  # fmt: skip
    assert "there is no round 1" in built and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(120, 120), (0, 0), (None, None), (True, None), (False, None), (-3, None), ("120", None), (1.5, None)],
)
def test_the_heartbeats_kept_count_is_read_only_when_it_is_a_count(sent: object, kept: int | None) -> None:
    counts = {"envelope_images": 200, "envelope_outside": 3, "envelope_drifting": 0}
    envelope = envelope_counts(counts if sent is None else {**counts, "envelope_kept": sent})
    assert envelope is not None and envelope.kept == kept
    assert envelope.describe() == ("3 of 200 outside" if kept is None else f"3 of 200 outside; {kept} kept")
    # Without the other envelope counters a kept count alone says nothing.
    assert envelope_counts({"envelope_kept": 120}) is None


def test_envelope_start_warns_about_the_nodes_that_will_refuse_or_fill_few_folds(tmp_path: Path) -> None:
    from typer.testing import CliRunner, Result

    from hub.cli import app
    from hub.service.settings import load_settings
    from hub.store.database import open_database

    env = hub_data_dir(tmp_path / "hub")
    bundle = bundle_root() / "bundle"
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_bytes())
    model = (manifest.model_id, manifest.model_version)
    # What each node's last heartbeat said, through the hub's own heartbeat path.
    beats = {
        "site-0": Heartbeat(edge_version="t", model_id=model[0], model_version="0.9.0", counts=_kept(200)),
        "site-1": Heartbeat(edge_version="t", model_id=model[0], model_version=model[1], counts=_kept(6)),
        "site-2": Heartbeat(edge_version="t", model_id=model[0], model_version=model[1], counts=_kept(30)),
        "site-3": Heartbeat(edge_version="t", model_id=model[0], model_version=model[1], counts=_kept(120)),
        "site-4": Heartbeat(  # an older edge: envelope counters, but no kept count
            edge_version="t", model_id=model[0], model_version=model[1], counts=_kept(None)
        ),
    }
    db = open_database(load_settings(Path(env["FEDCLINIC_HUB_DATA_DIR"])).db_url, migrate=False)
    try:
        ids = dict(zip(beats, enroll(db, len(beats)), strict=True))
        for name, beat in beats.items():
            with db.session() as session:
                node = session.get(Node, ids[name])
                assert node is not None and node.name == name
                record_heartbeat(node, beat)
    finally:
        db.close()

    runner = CliRunner()

    def start(*args: str) -> Result:
        result = runner.invoke(app, ["envelope", "start", "--bundle", str(bundle), *args], env=env)
        assert result.exit_code == 0, result.output
        return result

    started = start("--format", "json")
    info = json.loads(started.stdout)  # stdout is the round alone, as scripts read it
    assert info["strategy"] == "envelope_moments" and info["state"] == "collecting"
    assert sorted(info["nodes"]) == sorted(ids.values())  # the warnings stop nothing
    assert started.stderr.splitlines() == [
        f"warning: node site-0 ({ids['site-0']}) serves 0.9.0, the round is about {model[1]}: it will refuse",
        f"warning: node site-1 ({ids['site-1']}) keeps 6: it will refuse (fewer than 10)",
        f"warning: node site-2 ({ids['site-2']}) keeps 30: it fills fewer than 5 folds, which widens the "
        "threshold (docs/envelope.md)",
        f"warning: node site-4 ({ids['site-4']}) has not said how many images it keeps features of (an "
        "older edge?)",
    ]
    # For people: the same lines on stderr, about the nodes named alone; a round of 3 folds asks for 30.
    table = start("--node", ids["site-1"], "--node", ids["site-2"], "--node", ids["site-3"], "--folds", "3")
    assert table.stderr.splitlines() == [
        f"warning: node site-1 ({ids['site-1']}) keeps 6: it will refuse (fewer than 10)"
    ]
    assert "envelope round" in table.stdout and "warning" not in table.stdout
    # Every active node but those left out; the warnings are about the nodes that take part.
    left_out = json.loads(
        start("--exclude-node", ids["site-0"], "--exclude-node", ids["site-4"], "--format", "json").stdout
    )
    assert sorted(left_out["nodes"]) == sorted(ids[n] for n in ("site-1", "site-2", "site-3"))

    def refused(*args: str) -> str:
        result = runner.invoke(app, ["envelope", "start", "--bundle", str(bundle), *args], env=env)
        assert result.exit_code == 1, result.output
        return " ".join(result.stderr.split())

    assert "not an active node: n-nowhere" in refused("--exclude-node", "n-nowhere")
    assert "not both" in refused("--exclude-node", ids["site-0"], "--node", ids["site-1"])
    assert "no active node is left" in refused(*[x for i in ids.values() for x in ("--exclude-node", i)])


def _kept(n: int | None) -> dict[str, int]:
    counts = {"envelope_images": 200, "envelope_outside": 2, "envelope_drifting": 0, "envelope_negative": 0}
    return counts if n is None else {**counts, "envelope_kept": n}


def _signed_by_another_key(bundle: Path, dest: Path) -> Path:
    from export.signing import generate_private_key

    copy = dest / "bundle"
    shutil.copytree(bundle, copy)
    data = (copy / "manifest.json").read_bytes()
    manifest = Manifest.model_validate_json(data)
    (copy / "manifest.sig").write_bytes(generate_private_key().sign(manifest.canonical_bytes()))
    return copy
