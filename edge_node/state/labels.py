"""The clinic's labels: one per study or per SOP instance, with every change kept, and what learners read.

A label is a class name of the installed model's task. A *study* label applies to the instances the latest
finished run of that study analysed (its findings), so the learner trains on exactly the images the model
saw; an *instance* label applies to that instance and wins over its study's label. Setting a label again
replaces it; every change (and the label it replaced) is appended to ``label_history``, which is never
rewritten. Labels are human input that nothing could rebuild, so every write commits with FULL sync.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_node.errors import LabelError
from edge_node.learning.training_set import LabeledInstance
from edge_node.protocol.errors import BundleError
from edge_node.protocol.manifest import MANIFEST_FILE, parse_manifest
from edge_node.state.database import Database
from edge_node.state.model_registry import ModelRegistry

__all__ = ["LabelChange", "LabelInput", "LabelRecord", "LabelStore", "Scope", "Source", "installed_classes"]

Scope = Literal["study", "instance"]
Source = Literal["page", "import"]
_SCOPES = ("study", "instance")
_SOURCES = ("page", "import")


@dataclass(frozen=True)
class LabelInput:
    """A label to set: on a study (Study Instance UID) or on one SOP instance."""

    scope: Scope
    uid: str
    label: str


@dataclass(frozen=True)
class LabelRecord:
    """The label in force for a study or an instance."""

    scope: str
    uid: str
    label: str
    source: str
    who: str
    labeled_at: float


@dataclass(frozen=True)
class LabelChange:
    """One row of the audit trail: a label set, and the one it replaced (None: the first)."""

    scope: str
    uid: str
    label: str
    previous: str | None
    source: str
    who: str
    at: float


def installed_classes(db: Database) -> list[str]:
    """The class names of the active model's task, in index order; empty when no model is installed."""
    active = ModelRegistry(db).active()
    if active is None:
        return []
    try:
        manifest = parse_manifest((active.path / MANIFEST_FILE).read_bytes())
    except (OSError, BundleError, ValueError) as exc:
        raise LabelError(
            f"the installed model's manifest cannot be read ({type(exc).__name__}); "
            "reinstall the bundle with `fedclinic-edge install-bundle`"
        ) from None
    return [c.name for c in sorted(manifest.task.classes, key=lambda c: c.index)]


