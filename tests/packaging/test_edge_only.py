"""The edge installs and runs without torch: a fresh venv with only `.[edge,cpu]` passes the edge tests (the
listener in its default mode, no `slow` ones) and the bundle contract tests (the verification a clinic runs,
tested where it runs, on the prebuilt bundle)."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from installers.kit_builder import SOURCE_ITEMS, copy_sources

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]


@pytest.mark.slow
def test_fresh_edge_environment_has_no_torch_and_passes_edge_tests(tmp_path: Path) -> None:
    bundle = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    if not bundle:
        pytest.skip("FEDCLINIC_TEST_BUNDLE is not set: `make test` builds the test bundle and sets it")
    env_dir = tmp_path / "edge-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # A regular (non-editable) install of exactly what a clinic installs, from a copy of the sources (a build
    # in the checkout itself would race the hub-only test's on another worker).
    src = copy_sources(tmp_path / "src", (*SOURCE_ITEMS, "harness"))
    install = _run([str(py), "-m", "pip", "install", "-q", f"{src}[edge,cpu]", "pytest", "pytest-timeout"])
    assert install.returncode == 0, install.stdout + install.stderr

    probe = _run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"])
    assert probe.stdout.strip() == "True", "torch must not be installed by the edge extra"
    for forbidden in ("torch", "onnxscript", "sklearn"):
        check = _run([str(py), "-c", f"import {forbidden}"])
        assert check.returncode != 0, f"{forbidden} is importable in the edge-only environment"

    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}{os.pathsep}{env_dir / 'bin'}"}
    env.pop("PYTHONPATH", None)
    # The main suite's edge tests again, in an environment without torch: the listener in the node's default
    # receive mode only (the main suite runs all three), and not the long runs (`slow`: the 2000-instance
    # fuzz, the crash and resource-limit runs), whose code is the same in both environments.
    env["FEDCLINIC_TEST_RECEIVE_MODES"] = "processes"
    result = _run(
        [
            str(py),
            "-m",
            "pytest",
            "tests/edge_node",
            "tests/contract",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not gpu and not slow",
        ],
        cwd=REPO_ROOT,
        env=env,
        timeout=1800,
    )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout, tail
