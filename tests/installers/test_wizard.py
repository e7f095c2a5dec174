"""Must-show 4: the wizard, driven interactively in a real terminal (a pty through pexpect), completes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pexpect
import pytest

from harness.demo.orthanc import Orthanc
from tests.installers.conftest import SYSTEM_PYTHON, BuiltKitInfo, free_port, offline_env

pytestmark = pytest.mark.slow


def test_interactive_wizard_completes(
    kit: BuiltKitInfo, world_dir: Path, service_user: str, orthanc: Orthanc
) -> None:
    prefix, config = world_dir / "opt", world_dir / "etc" / "edge.toml"
    # Paths only (so the test stays out of /etc and /opt); every question is answered at the prompt.
    answers = world_dir / "paths.toml"
    answers.write_text(
        f'prefix = "{prefix}"\nconfig_path = "{config}"\nunit_dir = "{world_dir / "units"}"\n'
        f'data_dir = "{world_dir / "data"}"\nservice_user = "{service_user}"\nlisten_host = "127.0.0.1"\n'
    )
    port = free_port()
    env = {**offline_env(kit.path), "TERM": "xterm"}
    wizard = pexpect.spawn(
        str(SYSTEM_PYTHON),
        [str(kit.path / "install.py"), "--prefix", str(prefix), "--answers", str(answers)],
        env=env,
        encoding="utf-8",
        timeout=300,
        dimensions=(50, 200),
    )
    log = (world_dir / "wizard.log").open("w")
    wizard.logfile_read = log
    dialogue = [
        (r"This node's AE title", "WIZNODE"),
        (r"This node's DICOM port", str(port)),
        (r"AE titles allowed to send studies", ""),
        (r"Data directory", ""),
        (r"its AE title", orthanc.aet),
        (r"its address", "127.0.0.1"),
        (r"its DICOM port", str(orthanc.dicom_port)),
        (r"Join code", ""),
        (r"Test a C-ECHO or study sent from the PACS", "n"),
        (r"Send a test report to the PACS", "y"),
        (rf"Is {kit.key_fingerprint} the key fingerprint", "y"),
    ]
    started = time.monotonic()
    try:
        for question, answer in dialogue:
            wizard.expect(question)
            wizard.sendline(answer)
        wizard.expect(r"installed in")
        wizard.expect(pexpect.EOF)
    finally:
        wizard.close()
        log.close()
    # The terminal got colours; the words are what the IT person reads.
    transcript = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", (world_dir / "wizard.log").read_text())
    assert wizard.exitstatus == 0, transcript
    assert "ok C-ECHO to" in transcript and "ok test report (SR) sent to" in transcript
    text = config.read_text()
    assert (
        'ae_title = "WIZNODE"' in text and f"port = {port}" in text and f"port = {orthanc.dicom_port}" in text
    )
    print(f"\ninteractive install took {time.monotonic() - started:.1f} s")
