"""Receiver processes (``receive_processes``): what only they can get wrong, with real senders and kill -9.

The rest of the ingest suite runs in this mode too (the ``mode`` fixture); here: associations spread over
the receivers and received in parallel, a receiver killed mid-association (nothing acknowledged lost, the
receiver started again, the limits' counts given back), the limits counted across receivers, and the
receivers' log lines passing the privacy guard on their way to the node's log.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edge_node.ingest.listener import Listener, ListenerConfig
from edge_node.ingest.receiver_pool import ReceiverPool
from edge_node.ingest.spool import Spool
from edge_node.state.node_state import NodeState
from tests.edge_node.conftest import (
    DCMTK_ENV,
    acknowledged_files,
    dicom_dir,
    echoscu,
    make_ct_instances,
    process_runs,
    storescu,
    until,
)
from tests.support.dcmtk import dcmtk

RECEIVERS = 2
SECRET = "SECRETVALUE"


class Node:
    """A listener with receiver processes over a real spool and database (what ``fedclinic-edge`` runs)."""

    def __init__(self, tmp_path: Path, **config: object) -> None:
        self.store = NodeState.open(tmp_path / "edge.sqlite3")
        self.spool = Spool(tmp_path / "spool", self.store.ingest, max_instance_bytes=10**8, min_free_bytes=0)
        self.wakes = 0
        settings: dict[str, object] = {"receive_processes": RECEIVERS, **config}
        self.listener = Listener(ListenerConfig("EDGE", "127.0.0.1", 0, **settings), self.spool, self._woken)  # type: ignore[arg-type]
        self.listener.start()

    def _woken(self) -> None:
        self.wakes += 1

    @property
    def port(self) -> int:
        return self.listener.address[1]

    @property
    def pool(self) -> ReceiverPool:
        native = self.listener.native_server
        assert native is not None and isinstance(native.receivers, ReceiverPool)
        return native.receivers

    def sop_uids(self) -> set[str]:
        rows = self.store.db.query("SELECT sop_instance_uid FROM instances")
        return {str(r["sop_instance_uid"]) for r in rows}

    def stop(self) -> None:
        self.listener.stop()
        self.store.close()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(**config: object) -> Node:
        made.append(Node(tmp_path / f"node{len(made)}", **config))
        return made[-1]

    yield make
    for node in made:
        node.stop()


def _connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def _spooled(node: Node, sent: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(sent, stop_before_pixels=True)
    return pydicom.dcmread(node.spool.path_for(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)))


def _verification(port: int, calling: str = "PYSCU", bind: str | None = None) -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="EDGE", bind_address=(bind, 0) if bind else None)


def test_concurrent_associations_spread_over_the_receivers_and_every_instance_is_stored(
    node_factory: Callable[..., Node], tmp_path: Path
) -> None:
    node = node_factory()
    assert all(p is not None and process_runs(p) for p in node.pool.pids)
    # Two associations at once land on different receivers.
    held = [_verification(node.port) for _ in range(RECEIVERS)]
    assert all(a.is_established for a in held)  # type: ignore[attr-defined]
    assert until(lambda: node.pool.loads == [1] * RECEIVERS)
    for a in held:
        a.release()  # type: ignore[attr-defined]
    assert until(lambda: node.listener.open_connections("127.0.0.1") == 0)

    # Four storescu associations started together, ten instances each (two studies).
    shares = [make_ct_instances(tmp_path / f"ct{i}", 10, studies=1 + i % 2) for i in range(4)]
    senders = [
        subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aec", "EDGE", "127.0.0.1", str(node.port), *map(str, share)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=DCMTK_ENV,
        )
        for share in shares
    ]
    outputs = [s.communicate(timeout=120)[0] for s in senders]
    for out in outputs:
        ok, bad = acknowledged_files(out)
        assert len(ok) == 10 and not bad, out
    sent = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for share in shares for p in share]
    # Every released study queued; a receiver queues after its release response, so poll.
    assert until(lambda: node.store.status.counts()["queued"] == 6, 10), node.store.status.counts()
    assert node.sop_uids() == set(map(str, sent))
    assert node.store.status.counts()["instances"] == 40
    for share in shares:  # each spooled file is the instance as sent
        assert _spooled(node, share[-1]).PixelData == pydicom.dcmread(share[-1]).PixelData
    assert node.wakes >= 6
    assert until(lambda: node.listener.open_connections("127.0.0.1") == 0)


def test_a_receiver_killed_mid_association_loses_no_acknowledged_instance_and_is_started_again(
    node_factory: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = node_factory()
    # Real 512x512 CT slices (~0.5 MB each), so that the kill lands mid-association.
    source = sorted((dicom_dir() / "tcia_covid19_ny_sbu").rglob("axial_*.dcm"))[0]
    files = make_ct_instances(tmp_path / "ct", 150, source=source)
    log_path = tmp_path / "storescu.log"
    with log_path.open("w") as log:
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aec", "EDGE", "127.0.0.1", str(node.port), *map(str, files)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        assert until(lambda: log_path.read_text().count("Received Store Response (Success") >= 20, 60)
        (busy,) = [i for i, load in enumerate(node.pool.loads) if load]
        victim = node.pool.pids[busy]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        sender.wait(60)
    ok, _ = acknowledged_files(log_path.read_text())
    assert 20 <= len(ok) < len(files), f"the kill should land mid-association ({len(ok)} acknowledged)"
    assert sender.returncode != 0  # the association dropped with the receiver

    # The dead receiver's connection no longer counts, and a new receiver took its place (ready only once
    # it has recovered the dead one's slots).
    assert until(lambda: node.listener.open_connections("127.0.0.1") == 0)
    assert until(lambda: None not in node.pool.loads and node.pool.pids[busy] != victim, 30)
    assert not process_runs(victim)
    assert any(f"receiver process {busy} was killed by SIGKILL" in r.getMessage() for r in caplog.records)
    # Every acknowledged instance is recorded and on disk, as sent: one the dead receiver had answered but
    # not yet recorded (its row follows the response) was placed and recorded by the new one.
    stored = node.sop_uids()
    for name in ok:
        ds = pydicom.dcmread(name)
        assert str(ds.SOPInstanceUID) in stored, f"{Path(name).name} was acknowledged but is lost"
        assert _spooled(node, Path(name)).PixelData == ds.PixelData
    # The new receiver recovered its pool: no slot left with a partial instance in it.
    pool_dir = node.spool.root / ".pool" / f"r{busy}"
    assert all(slot.stat().st_size == 0 for slot in pool_dir.glob("*.slot"))

    # The PACS sends the whole series again: all of it arrives, once each.
    proc = storescu(node.port, files)
    again, bad = acknowledged_files(proc.stdout + proc.stderr)
    assert len(again) == len(files) and not bad, proc.stdout[-2000:]
    assert node.store.status.counts()["instances"] == len(files)
    assert echoscu(node.port)


def test_limits_are_counted_across_receivers(node_factory: Callable[..., Node]) -> None:
    node = node_factory(max_associations=2, max_associations_per_peer=3, acse_timeout=2.0)
    first, second = _verification(node.port), _verification(node.port)
    assert first.is_established and second.is_established  # type: ignore[attr-defined]
    assert until(lambda: node.pool.loads == [1, 1])  # one in each receiver
    third = _verification(node.port)
    assert third.is_rejected  # type: ignore[attr-defined]  # local limit exceeded, counted in the node
    first.release()  # type: ignore[attr-defined]
    assert until(lambda: node.listener.open_connections("127.0.0.1") == 1)
    fourth = _verification(node.port)
    assert fourth.is_established  # type: ignore[attr-defined]
    for a in (second, fourth):
        a.release()  # type: ignore[attr-defined]

    # Per address: three silent connections from 127.0.0.2 (whichever receivers hold them), a fourth is
    # closed at once by the node; the PACS's address is served meanwhile.
    silent = [_connect(node.port, "127.0.0.2") for _ in range(3)]
    assert until(lambda: node.listener.open_connections("127.0.0.2") == 3)
    with _connect(node.port, "127.0.0.2") as over:
        over.settimeout(2.0)
        assert over.recv(1) == b""  # closed without a word
    assert echoscu(node.port)
    # The ACSE timeout ends the silent ones in their receivers; the node gets the count back.
    assert until(lambda: node.listener.open_connections("127.0.0.2") == 0, 10)
    for s in silent:
        s.close()


def test_receiver_log_lines_reach_the_node_log_without_element_values(
    node_factory: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the receivers log at the node's level, taken when they start
    node = node_factory()
    ds = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    # Names and IDs that identify a patient, and a Study Instance UID that is not a UID (refused: 0xC000;
    # pydicom warns with the value when it reads it). Written as bytes: pydicom here would warn too.
    placeholder = "1.2.840.99999999"
    ds.StudyInstanceUID = placeholder
    ds.PatientName, ds.PatientID, ds.AccessionNumber = f"{SECRET}^NAME", f"{SECRET}ID", f"{SECRET}ACC"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    raw = bad.read_bytes()
    assert raw.count(placeholder.encode()) == 1
    bad.write_bytes(raw.replace(placeholder.encode(), f"1.2.{SECRET}9".encode()))
    good = make_ct_instances(tmp_path / "good", 2)
    proc = storescu(node.port, [*good, bad])  # storescu stops at the first refusal
    ok, refused = acknowledged_files(proc.stdout + proc.stderr)
    assert len(ok) == 2 and len(refused) == 1, proc.stdout + proc.stderr
    pids = {p for p in node.pool.pids if p is not None}

    def from_receivers() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.process in pids]

    # The receiver's lines are in the node's log (its refusal, and DEBUG lines for each instance) ...
    assert until(lambda: any("released" in r.getMessage() for r in from_receivers()))
    lines = [r.getMessage() + (r.exc_text or "") for r in from_receivers()]
    assert any("rejected an instance from TESTSCU" in line for line in lines), lines
    assert sum("spooled" in line for line in lines) == 2, lines
    # ... and no value of the instance is in any of them, nor anywhere else in the log.
    assert not [line for line in lines if SECRET in line]
    assert SECRET not in caplog.text
    assert "Traceback" not in caplog.text
