"""The systemd unit passes systemd-analyze verify; the written edge.toml loads in the edge's own settings."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from installers.answers import Answers, PacsAnswer, load_answers
from installers.edge_config import render_config, write_config
from installers.errors import AnswersError
from installers.service_user import ServiceUser
from installers.systemd_unit import UnitSpec, exec_start, render_unit, verify_unit

NEEDS_ANALYZE = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (apt install systemd)"
)
EXAMPLE = Path(__file__).resolve().parents[2] / "installers" / "answers.example.toml"


def _spec(tmp_path: Path, port: int) -> UnitSpec:
    # systemd-analyze checks that ExecStart's binary exists and is executable: point it at a real one.
    return UnitSpec(Path(sys.executable), tmp_path / "edge.toml", tmp_path / "data", "daemon", port)


@NEEDS_ANALYZE
@pytest.mark.parametrize("port", [104, 11112])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, port: int) -> None:
    unit = tmp_path / "fedclinic-edge.service"
    unit.write_text(render_unit(_spec(tmp_path, port)))
    assert verify_unit(unit) is None
    text = unit.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text and "User=daemon" in text
    # Only a port below 1024 gets the one capability it needs.
    assert ("AmbientCapabilities=CAP_NET_BIND_SERVICE" in text) == (port < 1024)


@NEEDS_ANALYZE
def test_broken_unit_is_reported(tmp_path: Path) -> None:
    unit = tmp_path / "fedclinic-edge.service"
    spec = UnitSpec(tmp_path / "missing-binary", tmp_path / "edge.toml", tmp_path / "data", "daemon", 11112)
    unit.write_text(render_unit(spec))
    complaint = verify_unit(unit)
    assert complaint is not None and "missing-binary" in complaint


def test_exec_start_is_the_units_command(tmp_path: Path) -> None:
    spec = _spec(tmp_path, 11112)
    assert f"ExecStart={' '.join(exec_start(spec))}\n" in render_unit(spec)


def test_config_loads_in_edge_settings_and_is_private(tmp_path: Path) -> None:
    from edge_node.settings import load_settings

    answers = Answers(
        ae_title="CLINIC_A",
        port=11113,
        allowed_calling_aes=["PACS"],
        data_dir=tmp_path / "data",
        pacs=PacsAnswer(ae_title="PACS", host="10.0.0.5", port=104),
    )
    keys = tmp_path / "hub.pub"
    # trusted_keys must exist; its content is read only when a bundle is installed.
    keys.write_text("placeholder")
    path = tmp_path / "etc" / "edge.toml"
    me = ServiceUser("me", os.getuid(), os.getgid())
    write_config(path, render_config(answers, keys), me)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    settings = load_settings(path)
    assert settings.ae_title == "CLINIC_A" and settings.port == 11113
    assert settings.allowed_calling_aes == ["PACS"] and settings.data_dir == tmp_path / "data"
    assert [(d.ae_title, d.host, d.port) for d in settings.destinations] == [("PACS", "10.0.0.5", 104)]


def test_example_answers_file_is_valid() -> None:
    answers = load_answers(EXAMPLE, {})
    assert answers.pacs is not None and answers.pacs.port == 104


def test_bad_answers_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "a.toml"
    bad.write_text('ae_title = "A\\\\B"\nport = 70000\n')
    with pytest.raises(AnswersError, match="port") as info:
        load_answers(bad, {})
    assert "ae_title" in str(info.value)
    bad.write_text("port = [")
    with pytest.raises(AnswersError, match="not valid TOML"):
        load_answers(bad, {})


def test_bootstrap_modules_run_on_a_bare_python(tmp_path: Path) -> None:
    """The kit's check must work with no third-party package at all (python -I -S: no site-packages)."""
    repo = Path(__file__).resolve().parents[2]
    code = "import sys; sys.path.insert(0, sys.argv[1]); import installers.bootstrap; print('ok')"
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(repo)], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_machine_check_command_reports_json(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from installers.cli import app

    result = CliRunner().invoke(
        app, ["check", "--data-dir", str(tmp_path), "--port", "1", "--format", "json"]
    )
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert {"operating system", "memory", "disk", "python", "GPU", "ONNX Runtime", "clock"} <= set(checks)
    # Port 1 cannot be bound by an unprivileged process, and is closed on any sane machine: both say "fail"
    # when not root; as root the port is free. Either way the check names the port.
    assert "port 1" in checks
    assert result.exit_code == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)
