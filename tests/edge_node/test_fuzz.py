"""Fuzzing a real node over real associations: 2,000 mutated instances from real files, fixed seed.

0 listener deaths, every case answered, every spooled study in a recorded state, the node's peak RSS under
a stated bound, and no text element value of any input in the node's log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import _config

from edge_node.ingest.sop_classes import STORAGE_SOP_CLASSES
from harness.fuzz_cases import fuzz_cases, send_cases, source_files, text_values
from tests.edge_node.conftest import EdgeProcess, TrustedBundle, dicom_dir, echoscu, peak_rss

pytestmark = pytest.mark.slow

SEED = 20261203
N_CASES = 2100  # some cases cannot be sent by the fuzzer itself (no usable file meta)
#: Instances per association: a PACS sends a study in one; it also keeps the test within a few minutes.
BATCH = 100
#: The stated bound on the node's peak resident memory over the whole run (VmHWM, its receivers' added).
RSS_BUDGET_BYTES = 700 * 1024 * 1024
FINAL_STATES = {"done", "skipped", "failed"}


def test_two_thousand_mutated_instances_over_real_associations(
    edge_factory: Callable[..., EdgeProcess],
    test_bundle: TrustedBundle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    sources = source_files(dicom_dir())
    assert len(sources) >= 10
    supported = set(STORAGE_SOP_CLASSES)
    secrets = text_values(sources)
    edge = edge_factory(trusted_keys=str(test_bundle.public_key), quiet_seconds=5.0, log_level="DEBUG")
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    edge.start()
    assert edge.proc is not None
    t0 = time.monotonic()
    cases = list(fuzz_cases(sources, tmp_path / "cases", N_CASES, SEED, BATCH))
    answered: dict[int, int | None] = {}
    for start in range(0, N_CASES, BATCH):
        batch = [c for c in cases[start : start + BATCH] if c.sop_class_uid in supported]
        answered.update(send_cases(edge.port, batch))
        assert edge.alive(), f"the node died at batch {start // BATCH}:\n{edge.log_text()[-3000:]}"
    sent = [i for i, s in answered.items() if s != -1]
    assert len(sent) >= 2000
    unanswered = [i for i in sent if answered[i] is None]
    assert unanswered == [], unanswered[:10]
    statuses = {answered[i] for i in sent}
    assert 0 in statuses and statuses - {0}, statuses  # some accepted, some refused
    edge.wait_idle(300)
    states = {str(s) for (s,) in edge.query("SELECT DISTINCT state FROM studies")}
    assert states <= FINAL_STATES, states
    assert edge.query("SELECT COUNT(*) FROM runs WHERE status = 'processing'")[0][0] == 0
    assert echoscu(edge.port)
    peak = peak_rss(edge.proc.pid)
    assert peak < RSS_BUDGET_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"
    log = edge.log_text()
    leaked = sorted(v for v in secrets if v in log)
    assert leaked == [], leaked[:5]
    assert "Traceback" not in log
    assert edge.stop() == 0
    print(f"fuzz: {len(sent)} cases in {time.monotonic() - t0:.0f} s, peak RSS {peak / 2**20:.0f} MiB")
