"""Every real DICOM sample, one storescu each, into a real `fedclinic-edge serve`: spooled or refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.edge_node.conftest import (
    EdgeProcess,
    Storescp,
    TrustedBundle,
    acknowledged_files,
    dicom_dir,
    echoscu,
    propose_flag,
    storescu,
)


@pytest.mark.slow
def test_every_sample_is_spooled_and_processed_or_refused_with_a_status(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, pacs: Storescp
) -> None:
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key),
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        quiet_seconds=5.0,
    )
    edge.start()
    installed = edge.cli("install-bundle", str(test_bundle.bundle))
    assert installed.returncode == 0, installed.stdout + installed.stderr

    files = sorted(p for p in dicom_dir().rglob("*") if p.is_file())
    assert len(files) >= 80
    spooled: list[Path] = []
    refused: dict[Path, str] = {}
    for path in files:
        proc = storescu(edge.port, [path], flags=propose_flag(path))
        out = proc.stdout + proc.stderr
        ok, bad = acknowledged_files(out)
        if ok:
            spooled.append(path)
        elif bad:
            refused[path] = "store response: " + next(
                line for line in out.splitlines() if "Received Store Response" in line
            )
        else:  # refused before any C-STORE: no presentation context, or not a storable file
            assert proc.returncode != 0 or "No presentation context" in out or "E:" in out, out
            refused[path] = "negotiation: " + next(line for line in out.splitlines() if line.startswith("E:"))
        assert edge.alive(), f"the node died on {path.name}:\n{edge.log_text()[-3000:]}"
    assert echoscu(edge.port)
    print(f"{len(spooled)} spooled, {len(refused)} refused:")
    for path, why in sorted(refused.items()):
        print(f"  {path.relative_to(dicom_dir())}: {why}")
    assert len(spooled) + len(refused) == len(files)
    # CT/MR/CR/DX/US/SC images in every accepted transfer syntax, compressed ones included.
    assert len(spooled) >= 85, refused
    # The classes this node does not take are refused, not swallowed.
    assert any("liver_seg" in p.name for p in refused)

    edge.wait_idle(timeout=300)
    known = {str(r[0]) for r in edge.query("SELECT sop_instance_uid FROM instances")}
    for path in spooled:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sop in known, f"{path.name} was acknowledged but is not in the spool"
    rows = edge.query(
        "SELECT s.state, r.status, r.reason FROM studies s JOIN runs r ON r.study_id = s.id"
        " WHERE r.id = (SELECT MAX(id) FROM runs WHERE study_id = s.id)"
    )
    n_studies = edge.query("SELECT COUNT(*) FROM studies")[0][0]
    assert len(rows) == n_studies
    for state, status, reason in rows:
        assert state in ("done", "skipped"), (state, reason)
        assert status == state
        if state == "skipped":
            assert reason, "a skipped study must say why"
    assert any(state == "done" for state, _, _ in rows)
    # Results went to the PACS: every outbox entry sent, and the PACS holds them.
    assert edge.query("SELECT COUNT(*) FROM outbox WHERE state != 'sent'")[0][0] == 0
    # A study that got more instances later ran again; its SR keeps its SOP Instance UID (derived from the
    # source), so the PACS holds one object per distinct UID however often it was sent.
    sent = {
        str(pydicom.dcmread(str(p[0]), stop_before_pixels=True).SOPInstanceUID)
        for p in edge.query("SELECT path FROM outbox")
    }
    received = {p.name.split(".", 1)[1] for p in pacs.files()}
    assert sent and received == sent
    states = [state for state, _, _ in rows]
    print(f"{len(rows)} studies: {states.count('done')} done, {states.count('skipped')} skipped")
    assert edge.stop() == 0
