"""A labeled archive brought into the node: a CSV of labels, or a folder of DICOM files with its labels.csv.

The CSV has a ``label`` column and a ``study_instance_uid`` or ``sop_instance_uid`` column (a row fills one
of them; other columns, such as those of ``labels export``, are ignored). A folder holds DICOM Part 10 files
(in any sub-folders) and ``labels.csv``; each row must match a file of the folder.

Everything is checked before anything is kept: a bad row or file (its line or name and the reason, never a
value from inside a DICOM file) refuses the whole import. Then the folder's files go into the spool exactly
as instances received from the PACS do (durably, through ``Spool.put``), their studies are queued for
analysis like any other, and all labels are written in one transaction. A file already in the spool is not
written again and a label already set changes nothing, so a second import of the same archive is a no-op.
A crash between spooling and labeling leaves spooled, unlabeled instances; importing again completes it.
"""

from __future__ import annotations

import csv
import getpass
import io
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_node.errors import BadInstanceError, LabelError
from edge_node.ingest.part10 import Header, parse_header
from edge_node.ingest.spool import Spool
from edge_node.state.labels import LabelInput, LabelStore

__all__ = ["IMPORT_CALLING_AE", "LABELS_CSV", "ArchiveRefused", "ImportReport", "import_labels"]

logger = logging.getLogger(__name__)

#: The file of a folder archive that holds its labels.
LABELS_CSV = "labels.csv"
#: What the instance rows of imported files carry in place of the sending PACS's AE title.
IMPORT_CALLING_AE = "(import)"
#: Files of a folder that are not instances and are passed over (a DICOMDIR indexes the others).
_NOT_INSTANCES = {LABELS_CSV.lower(), "dicomdir"}
_MAX_CSV_BYTES = 64 * 1024 * 1024


