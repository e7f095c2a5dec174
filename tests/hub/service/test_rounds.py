"""The round controller on a real SQLite store: life cycle, k of n, collections, takeover after a crash."""

from __future__ import annotations

import base64
import secrets
import threading
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import update

from edge_node.protocol.tensors import decode_tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import (
    EnrollRequest,
    RoundProtection,
    RoundStart,
    RoundState,
    Task,
    UpdateSubmission,
    decode_join_code,
)
from hub.fl.codec import encode_result
from hub.fl.strategy import ClientResult
from hub.rounds.controller import RoundController
from hub.rounds.lifecycle import TERMINAL, TRANSITIONS, IllegalTransition, check_transition, transition_table
from hub.service.enrollment import enroll_node, issue_join_code
from hub.service.errors import RoundConfigError, TaskClosedError, UpdateRejected
from hub.service.settings import HubSettings
from hub.store.artifacts import store_tensors
from hub.store.database import Database
from hub.store.schema import Round, utcnow

pytestmark = pytest.mark.hub


def enroll(db: Database, n: int) -> list[str]:
    ids = []
    for i in range(n):
        with db.session() as session:
            code, _node, _ = issue_join_code(
                session,
                name=f"site-{i}",
                cohort="default",
                ttl_s=600,
                hub_url="https://127.0.0.1:1",
                tls_sha256="0" * 64,
                actor="test",
            )
        with db.session() as session:
            req = EnrollRequest(
                join_secret=decode_join_code(code).secret,
                credential=secrets.token_urlsafe(32),
                edge_version="t",
            )
            ids.append(enroll_node(session, req).id)
    return ids


def answer(rc: RoundController, task: Task, node: str, tensors: dict[str, np.ndarray], n: int = 1) -> bool:
    envelope, payload = encode_result(ClientResult(node, task.round, n, tensors), UpdateKind(task.kind))
    body = UpdateSubmission(
        task_id=task.task_id, envelope=envelope, payload_b64=base64.b64encode(payload).decode()
    )
    return rc.submit(node, task.task_id, body).first_time


def test_the_life_cycle_is_a_table() -> None:
    states = {s for pair in TRANSITIONS for s in pair}
    assert states == set(RoundState)
    assert all(a not in TERMINAL for a, _ in TRANSITIONS)
    assert ("open", "collecting", TRANSITIONS[(RoundState.OPEN, RoundState.COLLECTING)]) in transition_table()
    with pytest.raises(IllegalTransition, match="published to collecting"):
        check_transition(RoundState.PUBLISHED, RoundState.COLLECTING)


def test_stats_round_sums_counts_and_refuses_late_updates(db: Database, settings: HubSettings) -> None:
    nodes = enroll(db, 3)
    rc = RoundController(db, settings)
    info = rc.start(
        RoundStart(strategy="stats", config={"num_classes": 3}, min_results=2, deadline_s=60), actor="t"
    )
    assert (
        info.state is RoundState.COLLECTING and info.kind is UpdateKind.STATS and info.nodes == sorted(nodes)
    )
    counts = {nodes[0]: [1, 2, 3], nodes[1]: [10, 0, 5]}
    for node, c in counts.items():
        (task,) = rc.open_tasks(node)
        assert [(e.name, e.shape, e.dtype) for e in task.expected] == [("label_counts", [3], "i8")]
        assert answer(rc, task, node, {"label_counts": np.array(c, np.int64)})
    assert rc.info(info.round_id).state is RoundState.COLLECTING  # the third node has not answered yet
    (late_task,) = rc.open_tasks(nodes[2])
    # Negative counts are refused on arrival, so they never fail the round at aggregation.
    with pytest.raises(UpdateRejected, match="negative counts in \\['label_counts'\\]"):
        answer(rc, late_task, nodes[2], {"label_counts": np.array([1, -4, 1], np.int64)})
    with db.session() as session:  # the deadline passes
        session.execute(
            update(Round).where(Round.id == info.round_id).values(deadline=utcnow() - timedelta(seconds=1))
        )
    rc.tick()
    done = rc.info(info.round_id)
    assert done.state is RoundState.PUBLISHED and (done.accepted, done.missing) == (2, 1)
    np.testing.assert_array_equal(rc.result(info.round_id)["label_counts"], [11, 2, 8])
    with pytest.raises(TaskClosedError, match="too late"):
        answer(rc, late_task, nodes[2], {"label_counts": np.array([1, 1, 1], np.int64)})


