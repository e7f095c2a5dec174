"""``fedclinic-edge config-check`` against a real storescp, a closed port, a real bundle and bad settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_node.cli import app
from edge_node.config_check import c_echo, check_data_dir, check_runtime
from edge_node.delivery.destination import Destination
from edge_node.settings import load_settings
from tests.edge_node.conftest import Storescp, TrustedBundle, free_port, write_config

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_edge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FEDCLINIC_EDGE_"):
            monkeypatch.delenv(name)


def _flat(text: str) -> str:
    """The output without whitespace and table borders (rich wraps long cells over several lines)."""
    return "".join(ch for ch in text if not ch.isspace() and not "\u2500" <= ch <= "\u257f")


def test_passes_with_a_real_pacs_and_reports_the_session_provider(
    tmp_path: Path, pacs: Storescp, test_bundle: TrustedBundle
) -> None:
    config = tmp_path / "edge.toml"
    write_config(
        config,
        ae_title="EDGE",
        data_dir=str(tmp_path / "data"),
        trusted_keys=str(test_bundle.public_key),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        precision="int8",
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    installed = runner.invoke(app, ["install-bundle", str(test_bundle.bundle), "--config", str(config)])
    assert installed.exit_code == 0, installed.output
    result = runner.invoke(app, ["config-check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    flat = _flat(result.output)
    assert "trustedkeysok" in flat and "datadirectoryok" in flat
    assert f"PACS@127.0.0.1:{pacs.port}ok" in flat and "C-ECHOsuccess" in flat
    assert "providersavailable" in flat and "CPUExecutionProvider" in flat
    # The session for the active model, as the node would open it: int8 variant, on the CPU.
    assert "model.int8.onnx,int8)runsonCPUExecutionProvider" in flat
    assert "config-checkpassed" in flat


def test_fails_when_a_destination_does_not_answer(tmp_path: Path, pacs: Storescp) -> None:
    dead = free_port()  # nobody listens here
    config = tmp_path / "edge.toml"
    write_config(
        config,
        data_dir=str(tmp_path / "data"),
        destinations=[
            {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": dead},
        ],
    )
    result = runner.invoke(app, ["config-check", "--config", str(config), "--timeout", "3"])
    assert result.exit_code == 1
    flat = _flat(result.output)
    assert f"PACS@127.0.0.1:{pacs.port}ok" in flat
    assert f"ARCHIVE@127.0.0.1:{dead}FAILED" in flat and "connectionrefused(nothinglistenson127.0.0.1" in flat
    # No trusted keys either: named with the setting that fixes it.
    assert "trustedkeysFAILED" in flat and "FEDCLINIC_EDGE_TRUSTED_KEYS" in flat
    # The same for a script: one JSON document, the same exit code.
    as_json = runner.invoke(
        app, ["config-check", "--config", str(config), "--timeout", "3", "--format", "json"]
    )
    assert as_json.exit_code == 1
    doc = json.loads(as_json.output)
    assert doc["ok"] is False and doc["failed"] == ["trusted keys", f"ARCHIVE@127.0.0.1:{dead}"]
    by_address = {d["address"]: d for d in doc["destinations"]}
    assert by_address[f"PACS@127.0.0.1:{pacs.port}"]["ok"] is True
    assert "connection refused" in by_address[f"ARCHIVE@127.0.0.1:{dead}"]["detail"]
    assert doc["runtime"]["configured"][-1] == "CPUExecutionProvider"
    assert "nomodelinstalledyet" in flat
    assert f"config-checkfailed:trustedkeys,ARCHIVE@127.0.0.1:{dead}" in flat


def test_echo_result_for_a_real_scp_and_a_closed_port(pacs: Storescp) -> None:
    ok = c_echo(Destination("PACS", "127.0.0.1", pacs.port), "EDGE", timeout=5)
    assert ok.ok and ok.detail == "C-ECHO success" and ok.milliseconds > 0
    closed = c_echo(Destination("PACS", "127.0.0.1", free_port()), "EDGE", timeout=3)
    assert not closed.ok and "connection refused" in closed.detail


def test_an_unwritable_data_dir_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data directory should be")
    settings = load_settings(data_dir=blocker / "data")
    check = check_data_dir(settings)
    assert not check.ok and "not writable" in check.detail and "FEDCLINIC_EDGE_DATA_DIR" in check.detail
    good = check_data_dir(load_settings(data_dir=tmp_path / "fresh"))
    assert good.ok and (tmp_path / "fresh").is_dir() and list((tmp_path / "fresh").iterdir()) == []


def test_runtime_without_a_model_lists_providers_only(tmp_path: Path) -> None:
    report = check_runtime(load_settings(data_dir=tmp_path))
    assert "CPUExecutionProvider" in report.available
    assert (
        report.session_provider is None and report.problem is not None and "install-bundle" in report.problem
    )
    assert not (tmp_path / "edge.sqlite3").exists()  # a check creates no database
