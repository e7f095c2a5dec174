"""The edge as an unattended service: its config file, one node per data dir, readiness, status, JSON."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from typer.testing import CliRunner

from edge_node.cli import app
from edge_node.errors import ConfigError
from edge_node.node_lock import NodeLock, running_node
from edge_node.service_notify import notify_service
from edge_node.settings import CONFIG_ENV, PROVIDER_PREFERENCE, load_settings
from edge_node.state.status_queries import StudySummary
from edge_node.status_report import StatusReport
from tests.edge_node.conftest import (
    EDGE_BIN,
    EdgeProcess,
    TrustedBundle,
    dicom_dir,
    make_ct_instances,
    make_signed_bundle,
    storescu,
    write_config,
)

runner = CliRunner()
DX = dicom_dir() / "highdicom" / "dx_image.dcm"


@pytest.fixture(autouse=True)
def _no_edge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FEDCLINIC_EDGE_"):
            monkeypatch.delenv(name)


def test_paths_in_the_config_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "keys").mkdir()
    (etc / "keys" / "hub.pub").write_bytes(signing_key[1].read_bytes())
    config = etc / "edge.toml"
    write_config(config, data_dir="var/data", trusted_keys="keys/hub.pub", providers=["CPUExecutionProvider"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a service starts in /, not next to its config
    settings = load_settings(config)
    assert settings.data_dir == etc / "var" / "data"
    assert settings.trusted_keys == etc / "keys" / "hub.pub"
    assert settings.trt_cache_dir == etc / "var" / "data" / "trt-cache"
    # The same file through FEDCLINIC_EDGE_CONFIG (no --config), from yet another directory.
    monkeypatch.setenv(CONFIG_ENV, str(config))
    bundle = make_signed_bundle(tmp_path / "b", signing_key[0])
    installed = runner.invoke(app, ["install-bundle", str(bundle)])
    assert installed.exit_code == 0, installed.output
    assert (etc / "var" / "data" / "models" / "test-student" / "1.0.0" / "model.onnx").is_file()
    assert not (elsewhere / "var").exists()
    # A variable that names a missing file is an error, not a silent fall back to defaults.
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and CONFIG_ENV in " ".join(result.output.split())


def test_the_lock_is_held_once_and_dropped_with_its_holder(tmp_path: Path) -> None:
    first = NodeLock(tmp_path)
    first.acquire()
    assert running_node(tmp_path) == running_node(tmp_path) and running_node(tmp_path) is not None
    assert running_node(tmp_path).pid == os.getpid()  # type: ignore[union-attr]
    second = NodeLock(tmp_path)
    with pytest.raises(ConfigError, match=rf"\(process {os.getpid()}\) already runs on data_dir {tmp_path}"):
        second.acquire()
    first.release()
    assert running_node(tmp_path) is None
    second.acquire()
    second.release()


def test_a_second_serve_on_the_same_data_dir_refuses_and_nothing_runs_twice(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    edge = edge_factory(trusted_keys=str(test_bundle.public_key), quiet_seconds=1.0)
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    edge.start()
    files = make_ct_instances(tmp_path / "dx", 2, source=DX)
    assert storescu(edge.port, files).returncode == 0
    # The same config, another port: refused at once, before recovery or a worker could touch the study.
    env = {**edge.env, "FEDCLINIC_EDGE_PORT": "0"}
    t0 = time.monotonic()
    second = subprocess.run(
        [str(EDGE_BIN), "serve", "--config", str(edge.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    said = " ".join(second.stderr.split())
    assert second.returncode == 1 and "already runs on data_dir" in said and str(edge.proc.pid) in said  # type: ignore[union-attr]
    assert time.monotonic() - t0 < 30
    edge.wait_idle(60)
    assert edge.query("SELECT COUNT(*) FROM runs")[0][0] == 1
    status = json.loads(edge.cli("status", "--format", "json").stdout)
    assert status["node"] == {"running": True, "pid": edge.proc.pid, "data_dir": str(edge.data_dir)}  # type: ignore[union-attr]
    assert status["totals"]["studies"]["done"] == 1 and status["totals"]["instances"] == 2
    assert edge.stop() == 0
    stopped = json.loads(edge.cli("status", "--format", "json").stdout)
    assert stopped["node"]["running"] is False and stopped["node"]["pid"] is None


def test_ready_is_signalled_to_systemd_and_echo_waits_for_the_node(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    edge = edge_factory(trusted_keys=str(test_bundle.public_key))
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(address)
        systemd.settimeout(60)
        log = (tmp_path / "serve.log").open("wb")
        proc = subprocess.Popen(
            [str(EDGE_BIN), "serve", "--config", str(edge.config)],
            stdout=log,
            stderr=log,
            env={**edge.env, "NOTIFY_SOCKET": address},
        )
        try:
            waited = edge.cli("echo", "--wait", "60", "--format", "json")
            assert waited.returncode == 0, waited.stdout + waited.stderr
            assert json.loads(waited.stdout)["ok"] is True
            assert systemd.recv(256) == b"READY=1"
            proc.terminate()
            assert proc.wait(60) == 0
            assert systemd.recv(256) == b"STOPPING=1"
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    down = edge.cli("echo", "--wait", "1", "--timeout", "1", "--format", "json")
    assert down.returncode == 1 and "connection refused" in json.loads(down.stdout)["detail"]


def test_notify_without_systemd_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify_service("READY=1") is False


def test_a_port_in_use_fails_before_the_model_loads(
    tmp_path: Path, test_bundle: TrustedBundle, edge_factory: Callable[..., EdgeProcess]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        edge = edge_factory(trusted_keys=str(test_bundle.public_key), port=taken.getsockname()[1])
        assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
        proc = subprocess.run(
            [str(EDGE_BIN), "serve", "--config", str(edge.config)],
            capture_output=True,
            text=True,
            env=edge.env,
            timeout=120,
        )
    assert proc.returncode == 1 and "cannot listen on 127.0.0.1" in " ".join(proc.stderr.split())
    assert "warmed up" not in proc.stderr and "serving model" not in proc.stderr
    assert running_node(edge.data_dir) is None  # the lock went with the process


def test_models_and_rollback_twice_as_json(
    tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    config = tmp_path / "edge.toml"
    write_config(
        config,
        data_dir=str(tmp_path / "data"),
        trusted_keys=str(signing_key[1]),
        providers=["CPUExecutionProvider"],
    )
    for i, version in enumerate(("1.0.0", "1.1.0", "1.2.0")):
        bundle = make_signed_bundle(tmp_path / version, signing_key[0], version=version, seed=i)
        assert runner.invoke(app, ["install-bundle", str(bundle), "--config", str(config)]).exit_code == 0

    def models() -> dict[str, object]:
        result = runner.invoke(app, ["models", "--config", str(config), "--format", "json"])
        assert result.exit_code == 0, result.output
        doc: dict[str, object] = json.loads(result.output)
        return doc

    doc = models()
    assert doc["active"] == {"model_id": "test-student", "version": "1.2.0"}
    assert doc["rollback_to"] == {"model_id": "test-student", "version": "1.1.0"}
    installed = doc["installed"]
    assert isinstance(installed, list) and [m["version"] for m in installed] == ["1.0.0", "1.1.0", "1.2.0"]
    assert [m["active"] for m in installed] == [False, False, True]
    first = runner.invoke(app, ["rollback", "--config", str(config)])
    assert first.exit_code == 0 and "1.1.0" in first.output
    second = runner.invoke(app, ["rollback", "--config", str(config)])
    assert second.exit_code == 0 and "1.0.0" in second.output  # further back, not undoing the first
    third = runner.invoke(app, ["rollback", "--config", str(config)])
    assert third.exit_code == 1 and "no previous model" in third.output
    assert models()["active"] == {"model_id": "test-student", "version": "1.0.0"}


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("fedclinic-edge ")


def test_status_text_on_a_narrow_pipe_keeps_every_word() -> None:
    reason = "modality CT not accepted by model pneumonia-student (accepts CR, DX) (12 instances)"
    skipped = StudySummary(
        "1.2.3", "skipped", "none", 12, 0.0, 1, "pneumonia-student 1.0.0", None, None, reason
    )
    counts = {"received": 0, "queued": 0, "processing": 0, "done": 2, "skipped": 1, "failed": 0}
    counts |= {"instances": 14, "outbox_pending": 1, "outbox_sent": 3}
    report = StatusReport(False, None, "/var/lib/edge", None, None, counts, None, [("abc123", skipped)], 20)
    out = io.StringIO()
    report.print_text(Console(file=out, width=50, force_terminal=False))
    text = " ".join(out.getvalue().split())
    assert reason in text
    assert "3 studies (2 done, 1 skipped), 14 instances, 1 result file to send, 3 result files sent" in text
    assert "node: not running on /var/lib/edge" in text


def test_default_providers_are_what_the_installed_runtime_offers(tmp_path: Path) -> None:
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    settings = load_settings(data_dir=tmp_path / "data")
    assert settings.providers == [p for p in PROVIDER_PREFERENCE if p in offered]
    assert settings.providers[-1] == "CPUExecutionProvider"
    # So a session on this runtime gets the first provider asked for: no "fell back" / "not first choice".
    assert settings.providers[0] in offered
