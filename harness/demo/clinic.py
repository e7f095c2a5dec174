"""A whole clinic on one machine: a real Orthanc PACS and a real `fedclinic-edge serve` process, both ways.

Orthanc pushes studies to the node (``POST /modalities/edge/store``); the node analyses them and sends its SR
(and SC) back to Orthanc, where the tests read them through the REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.demo.orthanc import Modality, Orthanc, OrthancError, free_port

__all__ = ["EDGE_BIN", "BundleFiles", "Clinic", "EdgeNode", "find_bundle", "table_rows"]

EDGE_BIN = Path(sys.executable).parent / "fedclinic-edge"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BundleFiles:
    bundle: Path  # bundle directory: manifest.json, manifest.sig, model.onnx (+ variants)
    public_key: Path  # hub.pub that signed it


def find_bundle() -> BundleFiles | None:
    """$FEDCLINIC_TEST_BUNDLE, else build/dev-bundle: a folder with bundle/ and hub.pub (a real student)."""
    env = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    root = Path(env) if env else REPO_ROOT / "build" / "dev-bundle"
    if (root / "bundle" / "manifest.json").is_file() and (root / "hub.pub").is_file():
        return BundleFiles(root / "bundle", root / "hub.pub")
    return None


def _toml(values: dict[str, Any]) -> str:
    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    for key, value in values.items():
        if isinstance(value, dict):
            continue  # a [section], written after the top-level keys as TOML requires
        if isinstance(value, list):
            items = [
                "{" + ", ".join(f"{k} = {scalar(x)}" for k, x in v.items()) + "}"
                if isinstance(v, dict)
                else scalar(v)
                for v in value
            ]
            lines.append(f"{key} = [{', '.join(items)}]")
        else:
            lines.append(f"{key} = {scalar(value)}")
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines.extend(_toml(table).splitlines())
    return "\n".join(lines) + "\n"


@dataclass
class EdgeNode:
    """A ``fedclinic-edge serve`` subprocess with its own data dir and TOML config."""

    root: Path
    settings: dict[str, Any]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "edge.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "edge.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(_toml(self.settings))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")}
        self.env.update({"OMP_NUM_THREADS": "1", "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1"})

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EDGE_BIN), *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env={**self.env, "COLUMNS": "250"},  # rich would wrap and cut the status table at 80
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(EDGE_BIN), "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self, limit: int = 20) -> dict[str, Any]:
        """``fedclinic-edge status --format json``: the operator's view (the node's database is its own)."""
        done = self.cli("status", "--limit", str(limit), "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"fedclinic-edge status failed:\n{done.stdout}\n{done.stderr}")
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    def updates(self) -> dict[str, Any]:
        """``fedclinic-edge updates --format json``: each update that left the clinic, with its bytes."""
        done = self.cli("updates", "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"fedclinic-edge updates failed:\n{done.stdout}\n{done.stderr}")
        report: dict[str, Any] = json.loads(done.stdout)
        return report


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table in ``text`` as lists of cell texts (header and rules left out)."""
    rows: list[list[str]] = []
    header_seen = False
    for line in text.splitlines():
        if "━" in line or "─" in line:  # the rule under the header, or a box edge
            header_seen = header_seen or "━" in line
            continue
        if header_seen and "│" in line:
            rows.append([cell.strip() for cell in line.strip().strip("│").split("│")])
    return rows


