"""What ``fedclinic-edge status`` reports: whether the node runs, its model, totals, the input envelope
monitor and recent studies.

Built once from the node's files (database, serving record, lock), then written as JSON for scripts or as
text for people: a table on a wide terminal, one block per study when piped or narrow, so that nothing
(skip reasons above all) is cut off.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_node.inference.personal_head import PersonalHeadStore
from edge_node.inference.serving_record import ServingRecord, read_serving
from edge_node.node_lock import running_node
from edge_node.settings import EdgeSettings
from edge_node.state.envelope_monitor import EnvelopeWindow
from edge_node.state.model_registry import ModelRecord
from edge_node.state.node_state import NodeState
from edge_node.state.status_queries import StudySummary

__all__ = ["StatusReport"]

#: Narrower than this (or not a terminal), studies are listed as blocks instead of a table.
TABLE_MIN_WIDTH = 110


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


@dataclass(frozen=True)
class StatusReport:
    running: bool
    pid: int | None
    data_dir: str
    model: ModelRecord | None
    serving: ServingRecord | None
    counts: dict[str, int]
    last_send_error: str | None
    studies: list[tuple[str, StudySummary]]  # (short salted hash of the study UID, summary)
    limit: int
    #: The clinic's personal head: serving (with the round that trained it) or retired (with why); None if
    #: the node never trained one.
    personal_head: dict[str, Any] | None = None
    #: Per model version with an input envelope: the latest analysed images and how many lay outside it.
    envelope: list[EnvelopeWindow] = field(default_factory=list)

    @classmethod
    def collect(cls, settings: EdgeSettings, state: NodeState, limit: int) -> StatusReport:
        node = running_node(settings.data_dir)
        return cls(
            running=node is not None,
            pid=node.pid if node is not None else None,
            data_dir=str(settings.data_dir),
            model=state.models.active(),
            serving=read_serving(settings.serving_path),
            counts=state.status.counts(),
            last_send_error=state.status.last_send_error(),
            studies=[(state.db.uid_hash(s.study_uid), s) for s in state.status.recent_studies(limit)],
            limit=limit,
            personal_head=_personal_head(PersonalHeadStore.in_data_dir(settings.data_dir), state),
            envelope=state.envelope.recent(),
        )

    # -- JSON ----------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A stable document for scripts (keys are only ever added)."""
        c = self.counts
        serving = None
        if self.serving is not None:
            serving = {**asdict(self.serving), "fell_back": self.serving.fell_back}
        model = None
        if self.model is not None:
            m = self.model
            model = {
                "model_id": m.model_id,
                "version": m.version,
                "key_fingerprint": m.key_fingerprint,
                "installed_at": m.installed_at,
            }
        return {
            "node": {"running": self.running, "pid": self.pid, "data_dir": self.data_dir},
            "model": model,
            "serving": serving,
            "totals": {
                "studies": {
                    k: c[k] for k in ("received", "queued", "processing", "done", "skipped", "failed")
                },
                "instances": c["instances"],
                "results_pending": c["outbox_pending"],
                "results_sent": c["outbox_sent"],
            },
            "last_send_error": self.last_send_error,
            "personal_head": self.personal_head,
            "input_envelope": [w.to_json() for w in self.envelope],
            "studies": [
                {
                    "study": key,
                    "state": s.state,
                    "instances": s.n_instances,
                    "runs": s.runs,
                    "finding": s.top_label,
                    "score": s.top_score,
                    "reason": s.reason,
                    "model": s.model,
                    "results": s.results,
                    "last_instance_at": s.last_instance_at,
                }
                for key, s in self.studies
            ],
        }

    # -- text ----------------------------------------------------------------------------------------------

    def totals_line(self) -> str:
        c = self.counts
        states = ("received", "queued", "processing", "done", "skipped", "failed")
        n_studies = sum(c[k] for k in states)
        if n_studies == 0:
            return "nothing received yet"
        by_state = ", ".join(f"{c[k]} {k}" for k in states if c[k])
        return (
            f"{n_studies} {'study' if n_studies == 1 else 'studies'} ({by_state}), "
            f"{_plural(c['instances'], 'instance')}, {_plural(c['outbox_pending'], 'result file')} to send, "
            f"{_plural(c['outbox_sent'], 'result file')} sent"
        )

    def personal_line(self) -> str:
        p = self.personal_head or {}
        if p.get("state") == "serving":
            return (
                f"serves a personalised head (trained in round {p['trained_round']} at {p['trained_at']}, "
                "never sent): the shared backbone and head plus this clinic's own"
            )
        return f"retired ({p.get('reason')}); the node serves the shared head only"

    def print_text(self, console: Console) -> None:
        if self.running:
            pid = f" (pid {self.pid})" if self.pid is not None else ""
            console.print(
                f"[bold]node:[/bold] [green]running[/green]{pid} on {self.data_dir}", highlight=False
            )
        else:
            console.print(
                f"[bold]node:[/bold] [yellow]not running[/yellow] on {self.data_dir}", highlight=False
            )
        if self.model is None:
            console.print("[yellow]model:[/yellow] none installed (fedclinic-edge install-bundle PATH)")
        else:
            m = self.model
            console.print(
                f"[bold]model:[/bold] {m.model_id} {m.version}  (key {m.key_fingerprint}, "
                f"installed {time.strftime('%Y-%m-%d %H:%M', time.localtime(m.installed_at))})",
                highlight=False,
            )
            self._print_serving(console, m)
        if self.personal_head is not None:
            console.print(f"[bold]personal head:[/bold] {self.personal_line()}", highlight=False)
        console.print(f"[bold]totals:[/bold] {self.totals_line()}", highlight=False)
        self._print_envelope(console)
        if self.last_send_error:
            console.print(f"[yellow]last send error:[/yellow] {self.last_send_error}", highlight=False)
        if not self.studies:
            return
        if console.is_terminal and console.width >= TABLE_MIN_WIDTH:
            self._print_table(console)
        else:
            self._print_blocks(console)

    def _print_serving(self, console: Console, model: ModelRecord) -> None:
        record = self.serving
        if record is None:
            console.print(
                "[yellow]serving:[/yellow] not loaded yet (the node loads the model when it starts)"
            )
            return
        if (record.model_id, record.model_version) != (model.model_id, model.version):
            console.print(
                f"[yellow]serving:[/yellow] {record.model_id} {record.model_version} until its next study "
                "(the running node switches to the active model then)",
                highlight=False,
            )
            return
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.loaded_at))
        variant = f"{record.model_file} ({record.precision})"
        if record.precision != record.requested_precision:
            variant += f" [yellow]- the bundle has no {record.requested_precision} variant[/yellow]"
        where = f"runs on {record.provider}"
        if record.fell_back:
            where = (
                f"[yellow]runs on {record.provider}[/yellow] (asked for {record.requested_provider}, which "
                "did not load: check the CUDA / cuDNN / TensorRT libraries)"
            )
        console.print(f"[bold]serving:[/bold] {variant}, {where}, since {since}", highlight=False)

    def _print_envelope(self, console: Console) -> None:
        """The input envelope monitor: a table on a wide terminal, a line per model version otherwise; a
        warning under it for each window with far more images outside than chance explains."""
        if not self.envelope:
            return
        if console.is_terminal and console.width >= TABLE_MIN_WIDTH:
            table = Table(title="input envelope (latest analysed images per model version)")
            columns = (
                "model",
                "images",
                "outside",
                "rate",
                "expected by chance",
                "drifting",
                "look negative",
            )
            for column in columns:
                table.add_column(column, overflow="fold")
            for w in self.envelope:
                table.add_row(
                    escape(f"{w.model_id} {w.model_version}"),
                    f"{w.images} (window {w.window})",
                    str(w.outside),
                    f"{w.rate:.1%}",
                    w.expected_words,
                    "[yellow]yes[/yellow]" if w.drifting else "no",
                    _negative_cell(w),
                )
            console.print(table)
        else:
            for w in self.envelope:
                model = escape(f"{w.model_id} {w.model_version}")
                console.print(
                    f"[bold]input envelope:[/bold] {model}: {w.outside} of the last {w.images} analysed"
                    f" images outside ({w.rate:.1%}; {w.expected_words} expected by chance)"
                    + _negative_words(w),
                    highlight=False,
                    soft_wrap=True,
                )
        for w in self.envelope:
            warning = w.warning()
            if warning is not None:
                console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)

    def _print_table(self, console: Console) -> None:
        table = Table(title=f"recent studies (last {self.limit})")
        for column in (
            "study",
            "state",
            "instances",
            "finding",
            "score",
            "model",
            "results",
            "last instance",
        ):
            table.add_column(column, overflow="fold")
        for key, s in self.studies:
            table.add_row(
                key,
                s.state,
                str(s.n_instances),
                s.top_label or (s.reason or ""),
                "" if s.top_score is None else f"{s.top_score:.3f}",
                s.model or "",
                s.results,
                _when(s.last_instance_at),
            )
        console.print(table)

    def _print_blocks(self, console: Console) -> None:
        console.print(f"recent studies (last {self.limit}):", highlight=False)
        for key, s in self.studies:
            score = "" if s.top_score is None else f" score {s.top_score:.3f}"
            finding = f", {s.top_label}{score}" if s.top_label else ""
            console.print(
                f"- study {key}: {s.state}{finding}, {_plural(s.n_instances, 'instance')}, "
                f"results {s.results}, last instance {_when(s.last_instance_at)}"
                + (f", model {s.model}" if s.model else ""),
                highlight=False,
                soft_wrap=True,
            )
            if s.reason and not s.top_label:
                console.print(f"  reason: {s.reason}", highlight=False, soft_wrap=True)


