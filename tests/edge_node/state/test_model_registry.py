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


def test_rollback_twice_goes_further_back_then_finds_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / "edge.sqlite3")
    models = ModelRegistry(db)
    rows = [models.add("m", v, tmp_path / v, f"sha-{v}", "fp") for v in ("1.0.0", "1.1.0", "1.2.0")]
    for row in rows:
        models.activate(row, "install")
    for expected in ("1.1.0", "1.0.0"):
        previous = models.previous()
        assert previous is not None and previous.version == expected
        models.activate(previous.row, "rollback")
        assert models.active() == previous
    assert models.previous() is None  # not back to 1.1.0: a rollback does not undo the one before
    models.activate(rows[2], "install (already present)")
    again = models.previous()
    assert again is not None and again.version == "1.0.0"
    assert [m.version for m in models.installed()] == ["1.0.0", "1.1.0", "1.2.0"]
    db.close()