def test_fewer_than_k_at_the_deadline_fails_the_round(db: Database, settings: HubSettings) -> None:
    nodes = enroll(db, 2)
    rc = RoundController(db, settings)
    info = rc.start(
        RoundStart(strategy="stats", config={"num_classes": 2}, min_results=2, deadline_s=60), actor="t"
    )
    (task,) = rc.open_tasks(nodes[0])
    answer(rc, task, nodes[0], {"label_counts": np.array([1, 1], np.int64)})
    with db.session() as session:
        session.execute(update(Round).where(Round.id == info.round_id).values(deadline=utcnow()))
    rc.tick()
    failed = rc.info(info.round_id)
    assert failed.state is RoundState.FAILED and "1 of the 2 results required" in (failed.reason or "")


def test_public_logits_round_is_an_example_weighted_mean(db: Database, settings: HubSettings) -> None:
    nodes = enroll(db, 2)
    rc = RoundController(db, settings)
    inputs = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)  # (N, C, H, W)
    with db.session() as session:
        art = store_tensors(session, {"inputs": inputs})
    info = rc.start(
        RoundStart(strategy="public_logits", config={"num_classes": 2}, model_artifact=art), actor="t"
    )
    logits = {nodes[0]: np.full((5, 2), 1.0, np.float32), nodes[1]: np.full((5, 2), 4.0, np.float32)}
    for n_examples, node in zip((1, 2), nodes, strict=True):
        (task,) = rc.open_tasks(node)
        assert rc.task_params(node, task.task_id)  # the anchors travel with the task
        answer(rc, task, node, {"logits": logits[node]}, n=n_examples)
    assert (
        rc.info(info.round_id).state is RoundState.PUBLISHED
    )  # every node answered: no wait for the deadline
    np.testing.assert_allclose(rc.result(info.round_id)["logits"], np.full((5, 2), 3.0))


def test_a_dead_process_s_aggregation_is_taken_over_after_its_lease(
    db: Database, settings: HubSettings
) -> None:
    nodes = enroll(db, 2)
    start = {"w": np.ones((2, 2), np.float32)}
    with db.session() as session:
        art = store_tensors(session, start)
    rc = RoundController(db, settings)
    info = rc.start(RoundStart(strategy="fedavg", model_artifact=art, deadline_s=60), actor="t")
    for node in nodes:
        (task,) = rc.open_tasks(node)
        tensors = {"w": np.full((2, 2), 0.5, np.float32)}
        envelope, payload = encode_result(ClientResult(node, task.round, 1, tensors))
        body = UpdateSubmission(
            task_id=task.task_id, envelope=envelope, payload_b64=base64.b64encode(payload).decode()
        )
        rc.intake.accept(node, task.task_id, body)  # stored, but this "process" dies before closing the round
    with db.session() as session:  # it had claimed the aggregation just now
        session.execute(
            update(Round)
            .where(Round.id == info.round_id)
            .values(state="aggregating", claimed_by="dead-process", claimed_at=utcnow())
        )
    survivor = RoundController(db, settings)
    survivor.tick()
    assert survivor.info(info.round_id).state is RoundState.AGGREGATING  # the claim is still live
    with db.session() as session:
        session.execute(
            update(Round).where(Round.id == info.round_id).values(claimed_at=utcnow() - timedelta(seconds=30))
        )
    survivor.tick()
    done = survivor.info(info.round_id)
    assert done.state is RoundState.PUBLISHED and done.accepted == 2
    np.testing.assert_allclose(survivor.result(info.round_id)["w"], np.full((2, 2), 1.5))


def test_concurrent_resends_count_once(db: Database, settings: HubSettings) -> None:
    nodes = enroll(db, 2)
    rc = RoundController(db, settings)
    info = rc.start(RoundStart(strategy="stats", config={"num_classes": 2}, deadline_s=60), actor="t")
    (task,) = rc.open_tasks(nodes[0])
    firsts: list[bool] = []

    def send() -> None:
        firsts.append(answer(rc, task, nodes[0], {"label_counts": np.array([3, 4], np.int64)}))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(firsts) == [False, False, False, True]
    assert rc.info(info.round_id).accepted == 1


