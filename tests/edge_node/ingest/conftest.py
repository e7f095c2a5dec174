"""Ingest fixtures: every listener test runs in every receive mode (``mode``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_node.ingest.listener import ReceiveTransport


@dataclass(frozen=True)
class ReceiveMode:
    """How the listener receives: its transport, and (native) how many receiver processes (0: threads)."""

    transport: ReceiveTransport
    processes: int = 0


#: The native transport in the node's process (threads), in two receiver processes, and pynetdicom.
THREADS = ReceiveMode("native")
PROCESSES = ReceiveMode("native", processes=2)
PYNETDICOM = ReceiveMode("pynetdicom")


@pytest.fixture(params=[THREADS, PROCESSES, PYNETDICOM], ids=["native", "processes", "pynetdicom"])
def mode(request: pytest.FixtureRequest) -> ReceiveMode:
    """The receive mode under test (``receive_transport``, ``receive_processes``)."""
    value: ReceiveMode = request.param
    return value
