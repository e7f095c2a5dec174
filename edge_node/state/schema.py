"""The SQLite schema of the node's state: one table per record kind, created at first open."""

from __future__ import annotations

__all__ = ["ADDED_COLUMNS", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA_VERSION = 5

#: Studies and their instances (ingest), runs and findings (analysis), the outbox (delivery), the model
#: registry with its activation log, (version 2) the clinic's labels with every change made to them, and
#: (version 3) each analysed image's input envelope result (bundles with an envelope), for the drift monitor,
#: with (version 4) its intensity part's result (NULL for envelopes without one, and for rows written before)
#: and (version 5) the features judged: the embedding and the grey-value features, float32 little-endian
#: bytes, kept for the latest rows of each model version only (``envelope_features``; NULL otherwise).
#: The outbox row carries what a C-STORE needs besides the bytes (SOP class and instance, transfer syntax),
#: so sending does not open the file to learn them.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL,
    first_received_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    results TEXT NOT NULL DEFAULT 'none'
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, last_instance_at);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'spooled'
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_id);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    revision INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    n_instances INTEGER NOT NULL,
    model_id TEXT,
    model_version TEXT,
    provider TEXT,
    reason TEXT,
    sr_uid TEXT,
    sr_series_uid TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_study ON runs (study_id);
CREATE TABLE IF NOT EXISTS findings (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    sop_instance_uid TEXT NOT NULL,
    score REAL NOT NULL,
    label TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS findings_by_run ON findings (run_id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs (id),
    study_id INTEGER NOT NULL REFERENCES studies (id),
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    dest_ae TEXT NOT NULL,
    dest_host TEXT NOT NULL,
    dest_port INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_try);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    model_id TEXT NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    installed_at REAL NOT NULL,
    UNIQUE (model_id, version)
);
CREATE TABLE IF NOT EXISTS activations (
    id INTEGER PRIMARY KEY,
    model_row INTEGER NOT NULL REFERENCES models (id),
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    scope TEXT NOT NULL CHECK (scope IN ('study', 'instance')),
    uid TEXT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('page', 'import')),
    who TEXT NOT NULL,
    labeled_at REAL NOT NULL,
    PRIMARY KEY (scope, uid)
);
CREATE TABLE IF NOT EXISTS label_history (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    uid TEXT NOT NULL,
    label TEXT NOT NULL,
    previous TEXT,
    source TEXT NOT NULL,
    who TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS envelope_results (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs (id),
    sop_instance_uid TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    outside INTEGER NOT NULL CHECK (outside IN (0, 1)),
    ratio REAL NOT NULL,
    quantile REAL NOT NULL,
    intensity_outside INTEGER CHECK (intensity_outside IN (0, 1)),
    negative INTEGER CHECK (negative IN (0, 1)),
    embedding BLOB,
    intensity_features BLOB
);
CREATE INDEX IF NOT EXISTS envelope_results_by_model ON envelope_results (model_id, model_version, id);
CREATE INDEX IF NOT EXISTS envelope_results_by_run ON envelope_results (run_id);
"""

#: Columns added to a table after it was first created: (table, column, its definition). ``CREATE TABLE IF
#: NOT EXISTS`` gives a new database the whole table; an older one gains each missing column when it opens,
#: NULL in the rows it already has.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("envelope_results", "intensity_outside", "INTEGER CHECK (intensity_outside IN (0, 1))"),  # version 4
    ("envelope_results", "negative", "INTEGER CHECK (negative IN (0, 1))"),  # version 4
    ("envelope_results", "embedding", "BLOB"),  # version 5
    ("envelope_results", "intensity_features", "BLOB"),  # version 5
)
