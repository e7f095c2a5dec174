"""`fedclinic-hub installer build` end to end: a signed kit that verifies, with exactly pinned wheels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub.cli import app
from installers.kit import verify_kit
from tests.installers.conftest import signing_root

pytestmark = pytest.mark.slow


def test_build_command_writes_a_verifiable_kit(tmp_path: Path) -> None:
    key = signing_root() / "keys" / "hub.key"
    if not key.is_file():
        pytest.skip(f"no signing key at {key} (make test-bundle)")
    out = tmp_path / "kit"
    command = ["installer", "build", "--out", str(out), "--key", str(key), "--join-code", "JOIN-123"]
    result = CliRunner().invoke(app, [*command, "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # progress goes to stderr in JSON mode: stdout is the document
    manifest, fingerprint = verify_kit(out, summary["key_fingerprint"])
    assert fingerprint == summary["key_fingerprint"] and manifest.join_code == "JOIN-123"
    assert summary["size_bytes"] < 300 * 1024 * 1024  # the CPU kit's budget
    wheels = {Path(w).name.split("-")[0].lower() for w in manifest.wheels()}
    assert {"fedclinic", "onnxruntime", "pynetdicom", "pydicom", "cryptography"} <= wheels
    assert not wheels & {"torch", "onnx", "scikit_learn", "onnxruntime_gpu"}  # the edge extra only
    pins = (out / "constraints.txt").read_text().splitlines()[1:]
    assert len(pins) == len(manifest.wheels()) and all("==" in p for p in pins)

    again = CliRunner().invoke(app, ["installer", "build", "--out", str(out), "--key", str(key)])
    assert again.exit_code == 1 and "is not empty; choose a new --out" in " ".join(again.output.split())
