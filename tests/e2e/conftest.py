"""Fixtures of the whole-flow tests: one throwaway PostgreSQL server per session for the federation flows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresCluster, find_pg_bin, postgres_cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL server for the session (Debian's binaries, an unprivileged user)."""
    if find_pg_bin() is None:
        pytest.fail("PostgreSQL binaries missing: apt-get install postgresql (the Makefile's system target)")
    with postgres_cluster() as cluster:
        yield cluster
