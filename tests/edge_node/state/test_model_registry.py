"""The model registry: installed models, the activation log, the active and the previous model."""

from __future__ import annotations

from pathlib import Path

from edge_node.state.database import Database
from edge_node.state.model_registry import ModelRegistry


def test_model_activation_and_previous(tmp_path: Path) -> None:
    db = Database(tmp_path / "edge.sqlite3")
    models = ModelRegistry(db)
    assert models.active() is None and models.previous() is None
    a = models.add("m", "1.0.0", tmp_path / "a", "sha-a", "fp")
    b = models.add("m", "1.1.0", tmp_path / "b", "sha-b", "fp")
    models.activate(a, "install")
    models.activate(b, "install")
    active, previous = models.active(), models.previous()
    assert active is not None and active.version == "1.1.0"
    assert previous is not None and previous.version == "1.0.0"
    before = models.activation_id()
    models.activate(previous.row, "rollback")
    assert models.activation_id() > before
    assert models.active() == previous
    db.close()
