"""kill -9 of a real node mid-burst (200 instances): nothing acknowledged is lost, each study runs once."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.edge_node.conftest import (
    DCMTK_ENV,
    EdgeProcess,
    Storescp,
    TrustedBundle,
    acknowledged_files,
    dicom_dir,
    echoscu,
    make_ct_instances,
    process_runs,
    process_tree,
)
from tests.support.dcmtk import dcmtk

DX = dicom_dir() / "highdicom" / "dx_image.dcm"


@pytest.mark.slow
@pytest.mark.parametrize("receive_processes", [0, 2], ids=["threads", "processes"])
def test_sigkill_mid_burst_loses_no_acknowledged_instance_and_runs_each_study_once(
    edge_factory: Callable[..., EdgeProcess],
    test_bundle: TrustedBundle,
    tmp_path: Path,
    receive_processes: int,
) -> None:
    files = make_ct_instances(tmp_path / "burst", 200, studies=4)
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key), quiet_seconds=1.0, receive_processes=receive_processes
    )
    edge.start()
    assert edge.proc is not None
    node = process_tree(edge.proc.pid)
    assert len(node) == 1 + receive_processes  # the node, and its receivers
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0

    log_path = tmp_path / "storescu.log"
    with log_path.open("w") as log:
        sender = subprocess.Popen(
            [
                dcmtk("storescu"),
                "-v",
                "-aet",
                "TESTSCU",
                "-aec",
                "EDGE",
                "127.0.0.1",
                str(edge.port),
                *map(str, files),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        deadline = time.time() + 60
        while True:  # kill once a good part of the burst is acknowledged, well before its end
            acked = log_path.read_text().count("Received Store Response (Success")
            if acked >= 70 or sender.poll() is not None or time.time() > deadline:
                break
            time.sleep(0.005)
        edge.kill9()
        sender.wait(60)
    # The receivers die with the node (before it starts again and recovers the spool they wrote to).
    deadline = time.time() + 5
    while any(map(process_runs, node)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(process_runs, node))
    ok, _ = acknowledged_files(log_path.read_text())
    assert 70 <= len(ok) < 200, f"the kill should land mid-burst ({len(ok)} acknowledged)"

    edge.start()  # same data dir: recovery, then the quiet timer queues the interrupted studies
    assert echoscu(edge.port)
    edge.wait_idle(timeout=180)

    rows = edge.query("SELECT sop_instance_uid, path FROM instances")
    spooled = {str(uid): Path(str(path)) for uid, path in rows}
    for name in ok:
        source = pydicom.dcmread(name)
        uid = str(source.SOPInstanceUID)
        assert uid in spooled, f"{Path(name).name} was acknowledged before the kill but is not in the spool"
        assert pydicom.dcmread(spooled[uid]).PixelData == source.PixelData
    # Exactly one finished run per study; a run cut by the kill is recorded as interrupted and redone.
    per_study = edge.query(
        "SELECT s.id, s.state, SUM(r.status IN ('done', 'skipped', 'failed')), SUM(r.status = 'processing')"
        " FROM studies s LEFT JOIN runs r ON r.study_id = s.id GROUP BY s.id"
    )
    assert per_study, "no study was recorded"
    for _, state, finished, running in per_study:
        assert state in ("done", "skipped")
        assert finished == 1, f"a study was processed {finished} times"
        assert running == 0
    # Nothing but acknowledged or in-flight instances: at most one more than storescu saw answered.
    assert len(ok) <= len(spooled) <= len(ok) + 1
    assert edge.stop() == 0


@pytest.mark.slow
def test_sigkill_during_a_run_redoes_the_study_once_and_sends_each_result_once(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, pacs: Storescp, tmp_path: Path
) -> None:
    files = make_ct_instances(tmp_path / "dx", 120, source=DX)  # one study; an SC per image makes a long run
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key),
        quiet_seconds=1.0,
        send_secondary_capture=True,
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    edge.start()
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    proc = subprocess.run(
        [dcmtk("storescu"), "-aet", "TESTSCU", "-aec", "EDGE", "127.0.0.1", str(edge.port), *map(str, files)],
        capture_output=True,
        env=DCMTK_ENV,
        timeout=120,
    )
    assert proc.returncode == 0
    deadline = time.time() + 30
    while not edge.query("SELECT 1 FROM runs WHERE status = 'processing'"):
        assert time.time() < deadline, "the study was never claimed"
        time.sleep(0.01)
    time.sleep(0.3)  # into the run, with some result files written
    edge.kill9()
    (cut,) = edge.query("SELECT id FROM runs WHERE status = 'processing'")
    assert edge.query("SELECT COUNT(*) FROM outbox")[0][0] == 0, "the kill should land inside the run"

    edge.start()
    edge.wait_idle(timeout=240)
    runs = edge.query("SELECT id, status FROM runs ORDER BY id")
    assert [status for _, status in runs] == ["interrupted", "done"]
    assert runs[0][0] == cut[0]
    assert not (edge.data_dir / "results" / f"run-{cut[0]:08d}").exists()
    done_run = runs[1][0]
    outbox = edge.query("SELECT run_id, path, state FROM outbox")
    assert outbox and all(run == done_run and state == "sent" for run, _, state in outbox)
    sent = {str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID) for _, p, _ in outbox}
    assert len(sent) == len(outbox) == 121  # one SR + one SC per image, each sent once
    assert {p.name.split(".", 1)[1] for p in pacs.files()} == sent
    assert edge.stop() == 0
