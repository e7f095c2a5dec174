"""A node's privacy floor at the hub: tasks carry the round's protection, refusals close the task with the
reason and count as failures for k of n; protection the hub cannot serve is refused at round start."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.protocol.protection import CompressionKind
from edge_node.protocol.wire import RoundProtection, RoundStart, RoundState
from hub.rounds.controller import RoundController
from hub.service.errors import ForbiddenError, RoundConfigError, TaskClosedError
from hub.store.database import Database
from tests.hub.service.test_rounds import answer, enroll

pytestmark = pytest.mark.hub


def test_tasks_carry_the_round_protection_and_its_size(db: Database, rc: RoundController) -> None:
    nodes = enroll(db, 3)
    protection = RoundProtection(clip_norm=2.0, epsilon=4.0, delta=1e-6)
    info = rc.start(RoundStart(strategy="stats", config={"num_classes": 2}, protection=protection), actor="t")
    assert info.protection == protection
    (task,) = rc.open_tasks(nodes[0])
    spec = task.protection
    assert spec is not None and spec.cohort_size == 3 and spec.kind.value == "stats"
    assert (spec.clip_norm, spec.epsilon, spec.delta, spec.secure_aggregation) == (2.0, 4.0, 1e-6, False)
    plain = rc.start(RoundStart(strategy="stats", config={"num_classes": 2}, nodes=nodes[:2]), actor="t")
    assert plain.protection is None
    second = next(t for t in rc.open_tasks(nodes[0]) if t.round_id == plain.round_id)
    assert second.protection is not None and second.protection.cohort_size == 2
    assert second.protection.epsilon is None


def test_refusals_are_recorded_and_count_as_failures(db: Database, rc: RoundController) -> None:
    nodes = enroll(db, 3)
    info = rc.start(
        RoundStart(strategy="stats", config={"num_classes": 2}, min_results=2, deadline_s=60), actor="t"
    )
    tasks = {n: rc.open_tasks(n)[0] for n in nodes}
    with pytest.raises(ForbiddenError):
        rc.refuse(nodes[1], tasks[nodes[0]].task_id, "not mine to refuse")
    first = rc.refuse(nodes[0], tasks[nodes[0]].task_id, "the round asks 3 clinics but ... at least 4")
    again = rc.refuse(nodes[0], tasks[nodes[0]].task_id, "said twice")  # a retry changes nothing
    assert again.recorded_at == first.recorded_at
    assert rc.open_tasks(nodes[0]) == []  # a refused task is not offered again
    assert answer(rc, tasks[nodes[1]], nodes[1], {"label_counts": np.array([1, 2], np.int64)})
    mid = rc.info(info.round_id)
    assert mid.state is RoundState.COLLECTING and mid.missing == 1
    assert [(r.node_id, r.reason) for r in mid.refusals] == [
        (nodes[0], "the round asks 3 clinics but ... at least 4")
    ]
    # The last node refuses too: every node has answered, so the round ends now, below k = 2.
    rc.refuse(nodes[2], tasks[nodes[2]].task_id, "this clinic sends updates only under secure aggregation")
    done = rc.info(info.round_id)
    assert done.state is RoundState.FAILED and (done.accepted, done.missing) == (1, 2)
    assert "1 of the 2 results required (2 refused" in (done.reason or "")
    with pytest.raises(TaskClosedError):
        rc.refuse(nodes[1], tasks[nodes[1]].task_id, "too late: already answered")


def test_a_refusal_does_not_stop_k_of_n(db: Database, rc: RoundController) -> None:
    nodes = enroll(db, 2)
    info = rc.start(RoundStart(strategy="stats", config={"num_classes": 2}, deadline_s=60), actor="t")
    (task0,), (task1,) = rc.open_tasks(nodes[0]), rc.open_tasks(nodes[1])
    rc.refuse(nodes[0], task0.task_id, "epsilon over budget")
    assert answer(rc, task1, nodes[1], {"label_counts": np.array([3, 4], np.int64)})
    done = rc.info(info.round_id)
    assert done.state is RoundState.PUBLISHED and (done.accepted, done.missing) == (1, 1)
    np.testing.assert_array_equal(rc.result(info.round_id)["label_counts"], [3, 4])


@pytest.mark.parametrize(
    ("protection", "words"),
    [
        (RoundProtection(epsilon=1.0), "needs a clip_norm"),
        # one node: a "sum" of one update is that update
        (
            RoundProtection(clip_norm=1.0, secure_aggregation=True),
            "secure aggregation needs at least 2 nodes",
        ),
        (
            RoundProtection(clip_norm=1.0, compression=CompressionKind.TOPK, secure_aggregation=True),
            "ring encoding is the codec",
        ),
    ],
)
def test_protection_the_hub_cannot_serve_is_refused_at_start(
    db: Database, rc: RoundController, protection: RoundProtection, words: str
) -> None:
    enroll(db, 1)
    with pytest.raises(RoundConfigError, match=words):
        rc.start(RoundStart(strategy="stats", config={"num_classes": 2}, protection=protection), actor="t")
    assert rc.recent() == []


def test_secure_aggregation_of_integer_counts_is_refused_at_start(db: Database, rc: RoundController) -> None:
    enroll(db, 2)
    protection = RoundProtection(clip_norm=1.0, secure_aggregation=True)
    with pytest.raises(RoundConfigError, match="counts are integers"):
        rc.start(RoundStart(strategy="stats", config={"num_classes": 2}, protection=protection), actor="t")
    assert rc.recent() == []
