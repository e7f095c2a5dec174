"""``fedclinic-edge config-check``: is this node set up to run? Keys, data directory, PACS, inference runtime.

Each check returns plain data (what was checked, whether it passed, what to do); the CLI draws the tables and
turns any failure into a non-zero exit. Nothing here changes the node's state beyond a probe file that is
removed again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from edge_node.delivery.destination import Destination
from edge_node.errors import ConfigError, ModelError
from edge_node.protocol.errors import BundleError
from edge_node.protocol.signing import fingerprint, load_public_keys
from edge_node.settings import EdgeSettings

__all__ = [
    "Check",
    "EchoResult",
    "RuntimeReport",
    "c_echo",
    "check_data_dir",
    "check_destinations",
    "check_runtime",
    "check_trusted_keys",
]


@dataclass(frozen=True)
class Check:
    """One line of the report: ``ok`` False is a failure; ``note`` True passes but deserves a look."""

    name: str
    ok: bool
    detail: str
    note: bool = False


@dataclass(frozen=True)
class EchoResult:
    ae_title: str
    host: str
    port: int
    ok: bool
    detail: str
    milliseconds: float

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_trusted_keys(settings: EdgeSettings) -> Check:
    """The hub's public key(s) exist and parse: without them no model bundle can be installed."""
    name = "trusted keys"
    if settings.trusted_keys is None:
        return Check(
            name,
            False,
            "not set: set trusted_keys (or FEDCLINIC_EDGE_TRUSTED_KEYS) to the hub's hub.pub",
        )
    try:
        keys = load_public_keys(settings.trusted_keys)
    except (BundleError, OSError) as exc:
        return Check(name, False, f"{settings.trusted_keys}: {exc}")
    prints = ", ".join(fingerprint(k) for k in keys)
    return Check(name, True, f"{settings.trusted_keys}: {len(keys)} key(s) ({prints})")


def check_data_dir(settings: EdgeSettings) -> Check:
    """The data directory exists (or can be made) and takes a file that is synced to disk."""
    name = "data directory"
    root = settings.data_dir
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".config-check-")
        try:
            os.write(fd, b"fedclinic")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or str(exc)
        return Check(
            name,
            False,
            f"{root} is not writable ({why}); set data_dir (FEDCLINIC_EDGE_DATA_DIR) to a writable directory",
        )
    free = shutil.disk_usage(root).free
    low = free < settings.min_free_bytes
    detail = f"{root} is writable; {free / 2**30:.1f} GiB free"
    if low:
        detail += " (below min_free_bytes: the listener refuses studies until space is freed)"
    return Check(name, not low, detail)


def c_echo(dest: Destination, calling_ae: str, *, timeout: float = 10.0) -> EchoResult:
    """Associate with ``dest`` and send a C-ECHO; never raises for a network problem.

    A failure's detail is the real reason: connection refused, timed out, called or calling AE title not
    recognised by the peer, or the status the peer answered.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from edge_node.delivery.association_failure import why_not_established
    from edge_node.delivery.association_loop import ParkedLoop
    from edge_node.ingest.socket_options import NODELAY_HANDLERS

    client = AE(ae_title=calling_ae)
    client.add_requested_context(Verification)
    client.acse_timeout = client.dimse_timeout = client.network_timeout = timeout
    client.connection_timeout = timeout
    t0 = time.perf_counter()

    def result(ok: bool, detail: str) -> EchoResult:
        ms = (time.perf_counter() - t0) * 1000
        return EchoResult(dest.ae_title, dest.host, dest.port, ok, detail, ms)

    assoc = client.associate(
        dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=list(NODELAY_HANDLERS)
    )
    if not assoc.is_established:
        return result(False, why_not_established(assoc, dest, calling_ae, timeout))
    held = ParkedLoop(assoc)  # pynetdicom's loop cannot take the answer
    try:
        answer = assoc.send_c_echo()
    finally:
        held.end()
    if not answer or "Status" not in answer:
        return result(False, f"no C-ECHO response within {timeout:.0f} s")
    code = int(answer.Status)
    if code != 0:
        return result(False, f"C-ECHO answered status 0x{code & 0xFFFF:04X}")
    return result(True, "C-ECHO success")


def check_destinations(settings: EdgeSettings, *, timeout: float = 10.0) -> list[EchoResult]:
    """C-ECHO every configured destination, calling as this node's AE title."""
    return [c_echo(d, settings.ae_title, timeout=timeout) for d in settings.destination_values]


@dataclass(frozen=True)
class RuntimeReport:
    """The providers this onnxruntime lists, the ones configured, and what a real session got."""

    available: list[str]
    configured: list[str]
    #: The active model's session: provider really used, the model file and precision, or why none.
    session_provider: str | None = None
    requested_provider: str | None = None
    model: str | None = None
    problem: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.session_provider is not None and self.session_provider != self.requested_provider


def check_runtime(settings: EdgeSettings) -> RuntimeReport:
    """Open a session for the active model exactly as the node would, and compare asked vs got."""
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    configured = list(settings.providers)
    if not settings.db_path.is_file():
        return RuntimeReport(available, configured, problem="no model installed yet (install-bundle PATH)")
    from edge_node.inference.model_slot import ModelSlot
    from edge_node.state.database import Database
    from edge_node.state.model_registry import ModelRegistry

    db = Database(settings.db_path)
    try:
        slot = ModelSlot.from_settings(ModelRegistry(db), settings)
        try:
            model = slot.current()
        except (ModelError, ConfigError) as exc:
            return RuntimeReport(available, configured, problem=f"the active model does not load: {exc}")
    finally:
        db.close()
    if model is None:
        return RuntimeReport(available, configured, problem="no model installed yet (install-bundle PATH)")
    what = f"{model.model_id} {model.model_version} ({model.model_file}, {model.precision})"
    return RuntimeReport(
        available,
        configured,
        session_provider=model.provider,
        requested_provider=model.requested_provider,
        model=what,
    )