def _personal_head(store: PersonalHeadStore, state: NodeState) -> dict[str, Any] | None:
    """Status of the personal head from its file: the node retires a head that does not fit when it loads."""
    head = store.load()
    active = state.models.active()
    if head is not None and (active is None or active.model_id == head.model_id):
        return {
            "state": "serving",
            "trained_round": head.trained_round,
            "trained_at": head.trained_at,
            "model_id": head.model_id,
            "sent": False,
        }
    if head is not None:
        reason = (
            f"trained for {head.model_id}; retired when the node loads {active.model_id if active else ''}"
        )
        return {"state": "retired", "reason": reason, "trained_round": head.trained_round, "sent": False}
    note = store.retired()
    if note is not None:
        return {
            "state": "retired",
            "reason": note.get("reason"),
            "trained_round": note.get("trained_round"),
            "sent": False,
        }
    return None


def _negative_cell(w: EnvelopeWindow) -> str:
    """The status table's "look negative" cell: how many of the images with unusual grey values look like
    negatives of the validation images, in yellow when that names the likely cause; "-" without an
    intensity part."""
    if w.intensity_outside is None:
        return "-"
    counts = f"{w.negative} of {w.intensity_outside} with unusual grey values"
    return f"[yellow]yes[/yellow]: {counts}" if w.looks_negative else f"no: {counts}"


def _negative_words(w: EnvelopeWindow) -> str:
    """The narrow status line's words on images that look negative; empty without an intensity part."""
    if w.intensity_outside is None:
        return ""
    return f"; {w.negative} of the {w.intensity_outside} with unusual grey values look negative"
