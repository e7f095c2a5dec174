"""RoundController: rounds over real nodes, with every transition and every accepted update persisted.

Rounds survive a crash at any point: the state, the tasks and each accepted update are rows. The controller
is the one object the API and the CLI hold; the work is done by its parts, one concept each: the opener
(new rounds and their tasks), the task desk (what nodes see), the intake (updates), the closer
(aggregation, deadlines, take-over of a dead process's work) and the reports. Several API workers can share
one database: every state change is a conditional UPDATE that only one of them wins (``RoundClaims``).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from edge_node.protocol.wire import (
    RefusalReceipt,
    RoundInfo,
    RoundStart,
    RoundUpdatesInfo,
    UpdateReceipt,
    UpdateSubmission,
)
from edge_node.protocol.wire import Task as WireTask
from hub.fl.strategy import Params
from hub.rounds.claims import RoundClaims, process_instance
from hub.rounds.closer import RoundCloser
from hub.rounds.decoded_updates import DecodedUpdates
from hub.rounds.intake import UpdateIntake
from hub.rounds.opener import RoundOpener
from hub.rounds.reports import RoundReports
from hub.rounds.round_updates import round_updates_report
from hub.rounds.secagg_desk import SecAggDesk
from hub.rounds.task_desk import TaskDesk
from hub.service.settings import HubSettings
from hub.store.database import Database

__all__ = ["RoundController"]


class RoundController:
    """Start, feed, close and report rounds; safe to use from several threads and processes at once."""

    def __init__(self, db: Database, settings: HubSettings, *, instance: str | None = None) -> None:
        self.db = db
        self.settings = settings
        self.instance = instance or process_instance()
        self.lease = timedelta(seconds=settings.aggregation_lease_s)
        self.claims = RoundClaims(self.instance, self.lease)
        self.opener = RoundOpener(db, self.claims)
        # Updates decoded at intake are handed to the aggregation instead of being decoded twice.
        decoded = DecodedUpdates()
        self.closer = RoundCloser(db, self.claims, self.opener.issue, decoded)
        self.desk = TaskDesk(db, settings, self.closer.close_round)
        self.intake = UpdateIntake(db, settings, self.closer.close_round, decoded)
        self.reports = RoundReports(db)
        self.secagg = SecAggDesk(db, settings, self.closer.close_round)

    # -- the operator ---------------------------------------------------------------------------------------

    def start(self, request: RoundStart, *, actor: str) -> RoundInfo:
        """Persist a new round (open), then issue its tasks (collecting)."""
        return self.info(self.opener.open(request, actor=actor))

    def cancel(self, round_id: str, *, actor: str) -> RoundInfo:
        self.closer.cancel(round_id, actor=actor)
        return self.info(round_id)

    def info(self, round_ref: str) -> RoundInfo:
        return self.reports.info(round_ref)

    def recent(self, limit: int = 100) -> list[RoundInfo]:
        return self.reports.recent(limit)

    def result(self, round_ref: str) -> Params:
        return self.reports.result(round_ref)

    def updates(self, round_ref: str) -> RoundUpdatesInfo:
        """Each node's update of a training round, read against the others' (``hub.rounds.round_updates``)."""
        return round_updates_report(self.db, round_ref)

    def activity_marker(self) -> tuple[int, tuple[str, ...]]:
        """Changes whenever a round starts, enters or leaves collecting: (newest number, collecting ids)."""
        return self.reports.activity_marker()

    # -- nodes ----------------------------------------------------------------------------------------------

    def open_tasks(self, node_id: str) -> list[WireTask]:
        return self.desk.open_tasks(node_id)

    def count_open_tasks(self, session: Session, node_id: str) -> int:
        return self.desk.count_open_tasks(session, node_id)

    def task_params(self, node_id: str, task_id: str) -> bytes:
        return self.desk.task_params(node_id, task_id)

    def refuse(self, node_id: str, task_id: str, reason: str) -> RefusalReceipt:
        """Record a node's refusal of its task: the task closes with the reason, a failure for k-of-n."""
        return self.desk.refuse(node_id, task_id, reason)

    def submit(self, node_id: str, task_id: str, submission: UpdateSubmission) -> UpdateReceipt:
        """Validate and keep one update; nothing is written unless it is accepted."""
        return self.intake.submit(node_id, task_id, submission)

    # -- time -----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Close due secure-aggregation steps and rounds whose deadline passed; take over dead work."""
        self.secagg.tick()
        self.closer.tick()

    def close_round(self, round_id: str) -> None:
        self.closer.close_round(round_id)
