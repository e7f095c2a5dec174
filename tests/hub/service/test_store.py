"""The hub store's migrations build the same schema on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from hub.store.database import open_database
from hub.store.schema import Base
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.hub

TABLES = {"nodes", "credentials", "artifacts", "rounds", "tasks", "updates", "publications", "audit_log"}


def _check(url: str) -> None:
    db = open_database(url)
    try:
        assert db.current_revision() == db.head_revision() == "0003"
        names = set(inspect(db.engine).get_table_names())
        assert names >= TABLES and "alembic_version" in names
        for table in Base.metadata.sorted_tables:  # the migration and the models agree column by column
            migrated = {c["name"] for c in inspect(db.engine).get_columns(table.name)}
            assert migrated == {c.name for c in table.columns}, table.name
        assert db.migrate() == "0003"  # running it again is a no-op
    finally:
        db.close()


def test_sqlite_store_migrates_and_uses_wal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    _check(url)
    db = open_database(url, migrate=False)
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        db.close()


@pytest.mark.slow
def test_postgres_store_migrates(pg: PostgresCluster) -> None:
    _check(pg.create_database(f"store_{os.urandom(4).hex()}"))
