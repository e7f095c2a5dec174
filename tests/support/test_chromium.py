"""The browser helper itself: a session it opens leaves no Chromium process behind."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support.chromium import chromium_paths, headless_chromium

pytestmark = pytest.mark.skipif(chromium_paths() is None, reason="needs chromium and chromium-driver")


def _browsers_on(profile: Path) -> list[str]:
    """Pids of the processes started with this profile (the browser and its helpers)."""
    pattern = f"--user-data-dir={profile}"
    return subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()


def test_a_closed_session_leaves_no_browser_running(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    with headless_chromium(profile) as browser:
        browser.get("data:text/html,<title>fedclinic</title>")
        assert browser.title() == "fedclinic"
        assert _browsers_on(profile)
    deadline = time.monotonic() + 10
    while _browsers_on(profile) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _browsers_on(profile) == []
