"""`fedclinic-hub --help`, `--version`, `keys …` and `data list` where torch (and ONNX Runtime) cannot load.

Each command runs in a subprocess whose ``sitecustomize`` makes ``import torch``, ``onnxruntime`` and
``sklearn`` fail as on a machine without them, so any eager import on these paths fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import importlib.abc
import sys

BLOCKED = {"torch", "onnxruntime", "sklearn", "onnx", "onnxscript"}


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture()
def python(tmp_path: Path, shared_data: Path) -> Runner:
    """Run ``python ARGS…`` in ``tmp_path`` with the blocker installed and this worktree importable."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT)]),
        "FEDCLINIC_DATA": str(shared_data),
        "COLUMNS": "300",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )

    return run


@pytest.fixture()
def hub_cli(python: Runner) -> Runner:
    """``fedclinic-hub ARGS…`` where torch cannot load."""
    return lambda *args: python("-m", "hub.cli", *args)


def test_the_blocker_really_blocks_torch(python: Runner) -> None:
    probe = python("-c", "import torch")
    assert probe.returncode == 1 and "No module named 'torch'" in probe.stderr, probe.stderr


def test_help_version_keys_and_data_list_work_without_torch(hub_cli: Runner) -> None:
    helped = hub_cli("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("train", "export", "keys", "data"):
        assert command in helped.stdout
    assert hub_cli("--version").stdout.strip() == "fedclinic-hub 0.1.0"
    assert hub_cli("train", "--help").returncode == 0
    assert hub_cli("export", "--help").returncode == 0

    created = hub_cli("keys", "create", "--out", "keys")
    assert created.returncode == 0, created.stderr
    shown = hub_cli("keys", "show", "keys/hub.pub", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["kind"] == "public"

    listed = hub_cli("data", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert {d["name"] for d in json.loads(listed.stdout)["datasets"] if d["md5_official"]} >= {
        "pneumoniamnist",
        "breastmnist",
    }


def test_train_and_export_refuse_before_they_need_torch(hub_cli: Runner, tmp_path: Path) -> None:
    (tmp_path / "runs" / "x" / "best").mkdir(parents=True)
    train = hub_cli("train", "--model", "student_cnn_s", "--dataset", "pneumoniamnist", "--out", "runs/x")
    assert train.returncode == 1 and "already holds a run" in train.stdout, train.stdout + train.stderr

    assert hub_cli("keys", "create", "--out", "keys").returncode == 0
    (tmp_path / "runs" / "x" / "best" / "config.json").write_text("{}")
    export = ["export", "--checkpoint", "runs/x/best", "--out", "bundles/b", "--model-version", "1.0.0"]
    public = hub_cli(*export, "--key", "keys/hub.pub")
    assert public.returncode == 2 and "public key" in public.stderr, public.stderr
    # With the right key, the missing runtime is named with the extra that brings it.
    no_runtime = hub_cli(*export, "--key", "keys/hub.key")
    assert no_runtime.returncode == 2 and "fedclinic[hub,cpu]" in no_runtime.stderr, no_runtime.stderr
    assert not (tmp_path / "bundles").exists()
