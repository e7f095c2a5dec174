"""The clinician page's HTTP server: stdlib ThreadingHTTPServer, the page, its JSON API and its guards.

Routes: ``GET /`` (the page), ``GET /api/studies``, ``POST /api/labels`` {study_instance_uid, label},
``GET /api/updates`` (what left this clinic), ``GET /thumbnails/<key>.png``.

Guards, and why: the page changes what the node learns from, so a request must come from the clinic's own
people. Bound to loopback without a password, the ``Host`` header must name this machine, so a web site in
the clinician's browser cannot reach the page through DNS rebinding. With a password (required to bind to a
LAN address) every request needs it (HTTP Basic; the node stores only a scrypt hash). A write must be a JSON
POST (a cross-site HTML form cannot send that content type without a CORS preflight, which the page never
grants) whose ``Origin`` and ``Sec-Fetch-Site``, when the browser sends them, say same origin.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edge_node.errors import ConfigError, EdgeError, LabelError
from edge_node.page.assets import PAGE_CSS, PAGE_HTML, PAGE_JS
from edge_node.page.bind_address import is_loopback
from edge_node.page.password import verify_password
from edge_node.page.study_board import recent_board, study_uid_of
from edge_node.page.thumbnail import study_thumbnail
from edge_node.protection.floor import PrivacyFloor
from edge_node.settings import LAN_NEEDS_PASSWORD, EdgeSettings
from edge_node.state.database import Database
from edge_node.state.labels import LabelStore

__all__ = ["ClinicianPage", "PageConfig"]

logger = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class PageConfig:
    """Where the page listens, its password hash, and where it reads results and what left the clinic."""

    host: str
    port: int
    password_hash: str | None
    data_dir: Path
    results_dir: Path
    privacy: PrivacyFloor

    def __post_init__(self) -> None:
        # The settings refuse this already; checked again for a page built without them (tests, tools).
        if not is_loopback(self.host) and not self.password_hash:
            raise ConfigError(LAN_NEEDS_PASSWORD.format(host=self.host))

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> PageConfig:
        return cls(
            host=settings.page_host,
            port=settings.page_port,
            password_hash=settings.page_password_hash,
            data_dir=settings.data_dir,
            results_dir=settings.results_dir,
            privacy=settings.privacy,
        )


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ClinicianPage:
    """The page over one node's database; ``start`` serves it on a thread until ``stop``."""

    def __init__(
        self, config: PageConfig, db: Database, *, hub_url: Callable[[], str | None] | None = None
    ) -> None:
        self.config = config
        self.db = db
        self.labels = LabelStore(db)
        self._hub_url = hub_url or (lambda: _enrolled_hub(config.data_dir))
        self._verified: set[str] = set()
        self._verified_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the page is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Bind and serve on a daemon thread; OSError when the address cannot be bound."""
        page = self

        class Handler(_Handler):
            owner = page

        self._server = ThreadingHTTPServer((self.config.host, self.config.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="edge-page", daemon=True)
        self._thread.start()
        host, port = self.address
        logger.info(
            "clinician page on http://%s:%d/ (%s)",
            host,
            port,
            "password required" if self.config.password_hash else "this machine only",
        )
        return host, port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the routes' work, free of HTTP --

    def studies(self, limit: int) -> dict[str, Any]:
        try:
            classes = list(self.labels.classes)
        except LabelError:
            classes = []
        return {"classes": classes, "studies": [s.to_json() for s in recent_board(self.db, limit)]}

    def set_label(self, body: dict[str, Any], who: str) -> dict[str, Any]:
        study_uid, label = body.get("study_instance_uid"), body.get("label")
        if not isinstance(study_uid, str) or not isinstance(label, str):
            raise _Refused(HTTPStatus.BAD_REQUEST, 'send {"study_instance_uid": "...", "label": "..."}')
        if not self.db.query("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)):
            raise _Refused(HTTPStatus.NOT_FOUND, "this node has received no study with that UID")
        try:
            changed = self.labels.label_study(study_uid, label, source="page", who=who)
        except LabelError as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
        logger.info(
            "label set on the page for study %s (%s)",
            self.db.uid_hash(study_uid),
            "changed" if changed else "unchanged",
        )
        return {"ok": True, "changed": changed, "label": label, "labeled_by": f"{who} (page)"}

    def updates(self) -> dict[str, Any]:
        from edge_node.uplink.update_log import UpdateLog

        hub = self._hub_url()
        return {"hub_url": hub, **UpdateLog.read(self.config.data_dir, self.config.privacy, hub).to_json()}

    def thumbnail(self, key: int) -> bytes | None:
        if study_uid_of(self.db, key) is None:
            return None
        return study_thumbnail(self.db, self.config.results_dir, key)

    def check_password(self, authorization: str | None) -> str:
        """The user name of a request that carries the page's password (Basic); raises _Refused otherwise."""
        stored = self.config.password_hash
        if stored is None:
            return "clinician"
        challenge = {"WWW-Authenticate": 'Basic realm="fedclinic clinic page", charset="UTF-8"'}
        if not authorization or not authorization.startswith("Basic "):
            raise _Refused(HTTPStatus.UNAUTHORIZED, "this page needs the clinic's password", challenge)
        try:
            user, _, password = (
                base64.b64decode(authorization[6:], validate=True).decode("utf-8").partition(":")
            )
        except (ValueError, UnicodeDecodeError):
            raise _Refused(HTTPStatus.UNAUTHORIZED, "malformed credentials", challenge) from None
        token = hashlib.sha256(f"{stored}\0{authorization}".encode()).hexdigest()
        with self._verified_lock:
            known = token in self._verified
        if not known:
            if not verify_password(password, stored):
                logger.warning("clinician page: a wrong password was given")
                raise _Refused(HTTPStatus.UNAUTHORIZED, "wrong password", challenge)
            with self._verified_lock:
                if len(self._verified) > 64:
                    self._verified.clear()
                self._verified.add(token)
        return user or "clinician"