def test_bad_round_settings_are_refused(db: Database, settings: HubSettings) -> None:
    rc = RoundController(db, settings)
    with pytest.raises(RoundConfigError, match="no active node"):
        rc.start(RoundStart(strategy="stats", config={"num_classes": 2}), actor="t")
    enroll(db, 1)
    with pytest.raises(RoundConfigError, match="unknown strategy"):
        rc.start(RoundStart(strategy="nope", model_artifact=None), actor="t")
    with pytest.raises(RoundConfigError, match="min_results 2"):
        rc.start(RoundStart(strategy="stats", config={"num_classes": 2}, min_results=2), actor="t")
    with pytest.raises(RoundConfigError, match="num_classes"):
        rc.start(RoundStart(strategy="stats"), actor="t")


def test_the_next_round_starts_from_the_state_the_last_one_saved(db: Database, settings: HubSettings) -> None:
    nodes = enroll(db, 2)
    with db.session() as session:
        art = store_tensors(session, {"w": np.zeros(3, np.float32)})
    rc = RoundController(db, settings)
    for expected in (1.0, 2.0):  # each round adds a mean delta of 1.0
        info = rc.start(
            RoundStart(strategy="fedavg", model_artifact=art if expected == 1.0 else None), actor="t"
        )
        for node in nodes:
            (task,) = rc.open_tasks(node)
            params = decode_tensors(rc.task_params(node, task.task_id))
            np.testing.assert_array_equal(params["w"], np.full(3, expected - 1.0))
            answer(rc, task, node, {"w": np.ones(3, np.float32)})
        assert rc.info(info.round_id).state is RoundState.PUBLISHED
        np.testing.assert_array_equal(rc.result(info.round_id)["w"], np.full(3, expected))
    with db.session() as session:
        saved = session.get(Round, info.round_id)
        assert saved is not None and saved.strategy_state is not None
        np.testing.assert_array_equal(decode_tensors(saved.strategy_state)["w"], np.full(3, 2.0))


def test_the_aggregate_uses_tensors_decoded_at_intake_only_when_they_match_the_store(
    db: Database, settings: HubSettings
) -> None:
    nodes = enroll(db, 2)
    with db.session() as session:
        art = store_tensors(session, {"w": np.ones((2, 2), np.float32)})
    rc = RoundController(db, settings)
    info = rc.start(RoundStart(strategy="fedavg", model_artifact=art, deadline_s=60), actor="t")
    first, second = nodes
    (task,) = rc.open_tasks(first)
    assert answer(rc, task, first, {"w": np.full((2, 2), 0.5, np.float32)})
    kept = rc.intake.decoded
    assert kept is rc.closer.decoded and kept.nbytes == 16  # decoded once, kept for the aggregation
    # A kept entry whose sha256 is not the stored row's is never used: the store is the truth.
    kept.keep(info.round_id, first, "0" * 64, {"w": np.full((2, 2), 99.0, np.float32)})
    (task,) = rc.open_tasks(second)
    assert answer(rc, task, second, {"w": np.full((2, 2), 1.5, np.float32)})
    assert rc.info(info.round_id).state is RoundState.PUBLISHED
    assert kept.nbytes == 0  # taken by the aggregation
    np.testing.assert_allclose(rc.result(info.round_id)["w"], np.full((2, 2), 2.0, np.float32))


def test_decoded_updates_are_bounded_in_bytes_and_rounds() -> None:
    from hub.rounds.decoded_updates import DecodedUpdates

    tensors = {"w": np.zeros(4, np.float32)}  # 16 bytes
    kept = DecodedUpdates(max_rounds=2, max_bytes=40)
    kept.keep("r1", "a", "s", tensors)
    kept.keep("r1", "b", "s", tensors)
    kept.keep("r1", "c", "s", tensors)  # over 40 bytes: not kept, the aggregation decodes it from the store
    assert set(kept.take("r1")) == {"a", "b"} and kept.nbytes == 0
    for r in ("r1", "r2", "r3"):
        kept.keep(r, "a", "s", tensors)
    assert kept.take("r1") == {}  # the oldest round was forgotten when the third began
    assert set(kept.take("r3")) == {"a"} and set(kept.take("r2")) == {"a"} and kept.nbytes == 0


