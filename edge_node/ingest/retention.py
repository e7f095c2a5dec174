"""Spool retention: instances of studies that are finished leave the spool by age or when it grows too big.

Only a study in a final state (done, skipped, failed) gives up its instances, oldest first, always whole; a
study still receiving, queued or in analysis keeps every instance. The study's row, its runs and results stay,
so ``status`` still tells its history. A purge and the listener never race on a file: a purge holds the
spool's exclusive write lock (see ``Spool.exclusive``) while it removes rows and files, so an instance being
received for a purged study is written after the purge, never removed by it.

Labeled studies are what the node learns from, so the clinic's labels protect them: a finished study with a
label on it or on one of its instances stays, whatever its age or the spool's size, until its latest label
is older than ``labeled_keep_days`` (None: as long as it is labeled; 0: labels protect nothing).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_node.ingest.spool import Spool

__all__ = ["PurgeReport", "RetentionPolicy", "purge_spool"]

logger = logging.getLogger(__name__)

_FINAL = ("done", "skipped", "failed")
_DAY = 86400.0


@dataclass(frozen=True)
class RetentionPolicy:
    """How long and how much: None leaves that limit off; labeled studies are kept ``labeled_keep_days``."""

    max_age_days: float | None
    max_bytes: int | None
    labeled_keep_days: float | None = None


@dataclass(frozen=True)
class PurgeReport:
    studies: int
    instances: int
    bytes: int
    bytes_left: int
    dry_run: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _labeled(policy: RetentionPolicy, now: float) -> tuple[str, tuple[float, ...]]:
    """An SQL condition on study ``s``: it carries a label young enough to keep it (with its arguments)."""
    if policy.labeled_keep_days == 0:
        return "0", ()
    cutoff = -math.inf if policy.labeled_keep_days is None else now - policy.labeled_keep_days * _DAY
    condition = (
        "(EXISTS (SELECT 1 FROM labels l WHERE l.labeled_at >= ? AND ((l.scope = 'study' AND"
        " l.uid = s.study_uid) OR (l.scope = 'instance' AND l.uid IN"
        " (SELECT li.sop_instance_uid FROM instances li WHERE li.study_id = s.id)))))"
    )
    return condition, (cutoff,)


def _candidates(spool: Spool, policy: RetentionPolicy, now: float) -> tuple[list[tuple[int, int, int]], int]:
    """(study id, instances, bytes) of the studies to purge, oldest first, and the spool's bytes now."""
    db = spool.records.db
    total = int(db.query("SELECT COALESCE(SUM(size), 0) AS n FROM instances")[0]["n"])
    protected, args = _labeled(policy, now)
    rows = db.query(
        "SELECT s.id, s.last_instance_at, COUNT(i.id) AS n, SUM(i.size) AS bytes FROM studies s"
        f" JOIN instances i ON i.study_id = s.id WHERE s.state IN {_FINAL} AND NOT {protected}"
        " GROUP BY s.id ORDER BY s.last_instance_at, s.id",
        args,
    )
    chosen: list[tuple[int, int, int]] = []
    left = total
    for r in rows:
        too_old = policy.max_age_days is not None and r["last_instance_at"] < now - policy.max_age_days * _DAY
        too_big = policy.max_bytes is not None and left > policy.max_bytes
        if not (too_old or too_big):
            break  # oldest first: the studies after this one are younger, and the spool fits
        chosen.append((int(r["id"]), int(r["n"]), int(r["bytes"])))
        left -= int(r["bytes"])
    return chosen, total


def purge_spool(
    spool: Spool, policy: RetentionPolicy, *, dry_run: bool = False, now: float | None = None
) -> PurgeReport:
    """Remove (or, dry run, only count) what the policy lets go; never an instance of an unfinished study."""
    now = time.time() if now is None else now
    if dry_run:
        chosen, total = _candidates(spool, policy, now)
        return _report(chosen, total, dry_run=True)
    with spool.exclusive():
        # Chosen under the lock: no instance is being written, and the states read are the last ones.
        chosen, total = _candidates(spool, policy, now)
        paths: list[Path] = []
        with spool.records.db.tx() as c:
            for study_id, _, _ in chosen:
                # The state is checked again in the same transaction that deletes.
                # The state and the labels are checked again in the transaction that deletes: a label
                # given on the page a moment ago keeps its study.
                protected, args = _labeled(policy, now)
                state = c.execute(
                    f"SELECT s.state, {protected} AS kept FROM studies s WHERE s.id = ?", (*args, study_id)
                ).fetchone()
                if state is None or state["state"] not in _FINAL or state["kept"]:
                    continue
                rows = c.execute("SELECT path FROM instances WHERE study_id = ?", (study_id,)).fetchall()
                paths.extend(Path(r["path"]) for r in rows)
                c.execute("DELETE FROM instances WHERE study_id = ?", (study_id,))
        for path in paths:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the study's directory goes once empty
                path.parent.rmdir()
    report = _report(chosen, total, dry_run=False)
    if report.instances:
        logger.info(
            "spool purge: %d studies, %d instances, %d bytes removed; %d bytes kept",
            report.studies,
            report.instances,
            report.bytes,
            report.bytes_left,
        )
    return report


def _report(chosen: list[tuple[int, int, int]], total: int, *, dry_run: bool) -> PurgeReport:
    size = sum(b for _, _, b in chosen)
    return PurgeReport(
        studies=len(chosen),
        instances=sum(n for _, n, _ in chosen),
        bytes=size,
        bytes_left=total - size,
        dry_run=dry_run,
    )
