"""Ingest fixtures: every listener test runs in every receive mode (``mode``)."""

from __future__ import annotations

import os
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


MODES = {"native": THREADS, "processes": PROCESSES, "pynetdicom": PYNETDICOM}
#: ``FEDCLINIC_TEST_RECEIVE_MODES`` (comma-separated ids) narrows the modes: the edge-only packaging test
#: runs the listener suite once more in a fresh environment, in the node's default mode only.
_CHOSEN = [m for m in os.environ.get("FEDCLINIC_TEST_RECEIVE_MODES", ",".join(MODES)).split(",") if m]


@pytest.fixture(params=[MODES[m] for m in _CHOSEN], ids=_CHOSEN)
def mode(request: pytest.FixtureRequest) -> ReceiveMode:
    """The receive mode under test (``receive_transport``, ``receive_processes``)."""
    value: ReceiveMode = request.param
    return value
