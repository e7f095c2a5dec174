"""Failures in plain words (a closed port, an AE title the PACS does not know, ours it does not know), what
arrives from the PACS, and the clock check against the hub's HTTP Date header."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import pytest
from pynetdicom import AE

from installers.machine import check_clock, clock_skew
from installers.pacs import InboundProbe, echo
from tests.installers.conftest import free_port


@pytest.fixture
def strict_pacs() -> Iterator[int]:
    """A DICOM SCP that checks both AE titles as a strict PACS does: called PACS, only FEDCLINIC may call."""
    scp = AE(ae_title="PACS")
    scp.add_supported_context("1.2.840.10008.1.1")
    scp.require_called_aet = True
    scp.require_calling_aet = ["FEDCLINIC"]
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()


def test_echo_ok_and_each_failure_in_words(strict_pacs: int) -> None:
    assert echo("127.0.0.1", strict_pacs, "PACS", "FEDCLINIC", timeout=5).ok

    wrong_called = echo("127.0.0.1", strict_pacs, "PACSX", "FEDCLINIC", timeout=5)
    assert not wrong_called.ok and "does not recognise the AE title 'PACSX'" in wrong_called.problem
    assert "exact AE title" in wrong_called.fix

    wrong_calling = echo("127.0.0.1", strict_pacs, "PACS", "STRANGER", timeout=5)
    assert not wrong_calling.ok and "does not know this node's AE title 'STRANGER'" in wrong_calling.problem

    closed = free_port()
    wrong_port = echo("127.0.0.1", closed, "PACS", "FEDCLINIC", timeout=5)
    assert not wrong_port.ok and f"refuses connections on port {closed}" in wrong_port.problem
    assert "DICOM port" in wrong_port.fix


def test_inbound_probe_shows_what_arrives() -> None:
    port = free_port()
    with InboundProbe("FEDCLINIC", "127.0.0.1", port) as probe:
        assert echo("127.0.0.1", port, "FEDCLINIC", "ORTHANC", timeout=5).ok
        (arrival,) = probe.wait(5)
    assert (arrival.kind, arrival.calling_ae) == ("C-ECHO", "ORTHANC")


class _DateHandler(http.server.BaseHTTPRequestHandler):
    offset = 0.0

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(time.time() + self.offset, usegmt=True)

    def do_HEAD(self) -> None:
        self.send_response(401)  # a hub answers an anonymous request with 401: it still has a Date
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("offset", "status"), [(0.0, "ok"), (-300.0, "fail")])
def test_clock_skew_from_the_date_header(offset: float, status: str) -> None:
    handler = type("Handler", (_DateHandler,), {"offset": offset})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/openapi.json"
        assert abs(clock_skew(url) + offset) < 5  # our clock is ahead by -offset
        check = check_clock(url)
        assert check.status == status
        if status == "fail":
            assert "NTP" in check.fix
    finally:
        server.shutdown()
        server.server_close()