class ArchiveRefused(LabelError):
    """The archive has bad rows or files; nothing of it was imported. ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"nothing was imported: {len(problems)} problem(s) in the archive; fix them and import again:"
            f"\n  {shown}{more}"
        )


@dataclass
class ImportReport:
    """What an import did (counts only: no UID, no value from a file)."""

    rows: int = 0
    files: int = 0
    spooled: int = 0
    already_spooled: int = 0
    studies: int = 0
    labels_changed: int = 0
    skipped_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class _Row:
    line: int
    item: LabelInput


def _read_rows(text: str, where: str, problems: list[str]) -> list[_Row]:
    reader = csv.DictReader(io.StringIO(text))
    columns = {c.strip().lower() for c in (reader.fieldnames or [])}
    if "label" not in columns or not columns & {"study_instance_uid", "sop_instance_uid"}:
        problems.append(
            f"{where}: the header row needs a 'label' column and a 'study_instance_uid' or"
            " 'sop_instance_uid' column"
        )
        return []
    rows: list[_Row] = []
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for number, raw in enumerate(reader, start=2):  # line 1 is the header
        values = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        study, sop, label = (
            values.get("study_instance_uid", ""),
            values.get("sop_instance_uid", ""),
            values.get("label", ""),
        )
        if not (study or sop or label):
            continue  # a blank line
        if bool(study) == bool(sop):
            problems.append(
                f"{where} line {number}: give a study_instance_uid or a sop_instance_uid, not both"
            )
            continue
        if not label:
            problems.append(f"{where} line {number}: the label is empty")
            continue
        item = LabelInput("instance", sop, label) if sop else LabelInput("study", study, label)
        earlier = seen.get((item.scope, item.uid))
        if earlier is not None and earlier[1] != label:
            problems.append(
                f"{where} line {number}: labels the same {item.scope} as line {earlier[0]} differently"
            )
            continue
        seen[(item.scope, item.uid)] = (number, label)
        rows.append(_Row(number, item))
    return rows


def _check_labels(rows: list[_Row], store: LabelStore, where: str, problems: list[str]) -> None:
    try:
        classes = store.classes
    except LabelError as exc:
        problems.append(str(exc))
        return
    for row in rows:
        try:
            store.check(row.item, classes)
        except LabelError as exc:
            problems.append(f"{where} line {row.line}: {exc}")


def _scan_folder(folder: Path, problems: list[str], report: ImportReport) -> dict[str, tuple[Path, Header]]:
    """Every instance of the folder by SOP Instance UID, from its header only."""
    found: dict[str, tuple[Path, Header]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.name.lower() in _NOT_INSTANCES or any(part.startswith(".") for part in path.parts):
            if path.name.lower() != LABELS_CSV:
                report.skipped_files.append(name)
            continue
        try:
            header = parse_header(path.read_bytes())
        except BadInstanceError as exc:
            problems.append(f"{name}: not a readable DICOM instance ({exc})")
            continue
        except OSError as exc:
            problems.append(f"{name}: cannot be read ({exc.strerror})")
            continue
        if header.sop_instance_uid in found:
            other = found[header.sop_instance_uid][0].relative_to(folder).as_posix()
            problems.append(f"{name}: the same SOP instance as {other}")
            continue
        found[header.sop_instance_uid] = (path, header)
    return found


def _already_spooled(spool: Spool, sop_instance_uid: str) -> bool:
    rows = spool.records.db.query(
        "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
    )
    return bool(rows) and Path(rows[0]["path"]).is_file()


def _known(store: LabelStore, item: LabelInput) -> bool:
    if item.scope == "study":
        return bool(store.db.query("SELECT 1 FROM studies WHERE study_uid = ?", (item.uid,)))
    return bool(store.db.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (item.uid,)))


def import_labels(
    source: Path,
    spool: Spool,
    store: LabelStore,
    *,
    who: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import a labels CSV or a labeled folder (see the module docstring); ArchiveRefused lists what is bad.

    ``progress(done, total)`` is called as the folder's files go into the spool.
    """
    who = who or f"import by {getpass.getuser()}"
    report = ImportReport()
    problems: list[str] = []
    if source.is_dir():
        csv_path = source / LABELS_CSV
        if not csv_path.is_file():
            raise ArchiveRefused(
                [f"{source} has no {LABELS_CSV} (columns: study_instance_uid or sop_instance_uid, label)"]
            )
    elif source.is_file():
        csv_path = source
    else:
        raise LabelError(
            f"{source} does not exist; give a labels CSV or a folder with DICOM files and {LABELS_CSV}"
        )
    if csv_path.stat().st_size > _MAX_CSV_BYTES:
        raise ArchiveRefused([f"{csv_path.name} is larger than {_MAX_CSV_BYTES} bytes"])
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArchiveRefused(
            [f"{csv_path.name} cannot be read as UTF-8 text ({type(exc).__name__})"]
        ) from None
    where = csv_path.name
    rows = _read_rows(text, where, problems)
    report.rows = len(rows)
    _check_labels(rows, store, where, problems)
    instances: dict[str, tuple[Path, Header]] = {}
    if source.is_dir():
        instances = _scan_folder(source, problems, report)
        studies = {h.study_uid for _, h in instances.values()}
        for row in rows:
            present = row.item.uid in (studies if row.item.scope == "study" else instances)
            if not present:
                problems.append(f"{where} line {row.line}: matches no DICOM file of the folder")
    else:
        for row in rows:
            if not _known(store, row.item):
                problems.append(
                    f"{where} line {row.line}: this node has no such {row.item.scope}; import it as a folder"
                    " with its DICOM files, or send it from the PACS first"
                )
    if problems:
        raise ArchiveRefused(problems)
    report.files = len(instances)
    study_ids: set[int] = set()
    for done, (sop_uid, (path, _)) in enumerate(instances.items(), start=1):
        if _already_spooled(spool, sop_uid):
            report.already_spooled += 1
        else:
            receipt = spool.put(path.read_bytes(), calling_ae=IMPORT_CALLING_AE)
            study_ids.add(receipt.study_id)
            report.spooled += 1
        if progress is not None:
            progress(done, len(instances))
    # The new instances' studies are complete: queue them for analysis as a released association does.
    spool.records.mark_complete(sorted(study_ids))
    report.studies = len({h.study_uid for _, h in instances.values()})
    report.labels_changed = store.set_labels([r.item for r in rows], source="import", who=who)
    logger.info(
        "labels import: %d rows, %d files (%d spooled, %d already there), %d labels changed",
        report.rows,
        report.files,
        report.spooled,
        report.already_spooled,
        report.labels_changed,
    )
    return report
