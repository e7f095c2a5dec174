"""Connection floods from one address (127.0.0.2) leave the PACS (127.0.0.1) answered within a stated time."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edge_node.errors import ConfigError
from edge_node.ingest.listener import Listener, ListenerConfig
from edge_node.ingest.spool import Spool
from edge_node.node import Node
from edge_node.settings import load_settings
from edge_node.state.node_state import NodeState
from tests.edge_node.conftest import acknowledged_files, echoscu, make_ct_instances, storescu
from tests.edge_node.ingest.conftest import ReceiveMode

#: The stated bound: a legitimate C-ECHO, and a C-STORE of one image, each answered within this time while
#: the flood holds every connection its address may have, plus LOAD_ALLOWANCE times the slowest answer the
#: same listener gave moments before, unflooded. Unloaded, answers take 0.05-0.3 s, so the bound is about
#: 2.7 s and still fails on a PACS whose connection request the kernel dropped twice (1 s + 2 s of SYN
#: retries: what a listen backlog of 5 gave). On a box busy with other work the unflooded answers slow too
#: and the bound widens with them: a fixed 3 s failed once at 3.16 s in a CI run beside two benchmark
#: processes (measured since, six CPU-bound processes on the two cores: unflooded answers up to 0.18 s,
#: flooded up to 1.4 s, bound 3.0-3.2 s).
ANSWER_WITHIN_S = 2.5
LOAD_ALLOWANCE = 4
FLOOD_FROM = "127.0.0.2"  # Linux routes all of 127/8 to loopback: a second source address on one machine
PER_PEER = 3


@pytest.fixture
def listener(tmp_path: Path, mode: ReceiveMode) -> Iterator[Listener]:
    store = NodeState.open(tmp_path / "edge.sqlite3")
    spool = Spool(tmp_path / "spool", store.ingest, max_instance_bytes=10**8, min_free_bytes=0)
    config = ListenerConfig(
        "EDGE",
        "127.0.0.1",
        0,
        max_associations=6,
        max_associations_per_peer=PER_PEER,
        acse_timeout=2.0,
        network_timeout=4.0,
        transport=mode.transport,
        receive_processes=mode.processes,
    )
    running = Listener(config, spool, lambda: None)
    running.start()
    yield running
    running.stop()
    store.close()


def _silent(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(FLOOD_FROM, 0))
    return s


#: A flooding host: connect from the given address to the given port and drop the connection at once, until
#: killed. It drops with a reset (SO_LINGER 0): a graceful close would leave each of its ~2,400 connections a
#: second in TIME_WAIT for a minute, and within seconds those hold every ephemeral port of the machine, so the
#: next test's clients could not connect at all (measured: one run of this test left 14,071 of the 14,116
#: odd-numbered ephemeral ports in TIME_WAIT, and bind() had spilled into the even ones connect() draws from).
#: It runs at the lowest CPU priority: a flooding host is another machine, and on this one two churners
#: spinning at full priority took the CPU from the listener and the PACS's client, so that a C-STORE
#: waited on the scheduler, not on the listener's defences (4.0-4.1 s in two CI runs on a loaded box).
_CHURN = """
import contextlib, os, socket, struct, sys
os.nice(19)
source, port = sys.argv[1], int(sys.argv[2])
reset = struct.pack("ii", 1, 0)
while True:
    with contextlib.suppress(OSError):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
        s.close()
"""


def _timed(fn: Callable[[], bool]) -> float:
    t0 = time.monotonic()
    assert fn()
    return time.monotonic() - t0


@dataclass
class _Bound:
    """ANSWER_WITHIN_S widened by what the box's load does to the same answers without a flood."""

    unflooded_s: float

    @property
    def seconds(self) -> float:
        return ANSWER_WITHIN_S + LOAD_ALLOWANCE * self.unflooded_s

    def check(self, fn: Callable[[], bool], what: str) -> None:
        took = _timed(fn)
        load = os.getloadavg()[0]
        assert took < self.seconds, (
            f"{what} answered in {took:.2f} s under the flood, bound {self.seconds:.2f} s "
            f"(the slowest unflooded answer here {self.unflooded_s:.2f} s; load average {load:.1f})"
        )


