"""The README's examples are run as written: hub train/export/dicomize, an edge node serving them, and a
federation: a hub, an enrolled node, a published model and a round."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.demo.orthanc import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
BIN = Path(sys.executable).parent


def readme_blocks(section: str | None = None) -> list[tuple[str, str]]:
    """The fenced bash/toml blocks of the README, or of one of its ``## `` sections."""
    text = README.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|toml)\n(.*?)```", text, flags=re.S)


def test_quick_start_names_the_two_commands() -> None:
    quick = readme_blocks("Quick start")[0][1]
    assert "make demo" in quick and "make test" in quick


@pytest.mark.slow
def test_readme_clinic_path_examples_run_as_written(tmp_path: Path, shared_data: Path) -> None:
    blocks = readme_blocks("The clinic path")
    (toml,) = [body for kind, body in blocks if kind == "toml"]
    (tmp_path / "edge.toml").write_text(toml)
    port = free_port()
    env = {
        **os.environ,
        # Appended, not prepended: pynetdicom puts Python apps named storescu etc. into the venv's bin/,
        # and the README means dcmtk's storescu.
        "PATH": f"{os.environ.get('PATH', '')}{os.pathsep}{BIN}",
        "FEDCLINIC_DATA": str(shared_data),
        "FEDCLINIC_EDGE_PORT": str(port),  # the environment wins over edge.toml: no clash with a real 11112
        "OMP_NUM_THREADS": "1",
        "TCP_NODELAY": "1",
        "COLUMNS": "200",
    }
    background: list[subprocess.Popen[bytes]] = []
    try:
        for kind, body in blocks:
            if kind != "bash":
                continue
            for line in body.strip().splitlines():
                command = line.replace("11112", str(port))
                if command.endswith("&"):
                    log = (tmp_path / "serve.log").open("wb")
                    background.append(
                        subprocess.Popen(
                            shlex.split(command.rstrip("& ")), cwd=tmp_path, env=env, stdout=log, stderr=log
                        )
                    )
                    continue
                # The listener needs a moment after `serve &`: retry only the connection test.
                deadline = time.monotonic() + (60 if " echo " in command else 0)
                while True:
                    result = subprocess.run(
                        command,
                        shell=True,
                        cwd=tmp_path,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=600,
                    )
                    if result.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

        # The four studies storescu sent are analysed by the node's worker.
        deadline = time.monotonic() + 120
        while True:
            status = subprocess.run(
                ["fedclinic-edge", "status", "--config", "edge.toml", "--format", "json"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            studies = json.loads(status.stdout)["studies"]
            if sum(s["state"] == "done" for s in studies) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sum(s["state"] == "done" for s in studies) >= 4, status.stdout
        assert "pneumonia" in {s["finding"] for s in studies}
    finally:
        for proc in background:
            proc.terminate()
            proc.wait(timeout=60)


def prebuilt_bundle_root() -> Path:
    """$FEDCLINIC_TEST_BUNDLE (bundle/, keys/hub.key, keys/hub.pub), else build/dev-bundle."""
    env = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    return Path(env) if env else REPO_ROOT / "build" / "dev-bundle"


@pytest.mark.slow
def test_readme_federation_runs_as_written(tmp_path: Path, shared_data: Path) -> None:
    # What the clinic path leaves behind (keys/, the signed bundle, edge.toml) comes from the prebuilt test
    # bundle: the clinic path test runs those commands; training again here would only cost time.
    source = prebuilt_bundle_root()
    if not (source / "keys" / "hub.key").is_file():
        pytest.skip(f"no prebuilt test bundle with its key at {source}: run `make test-bundle`")
    shutil.copytree(source / "keys", tmp_path / "keys")
    shutil.copytree(source / "bundle", tmp_path / "bundles" / "pneumonia-1.0.0")
    (toml,) = [body for kind, body in readme_blocks("The clinic path") if kind == "toml"]
    (tmp_path / "edge.toml").write_text(toml)
    (script,) = [body for kind, body in readme_blocks("The federation") if kind == "bash"]
    hub_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{os.environ.get('PATH', '')}{os.pathsep}{BIN}",
        "FEDCLINIC_DATA": str(shared_data),
        "FEDCLINIC_EDGE_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    # One shell runs the block as written, `&` lines included (CODE=$(...) is used on the next line); its own
    # session, so that the hub and the node it started in the background stop with it.
    # Output to a file, not a pipe: the background processes keep their copy of it open.
    log = tmp_path / "federation.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script.replace("8443", str(hub_port))],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        returncode = proc.wait(timeout=300)
        assert returncode == 0, log.read_text(errors="replace")[-6000:]

        def hub(*args: str) -> Any:
            done = subprocess.run(
                ["fedclinic-hub", *args, "--format", "json"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            return json.loads(done.stdout)

        (node,) = hub("nodes", "list")["nodes"]
        assert (node["node_name"], node["state"]) == ("clinic-a", "active"), node
        assert node["last_heartbeat"] is not None
        round_ = hub("rounds", "status", "1")
        assert (round_["state"], round_["accepted"], round_["nodes"]) == ("published", 1, [node["node_id"]])
        (publication,) = hub("models", "list")["publications"]
        assert (publication["record"]["model_id"], publication["record"]["model_version"]) == (
            "pneumonia-student",
            "1.0.0",
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
