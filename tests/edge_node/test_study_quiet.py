"""A PACS that sends each instance in its own association: the study runs once, after its quiet time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.edge_node.conftest import (
    EdgeProcess,
    TrustedBundle,
    acknowledged_files,
    dicom_dir,
    make_ct_instances,
    storescu,
)


def test_one_association_per_instance_makes_one_run(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    files = make_ct_instances(tmp_path / "study", 50, source=dicom_dir() / "highdicom" / "dx_image.dcm")
    # The fallback quiet time is long: only the settle time after each release can start the run.
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key), quiet_seconds=600.0, study_quiet_seconds=2.0
    )
    edge.start()
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    for f in files:  # one storescu process, hence one association, per instance
        proc = storescu(edge.port, [f])
        ok, bad = acknowledged_files(proc.stdout + proc.stderr)
        assert (len(ok), bad) == (1, []), proc.stdout + proc.stderr
    deadline = time.time() + 60
    while time.time() < deadline:
        runs = edge.query("SELECT status, n_instances FROM runs")
        if runs and runs[0][0] != "processing":
            break
        time.sleep(0.2)
    time.sleep(3.0)  # longer than the settle time: a second run, if one were coming, would have started
    runs = edge.query("SELECT status, n_instances FROM runs")
    assert len(runs) == 1, runs
    assert runs[0] == ("done", 50), edge.log_text()[-3000:]
    assert edge.query("SELECT state FROM studies") == [("done",)]
    # Each release queued the study again, and each new instance took it back to receiving.
    assert edge.log_text().count("association released") == 50