def test_floods_from_one_address_leave_the_pacs_answered(
    listener: Listener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = listener.address[1]
    image = make_ct_instances(tmp_path / "ct", 1)

    def store_one() -> bool:
        proc = storescu(port, image)
        return len(acknowledged_files(proc.stdout + proc.stderr)[0]) == 1

    def echo_one() -> bool:
        return echoscu(port)

    # 0. The same answers without a flood, to see what the box's load does to them.
    bound = _Bound(max(_timed(op) for op in (echo_one, store_one) * 3))

    # 1. Idle sockets: 50 TCP connections that never speak.
    silent = [_silent(port) for _ in range(50)]
    time.sleep(0.3)
    bound.check(echo_one, "C-ECHO")
    bound.check(store_one, "C-STORE")

    # 2. Connect-and-close in a loop from the same address, while the PACS talks. The churners are processes
    #    of their own, as a flooding host is: threads here would share the listener's interpreter lock.
    churners = [subprocess.Popen([sys.executable, "-c", _CHURN, FLOOD_FROM, str(port)]) for _ in range(2)]
    time.sleep(0.5)  # the flood is on before the PACS talks
    try:
        for _ in range(3):
            bound.check(echo_one, "C-ECHO")
        bound.check(store_one, "C-STORE")
        assert all(c.poll() is None for c in churners)  # still flooding
    finally:
        for c in churners:
            c.kill()
            c.wait()
    for s in silent:
        s.close()

    # 3. Idle associations from the flooding address: as many as it may hold, plus some it may not.
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="EDGE", bind_address=(FLOOD_FROM, 0)) for _ in range(6)]
    assert sum(a.is_established for a in held) <= PER_PEER
    bound.check(echo_one, "C-ECHO")
    bound.check(store_one, "C-STORE")
    for a in held:
        if a.is_established:
            a.release()

    # Silent connections are closed by the ACSE timeout, so the address gets its slots back.
    time.sleep(2.5)
    assert listener.open_connections(FLOOD_FROM) == 0
    refusals = [r for r in caplog.records if "refused connections from" in r.getMessage()]
    assert refusals and all(FLOOD_FROM in r.getMessage() for r in refusals)
    assert len(refusals) <= 3  # rate-limited: a flood does not flood the log


def test_connections_reset_by_their_peer_end_quietly(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    """A port scanner or a flooding host drops its connections with a reset: each ends as a close does, with
    no error line (pynetdicom would write two and a traceback for every one)."""
    port = listener.address[1]
    for _ in range(PER_PEER):  # as many as the address may hold: none refused, each reaches the association
        s = _silent(port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        time.sleep(0.1)
    deadline = time.monotonic() + 5  # pynetdicom's association notices only at the ACSE timeout (2 s)
    while listener.open_connections(FLOOD_FROM) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener.open_connections(FLOOD_FROM) == 0
    assert echoscu(port)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_listener_settings_reach_the_transport(listener: Listener) -> None:
    native = listener.native_server
    if native is not None:
        settings = native.settings
        assert (settings.max_associations, settings.acse_timeout, settings.network_timeout) == (6, 2.0, 4.0)
        assert (settings.per_peer, settings.max_pdu) == (PER_PEER, 1024 * 1024)
        return
    ae = listener._ae
    assert (ae.maximum_associations, ae.acse_timeout, ae.network_timeout) == (6, 2.0, 4.0)
    assert ae.maximum_pdu_size == 1024 * 1024  # bounded by default, never 0 (unlimited)
    logging.getLogger(__name__).debug("settings %s", ae.dimse_timeout)


def test_the_node_passes_its_listener_settings_through(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        data_dir=tmp_path / "data",
        port=0,
        max_pdu_bytes=65536,
        max_associations=7,
        max_associations_per_peer=2,
        network_timeout_s=12.0,
        receive_transport="native",
    )
    node = Node(settings)
    try:
        config = node.listener.config
        assert (config.max_pdu, config.max_associations, config.max_associations_per_peer) == (65536, 7, 2)
        assert node.listener._ae.maximum_pdu_size == 65536
        assert config.network_timeout == 12.0
        assert config.transport == "native"
    finally:
        node.state.close()
    # 0 would mean unlimited in DICOM: refused, naming the key.
    with pytest.raises(ConfigError, match="max_pdu_bytes"):
        load_settings(None, data_dir=tmp_path / "data", max_pdu_bytes=0)
