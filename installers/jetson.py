"""NVIDIA Jetson detection: aarch64 + /etc/nv_tegra_release, the L4T release and its JetPack."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JETPACK_BY_L4T", "JetsonInfo", "detect_jetson", "parse_tegra_release"]

#: L4T (Linux for Tegra) release → JetPack release, from NVIDIA's JetPack archive. The onnxruntime-gpu wheel
#: for a Jetson must match the JetPack (CUDA, cuDNN and TensorRT versions come with it).
JETPACK_BY_L4T = {
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
}

_RELEASE = re.compile(r"#\s*R(?P<major>\d+)\s*\(release\),\s*REVISION:\s*(?P<revision>[\d.]+)", re.IGNORECASE)
_BOARD = re.compile(r"BOARD:\s*(?P<board>[\w.-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class JetsonInfo:
    l4t: str  # e.g. "35.4.1"
    jetpack: str | None  # None when the L4T release is newer than this table
    board: str | None  # from nv_tegra_release, e.g. "t186ref"
    model: str | None  # from the device tree, e.g. "NVIDIA Jetson AGX Orin Developer Kit"

    def describe(self) -> str:
        jetpack = f"JetPack {self.jetpack}" if self.jetpack else "JetPack unknown to this installer"
        return f"{self.model or 'NVIDIA Jetson'}, L4T {self.l4t} ({jetpack})"


def parse_tegra_release(text: str) -> tuple[str, str | None] | None:
    """(L4T version, board) from the first line of /etc/nv_tegra_release, or None when it is not one."""
    match = _RELEASE.search(text)
    if match is None:
        return None
    revision = match["revision"]
    parts = revision.split(".")
    # "REVISION: 4.1" of R35 is L4T 35.4.1; "REVISION: 1.0" of R35 is 35.1.0.
    l4t = ".".join([match["major"], *parts, *(["0"] * (2 - len(parts)))][:3])
    board = _BOARD.search(text)
    return l4t, board["board"] if board else None


def detect_jetson(root: Path = Path("/"), machine: str | None = None) -> JetsonInfo | None:
    """The Jetson this runs on, or None; ``root`` and ``machine`` let tests point at fixture files."""
    import platform

    if (machine or platform.machine()) != "aarch64":
        return None
    release_file = root / "etc" / "nv_tegra_release"
    try:
        parsed = parse_tegra_release(release_file.read_text(errors="replace"))
    except OSError:
        return None
    if parsed is None:
        return None
    l4t, board = parsed
    try:
        text = (root / "proc" / "device-tree" / "model").read_text(errors="replace")
        model: str | None = text.strip("\x00\n ") or None
    except OSError:
        model = None
    return JetsonInfo(l4t=l4t, jetpack=JETPACK_BY_L4T.get(l4t), board=board, model=model)
