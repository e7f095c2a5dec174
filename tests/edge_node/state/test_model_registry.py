"""The model registry: installed models, the activation log, the active and the previous model."""

from __future__ import annotations

from pathlib import Path

from edge_node.store import Store


def test_model_activation_and_previous(tmp_path: Path) -> None:
    store = Store(tmp_path / "edge.sqlite3")
    assert store.models.active() is None and store.models.previous() is None
    a = store.models.add("m", "1.0.0", tmp_path / "a", "sha-a", "fp")
    b = store.models.add("m", "1.1.0", tmp_path / "b", "sha-b", "fp")
    store.models.activate(a, "install")
    store.models.activate(b, "install")
    active, previous = store.models.active(), store.models.previous()
    assert active is not None and active.version == "1.1.0"
    assert previous is not None and previous.version == "1.0.0"
    before = store.models.activation_id()
    store.models.activate(previous.row, "rollback")
    assert store.models.activation_id() > before
    assert store.models.active() == previous
    store.close()