class LabelStore:
    """The labels and label_history tables of one node's database.

    ``classes`` are the names a label may take; None (the default) reads them from the model installed at
    the time of each write (see ``installed_classes``), so a new model's classes apply at once. Reading
    needs none; writing refuses every label when there are none.
    """

    def __init__(self, db: Database, classes: Sequence[str] | None = None) -> None:
        self.db = db
        self._classes = None if classes is None else tuple(classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes if self._classes is not None else tuple(installed_classes(self.db))

    def check(self, item: LabelInput, classes: Sequence[str] | None = None) -> None:
        """Raise LabelError when ``item`` cannot be stored: unknown class, scope, or an empty UID."""
        if item.scope not in _SCOPES:
            raise LabelError(f"a label is for a 'study' or an 'instance', not {item.scope!r}")
        if not item.uid or len(item.uid) > 64 or not all(ch.isdigit() or ch == "." for ch in item.uid):
            raise LabelError("a label needs a UID of digits and dots (at most 64 characters)")
        classes = self.classes if classes is None else classes
        if not classes:
            raise LabelError(
                "no model is installed, so no label can be checked; labels are class names of the installed"
                " model's task: run `fedclinic-edge install-bundle PATH` first"
            )
        if item.label not in classes:
            allowed = ", ".join(repr(c) for c in classes)
            raise LabelError(f"unknown label {item.label!r}; the installed model's classes are {allowed}")

    def set_labels(
        self, items: Sequence[LabelInput], *, source: Source, who: str, now: float | None = None
    ) -> int:
        """Set every label of ``items`` in one transaction (all or none); return how many changed.

        Setting a label a study or instance already has changes nothing and adds no history row, so
        importing the same archive twice is a no-op.
        """
        if source not in _SOURCES:
            raise LabelError(f"a label comes from 'page' or 'import', not {source!r}")
        classes = self.classes
        for item in items:
            self.check(item, classes)
        now = time.time() if now is None else now
        changed = 0
        with self.db.tx(durable=True) as c:
            for item in items:
                row = c.execute(
                    "SELECT label FROM labels WHERE scope = ? AND uid = ?", (item.scope, item.uid)
                ).fetchone()
                previous = None if row is None else str(row["label"])
                if previous == item.label:
                    continue
                c.execute(
                    "INSERT INTO labels (scope, uid, label, source, who, labeled_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (scope, uid) DO UPDATE SET label = excluded.label,"
                    " source = excluded.source, who = excluded.who, labeled_at = excluded.labeled_at",
                    (item.scope, item.uid, item.label, source, who, now),
                )
                c.execute(
                    "INSERT INTO label_history (scope, uid, label, previous, source, who, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item.scope, item.uid, item.label, previous, source, who, now),
                )
                changed += 1
        return changed

    def label_study(self, study_uid: str, label: str, *, source: Source, who: str) -> bool:
        """Label a study the node has received (LabelError for one it does not know); True if it changed."""
        if not self.db.query("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)):
            raise LabelError("this node has received no study with that Study Instance UID")
        return self.set_labels([LabelInput("study", study_uid, label)], source=source, who=who) == 1

    def labels(self) -> list[LabelRecord]:
        """Every label in force, oldest first."""
        rows = self.db.query(
            "SELECT scope, uid, label, source, who, labeled_at FROM labels ORDER BY labeled_at, scope, uid"
        )
        return [
            LabelRecord(
                scope=str(r["scope"]),
                uid=str(r["uid"]),
                label=str(r["label"]),
                source=str(r["source"]),
                who=str(r["who"]),
                labeled_at=float(r["labeled_at"]),
            )
            for r in rows
        ]

    def study_labels(self, study_uids: Sequence[str]) -> dict[str, str]:
        """The study labels in force for these studies (those without one are absent)."""
        if not study_uids:
            return {}
        marks = ", ".join("?" for _ in study_uids)
        rows = self.db.query(
            f"SELECT uid, label FROM labels WHERE scope = 'study' AND uid IN ({marks})", list(study_uids)
        )
        return {str(r["uid"]): str(r["label"]) for r in rows}

    def history(self) -> list[LabelChange]:
        """Every label change ever made, oldest first (the audit trail)."""
        rows = self.db.query(
            "SELECT scope, uid, label, previous, source, who, at FROM label_history ORDER BY id"
        )
        return [
            LabelChange(
                scope=str(r["scope"]),
                uid=str(r["uid"]),
                label=str(r["label"]),
                previous=None if r["previous"] is None else str(r["previous"]),
                source=str(r["source"]),
                who=str(r["who"]),
                at=float(r["at"]),
            )
            for r in rows
        ]

    def labeled_instances(self) -> list[LabeledInstance]:
        """The spooled instances that carry a label, in the order they were received.

        An instance label wins over its study's label. A study label covers the instances its latest
        finished run analysed (a study not analysed yet has none). Instances whose Part 10 file is no
        longer in the spool (purged) are left out.
        """
        rows = self.db.query(
            """
            SELECT i.id, i.sop_instance_uid, s.study_uid, i.path, l.label, l.source
            FROM labels l
            JOIN instances i ON l.scope = 'instance' AND i.sop_instance_uid = l.uid
            JOIN studies s ON s.id = i.study_id
            UNION ALL
            SELECT i.id, i.sop_instance_uid, s.study_uid, i.path, l.label, l.source
            FROM labels l
            JOIN studies s ON l.scope = 'study' AND s.study_uid = l.uid
            JOIN instances i ON i.study_id = s.id
            WHERE i.sop_instance_uid IN (
                SELECT f.sop_instance_uid FROM findings f
                WHERE f.run_id = (SELECT MAX(r.id) FROM runs r WHERE r.study_id = s.id AND r.status = 'done')
            )
            AND NOT EXISTS (
                SELECT 1 FROM labels li WHERE li.scope = 'instance' AND li.uid = i.sop_instance_uid
            )
            ORDER BY 1
            """
        )
        found: list[LabeledInstance] = []
        for r in rows:
            path = Path(r["path"])
            if not path.is_file():
                continue
            found.append(
                LabeledInstance(
                    sop_instance_uid=str(r["sop_instance_uid"]),
                    study_instance_uid=str(r["study_uid"]),
                    path=path,
                    label=str(r["label"]),
                    source=str(r["source"]),
                )
            )
        return found
