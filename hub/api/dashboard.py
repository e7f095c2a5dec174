"""The hub's read-only dashboard: nodes and their last heartbeat, rounds and their progress, publications.

Each training round's accepted updates are read node by node as ``fedclinic-hub rounds updates`` reads them
(``hub.rounds.round_updates``): a node the reading names stands out in the round's row, with the reason on
hover. A round's reading is kept per (round, accepted updates, state), so a reload reads only what changed.

Plain HTML from the server (no JavaScript), refreshed by the browser every few seconds. It is behind the admin
credential like the admin API: the operator signs in once with the admin token (``data_dir/admin.token``),
which becomes an HttpOnly, Secure, SameSite=Strict cookie; ``Authorization: Bearer`` works too, for scripts.
Nothing here writes to the store.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select

from edge_node.protocol.updates import UpdateKind
from hub.rounds.round_updates import MODEL_UPDATES, round_updates_report
from hub.rounds.secagg_desk import is_secagg
from hub.service.errors import ConflictError
from hub.service.heartbeat import EnvelopeCounts, envelope_counts
from hub.store.database import Database
from hub.store.schema import Node, Publication, Round, Update

__all__ = ["COOKIE", "Readings", "dashboard_router", "render_dashboard"]

#: A round's updates cell, kept per (round id, accepted updates, state): what a reload need not read again.
Readings = dict[tuple[str, int, str], str]

#: Cookie that carries the admin token once the operator signed in.
COOKIE = "fedclinic_admin"
#: Seconds between the browser's reloads of the page.
REFRESH_SECONDS = 10

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1b1f24; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; min-width: 60%; }
th, td { border-bottom: 1px solid #d0d7de; padding: .3rem .7rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } .muted { color: #57606a; } .empty { color: #57606a; font-style: italic; }
.state-active, .state-published { color: #1a7f37; } .state-revoked, .state-failed { color: #cf222e; }
.state-collecting, .state-aggregating, .state-open, .state-pending { color: #9a6700; }
progress { width: 8rem; } .alarm { color: #cf222e; font-weight: 600; }
"""


