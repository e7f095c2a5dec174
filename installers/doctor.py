"""`fedclinic-install doctor`: every check again, on the installed node, as a report an IT person can send."""

from __future__ import annotations

import os
import platform
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from installers.bootstrap import clean_environment
from installers.layout import InstallRecord, Layout
from installers.machine import Check, MachineProbe, run_checks
from installers.pacs import echo
from installers.service_user import ServiceUser, run_as
from installers.systemd_unit import UNIT_NAME, systemd_running, verify_unit

__all__ = ["diagnose", "report_text"]


def _config_checks(record: InstallRecord) -> tuple[list[Check], dict[str, Any]]:
    path = Path(record.config)
    try:
        info = path.stat()
        settings = tomllib.loads(path.read_text())
    except OSError as exc:
        return [
            Check("settings file", "fail", f"{path}: {exc.strerror}", "reinstall, or restore the file")
        ], {}
    except tomllib.TOMLDecodeError as exc:
        return [Check("settings file", "fail", f"{path} is not valid TOML: {exc}", "fix the syntax")], {}
    owner = pwd.getpwuid(info.st_uid).pw_name
    mode = stat.S_IMODE(info.st_mode)
    if owner != record.service_user or mode & 0o077:
        return [
            Check(
                "settings file",
                "fail",
                f"{path} is owned by {owner} with mode {mode:o}",
                f"chown {record.service_user} {path} && chmod 600 {path}",
            )
        ], settings
    return [Check("settings file", "ok", f"{path} (owner {owner}, mode {mode:o})")], settings


def _pacs_checks(settings: dict[str, Any], calling_ae: str) -> list[Check]:
    checks = []
    for dest in settings.get("destinations", []):
        try:
            host, port, called = str(dest["host"]), int(dest["port"]), str(dest["ae_title"])
        except (KeyError, TypeError, ValueError):
            checks.append(
                Check("PACS", "fail", f"destination {dest!r} is incomplete", "give ae_title, host and port")
            )
            continue
        outcome = echo(host, port, called, calling_ae, timeout=10.0)
        name = f"PACS {outcome.address}"
        if outcome.ok:
            checks.append(Check(name, "ok", f"C-ECHO answered in {outcome.milliseconds:.0f} ms"))
        else:
            fix = f"{outcome.fix}; then set host/port/ae_title of this destination in the settings file"
            checks.append(Check(name, "fail", outcome.problem, fix))
    if not checks:
        checks.append(Check("PACS", "info", "no destination configured: results stay in the data directory"))
    return checks


def _node_checks(record: InstallRecord, layout: Layout) -> list[Check]:
    checks = []
    binary = layout.edge_binary()
    if not binary.is_file():
        checks.append(Check("installation", "fail", f"{binary} is missing", "reinstall from the kit"))
        return checks
    checks.append(Check("installation", "ok", f"{layout.current.resolve()}"))
    unit = Path(record.unit_path)
    complaint = verify_unit(unit) if unit.is_file() else f"{unit} is missing"
    checks.append(
        Check("service unit", "fail", complaint, "reinstall from the kit")
        if complaint
        else Check("service unit", "ok", f"{unit} passes systemd-analyze verify")
    )
    if systemd_running():
        active = subprocess.run(["systemctl", "is-active", UNIT_NAME], capture_output=True, text=True)
        state = active.stdout.strip()
        checks.append(
            Check("service", "ok", "active")
            if state == "active"
            else Check(
                "service",
                "fail",
                state or "unknown",
                f"journalctl -u {UNIT_NAME}; systemctl restart {UNIT_NAME}",
            )
        )
    # The node answering its own DICOM port is the readiness that matters to the PACS.
    host = "127.0.0.1" if record.listen_host in ("0.0.0.0", "::") else record.listen_host
    own = echo(host, record.port, record.ae_title, record.ae_title, timeout=5.0)
    # A node that allows only the PACS's AE title rejects this test's calling AE: it is up all the same.
    alive = own.ok or "does not know this node's AE title" in own.problem
    checks.append(
        Check("node DICOM listener", "ok", f"{own.address} answers")
        if alive
        else Check("node DICOM listener", "fail", own.problem, "start the node (see the service check)")
    )
    return checks


