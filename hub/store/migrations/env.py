"""Alembic environment: migrations run on the connection handed over by ``Database.migrate``."""

from __future__ import annotations

from alembic import context

from hub.store.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run hub migrations through `fedclinic-hub init` (Database.migrate), not bare alembic")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
