"""The node's systemd service: the unit text, verification, and starting it where systemd runs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from installers.errors import StepError

__all__ = ["UNIT_NAME", "UnitSpec", "exec_start", "render_unit", "systemd_running", "verify_unit"]

UNIT_NAME = "fedclinic-edge.service"


@dataclass(frozen=True)
class UnitSpec:
    """What the unit needs to know; ``edge_binary`` goes through PREFIX/current so upgrades switch it."""

    edge_binary: Path
    config: Path
    data_dir: Path
    user: str
    port: int
    memory_max: str = "4G"
    gpu: bool = False


def exec_start(spec: UnitSpec) -> list[str]:
    """The node's command line: the unit's ExecStart, also used verbatim where systemd does not run."""
    return [str(spec.edge_binary), "serve", "--config", str(spec.config)]


def render_unit(spec: UnitSpec) -> str:
    # A DICOM port below 1024 (104 is the standard one) needs this one capability and nothing else.
    privileged_port = spec.port < 1024
    capabilities = "CAP_NET_BIND_SERVICE" if privileged_port else ""
    lines = [
        "[Unit]",
        "Description=fedclinic edge node (DICOM listener, AI results back to the PACS)",
        "After=network-online.target",
        "Wants=network-online.target",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=10",
        "",
        "[Service]",
        # serve tells systemd when the listener is up (sd_notify READY=1): `systemctl start` waits for it.
        "Type=notify",
        "NotifyAccess=main",
        f"User={spec.user}",
        f"Group={spec.user}",
        f"Environment=FEDCLINIC_EDGE_CONFIG={spec.config}",
        "Environment=OMP_NUM_THREADS=1",
        "Environment=TCP_NODELAY=1",
        f"ExecStart={shlex.join(exec_start(spec))}",
        "Restart=on-failure",
        "RestartSec=5",
        # A first start on a GPU may build a TensorRT engine, which takes minutes.
        "TimeoutStartSec=900",
        "TimeoutStopSec=60",
        f"MemoryMax={spec.memory_max}",
        "TasksMax=256",
        "LimitNOFILE=8192",
        "UMask=0077",
        f"ReadWritePaths={spec.data_dir}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        # The GPU is a device file: a GPU node keeps /dev, a CPU node gets none.
        f"PrivateDevices={'no' if spec.gpu else 'yes'}",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        f"CapabilityBoundingSet={capabilities}",
        f"AmbientCapabilities={capabilities}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def systemd_running() -> bool:
    """True when systemd is PID 1 (sd_booted: /run/systemd/system exists)."""
    return Path("/run/systemd/system").is_dir()


def verify_unit(path: Path) -> str | None:
    """``systemd-analyze verify``'s complaint about the unit; None when it passes or the tool is absent."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    done = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    # Without systemd as PID 1 the tool still checks the unit; lines about other units are not ours.
    ours = [ln for ln in (done.stdout + done.stderr).splitlines() if path.name in ln]
    if done.returncode != 0 or ours:
        return "\n".join(ours) or (done.stderr.strip() or f"exit {done.returncode}")
    return None


def systemctl(*args: str) -> None:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise StepError(
            f"systemctl {' '.join(args)} failed: {done.stderr.strip()}; see journalctl -u {UNIT_NAME}"
        )
