"""The kit, built once per test session from this source tree, and throwaway install targets for it.

Installing creates a system user and runs the node as that user, so these tests need root (as CI runs them);
each install goes to its own world-readable temp folder so the service user can reach it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SYSTEM_PYTHON = Path("/usr/bin/python3")


def signing_root() -> Path:
    """$FEDCLINIC_TEST_BUNDLE: bundle/ and keys/hub.key of the prebuilt test bundle."""
    env = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "build" / "dev-bundle"


@dataclass(frozen=True)
class BuiltKitInfo:
    path: Path
    key_fingerprint: str
    size_bytes: int
    seconds: float


def require_installable() -> None:
    if os.geteuid() != 0:
        pytest.skip("the installer creates a system user and a service: run these tests as root (CI does)")
    if not SYSTEM_PYTHON.is_file():
        pytest.skip("no system /usr/bin/python3 to run the kit with")
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    if version.returncode != 0:
        pytest.skip("the system python3 has no venv/ensurepip (apt install python3-venv)")
    if version.stdout.strip() != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"the system python3 is {version.stdout.strip()}; the kit is built for this interpreter")
    if shutil.which("runuser") is None:
        pytest.skip("runuser (util-linux) is missing")


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> BuiltKitInfo:
    """A real CPU kit with the test bundle, signed with the test bundle's hub key (pip downloads wheels)."""
    from export.signing import load_private_key
    from installers.kit_builder import BuildOptions, build_kit

    require_installable()
    root = signing_root()
    key_file, bundle = root / "keys" / "hub.key", root / "bundle"
    if not key_file.is_file() or not (bundle / "manifest.json").is_file():
        pytest.skip(f"no test bundle with its signing key at {root} (make test-bundle)")
    out = tmp_path_factory.mktemp("kit-build") / "kit"
    built = build_kit(BuildOptions(out=out, bundle=bundle), load_private_key(key_file))
    os.chmod(out.parent, 0o755)
    return BuiltKitInfo(out, built.key_fingerprint, built.size_bytes, built.seconds)


def offline_env(kit_path: Path) -> dict[str, str]:
    """No package index reachable: pip may only look at the kit (and the installer ignores even that)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(kit_path / "wheelhouse"),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # discard port on loopback: nothing answers
        "PIP_CONFIG_FILE": os.devnull,
        "COLUMNS": "200",
    }


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A temp folder the service user can traverse (pytest's own tmp folders are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="fcinst-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service_user() -> Iterator[str]:
    """A fresh user name; the user the installer creates is removed afterwards."""
    name = f"fci{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        try:
            pwd.getpwnam(name)
        except KeyError:
            pass
        else:
            subprocess.run(["userdel", name], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
