"""The Orthanc harness picks new ports when another process took a picked one before Orthanc bound it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from harness.demo import orthanc as orthanc_module
from harness.demo.orthanc import Orthanc, orthanc_available


@pytest.mark.skipif(not orthanc_available(), reason="needs Orthanc (apt-get install orthanc)")
def test_a_port_taken_after_it_was_picked_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: Orthanc cannot bind it, nothing answers there
        busy = taken.getsockname()[1]
        picks = iter([busy, orthanc_module.free_port()])
        real = orthanc_module.free_port
        monkeypatch.setattr(orthanc_module, "free_port", lambda: next(picks, None) or real())
        server = Orthanc(workdir=tmp_path / "orthanc").start()
        try:
            assert server.http_port != busy
            assert server.system()["DicomAet"] == server.aet
        finally:
            server.stop()
