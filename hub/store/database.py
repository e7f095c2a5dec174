"""Opening the hub database: engine, sessions, Alembic migrations; SQLite in WAL mode, or PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "open_database"]

logger = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run while a writer commits; busy_timeout makes concurrent writers wait, not fail.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Database:
    """One engine and session factory per process, built from a SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            # A pool larger than the API's thread pool (40): opening a connection (and its pragmas) per
            # request when the pool overflows costs more than the query.
            self.engine: Engine = create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False},
                pool_size=48,
                max_overflow=16,
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on any exception."""
        with self.sessions() as session, session.begin():
            yield session

    def _alembic_config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        return cfg

    def migrate(self) -> str:
        """Bring the schema to the newest migration; returns the revision now in place."""
        cfg = self._alembic_config()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        head = self.current_revision()
        logger.info("hub store at migration %s (%s)", head, self.dialect)
        return head or ""

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def describe(self) -> str:
        """The URL without its password, safe to print."""
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()


def open_database(url: str, *, migrate: bool = True) -> Database:
    db = Database(url)
    if migrate:
        db.migrate()
    return db
