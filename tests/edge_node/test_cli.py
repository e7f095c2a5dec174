"""The fedclinic-edge CLI: settings errors, status, install / refuse / rollback bundles, echo, hot swap."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from typer.testing import CliRunner

from edge_node.cli import app
from edge_node.errors import ConfigError
from edge_node.settings import load_settings
from edge_node.state.database import Database
from edge_node.state.node_state import NodeState
from edge_node.status_report import StatusReport
from tests.edge_node.conftest import (
    EDGE_BIN,
    EdgeProcess,
    Storescp,
    TrustedBundle,
    dicom_dir,
    free_port,
    make_ct_instances,
    make_signed_bundle,
    storescu,
    write_config,
)
from tests.edge_node.state.test_envelope_monitor import record_run

runner = CliRunner()
DX = dicom_dir() / "highdicom" / "dx_image.dcm"


@pytest.fixture(autouse=True)
def _no_edge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FEDCLINIC_EDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config(tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]) -> Path:
    path = tmp_path / "edge.toml"
    write_config(
        path,
        data_dir=str(tmp_path / "data"),
        trusted_keys=str(signing_key[1]),
        providers=["CPUExecutionProvider"],
    )
    return path


COMMANDS = ("serve", "status", "install-bundle", "rollback", "models", "echo", "config-check", "states")


def test_help_lists_the_commands_and_the_first_steps() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    text = " ".join(result.output.split())
    assert "FEDCLINIC_EDGE_* environment variables" in text
    assert "fedclinic-edge config-check --config /etc/fedclinic/edge.toml" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert f"Usage: fedclinic-edge {command}" in text
    if command != "states":  # states takes no arguments: nothing to show by example
        assert f"Example: fedclinic-edge {command}" in text


def test_states_prints_the_transition_table() -> None:
    result = runner.invoke(app, ["states"])
    assert result.exit_code == 0
    assert "processing --done" in result.output and "--recover" in result.output


def test_missing_setting_names_the_key_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    write_config(bad, port=70000)
    result = runner.invoke(app, ["status", "--config", str(bad)])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "FEDCLINIC_EDGE_DATA_DIR" in out and "FEDCLINIC_EDGE_PORT" in out


def test_missing_trusted_keys_file_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    write_config(path, data_dir=str(tmp_path / "data"), trusted_keys=str(tmp_path / "nope.pub"))
    result = runner.invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "FEDCLINIC_EDGE_TRUSTED_KEYS" in out and "does not exist" in out


def test_status_before_anything_was_received(config: Path, tmp_path: Path) -> None:
    Database(tmp_path / "data" / "edge.sqlite3").close()
    result = runner.invoke(app, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "none installed" in result.output and "nothing received yet" in result.output


def test_status_shows_the_input_envelope_monitor_and_warns_on_drift(config: Path, tmp_path: Path) -> None:
    state = NodeState.open(tmp_path / "data" / "edge.sqlite3")
    try:
        record_run(state, [False] * 60, model=("test-student", "1.0.0"))
        record_run(state, [True] * 25 + [False] * 15, model=("test-student", "1.1.0"))
    finally:
        state.close()
    text = runner.invoke(app, ["status", "--config", str(config)])
    assert text.exit_code == 0, text.output
    said = " ".join(text.output.split())
    assert "input envelope: test-student 1.1.0: 25 of the last 40 analysed images outside (62.5%" in said
    assert "input envelope: test-student 1.0.0: 0 of the last 60 analysed images outside (0.0%" in said
    warnings = [line for line in text.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "test-student 1.1.0" in warnings[0]
    assert "never checked on" in said

    doc = json.loads(runner.invoke(app, ["status", "--config", str(config), "--format", "json"]).output)
    newest, oldest = doc["input_envelope"]
    assert (newest["model_version"], newest["images"], newest["outside"]) == ("1.1.0", 40, 25)
    assert newest["window"] == 200 and newest["expected_rate"] == pytest.approx(0.01)
    assert newest["rate"] == pytest.approx(25 / 40) and newest["drifting"] is True and newest["warning"]
    assert (oldest["model_version"], oldest["outside"], oldest["drifting"], oldest["warning"]) == (
        "1.0.0",
        0,
        False,
        None,
    )

    # On a wide terminal: a table, and the same warning under it.
    state = NodeState.open(tmp_path / "data" / "edge.sqlite3")
    try:
        report = StatusReport.collect(load_settings(config_file=config), state, 20)
    finally:
        state.close()
    console = Console(force_terminal=True, width=160, record=True)
    report.print_text(console)
    shown = console.export_text()
    assert "input envelope (latest analysed images per model version)" in shown
    assert "40 (window 200)" in shown and "62.5%" in shown and "warning:" in shown


def test_status_says_when_the_images_look_like_negatives(config: Path, tmp_path: Path) -> None:
    state = NodeState.open(tmp_path / "data" / "edge.sqlite3")
    try:
        record_run(state, [False] * 60, model=("test-student", "1.0.0"))  # an envelope without intensity part
        grey = [(True, True)] * 50 + [(True, False)] * 10 + [(False, False)] * 140
        record_run(state, [True] * 60 + [False] * 140, model=("test-student", "1.1.0"), grey=grey)
    finally:
        state.close()
    text = runner.invoke(app, ["status", "--config", str(config)])
    assert text.exit_code == 0, text.output
    said = " ".join(text.output.split())
    assert (
        "input envelope: test-student 1.1.0: 60 of the last 200 analysed images outside (30.0%; up to 2.0%"
        " expected by chance); 50 of the 60 with unusual grey values look negative"
    ) in said
    assert "test-student 1.0.0: 0 of the last 60 analysed images outside (0.0%; about 1.0% expected" in said
    (warning,) = [" ".join(w.split()) for w in text.output.split("warning:")[1:]]
    assert "test-student 1.1.0" in warning and "50 of the 60 images whose grey values were unlike" in warning
    assert "check the display header (Photometric Interpretation MONOCHROME1 or MONOCHROME2" in warning

    doc = json.loads(runner.invoke(app, ["status", "--config", str(config), "--format", "json"]).output)
    newest, oldest = doc["input_envelope"]
    assert (newest["intensity_outside"], newest["negative"], newest["looks_negative"]) == (60, 50, True)
    assert newest["expected_rate"] == pytest.approx(0.02) and "display header" in newest["warning"]
    assert (oldest["intensity_outside"], oldest["negative"], oldest["looks_negative"]) == (None, None, False)

    state = NodeState.open(tmp_path / "data" / "edge.sqlite3")
    try:
        report = StatusReport.collect(load_settings(config_file=config), state, 20)
    finally:
        state.close()
    console = Console(force_terminal=True, width=240, record=True)
    report.print_text(console)
    rows = console.export_text().splitlines()
    assert any("look negative" in line for line in rows)
    (negative_row,) = [line for line in rows if "test-student 1.1.0" in line and "200 (window 200)" in line]
    assert "yes: 50 of 60 with unusual grey values" in negative_row and "up to 2.0%" in negative_row
    (plain_row,) = [line for line in rows if "test-student 1.0.0" in line and "60 (window 200)" in line]
    assert plain_row.rstrip(" │").endswith("-") and "about 1.0%" in plain_row


def test_install_refuse_and_rollback(
    config: Path, tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    key = signing_key[0]
    v1 = make_signed_bundle(tmp_path / "v1", key, version="1.0.0", seed=1)
    v2 = make_signed_bundle(tmp_path / "v2", key, version="1.1.0", seed=2)
    assert runner.invoke(app, ["install-bundle", str(v1), "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["install-bundle", str(v2), "--config", str(config)])
    assert result.exit_code == 0 and "1.1.0" in result.output
    assert (tmp_path / "data" / "models" / "test-student" / "1.0.0" / "model.onnx").is_file()

    # Tampered weights: the sha256 in the signed manifest no longer matches. Refused; 1.1.0 stays active.
    bad = make_signed_bundle(tmp_path / "bad", key, version="2.0.0")
    onnx = bad / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    result = runner.invoke(app, ["install-bundle", str(bad), "--config", str(config)])
    assert result.exit_code == 1 and "refused" in result.output
    # Signed by a key this node does not trust.
    stranger = make_signed_bundle(tmp_path / "stranger", Ed25519PrivateKey.generate(), version="3.0.0")
    result = runner.invoke(app, ["install-bundle", str(stranger), "--config", str(config)])
    assert result.exit_code == 1 and "refused" in result.output
    status = runner.invoke(app, ["status", "--config", str(config)])
    assert "test-student 1.1.0" in status.output

    result = runner.invoke(app, ["rollback", "--config", str(config)])
    assert result.exit_code == 0 and "1.0.0" in result.output
    status = runner.invoke(app, ["status", "--config", str(config)])
    assert "test-student 1.0.0" in status.output


def test_install_without_trusted_keys_says_how_to_set_them(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    write_config(path, data_dir=str(tmp_path / "data"))
    bundle = make_signed_bundle(tmp_path / "b", Ed25519PrivateKey.generate())
    result = runner.invoke(app, ["install-bundle", str(bundle), "--config", str(path)])
    assert result.exit_code == 1
    assert "FEDCLINIC_EDGE_TRUSTED_KEYS" in " ".join(result.output.split())


def test_rollback_with_one_model_is_an_error(config: Path, tmp_path: Path) -> None:
    Database(tmp_path / "data" / "edge.sqlite3").close()
    result = runner.invoke(app, ["rollback", "--config", str(config)])
    assert result.exit_code == 1 and "no previous model" in result.output


def test_echo_a_real_scp_and_a_closed_port(pacs: Storescp) -> None:
    ok = runner.invoke(app, ["echo", "127.0.0.1", str(pacs.port), "PACS"])
    assert ok.exit_code == 0 and "C-ECHO ok" in ok.output
    closed = runner.invoke(app, ["echo", "127.0.0.1", str(free_port()), "PACS", "--timeout", "3"])
    said = " ".join(closed.output.split())
    assert closed.exit_code == 1 and ": connection refused (nothing listens on 127.0.0.1" in said


@pytest.mark.slow
def test_hot_swap_while_serving(
    edge_factory: Callable[..., EdgeProcess],
    test_bundle: TrustedBundle,
    tmp_path: Path,
) -> None:
    """A serving node switches to a newly installed model before its next study, and back on rollback."""
    edge = edge_factory(trusted_keys=str(test_bundle.public_key), quiet_seconds=1.0)
    edge.start()
    first = edge.cli("install-bundle", str(test_bundle.bundle))
    assert first.returncode == 0, first.stdout + first.stderr

    def run_study(name: str) -> str:
        files = make_ct_instances(tmp_path / name, 2, source=DX)
        assert storescu(edge.port, files).returncode == 0
        edge.wait_idle(60)
        rows = edge.query("SELECT model_id, model_version, status FROM runs ORDER BY id DESC LIMIT 1")
        model_id, version, status = rows[0]
        assert status == "done"
        return f"{model_id} {version}"

    original = run_study("a")
    # A second model, signed by a second hub key that the node is told to trust as well.
    key = Ed25519PrivateKey.generate()
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "hub.pub").write_bytes(test_bundle.public_key.read_bytes())
    (keys_dir / "second.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    text = edge.config.read_text().replace(str(test_bundle.public_key), str(keys_dir))
    edge.config.write_text(text)
    edge.stop()
    edge.start()  # trusted_keys is read at start
    second = make_signed_bundle(tmp_path / "second", key, version="9.9.9")
    installed = edge.cli("install-bundle", str(second))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert run_study("b") == "test-student 9.9.9"
    assert edge.cli("rollback").returncode == 0
    assert run_study("c") == original
    assert edge.stop() == 0


def test_environment_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edge.toml"
    write_config(
        path,
        data_dir=str(tmp_path / "data"),
        port=4000,
        destinations=[{"ae_title": "PACS", "host": "10.0.0.5", "port": 104}],
    )
    monkeypatch.setenv("FEDCLINIC_EDGE_PORT", "4001")
    monkeypatch.setenv("FEDCLINIC_EDGE_ALLOWED_CALLING_AES", '["ORTHANC"]')
    settings = load_settings(path)
    assert settings.port == 4001 and settings.allowed_calling_aes == ["ORTHANC"]
    assert settings.destinations[0].host == "10.0.0.5"
    assert settings.providers[-1] == "CPUExecutionProvider" and settings.intra_op_threads == 1
    with pytest.raises(ConfigError, match="FEDCLINIC_EDGE_AE_TITLE"):
        load_settings(path, ae_title="WAY_TOO_LONG_AE_TITLE")


def test_serve_on_a_taken_port_says_which_setting_to_change(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = tmp_path / "edge.toml"
        write_config(path, data_dir=str(tmp_path / "data"), port=taken.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")}
        proc = subprocess.run(
            [str(EDGE_BIN), "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert proc.returncode == 1
    assert "FEDCLINIC_EDGE_PORT" in " ".join(proc.stderr.split())
