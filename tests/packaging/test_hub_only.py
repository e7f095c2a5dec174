"""`pip install 'fedclinic[hub]'` alone gives a working hub; export names the runtime extra it lacks."""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

from installers.kit_builder import SOURCE_ITEMS, copy_sources


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]


@pytest.mark.slow
def test_fresh_hub_environment_trains_and_says_which_extra_export_needs(
    tmp_path: Path, shared_data: Path
) -> None:
    env_dir = tmp_path / "hub-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # A regular (non-editable) install of exactly what a hub operator installs, nothing else, from a copy of
    # the sources (a build in the checkout itself would race the edge-only test's on another worker).
    src = copy_sources(tmp_path / "src", (*SOURCE_ITEMS, "harness"))
    install = _run([str(py), "-m", "pip", "install", "-q", f"{src}[hub]"], timeout=1800)
    assert install.returncode == 0, install.stdout + install.stderr
    for absent in ("onnxruntime", "pynetdicom", "matplotlib"):
        check = _run([str(py), "-c", f"import {absent}"])
        assert check.returncode != 0, f"{absent} is importable with only the hub extra"

    hub = str(env_dir / "bin" / "fedclinic-hub")
    env = {**os.environ, "FEDCLINIC_DATA": str(shared_data), "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _run([hub, *args], cwd=tmp_path, env=env, timeout=600)

    assert run("--help").returncode == 0
    listed = run("data", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert any(d["md5_official"] for d in json.loads(listed.stdout)["datasets"])
    assert run("keys", "create", "--out", "keys").returncode == 0
    trained = run(
        "train", "--model", "student_cnn_s", "--dataset", "pneumoniamnist", "--epochs", "1",
        "--max-train-samples", "256", "--out", "runs/s",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    exported = run(
        "export", "--checkpoint", "runs/s/best", "--key", "keys/hub.key", "--out", "bundles/b",
        "--model-version", "1.0.0",
    )  # fmt: skip
    assert exported.returncode == 2, exported.stdout + exported.stderr
    assert "fedclinic[hub,cpu]" in exported.stderr
