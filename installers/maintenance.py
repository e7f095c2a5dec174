"""Upgrade (keeps settings and data, rolls back when the new version fails its self-test) and uninstall."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from installers.bootstrap import clean_environment
from installers.errors import StepError
from installers.layout import InstallRecord, Layout
from installers.service_user import ServiceUser, run_as
from installers.systemd_unit import UNIT_NAME, systemctl, systemd_running

__all__ = ["self_test", "uninstall", "upgrade"]


def _user(record: InstallRecord) -> ServiceUser:
    try:
        entry = pwd.getpwnam(record.service_user)
    except KeyError:
        raise StepError(
            f"the service user {record.service_user} is missing; reinstall from the kit"
        ) from None
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def self_test(version_dir: Path, record: InstallRecord) -> str | None:
    """Run the new version against the real settings, as the service user; the problem, or None when it works.

    It must import the node and its runtime, read the settings, and open the node's database and model.
    """
    user = _user(record)
    edge = version_dir / "venv" / "bin" / "fedclinic-edge"
    python = version_dir / "venv" / "bin" / "python"
    probes = [
        [str(python), "-c", "import edge_node.cli, onnxruntime, pynetdicom"],
        [str(edge), "status", "--config", record.config, "--limit", "1"],
    ]
    for command in probes:
        done = run_as(user, command, env=clean_environment(), timeout=300)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()[-400:]
            return f"{Path(command[0]).name} {' '.join(command[1:3])}: {said}"
    return None


def upgrade(layout: Layout, version_dir: Path) -> tuple[InstallRecord, str | None]:
    """Switch to ``version_dir`` if it passes its self-test; returns the record and why it did not."""
    record = layout.read_record()
    old = layout.current.resolve()
    if old == version_dir.resolve():
        return record, None
    problem = self_test(version_dir, record)
    if problem is not None:
        return record, f"the new version failed its self-test and was not activated: {problem}"
    layout.activate(version_dir)
    if systemd_running():
        try:
            systemctl("restart", UNIT_NAME)
        except StepError as exc:
            layout.activate(old)
            systemctl("restart", UNIT_NAME)
            return record, f"the new version did not start ({exc}); back on {old.name}"
    new = replace(record, version_dir=str(version_dir), previous_version_dir=str(old))
    layout.write_record(new)
    # Keep the current and the previous version only.
    for stale in (layout.prefix / "versions").iterdir():
        if stale.resolve() not in (version_dir.resolve(), old):
            shutil.rmtree(stale, ignore_errors=True)
    return new, None


def uninstall(layout: Layout, purge: bool) -> list[str]:
    """Remove the service and the software; settings and data stay unless ``purge``; returns what went."""
    record = layout.read_record()
    removed = []
    if systemd_running():
        subprocess.run(["systemctl", "disable", "--now", UNIT_NAME], capture_output=True, text=True)
    unit = Path(record.unit_path)
    if unit.is_file():
        unit.unlink()
        removed.append(str(unit))
        if systemd_running():
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
    shutil.rmtree(layout.prefix)
    removed.append(str(layout.prefix))
    if purge:
        config = Path(record.config)
        for path in (Path(record.data_dir), config.parent):
            if path.exists():
                shutil.rmtree(path)
                removed.append(str(path))
        subprocess.run(["userdel", record.service_user], capture_output=True, text=True)
        removed.append(f"user {record.service_user}")
    return removed
