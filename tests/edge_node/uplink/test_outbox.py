"""The update outbox survives a restart, answers each task once, and schedules retries; backoff has jitter."""

from __future__ import annotations

import random
from pathlib import Path

from edge_node.uplink.backoff import Backoff
from edge_node.uplink.outbox import UpdateOutbox


def test_outbox_keeps_updates_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = UpdateOutbox(path)
    assert box.put("t1", '{"a": 1}', b"npz-1", now=100.0)
    assert not box.put("t1", '{"a": 2}', b"npz-other", now=101.0)  # one answer per task
    assert box.put("t2", '{"b": 1}', b"npz-2", now=102.0)
    box.close()

    box = UpdateOutbox(path)  # a new process
    due = box.due(now=200.0)
    assert [(e.task_id, e.payload) for e in due] == [("t1", b"npz-1"), ("t2", b"npz-2")]
    box.mark_retry(due[0].id, "hub unreachable", next_try=300.0)
    box.mark_sent(due[1].id, now=201.0)
    assert [e.task_id for e in box.due(now=250.0)] == []
    assert box.next_try() == 300.0
    retry = box.due(now=300.0)
    assert [(e.task_id, e.attempts) for e in retry] == [("t1", 1)]
    box.mark_refused(retry[0].id, "task_closed: round 3 is no longer collecting")
    assert box.counts() == {"pending": 0, "sent": 1, "refused": 1}
    assert box.next_try() is None
    assert box.has("t1") and box.has("t2") and not box.has("t3")
    box.close()


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(base_seconds=1.0, max_seconds=60.0, rng=random.Random(7))
    assert [backoff.cap(n) for n in (0, 1, 2, 3, 7, 8, 500)] == [0.0, 1.0, 2.0, 4.0, 60.0, 60.0, 60.0]
    delays = [backoff.delay(5) for _ in range(200)]  # cap 16 s
    assert all(8.0 <= d <= 16.0 for d in delays)
    assert max(delays) - min(delays) > 4.0  # spread: nodes that failed together do not return together
