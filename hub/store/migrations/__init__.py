"""Alembic migrations of the hub store (run by ``hub.store.database.Database.migrate``)."""
