"""Upgrade from a newer kit keeps settings and data; a version that fails its self-test is not activated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from export.signing import load_private_key
from installers.kit import canonical_json
from tests.installers.conftest import SYSTEM_PYTHON, BuiltKitInfo, free_port, offline_env, signing_root

pytestmark = pytest.mark.slow


def _resigned(kit: Path, dest: Path) -> Path:
    """The same kit released again (new build time): another kit digest, so another version folder."""
    shutil.copytree(kit, dest, copy_function=os.link)
    manifest = json.loads((dest / "kit.json").read_bytes())
    manifest["created"] = "2030-01-01T00:00:00Z"
    signed = canonical_json(manifest)
    key = load_private_key(signing_root() / "keys" / "hub.key")
    for name, data in (("kit.json", signed), ("kit.sig", key.sign(signed))):
        (dest / name).unlink()
        (dest / name).write_bytes(data)
    return dest


def _run(kit: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SYSTEM_PYTHON), str(kit / "install.py"), *args],
        env=offline_env(kit),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_upgrade_switches_and_a_broken_version_is_refused(
    kit: BuiltKitInfo, world_dir: Path, service_user: str
) -> None:
    prefix, config, data = world_dir / "opt", world_dir / "etc" / "edge.toml", world_dir / "data"
    answers = world_dir / "answers.toml"
    answers.write_text(
        f'prefix = "{prefix}"\nconfig_path = "{config}"\nunit_dir = "{world_dir / "units"}"\n'
        f'data_dir = "{data}"\nservice_user = "{service_user}"\nlisten_host = "127.0.0.1"\n'
        f"port = {free_port()}\n"
    )
    first = _run(kit.path, "--prefix", str(prefix), "--answers", str(answers), "--yes")
    assert first.returncode == 0, first.stdout + first.stderr
    old = (prefix / "current").resolve()
    settings_before = config.read_text()

    newer = _resigned(kit.path, world_dir / "kit-newer")
    upgraded = _run(newer, "upgrade", "--prefix", str(prefix), "--expect-key", kit.key_fingerprint)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    new = (prefix / "current").resolve()
    assert new != old and new.parent == old.parent
    record = json.loads((prefix / "install.json").read_text())
    assert record["version_dir"] == str(new) and record["previous_version_dir"] == str(old)
    assert config.read_text() == settings_before and (data / "edge.sqlite3").is_file()

    # Going "up" to a version whose runtime is broken: the self-test fails and the node stays where it is.
    runtime = next((old / "venv" / "lib").glob("python3.*/site-packages/onnxruntime"))
    runtime.rename(runtime.with_name("onnxruntime-removed"))
    tool = new / "venv" / "bin" / "fedclinic-install"
    refused = subprocess.run(
        [str(tool), "upgrade", "--kit", str(kit.path), "--version-dir", str(old), "--prefix", str(prefix)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 1
    assert "failed its self-test" in refused.stderr and "onnxruntime" in refused.stderr
    assert (prefix / "current").resolve() == new