def _pfednet_start(db: Database) -> tuple[str, dict[str, np.ndarray]]:
    model = {
        "features.0.conv.weight": np.ones((2, 1, 3, 3), np.float32),
        "features.0.norm.weight": np.ones(2, np.float32),
        "head.weight": np.zeros((1, 2), np.float32),
    }
    with db.session() as session:
        return store_tensors(session, model), model


PFEDNET = {"personal": "head_norm", "graph_keys": "label_counts,feature_mean", "graph_k": 1}


def _sketch(prevalence: float, brightness: float) -> dict[str, np.ndarray]:
    n = 40
    return {
        "label_counts": np.array([round(n * (1 - prevalence)), round(n * prevalence)], np.int64),
        "feature_mean": np.full(16, brightness, np.float32),
    }


def _expire(db: Database, round_id: str) -> None:
    with db.session() as session:
        session.execute(update(Round).where(Round.id == round_id).values(deadline=utcnow()))


def test_a_pfednet_sketch_round_builds_the_graph_and_the_next_round_continues_from_it(
    db: Database, settings: HubSettings
) -> None:
    nodes = enroll(db, 3)
    rc = RoundController(db, settings)
    artifact, model = _pfednet_start(db)
    start = RoundStart(
        strategy="pfednet", config=PFEDNET, model_artifact=artifact, min_results=1, deadline_s=60
    )
    # The sketch round is a stats round from the start: protection that cannot apply to counts is refused.
    with pytest.raises(RoundConfigError, match="a stats round's counts are integers"):
        rc.start(
            start.model_copy(update={"protection": RoundProtection(secure_aggregation=True, clip_norm=1.0)}),
            actor="t",
        )
    first = rc.start(start, actor="t")
    assert first.kind is UpdateKind.STATS
    tasks = {n: rc.open_tasks(n)[0] for n in nodes}
    expected = [(e.name, e.shape, e.dtype) for e in tasks[nodes[0]].expected]
    assert expected == [("label_counts", [2], "i8"), ("feature_mean", [16], "f4")]
    assert tasks[nodes[0]].config == {"stats_keys": "label_counts,feature_mean", "stats_of": "training_set"}
    # A mean of grey values outside [0, 1], or not finite, is refused on arrival.
    bad = _sketch(0.5, 0.5)
    with pytest.raises(UpdateRejected, match="outside it"):
        answer(rc, tasks[nodes[0]], nodes[0], {**bad, "feature_mean": np.full(16, 1.5, np.float32)})
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        answer(rc, tasks[nodes[0]], nodes[0], {**bad, "feature_mean": np.full(16, np.nan, np.float32)})
    # One sketch is no graph: the round fails and says why.
    assert answer(rc, tasks[nodes[0]], nodes[0], _sketch(0.9, 0.3))
    _expire(db, first.round_id)
    rc.tick()
    failed = rc.info(first.round_id)
    assert failed.state is RoundState.FAILED and "the similarity graph needs 2" in (failed.reason or "")

    second = rc.start(start, actor="t")
    for node, (p, b) in zip(nodes, [(0.9, 0.3), (0.85, 0.32), (0.2, 0.6)], strict=True):
        (task,) = rc.open_tasks(node)
        assert answer(rc, task, node, _sketch(p, b))
    done = rc.info(second.round_id)
    assert done.state is RoundState.PUBLISHED
    published = rc.result(second.round_id)  # the model as it stood, with the mean personal part
    for name, arr in model.items():
        np.testing.assert_array_equal(published[name], arr)

    # The next round starts from that state: training tasks with each node's personal part.
    third = rc.start(RoundStart(strategy="pfednet", config=PFEDNET, min_results=1, deadline_s=60), actor="t")
    assert third.kind is UpdateKind.WEIGHTS_DELTA
    (task,) = rc.open_tasks(nodes[2])
    assert task.config["personal"] == "head_norm"
    assert sorted(e.name for e in task.expected) == sorted(model)
