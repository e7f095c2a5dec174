"""Spool retention in a real node: the CLI purge (dry run, JSON) and the node's own purge timer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tests.edge_node.conftest import EdgeProcess, TrustedBundle, dicom_dir, make_ct_instances, storescu

DX = dicom_dir() / "highdicom" / "dx_image.dcm"


def _spooled(edge: EdgeProcess) -> list[Path]:
    return [Path(str(p)) for (p,) in edge.query("SELECT path FROM instances")]


def test_spool_purge_cli_removes_finished_studies_only(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    edge = edge_factory(trusted_keys=str(test_bundle.public_key), study_quiet_seconds=0.2, spool_max_bytes=0)
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    edge.start()
    assert storescu(edge.port, make_ct_instances(tmp_path / "a", 3, source=DX)).returncode == 0
    edge.wait_idle(120)
    files = _spooled(edge)
    assert len(files) == 3 and all(p.exists() for p in files)

    dry = edge.cli("spool", "purge", "--dry-run", "--format", "json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert (doc["studies"], doc["instances"], doc["dry_run"]) == (1, 3, True)
    assert all(p.exists() for p in files)

    done = edge.cli("spool", "purge", "--format", "json")  # while the node runs
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["instances"] == 3
    assert not any(p.exists() for p in files) and _spooled(edge) == []
    assert edge.query("SELECT state FROM studies") == [("done",)]
    table = edge.cli("spool", "purge")
    assert table.returncode == 0 and "spool purge" in table.stdout
    # The node still receives into the spool after a purge.
    assert storescu(edge.port, make_ct_instances(tmp_path / "b", 1, source=DX)).returncode == 0
    edge.wait_idle(120)
    assert len(_spooled(edge)) == 1
    assert edge.stop() == 0


def test_the_node_purges_by_itself(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key),
        study_quiet_seconds=0.2,
        spool_max_bytes=0,
        spool_purge_interval_seconds=0.5,
    )
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    edge.start()
    assert storescu(edge.port, make_ct_instances(tmp_path / "a", 2, source=DX)).returncode == 0
    edge.wait_idle(120)
    # The purge deletes the files, then logs what it removed: wait for both.
    deadline = time.time() + 20
    while time.time() < deadline and (_spooled(edge) or "spool purge: 1 studies" not in edge.log_text()):
        time.sleep(0.2)
    assert _spooled(edge) == [], edge.log_text()[-2000:]
    assert "spool purge: 1 studies, 2 instances" in edge.log_text()
    assert edge.stop() == 0
