"""For the e2e tests: the signed student bundle they deploy, and a look inside a running node's records."""

from __future__ import annotations

from pathlib import Path

from edge_node.state.node_state import NodeState
from edge_node.state.status_queries import StudySummary
from harness.demo.clinic import BundleFiles, Clinic, find_bundle

__all__ = ["find_bundle", "node_studies", "obtain_bundle"]


def node_studies(clinic: Clinic, limit: int = 1000) -> list[StudySummary]:
    """The node's own study records, read from its database.

    A white-box check that only tests make; the demo asks the node (``fedclinic-edge status``) instead.
    """
    state = NodeState.open(Path(clinic.edge.settings["data_dir"]) / "edge.sqlite3")
    try:
        return state.status.recent_studies(limit)
    finally:
        state.close()


def obtain_bundle(workdir: Path) -> BundleFiles:
    """The prebuilt test bundle, or a fresh one trained and signed here (~20 s; needs the hub extra)."""
    found = find_bundle()
    if found is not None:
        return found
    from tests.support.bundle import build_test_bundle

    bundle, pub = build_test_bundle(workdir / "test-bundle")
    return BundleFiles(bundle, pub)