def _enrolled_hub(data_dir: Path) -> str | None:
    from edge_node.uplink.credential import NodeCredential, uplink_dir

    try:
        credential = NodeCredential.load(uplink_dir(data_dir))
    except EdgeError:
        return None
    return credential.hub_url if credential is not None else None


class _Handler(BaseHTTPRequestHandler):
    owner: ClinicianPage
    server_version = "fedclinic-edge-page"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # Paths carry no UID (thumbnails are named by row id); bodies are never logged.
        logger.debug("page %s: " + format, self.client_address[0], *args)

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc, default=str).encode("utf-8"), "application/json", headers)

    def _guard(self) -> str:
        """Host and password checks shared by every route; returns the user name."""
        owner = self.owner
        if owner.config.password_hash is None:
            host = urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
            if not is_loopback(host):
                raise _Refused(HTTPStatus.FORBIDDEN, "this page answers only on this machine's own address")
        return owner.check_password(self.headers.get("Authorization"))

    def _handle(self, route: Callable[[str], None]) -> None:
        try:
            user = self._guard()
            route(user)
        except _Refused as exc:
            self._json(exc.status, {"error": str(exc)}, exc.headers)
        except Exception:
            logger.exception("clinician page: %s failed", urlsplit(self.path).path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the node log"})

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _get(self, user: str) -> None:
        url = urlsplit(self.path)
        owner = self.owner
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE_HTML.encode(), "text/html; charset=utf-8")
        elif url.path == "/page.js":
            self._send(HTTPStatus.OK, PAGE_JS.encode(), "text/javascript; charset=utf-8")
        elif url.path == "/page.css":
            self._send(HTTPStatus.OK, PAGE_CSS.encode(), "text/css; charset=utf-8")
        elif url.path == "/api/studies":
            raw = parse_qs(url.query).get("limit", ["50"])[0]
            limit = int(raw) if raw.isdigit() else 50
            self._json(HTTPStatus.OK, owner.studies(max(1, min(limit, 5000))))
        elif url.path == "/api/updates":
            self._json(HTTPStatus.OK, owner.updates())
        elif url.path.startswith("/thumbnails/") and url.path.endswith(".png"):
            key = url.path[len("/thumbnails/") : -len(".png")]
            png = owner.thumbnail(int(key)) if key.isdigit() else None
            if png is None:
                raise _Refused(HTTPStatus.NOT_FOUND, "no picture of that study")
            self._send(HTTPStatus.OK, png, "image/png")
        else:
            raise _Refused(HTTPStatus.NOT_FOUND, "no such page")

    def _post(self, user: str) -> None:
        if urlsplit(self.path).path != "/api/labels":
            raise _Refused(HTTPStatus.NOT_FOUND, "no such page")
        origin, site = self.headers.get("Origin"), self.headers.get("Sec-Fetch-Site")
        if origin is not None and origin != f"http://{self.headers.get('Host')}":
            raise _Refused(HTTPStatus.FORBIDDEN, "a label can only be set from the page itself")
        if site is not None and site not in ("same-origin", "none"):
            raise _Refused(HTTPStatus.FORBIDDEN, "a label can only be set from the page itself")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the label as application/json")
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if not 0 < length <= _MAX_BODY:
            raise _Refused(HTTPStatus.BAD_REQUEST, f"send a JSON body of at most {_MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            raise _Refused(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise _Refused(HTTPStatus.BAD_REQUEST, "send a JSON object")
        who = f"{user}@{self.client_address[0]}"
        self._json(HTTPStatus.OK, self.owner.set_label(body, who))
