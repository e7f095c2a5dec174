"""Hostile bundles at install: each refused with a message, the active model kept, nothing extra copied."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from edge_node.cli import app
from edge_node.protocol.manifest import MAX_MANIFEST_BYTES
from tests.edge_node.conftest import make_signed_bundle, write_config

runner = CliRunner()


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


@pytest.fixture
def installed(config: Path, tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]) -> Path:
    """The node runs test-student 1.1.0."""
    v = make_signed_bundle(tmp_path / "active", signing_key[0], version="1.1.0", seed=1)
    assert runner.invoke(app, ["install-bundle", str(v), "--config", str(config)]).exit_code == 0
    return config


def _refused(config: Path, bundle: Path, *phrases: str) -> None:
    result = runner.invoke(app, ["install-bundle", str(bundle), "--config", str(config)])
    text = result.output + (str(result.exception) if result.exception else "")
    assert result.exit_code == 1, text
    assert "refused" in text and "Traceback" not in text, text
    for phrase in phrases:
        assert phrase in text, text
    status = runner.invoke(app, ["status", "--config", str(config)])
    assert "test-student 1.1.0" in status.output


def test_downgrade_is_refused_unless_it_is_a_rollback(
    installed: Path, tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    older = make_signed_bundle(tmp_path / "older", signing_key[0], version="1.0.0", seed=2)
    _refused(installed, older, "older than the active 1.1.0")
    newer = make_signed_bundle(tmp_path / "newer", signing_key[0], version="1.2.0", seed=3)
    assert runner.invoke(app, ["install-bundle", str(newer), "--config", str(installed)]).exit_code == 0
    # The explicit way back: rollback to the model that was active before.
    result = runner.invoke(app, ["rollback", "--config", str(installed)])
    assert result.exit_code == 0 and "1.1.0" in result.output


def test_only_listed_files_are_copied_and_links_are_never_followed(
    installed: Path, tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    secret = tmp_path / "private.pem"
    secret.write_text("PRIVATE KEY")
    bundle = make_signed_bundle(tmp_path / "b", signing_key[0], version="1.3.0", seed=4)
    (bundle / "stolen.pem").symlink_to(secret)  # unlisted link to a file outside the bundle
    (bundle / "notes.txt").write_text("unlisted")
    assert runner.invoke(app, ["install-bundle", str(bundle), "--config", str(installed)]).exit_code == 0
    copied = tmp_path / "data" / "models" / "test-student" / "1.3.0"
    names = sorted(p.name for p in copied.rglob("*"))
    assert names == ["manifest.json", "manifest.sig", "model.onnx"]
    # A listed file that is a link (even to identical bytes) is refused.
    linked = make_signed_bundle(tmp_path / "l", signing_key[0], version="1.4.0", seed=5)
    real = tmp_path / "model-elsewhere.onnx"
    shutil.move(linked / "model.onnx", real)
    (linked / "model.onnx").symlink_to(real)
    result = runner.invoke(app, ["install-bundle", str(linked), "--config", str(installed)])
    assert result.exit_code == 1 and "link" in result.output, result.output


def test_link_loop_nesting_duplicates_and_size_are_refused_with_a_message(
    installed: Path, tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    # 1. manifest.json is a symlink loop.
    loop = make_signed_bundle(tmp_path / "loop", signing_key[0], version="2.0.0", seed=6)
    (loop / "manifest.json").unlink()
    os.symlink("manifest.json", loop / "manifest.json")
    _refused(installed, loop, "link")
    # 2. JSON nested far beyond any manifest.
    deep = make_signed_bundle(tmp_path / "deep", signing_key[0], version="2.0.0", seed=6)
    (deep / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    _refused(installed, deep, "nested too deeply")
    # 3. The same key twice (which one counts would depend on the reader).
    dup = make_signed_bundle(tmp_path / "dup", signing_key[0], version="2.0.0", seed=6)
    raw = (dup / "manifest.json").read_text()
    (dup / "manifest.json").write_text(raw[:-1] + ', "model_version": "9.9.9"}')
    _refused(installed, dup, "twice")
    # 4. An oversized manifest: refused from its size, not parsed.
    big = make_signed_bundle(tmp_path / "big", signing_key[0], version="2.0.0", seed=6)
    data = json.loads((big / "manifest.json").read_text())
    data["padding"] = "x" * (MAX_MANIFEST_BYTES + 10)
    (big / "manifest.json").write_text(json.dumps(data))
    _refused(installed, big, "larger than")
    # 5. A zip holding a member twice.
    good = make_signed_bundle(tmp_path / "good", signing_key[0], version="2.0.0", seed=6)
    archive = tmp_path / "twice.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("manifest.json", "manifest.sig", "model.onnx"):
            zf.write(good / name, name)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("model.onnx", b"other bytes")
    _refused(installed, archive, "twice")
