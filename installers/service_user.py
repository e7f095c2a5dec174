"""The dedicated unprivileged user the node runs as: created with useradd --system when missing."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from installers.errors import StepError

__all__ = ["ServiceUser", "ensure_service_user", "run_as"]


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int


def ensure_service_user(name: str, home: Path) -> ServiceUser:
    """The user ``name``; created as a system user without login shell when it does not exist yet."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        nologin = shutil.which("nologin") or "/usr/sbin/nologin"
        done = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(home),
             "--shell", nologin, "--comment", "fedclinic edge node", name],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise StepError(
                f"creating the service user {name!r} failed: {done.stderr.strip()}; run the installer as root"
            ) from None
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise StepError(f"{name!r} is root; the node must run as an unprivileged user, choose another name")
    return ServiceUser(name, entry.pw_uid, entry.pw_gid)


def run_as(user: ServiceUser, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as the service user (runuser keeps the environment the caller sets in ``env``)."""
    return subprocess.run(  # type: ignore[call-overload]
        ["runuser", "-u", user.name, "--", *command], capture_output=True, text=True, **kwargs
    )
