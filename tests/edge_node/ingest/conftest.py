"""Ingest fixtures: every listener test runs against both receive transports."""

from __future__ import annotations

import pytest

from edge_node.ingest.listener import ReceiveTransport


@pytest.fixture(params=["native", "pynetdicom"])
def transport(request: pytest.FixtureRequest) -> ReceiveTransport:
    """The receive transport under test (``receive_transport``)."""
    value: ReceiveTransport = request.param
    return value
