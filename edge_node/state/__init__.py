"""The node's durable state in SQLite, split by concern: schema, ingest records, runs, status, models, and the
input envelope monitor."""