@dataclass
class Clinic:
    """Orthanc + an edge node wired both ways; ``start()`` returns when Orthanc can C-ECHO the node."""

    workdir: Path
    #: A signed bundle installed before the node starts (a stand-alone clinic), or None.
    bundle: BundleFiles | None = None
    secondary_capture: bool = True
    ae_title: str = "EDGE"
    #: A join code from ``fedclinic-hub nodes enroll``: the node enrolls before it starts and pulls its model.
    join_code: str | None = None
    #: Seconds of quiet after a study's last instance before the node analyses it.
    quiet_seconds: float = 5.0
    #: More edge settings: top-level keys, or TOML sections as dicts (``{"learning": {...}}``).
    extra_settings: dict[str, Any] = field(default_factory=dict)
    orthanc: Orthanc = field(init=False)
    edge: EdgeNode = field(init=False)
    page_port: int = field(init=False, default=0)

    @property
    def page_url(self) -> str:
        """The node's clinician page (loopback only: no password is set)."""
        return f"http://127.0.0.1:{self.page_port}"

    def start(self, timeout: float = 60.0) -> Clinic:
        self.workdir = self.workdir.resolve()
        self.orthanc = Orthanc(workdir=self.workdir / "orthanc").start()
        port = free_port()
        self.page_port = free_port()
        settings: dict[str, Any] = {
            "ae_title": self.ae_title,
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(self.workdir / "edge" / "data"),
            "providers": ["CPUExecutionProvider"],
            "intra_op_threads": 1,
            "send_secondary_capture": self.secondary_capture,
            "destinations": [
                {"ae_title": self.orthanc.aet, "host": "127.0.0.1", "port": self.orthanc.dicom_port}
            ],
            "quiet_seconds": self.quiet_seconds,
            "send_retry_base_seconds": 1.0,
            "log_level": "INFO",
            "page_port": self.page_port,
            # A demo clinic receives a few dozen single images: a small reserve, not 512 MiB per clinic.
            "spool_reserve_bytes": 16 * 1024 * 1024,
        }
        settings.update(self.extra_settings)
        if self.bundle is not None:
            settings["trusted_keys"] = str(self.bundle.public_key)
        self.edge = EdgeNode(root=self.workdir / "edge", port=port, settings=settings)
        self.edge.write_config()
        steps = [("install-bundle", str(self.bundle.bundle))] if self.bundle is not None else []
        if self.join_code is not None:
            steps.append(("enroll", self.join_code))
        for step in steps:
            done = self.edge.cli(*step)
            if done.returncode != 0:
                self.orthanc.stop()
                raise RuntimeError(f"fedclinic-edge {step[0]} failed:\n{done.stdout}\n{done.stderr}")
        self.orthanc.put_modality("edge", Modality(self.ae_title, "127.0.0.1", port))
        self.edge.start()
        deadline = time.monotonic() + timeout
        while not self.orthanc.echo("edge"):
            if not self.edge.alive() or time.monotonic() > deadline:
                log = self.edge.log_text()[-4000:]
                self.stop()
                raise RuntimeError(f"the edge node did not come up:\n{log}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if hasattr(self, "edge"):
            self.edge.stop()
        if hasattr(self, "orthanc"):
            self.orthanc.stop()

    def __enter__(self) -> Clinic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def upload_study(self, files: list[Path]) -> str:
        """Upload files of one study to Orthanc over REST; returns Orthanc's study ID."""
        study_ids = {str(self.orthanc.upload(p)["ParentStudy"]) for p in files}
        if len(study_ids) != 1:
            raise ValueError(f"files span {len(study_ids)} studies")
        return study_ids.pop()

    def push(self, study_id: str) -> dict[str, Any]:
        """Orthanc C-STOREs the whole study to the edge node (returns when the transfer is done)."""
        return self.orthanc.store_to_modality("edge", [study_id], synchronous=True)

    def series_by_modality(self, study_id: str) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for series in self.orthanc.study_series(study_id):
            out.setdefault(str(series["MainDicomTags"].get("Modality", "")), []).append(series)
        return out

    def wait_results(
        self, study_id: str, modalities: tuple[str, ...] = ("SR",), timeout: float = 60.0
    ) -> dict[str, list[dict[str, Any]]]:
        """Poll Orthanc until the study has a series of each result modality; OrthancError on timeout."""

        def ready() -> dict[str, list[dict[str, Any]]] | None:
            found = self.series_by_modality(study_id)
            return found if all(m in found for m in modalities) else None

        try:
            return self.orthanc.wait_for(ready, timeout=timeout, interval=0.05)
        except OrthancError:
            raise OrthancError(
                f"no {'/'.join(modalities)} result in Orthanc after {timeout:.0f} s; edge log:\n"
                + self.edge.log_text()[-4000:]
            ) from None

    def wait_skipped(self, timeout: float = 60.0) -> str:
        """Wait until the node's status lists a skipped study; returns that row (the reason is PHI-free)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for study in self.edge.status()["studies"]:
                if study["state"] == "skipped":
                    return f"{study['study']} · skipped · {study['reason']}"
            time.sleep(0.5)
        raise OrthancError(
            f"no skipped study in the node's status within {timeout:.0f} s; edge log:\n"
            + self.edge.log_text()[-4000:]
        )
