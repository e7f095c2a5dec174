"""Machine checks: can this PC run a node? OS, cores, memory, disk, Python, GPU, ports, clock."""

from __future__ import annotations

import email.utils
import os
import platform
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from installers.jetson import detect_jetson

__all__ = ["Check", "MachineProbe", "check_clock", "clock_skew", "run_checks"]

Status = Literal["ok", "warn", "fail", "info"]

MIN_MEMORY = 2 * 1024**3
GOOD_MEMORY = 4 * 1024**3
MIN_DISK = 2 * 1024**3
GOOD_DISK = 10 * 1024**3
MAX_SKEW_SECONDS = 60.0


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, what was seen, and what to do about it."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MachineProbe:
    """What to check against: where the data goes, which port the node listens on, the hub and a model."""

    data_dir: Path
    node_host: str = "0.0.0.0"
    node_port: int = 11112
    hub_url: str | None = None
    model: Path | None = None  # an ONNX file to test which execution providers really load
    root: Path = Path("/")  # lets tests point the OS / Jetson checks at fixture files
    port_owned_by_node: bool = False  # doctor: the running node itself holds the port


def _check_os(root: Path) -> Check:
    if platform.system() != "Linux":
        return Check(
            "operating system",
            "fail",
            platform.system(),
            "the edge node runs on Linux; see docs/installer.md for Windows",
        )
    name = platform.platform()
    try:
        for line in (root / "etc" / "os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return Check("operating system", "ok", f"{name}, {platform.machine()}")


def _check_cores() -> Check:
    cores = os.cpu_count() or 1
    if cores < 2:
        return Check("CPU cores", "warn", f"{cores}", "one core works but studies queue while the model runs")
    return Check("CPU cores", "ok", str(cores))


def _memory_bytes(root: Path) -> int | None:
    try:
        for line in (root / "proc" / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_memory(root: Path) -> Check:
    total = _memory_bytes(root)
    if total is None:
        return Check("memory", "warn", "unknown (no /proc/meminfo)")
    detail = f"{total / 1024**3:.1f} GiB"
    if total < MIN_MEMORY:
        return Check("memory", "fail", detail, "the node needs at least 2 GiB of memory")
    if total < GOOD_MEMORY:
        return Check("memory", "warn", detail, "4 GiB or more is recommended")
    return Check("memory", "ok", detail)


def _check_disk(data_dir: Path) -> Check:
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    detail = f"{free / 1024**3:.1f} GiB free at {probe} (for the study spool in {data_dir})"
    if free < MIN_DISK:
        return Check("disk", "fail", detail, "free space or choose another data directory (2 GiB minimum)")
    if free < GOOD_DISK:
        return Check("disk", "warn", detail, "10 GiB or more is recommended for the spool")
    return Check("disk", "ok", detail)


def _check_python() -> Check:
    version = platform.python_version()
    return Check("python", "ok", f"{version} ({sys.executable})")


def _check_gpu(root: Path) -> Check:
    jetson = detect_jetson(root)
    if jetson is not None:
        return Check("GPU", "ok", f"Jetson: {jetson.describe()}")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("GPU", "info", "no NVIDIA GPU found (no nvidia-smi); the node runs on the CPU")
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("GPU", "warn", f"nvidia-smi failed: {exc}", "check the NVIDIA driver")
    if listed.returncode != 0:
        return Check("GPU", "warn", "nvidia-smi found no working GPU", "check the NVIDIA driver (nvidia-smi)")
    return Check("GPU", "ok", "; ".join(listed.stdout.strip().splitlines()))


def _check_providers(model: Path | None) -> Check:
    """Which ONNX Runtime execution providers this build offers, and which ones a session really gets."""
    try:
        import onnxruntime as ort
    except ImportError:
        return Check("ONNX Runtime", "fail", "onnxruntime is not installed", "reinstall from the kit")
    available = list(ort.get_available_providers())
    if model is None or not model.is_file():
        return Check(
            "ONNX Runtime",
            "info",
            f"{ort.__version__}; offers {', '.join(available)} (not loaded: no model yet)",
        )
    loads = []
    for provider in available:
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # a provider that cannot load says why below, not in ORT's log
            session = ort.InferenceSession(str(model), sess_options=options, providers=[provider])
            got = session.get_providers()[0]
        except Exception:
            continue
        if got == provider:
            loads.append(provider)
    missing = [p for p in available if p not in loads]
    detail = f"{ort.__version__}; loads {', '.join(loads) or 'nothing'}"
    if missing:
        detail += f"; offered but does not load: {', '.join(missing)}"
        return Check(
            "ONNX Runtime", "warn", detail, "GPU providers need the matching CUDA/cuDNN/TensorRT libraries"
        )
    return Check("ONNX Runtime", "ok", detail)


def _check_port(host: str, port: int, owned_by_node: bool) -> Check:
    name = f"port {port}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if owned_by_node:
                return Check(name, "ok", f"in use on {host} (by the node, as expected)")
            return Check(
                name,
                "fail",
                f"cannot listen on {host}:{port}: {exc.strerror}",
                "another program uses this port; stop it or choose another DICOM port",
            )
    if owned_by_node:
        return Check(
            name, "fail", f"nothing listens on {host}:{port}", "the node is not running; start the service"
        )
    return Check(name, "ok", f"free on {host}")


def clock_skew(hub_url: str, timeout: float = 10.0) -> float:
    """Seconds this clock is ahead of the hub's (from the HTTP Date header of any answer)."""
    # Only the Date header is read and nothing is sent, so certificate checks are not needed here; the
    # enrollment pins the hub's certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(hub_url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            date = response.headers.get("Date")
    except urllib.error.HTTPError as exc:  # a 401/404 still carries the hub's clock
        date = exc.headers.get("Date")
    local = time.time()
    if not date:
        raise OSError("the hub's answer has no Date header")
    return local - email.utils.parsedate_to_datetime(date).timestamp()


def check_clock(hub_url: str | None) -> Check:
    if not hub_url:
        return Check("clock", "info", "no hub address given; clock not compared")
    try:
        skew = clock_skew(hub_url)
    except (OSError, ValueError) as exc:
        return Check(
            "clock",
            "warn",
            f"hub {hub_url} not reached: {exc}",
            "check that HTTPS to the hub is allowed out (and HTTPS_PROXY if the clinic uses a proxy)",
        )
    detail = f"{skew:+.1f} s against the hub"
    if abs(skew) > MAX_SKEW_SECONDS:
        return Check("clock", "fail", detail, "set the clock right (enable NTP: timedatectl set-ntp true)")
    return Check("clock", "ok", detail)


def run_checks(probe: MachineProbe) -> list[Check]:
    return [
        _check_os(probe.root),
        _check_cores(),
        _check_memory(probe.root),
        _check_disk(probe.data_dir),
        _check_python(),
        _check_gpu(probe.root),
        _check_providers(probe.model),
        _check_port(probe.node_host, probe.node_port, probe.port_owned_by_node),
        check_clock(probe.hub_url),
    ]