def _hub_check(record: InstallRecord, layout: Layout) -> Check:
    """Ask the node about its hub link (enrollment, credential); a revoked credential is named with a fix."""
    try:
        user_entry = pwd.getpwnam(record.service_user)
    except KeyError:
        return Check("hub link", "fail", f"user {record.service_user} is missing", "reinstall from the kit")
    user = ServiceUser(record.service_user, user_entry.pw_uid, user_entry.pw_gid)
    binary = str(layout.edge_binary())
    done = run_as(
        user,
        [binary, "status", "--config", record.config, "--format", "json"],
        env=clean_environment(),
        timeout=60,
    )
    if done.returncode == 2 and "--format" in done.stderr:
        return Check("hub link", "info", "this fedclinic version does not report its hub link")
    import json

    try:
        status = json.loads(done.stdout)
    except ValueError:
        return Check("hub link", "warn", "the node's status could not be read", "run fedclinic-edge status")
    hub = status.get("hub") if isinstance(status, dict) else None
    if not isinstance(hub, dict) or not hub.get("enrolled"):
        return Check(
            "hub link", "info", "not enrolled", "fedclinic-edge enroll CODE (join code from the hub operator)"
        )
    # ``status --format json`` of the node: ``hub.last_error`` holds the hub's refusal, and a revoked
    # credential reads "this node was revoked at the hub (...)".
    problem = str(hub.get("last_error") or "")
    if "revoked" in problem.lower():
        return Check(
            "hub link",
            "fail",
            "the hub revoked this node's credential",
            "ask the hub operator for a new join code, then: fedclinic-edge enroll NEW-CODE",
        )
    if problem:
        return Check("hub link", "warn", problem, "check HTTPS to the hub (firewall, HTTPS_PROXY)")
    last_ok = hub.get("last_ok_at")
    if not isinstance(last_ok, (int, float)):
        return Check("hub link", "warn", f"enrolled with {hub.get('hub_url')} but not reached yet",
                     "start the node; check HTTPS to the hub (firewall, HTTPS_PROXY)")  # fmt: skip
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_ok))
    return Check("hub link", "ok", f"{hub.get('hub_url')} last reached {when}")


def diagnose(layout: Layout) -> tuple[InstallRecord, list[Check]]:
    record = layout.read_record()
    config_checks, settings = _config_checks(record)
    calling = str(settings.get("ae_title", record.ae_title))
    machine = run_checks(
        MachineProbe(
            data_dir=Path(record.data_dir),
            node_host=record.listen_host,
            node_port=record.port,
            hub_url=record.hub_url or None,
            port_owned_by_node=True,
        )
    )
    checks = machine + config_checks + _node_checks(record, layout) + _pacs_checks(settings, calling)
    checks.append(_hub_check(record, layout))
    return record, checks


def report_text(record: InstallRecord, checks: list[Check]) -> str:
    """Plain text for an e-mail to the hub operator: no patient data, only the checks."""
    lines = [
        f"fedclinic doctor report, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"host {platform.node()}, node AE {record.ae_title} port {record.port}, install {record.version_dir}",
        f"user {os.getuid()}",
        "",
    ]
    for check in checks:
        lines.append(f"[{check.status.upper():4}] {check.name}: {check.detail}")
        if check.fix and check.status in ("fail", "warn"):
            lines.append(f"       fix: {check.fix}")
    failed = [c.name for c in checks if c.status == "fail"]
    lines += ["", f"{len(failed)} problem(s)" + (f": {', '.join(failed)}" if failed else "")]
    return "\n".join(lines) + "\n"