def _esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _table(table_id: str, headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """A table; cells are already-escaped HTML."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty" id="{table_id}-empty">{_esc(empty)}</p>'
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _state(value: str) -> str:
    return f'<span class="state-{_esc(value)}">{_esc(value)}</span>'


def _envelope_cell(counts: EnvelopeCounts | None) -> str:
    """The node's latest images outside its model's input envelope; a raised drift alarm stands out, and so
    do images that look like negatives of the validation images (with the likely cause as the title)."""
    if counts is None:
        return ""
    if counts.negative:
        why = "their grey values look like negatives of the validation images: check the display header"
        return f'<span class="alarm" title="{_esc(why)}">{_esc(counts.describe())}</span>'
    if counts.drifting:
        return f'<span class="alarm" title="more images outside than chance">{_esc(counts.describe())}</span>'
    return _esc(counts.describe())


def _updates_cell(db: Database, r: Round, accepted: int) -> str:
    """What the node-by-node reading of a training round's updates says: the nodes it names stand out, each
    with its reason on hover; nothing for collection rounds."""
    if UpdateKind(r.kind) not in MODEL_UPDATES or accepted == 0:
        return ""
    if is_secagg(r):
        return '<span class="muted" title="secure aggregation: the hub holds only the sum">masked</span>'
    try:
        report = round_updates_report(db, r.id)
    except ConflictError as exc:
        return f'<span class="muted" title="{_esc(exc)}">not readable</span>'
    named = [
        f'<span class="alarm named" title="{_esc(n.named)}">named: {_esc(n.name or n.node_id)}</span>'
        for n in report.nodes
        if n.named
    ]
    if named:
        return "<br>".join(named)
    said = "; ".join(report.warnings)
    return f'<span class="muted" title="{_esc(said)}">{len(report.nodes)} read, nobody named</span>'


def _page(title: str, body: str, *, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def render_dashboard(db: Database, now: datetime | None = None, readings: Readings | None = None) -> str:
    """The dashboard's HTML from the store as it is now; ``readings`` keeps the rounds' updates cells between
    calls (left with the shown rounds' cells only)."""
    now = now or datetime.now(timezone.utc)
    with db.session() as session:
        nodes = list(session.scalars(select(Node).order_by(Node.name)))
        rounds = list(session.scalars(select(Round).order_by(Round.number.desc()).limit(50)))
        accepted: dict[str, int] = {
            str(round_id): int(n)
            for round_id, n in session.execute(
                select(Update.round_id, func.count()).group_by(Update.round_id)
            ).all()
        }
        publications = list(session.scalars(select(Publication).order_by(Publication.seq.desc()).limit(50)))

    node_rows = [
        [
            f"<strong>{_esc(n.name)}</strong>",
            f'<span class="muted">{_esc(n.id)}</span>',
            _esc(n.cohort),
            _state(n.state),
            f'<span title="{_esc(n.last_heartbeat.isoformat() if n.last_heartbeat else "")}">'
            f"{_esc(_ago(n.last_heartbeat, now))}</span>",
            _esc(n.edge_version or ""),
            _esc(f"{n.model_id} {n.model_version}" if n.model_id else ""),
            _esc(n.publication_id or ""),
            _esc(n.health or ""),
            _envelope_cell(envelope_counts(n.counts)),
        ]
        for n in nodes
    ]
    kept = {} if readings is None else readings
    shown: Readings = {}
    round_rows = []
    for r in rounds:
        got = int(accepted.get(r.id, 0))
        total = len(r.nodes) or 1
        key = (r.id, got, r.state)
        cell = kept.get(key)  # another request may clear the kept cells meanwhile: get, not test then index
        shown[key] = cell if cell is not None else _updates_cell(db, r, got)
        round_rows.append(
            [
                _esc(r.number),
                _esc(r.strategy),
                _esc(r.kind),
                _state(r.state),
                f'<progress max="{total}" value="{got}"></progress> '
                f"{got} of {len(r.nodes)} (needs {r.min_results})",
                _esc(r.deadline.strftime("%Y-%m-%d %H:%M:%S UTC")),
                _esc(_ago(r.updated_at, now)),
                _esc(r.reason or ""),
                shown[key],
            ]
        )
    if readings is not None:
        readings.clear()
        readings.update(shown)
    publication_rows = []
    for p in publications:
        record = p.signed.get("record", {}) if isinstance(p.signed, dict) else {}
        canary = record.get("nodes") or []
        publication_rows.append(
            [
                _esc(p.seq),
                f'<span class="muted">{_esc(p.id)}</span>',
                _esc(f"{record.get('model_id', '')} {record.get('model_version', '')}"),
                _esc(p.cohort),
                _esc(f"canary: {', '.join(canary)}" if canary else "whole cohort"),
                "rollback" if record.get("rollback") else "",
                _esc(_ago(p.created_at, now)),
                _esc(record.get("expires_at", "")),
            ]
        )
    active = sum(1 for n in nodes if n.state == "active")
    body = (
        "<h1>fedclinic hub</h1>"
        f'<p class="muted">{active} active nodes of {len(nodes)}; {len(rounds)} recent rounds; '
        f"{len(publications)} publications. Updated {now.strftime('%Y-%m-%d %H:%M:%S UTC')}, "
        f"reloads every {REFRESH_SECONDS} s.</p>"
        "<h2>Nodes</h2>"
        + _table(
            "nodes",
            [
                "name",
                "id",
                "cohort",
                "state",
                "last heartbeat",
                "edge",
                "model",
                "publication",
                "health",
                "input envelope",
            ],
            node_rows,
            "No nodes yet: fedclinic-hub nodes enroll NAME",
        )
        + "<h2>Rounds</h2>"
        + _table(
            "rounds",
            [
                "round",
                "strategy",
                "kind",
                "state",
                "progress",
                "deadline",
                "last change",
                "reason",
                "updates",
            ],
            round_rows,
            "No rounds yet: fedclinic-hub rounds start",
        )
        + "<h2>Published models</h2>"
        + _table(
            "publications",
            ["seq", "id", "model", "cohort", "to", "", "published", "expires"],
            publication_rows,
            "Nothing published yet: fedclinic-hub models publish BUNDLE",
        )
    )
    return _page("fedclinic hub", body, refresh=True)


def _login_page(message: str = "") -> str:
    note = f'<p class="state-failed" id="login-error">{_esc(message)}</p>' if message else ""
    body = (
        "<h1>fedclinic hub</h1><p>Sign in with the admin token (the file admin.token in the hub's data "
        "directory).</p>"
        f"{note}"
        '<form method="post" action="/dashboard/login">'
        '<label>admin token <input type="password" name="token" id="token" autocomplete="off" required>'
        '</label> <button type="submit" id="sign-in">sign in</button></form>'
    )
    return _page("fedclinic hub: sign in", body, refresh=False)


def dashboard_router(db: Database, is_admin_token: Callable[[str], bool]) -> APIRouter:
    """Routes ``GET /dashboard`` and ``POST /dashboard/login`` (not part of the /v1 API's OpenAPI)."""
    router = APIRouter(include_in_schema=False)
    readings: Readings = {}

    def _presented(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.cookies.get(COOKIE)

    @router.get("/dashboard", response_class=HTMLResponse)
    def dashboard(request: Request) -> Response:
        token = _presented(request)
        if token is None or not is_admin_token(token):
            return HTMLResponse(_login_page(), status_code=401, headers={"Cache-Control": "no-store"})
        return HTMLResponse(render_dashboard(db, readings=readings), headers={"Cache-Control": "no-store"})

    @router.post("/dashboard/login")
    def login(token: Annotated[str, Form(max_length=512)]) -> Response:
        if not is_admin_token(token.strip()):
            return HTMLResponse(_login_page("That is not the admin token."), status_code=401)
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(COOKIE, token.strip(), httponly=True, secure=True, samesite="strict")
        return response

    return router
