"""Must-show 1 (enrollment): the unattended install enrolls against a real hub started by the test.

The hub is ``fedclinic-hub init --public-url`` + ``serve`` over HTTPS on loopback; the join code from
``fedclinic-hub nodes enroll`` carries its address and certificate fingerprint, and the installed node's own
``fedclinic-edge enroll`` (from the offline kit) uses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from installers.systemd_unit import UNIT_NAME
from tests.installers.conftest import SYSTEM_PYTHON, BuiltKitInfo, free_port, offline_env
from tests.installers.test_kit_install import _doctor, _unit_command

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real hub over HTTPS on loopback: (its URL, the environment that selects its data directory)."""
    env = {
        **os.environ,
        "FEDCLINIC_HUB_DATA_DIR": str(tmp_path / "hub"),
        # Short beats and polls: the doctor test waits for the node to hear of its revocation.
        "FEDCLINIC_HUB_HEARTBEAT_INTERVAL_S": "1",
        "FEDCLINIC_HUB_MAX_WAIT_S": "2",
    }
    hub_cli = str(Path(sys.executable).parent / "fedclinic-hub")
    port = free_port()
    # The public URL goes into every join code: it must be the address the node will reach.
    init = _cli(hub_cli, "init", "--public-url", f"https://127.0.0.1:{port}", env=env)
    assert init.returncode == 0, init.stderr
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
    assert listed.returncode == 0, listed.stderr
    nodes = {n["node_name"]: n for n in json.loads(listed.stdout)["nodes"]}
    assert nodes["clinic-kit"]["state"] == "active"
    # The node's credential is the service user's alone.
    credential = world_dir / "data" / "uplink" / "credential.json"
    assert credential.stat().st_mode & 0o777 == 0o600

    # Must-show 3: a wrong PACS port and a revoked credential; doctor names both, each with its fix.
    wrong = free_port()  # nothing listens there
    config = world_dir / "etc" / "edge.toml"
    with config.open("a") as out:
        out.write(f'\n[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {wrong}\n')
    command, unit_env, user = _unit_command(world_dir / "units" / UNIT_NAME)
    node = subprocess.Popen(
        ["runuser", "-u", user, "--", *command],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **unit_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        node_id = nodes["clinic-kit"]["node_id"]
        _wait("the node's first heartbeat", lambda: _node(env, "clinic-kit").get("last_heartbeat"), node)
        revoked = _cli(hub_cli, "nodes", "revoke", node_id, env=env)
        assert revoked.returncode == 0, revoked.stderr
        edge = [
            str(prefix / "current" / "venv" / "bin" / "fedclinic-edge"),
            "status",
            "--config",
            str(config),
        ]

        def told_revoked() -> bool:
            shown = _cli("runuser", "-u", user, "--", *edge, "--format", "json")
            return "revoked" in str(json.loads(shown.stdout or "{}").get("hub", {}).get("last_error"))

        _wait("the node to hear it was revoked", told_revoked, node)
        report = _doctor(prefix)
        assert report.returncode == 1, report.stdout + report.stderr
        assert f"refuses connections on port {wrong}" in report.stdout
        assert "ask the PACS administrator for the PACS's DICOM port" in report.stdout
        assert "the hub revoked this node's credential" in report.stdout
        assert (
            "ask the hub operator for a new join code, then: fedclinic-edge enroll NEW-CODE" in report.stdout
        )
    finally:
        node.terminate()
        node.wait(timeout=30)


def _node(env: dict[str, str], name: str) -> dict[str, object]:
    hub_cli = str(Path(sys.executable).parent / "fedclinic-hub")
    listed = _cli(hub_cli, "nodes", "list", "--format", "json", env=env)
    return {n["node_name"]: n for n in json.loads(listed.stdout)["nodes"]}.get(name, {})


def _wait(what: str, probe: Callable[[], object], node: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert node.poll() is None, f"the node exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)
