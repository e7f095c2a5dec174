"""Fixtures of the whole-flow tests: one throwaway PostgreSQL server per session for the federation flows,
and a real hub on loopback for the flows that need one of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.federation import HubProcess, make_hub
from tests.support.postgres import PostgresCluster, find_pg_bin, postgres_cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL server for the session (Debian's binaries, an unprivileged user)."""
    if find_pg_bin() is None:
        pytest.fail("PostgreSQL binaries missing: apt-get install postgresql (the Makefile's system target)")
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture()
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A ``fedclinic-hub serve`` over HTTPS with its SQLite store, in the test's own directory."""
    server = make_hub(tmp_path / "hub")
    server.start()
    try:
        yield server
    finally:
        server.stop()
