"""A real Orthanc PACS on loopback: private config, free ports, TCP_NODELAY, and a REST helper."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

__all__ = ["ORTHANC_BINARY", "Modality", "Orthanc", "OrthancError", "free_port", "orthanc_available"]

ORTHANC_BINARY = os.environ.get("FEDCLINIC_ORTHANC", "/usr/sbin/Orthanc")

T = TypeVar("T")


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed; the message carries the tail of its log."""


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).is_file() or shutil.which(ORTHANC_BINARY) is not None


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc knows by name (the target of ``/modalities/{name}/store``)."""

    ae_title: str
    host: str
    port: int


@dataclass
class Orthanc:
    """One Orthanc process; ``start()`` blocks until ``GET /system`` answers, ``stop()`` ends it."""

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, Modality] = field(default_factory=dict)
    http_port: int = 0
    dicom_port: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise OrthancError("Orthanc is not running; call start() first")
        return self._client

    def config(self) -> dict[str, Any]:
        return {
            "Name": "FedclinicTestOrthanc",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            # Orthanc 1.10's web server drops an idle kept-alive connection within a second, and a client that
            # reuses it just then gets "server disconnected": one connection per request is reliable.
            "KeepAlive": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {
                name: {"AET": m.ae_title, "Host": m.host, "Port": m.port}
                for name, m in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            # The node answers each C-STORE only once the instance is fsynced; on a machine shared by many
            # busy processes (the demo under `nice`, CI) that has taken over 15 s.
            "DicomScuTimeout": 60,
            "StableAge": 2,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "StorageCompression": False,
            "LogExportedResources": False,
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start Orthanc and wait for its REST API. Ports left at 0 are picked free; if another process took
        one between the pick and Orthanc's bind ("already in use"), new ones are picked, up to three times."""
        chosen = not self.http_port and not self.dicom_port
        for attempt in range(3):
            try:
                return self._start(timeout)
            except OrthancError as exc:
                if not (chosen and "already in use" in str(exc)) or attempt == 2:
                    raise
                self.http_port = self.dicom_port = 0
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> Orthanc:
        if not orthanc_available():
            raise OrthancError(f"Orthanc not found at {ORTHANC_BINARY} (apt-get install orthanc)")
        # Orthanc runs with the work dir as cwd and resolves its config against it: keep paths absolute.
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [ORTHANC_BINARY, str(cfg)], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._client = httpx.Client(base_url=self.url, timeout=30.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self._proc.returncode} at start:\n{self.log_tail()}"
                )
            try:
                if self._client.get("/system").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer GET /system within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -- REST helpers ----------------------------------------------------------------------------------------

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise OrthancError(
                f"{response.request.method} {response.request.url.path} -> {response.status_code}: "
                f"{response.text[:500]}"
            )
        return response

    def get_json(self, path: str, **params: Any) -> Any:
        return self._check(self.client.get(path, params=params or None)).json()

    def system(self) -> dict[str, Any]:
        return dict(self.get_json("/system"))

    def studies(self) -> list[str]:
        return list(self.get_json("/studies"))

    def study(self, study_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/studies/{study_id}"))

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get_json(f"/studies/{study_id}/instances"))

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """The series of a study with their MainDicomTags (Modality, SeriesInstanceUID) and Instances."""
        return list(self.get_json(f"/studies/{study_id}/series"))

    def echo(self, modality: str) -> bool:
        """C-ECHO from Orthanc to a named modality."""
        return self.client.post(f"/modalities/{modality}/echo", json={}).status_code == 200

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        return self._check(self.client.get(f"/instances/{instance_id}/file")).content

    def upload(self, data: bytes | Path) -> dict[str, Any]:
        """POST one DICOM file to /instances; returns Orthanc's answer (ID, ParentStudy, Status, ...)."""
        body = data.read_bytes() if isinstance(data, Path) else data
        return dict(self._check(self.client.post("/instances", content=body)).json())

    def lookup_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc ID of the study with this StudyInstanceUID, or None."""
        hits = self._check(self.client.post("/tools/lookup", content=study_instance_uid)).json()
        for hit in hits:
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def put_modality(self, name: str, modality: Modality) -> None:
        """Declare (or replace) a DICOM peer at run time."""
        self.modalities[name] = modality
        body = {"AET": modality.ae_title, "Host": modality.host, "Port": modality.port}
        self._check(self.client.put(f"/modalities/{name}", json=body))

    def store_to_modality(
        self, name: str, resources: Iterable[str], synchronous: bool = True, timeout: float = 60.0
    ) -> dict[str, Any]:
        """C-STORE the given Orthanc resources (studies, series, instances) to a named modality."""
        body = {"Resources": list(resources), "Synchronous": synchronous}
        response = self.client.post(f"/modalities/{name}/store", json=body, timeout=timeout)
        return dict(self._check(response).json())

    def changes(self, since: int = 0, limit: int = 100) -> dict[str, Any]:
        return dict(self.get_json("/changes", since=since, limit=limit))

    def last_change(self) -> int:
        return int(self.get_json("/changes", last="")["Last"])

    def wait_for(self, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05) -> T:
        """Poll ``probe`` until it returns something other than None/False; OrthancError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value is not None and value is not False:
                return value
            if time.monotonic() > deadline:
                raise OrthancError(f"condition not met within {timeout:.0f} s")
            time.sleep(interval)
