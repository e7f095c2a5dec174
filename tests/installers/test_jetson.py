"""Jetson detection from fixture files: aarch64, /etc/nv_tegra_release, the device-tree model."""

from __future__ import annotations

from pathlib import Path

import pytest

from installers.jetson import detect_jetson, parse_tegra_release

ORIN = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
)
NANO_JP6 = (
    "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
    "DATE: Wed Jan  8 01:49:37 UTC 2025\n"
)


def _root(tmp_path: Path, release: str | None, model: str | None = None) -> Path:
    if release is not None:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "nv_tegra_release").write_text(release)
    if model is not None:
        (tmp_path / "proc" / "device-tree").mkdir(parents=True)
        (tmp_path / "proc" / "device-tree" / "model").write_text(model + "\x00")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "l4t", "board"),
    [
        (ORIN, "35.4.1", "t186ref"),
        (NANO_JP6, "36.4.3", "generic"),
        ("# R32 (release), REVISION: 7.1", "32.7.1", None),
    ],
)
def test_parse_tegra_release(text: str, l4t: str, board: str | None) -> None:
    assert parse_tegra_release(text) == (l4t, board)


def test_orin_with_jetpack_5(tmp_path: Path) -> None:
    info = detect_jetson(_root(tmp_path, ORIN, "NVIDIA Jetson AGX Orin Developer Kit"), machine="aarch64")
    assert info is not None
    assert (info.l4t, info.jetpack, info.board) == ("35.4.1", "5.1.2", "t186ref")
    assert info.model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert "JetPack 5.1.2" in info.describe()


def test_jetpack_6_and_unknown_release(tmp_path: Path) -> None:
    info = detect_jetson(_root(tmp_path, NANO_JP6), machine="aarch64")
    assert info is not None and info.jetpack == "6.2" and info.model is None
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R39 (release), REVISION: 1.0, BOARD: x")
    later = detect_jetson(tmp_path, machine="aarch64")
    assert later is not None and later.jetpack is None and "unknown" in later.describe()


def test_not_a_jetson(tmp_path: Path) -> None:
    pc = tmp_path / "pc"
    pc.mkdir()
    assert detect_jetson(_root(pc, ORIN), machine="x86_64") is None  # a release file on a PC is ignored
    pi = tmp_path / "pi"
    pi.mkdir()
    assert detect_jetson(pi, machine="aarch64") is None  # aarch64 without L4T (e.g. a Raspberry Pi)
    (pc / "etc" / "nv_tegra_release").write_text("garbage")
    assert detect_jetson(pc, machine="aarch64") is None
