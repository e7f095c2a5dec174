"""Must-show 1 (enrollment): the unattended install enrolls against a hub started by the test.

Runs once the hub service (``fedclinic-hub init/serve/nodes``) and ``fedclinic-edge enroll`` are in this tree;
until then it skips and says which command is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.installers.conftest import SYSTEM_PYTHON, BuiltKitInfo, free_port, offline_env

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=env)


def _require_commands() -> None:
    bin_dir = Path(sys.executable).parent
    checks = [
        ([str(bin_dir / "fedclinic-hub"), "init", "--help"], "fedclinic-hub init"),
        ([str(bin_dir / "fedclinic-hub"), "nodes", "enroll", "--help"], "fedclinic-hub nodes enroll"),
        ([str(bin_dir / "fedclinic-edge"), "enroll", "--help"], "fedclinic-edge enroll"),
    ]
    for command, name in checks:
        if _cli(*command).returncode != 0:
            pytest.skip(f"{name} not available yet (the hub-service issue adds it)")


@pytest.fixture(scope="session")
def enroll_commands() -> None:
    """Session-scoped so that it runs before the (slow) session-scoped kit when the commands are missing."""
    _require_commands()


@pytest.fixture
def hub(enroll_commands: None, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real hub over HTTPS on loopback: (its URL, the environment that selects its data directory)."""
    env = {**os.environ, "FEDCLINIC_HUB_DATA_DIR": str(tmp_path / "hub")}
    hub_cli = str(Path(sys.executable).parent / "fedclinic-hub")
    init = _cli(hub_cli, "init", env=env)
    assert init.returncode == 0, init.stderr
    port = free_port()
    server = subprocess.Popen(
        [hub_cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                # Readiness only: the self-signed certificate is pinned by the join code, not checked here.
                if httpx.get(f"{url}/v1/openapi.json", verify=False, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the hub did not start"
            time.sleep(0.5)
        yield url, env
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_unattended_install_enrolls_with_the_join_code(
    enroll_commands: None,
    kit: BuiltKitInfo,
    world_dir: Path,
    service_user: str,
    hub: tuple[str, dict[str, str]],
) -> None:
    url, env = hub
    hub_cli = str(Path(sys.executable).parent / "fedclinic-hub")
    enrolled = _cli(hub_cli, "nodes", "enroll", "clinic-kit", "--format", "json", env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    code = json.loads(enrolled.stdout)["join_code"]
    prefix = world_dir / "opt"
    answers = world_dir / "answers.toml"
    answers.write_text(
        f'prefix = "{prefix}"\nconfig_path = "{world_dir / "etc" / "edge.toml"}"\n'
        f'unit_dir = "{world_dir / "units"}"\ndata_dir = "{world_dir / "data"}"\n'
        f'service_user = "{service_user}"\nlisten_host = "127.0.0.1"\nport = {free_port()}\n'
        f'join_code = "{code}"\nhub_url = "{url}"\n'
    )
    done = subprocess.run(
        [str(SYSTEM_PYTHON), str(kit.path / "install.py"), "--prefix", str(prefix), "--answers", str(answers),
         "--yes"],
        env=offline_env(kit.path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "enrolled" in done.stdout
    listed = _cli(hub_cli, "nodes", "list", "--format", "json", env=env)
    assert listed.returncode == 0 and "clinic-kit" in listed.stdout
