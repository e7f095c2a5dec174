"""The DICOM listener in-process against dcmtk and pynetdicom peers: echo, store, refusals, survival.

Every test that does not look inside a transport runs in every receive mode (the ``mode`` fixture: native
threads, native receiver processes, pynetdicom). A receiver process's log records are emitted by the node's
process (``edge_node.ingest.receiver_pool``), so ``caplog`` sees them in every mode.
"""

from __future__ import annotations

import copy
import logging
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from edge_node.delivery.association_loop import ParkedLoop, loop_has_work
from edge_node.ingest.listener import (
    DUL_LOOP_DELAY_S,
    IDLE_DUL_LOOP_DELAY_S,
    Listener,
    ListenerConfig,
)
from edge_node.ingest.native_transport import HandedConnection
from edge_node.ingest.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from edge_node.ingest.receiver_pool import ReceiverPool
from edge_node.ingest.socket_options import NODELAY_HANDLERS
from edge_node.ingest.sop_classes import STORAGE_SOP_CLASSES
from edge_node.ingest.spool import Spool
from edge_node.ingest.storage_sink import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_PROCESSING_FAILURE,
    STATUS_SPOOL_FAILURE,
    STATUS_SUCCESS,
)
from edge_node.state.node_state import NodeState
from tests.edge_node.conftest import (
    DCMTK_ENV,
    acknowledged_files,
    dicom_dir,
    echoscu,
    make_ct_instances,
    propose_flag,
    storescu,
    until,
)
from tests.edge_node.ingest.conftest import PYNETDICOM, THREADS, ReceiveMode
from tests.support.dcmtk import dcmtk


class Running:
    def __init__(self, listener: Listener, store: NodeState) -> None:
        self.listener = listener
        self.store = store
        #: The study counts each time the listener woke the worker (``on_complete``).
        self.wakes: list[dict[str, int]] = []

    def woken(self, seen: Callable[[dict[str, int]], bool], within: float = 5.0) -> bool:
        """Whether a wake-up saw counts for which ``seen`` holds (receivers report asynchronously)."""
        deadline = time.monotonic() + within
        while not any(seen(w) for w in list(self.wakes)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    @property
    def port(self) -> int:
        return self.listener.address[1]


def _start(
    tmp_path: Path,
    mode: ReceiveMode,
    *,
    max_instance_bytes: int = 10**8,
    allowed: list[str] | None = None,
    network_timeout: float = 30.0,
    max_pdu: int = 1024 * 1024,
    max_associations: int = 10,
) -> Running:
    store = NodeState.open(tmp_path / "edge.sqlite3")
    spool = Spool(tmp_path / "spool", store.ingest, max_instance_bytes=max_instance_bytes, min_free_bytes=0)
    config = ListenerConfig(
        "EDGE",
        "127.0.0.1",
        0,
        allowed_calling_aes=allowed,
        network_timeout=network_timeout,
        max_pdu=max_pdu,
        max_associations=max_associations,
        transport=mode.transport,
        receive_processes=mode.processes,
    )
    running: Running

    def completed() -> None:
        running.wakes.append(store.status.counts())

    running = Running(Listener(config, spool, completed), store)
    running.listener.start()
    return running


@pytest.fixture
def edge(tmp_path: Path, mode: ReceiveMode) -> Iterator[Running]:
    running = _start(tmp_path, mode)
    yield running
    running.listener.stop()
    running.store.close()


@contextmanager
def sending(ae: AE, port: int, *, nodelay: bool = False) -> Iterator[Association]:
    """An association to the node for a test to send on, released at the end. Its association loop is
    parked meanwhile (``ParkedLoop``), so it cannot take a response meant for ``send_*``."""
    handlers = list(NODELAY_HANDLERS) if nodelay else []
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE", evt_handlers=handlers)
    assert assoc.is_established
    held = ParkedLoop(assoc)
    try:
        yield assoc
    finally:
        held.end()


def _scu(port: int, ds: pydicom.Dataset, calling: str = "PYSCU") -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    with sending(ae, port, nodelay=True) as assoc:
        return int(assoc.send_c_store(ds).Status)


def test_echo_and_nodelay_on_both_ends(edge: Running) -> None:
    assert echoscu(edge.port)
    # echoscu's connection is closed when its thread (or receiver) has seen the release: wait for that.
    deadline = time.monotonic() + 5
    while edge.listener.open_connections("127.0.0.1") and time.monotonic() < deadline:
        time.sleep(0.02)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    with sending(ae, edge.port, nodelay=True) as assoc:
        assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        native = edge.listener.native_server
        if native is not None:
            (connection,) = native.connections
            assert connection.established
            if isinstance(connection, HandedConnection):
                # Run by a receiver process: the node set TCP_NODELAY on the socket before handing it over.
                assert isinstance(native.receivers, ReceiverPool)
                loads = native.receivers.loads
                assert None not in loads and sorted(cast(list[int], loads)) == [0, 1]
            else:
                assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert int(assoc.send_c_echo().Status) == 0
            return
        server = edge.listener._server
        assert server is not None and server.active_associations, "the acceptor association should be open"
        acceptor = server.active_associations[0].dul.socket
        assert acceptor is not None and acceptor.socket is not None
        assert acceptor.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # The acceptor's DUL reactor polls faster than pynetdicom's default (1 ms): shorter round trips.
        assert server.active_associations[0].dul._run_loop_delay == DUL_LOOP_DELAY_S < 0.001
        assert int(assoc.send_c_echo().Status) == 0


@pytest.fixture
def pynetdicom_edge(tmp_path: Path) -> Iterator[Running]:
    running = _start(tmp_path, PYNETDICOM)
    yield running
    running.listener.stop()
    running.store.close()


def _cpu_ticks(thread_id: int) -> int:
    """User + system clock ticks of one thread of this process (/proc/self/task/TID/stat)."""
    fields = Path(f"/proc/self/task/{thread_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_an_idle_native_association_costs_no_cpu(tmp_path: Path) -> None:
    running = _start(tmp_path, THREADS)
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        with sending(ae, running.port) as assoc:
            native = running.listener.native_server
            assert native is not None
            threads = {t.native_id for t in threading.enumerate() if t.name == "edge-dicom-association"}
            acceptors = {t.native_id for t in threading.enumerate() if t.name == "edge-dicom-acceptor"}
            assert len(threads) == 1 and len(acceptors) == 1
            ids = [i for i in threads | acceptors if i is not None]
            before = sum(_cpu_ticks(i) for i in ids)
            time.sleep(1.5)
            # Both threads are blocked in the kernel (recv, accept): not one clock tick (10 ms) between them.
            assert sum(_cpu_ticks(i) for i in ids) - before == 0
            assert int(assoc.send_c_echo().Status) == 0
    finally:
        running.listener.stop()
        running.store.close()


def _parked_acceptor(edge: Running) -> Association:
    """The node's side of the one open association, once the pacer has parked its association loop."""
    server = edge.listener._server
    assert server is not None and server.active_associations
    acceptor = server.active_associations[0]
    time.sleep(0.8)  # more than two sweeps without a PDU
    assert not acceptor._reactor_checkpoint.is_set()
    return acceptor


def test_an_idle_association_polls_slowly_until_it_receives_again(pynetdicom_edge: Running) -> None:
    edge = pynetdicom_edge
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    with sending(ae, edge.port) as assoc:
        # The association loop is parked on pynetdicom's checkpoint (no 1 ms wake-ups) ...
        acceptor = _parked_acceptor(edge)
        assert acceptor.dul._run_loop_delay == IDLE_DUL_LOOP_DELAY_S
        assert acceptor._is_paused
        # ... and runs again for the next PDU: answered, at most one slow poll late.
        assert int(assoc.send_c_echo().Status) == 0
        assert acceptor.dul._run_loop_delay == DUL_LOOP_DELAY_S
        assert acceptor._reactor_checkpoint.is_set()
        assert int(assoc.send_c_echo().Status) == 0
    # A release reaches a parked loop too: the acceptor is gone, not left waiting.
    server = edge.listener._server
    assert server is not None
    deadline = time.monotonic() + 5
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.active_associations


def test_a_message_that_reaches_a_parked_loop_late_is_served(pynetdicom_edge: Running) -> None:
    """The DUL fires the pacer's wake-up before it decodes a PDU; on a loaded machine the message can reach
    DIMSE after a sweep has parked the loop. It is served at the next sweep, not at the network timeout."""
    edge = pynetdicom_edge
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    with sending(ae, edge.port) as assoc:
        acceptor = _parked_acceptor(edge)
        # What the DUL hands DIMSE once it is scheduled again: a whole C-ECHO request, with no PDU event.
        late = C_ECHO()
        late.MessageID = 7
        late.AffectedSOPClassUID = Verification
        context_id = acceptor.accepted_contexts[0].context_id
        assert context_id is not None
        acceptor.dimse.msg_queue.put((context_id, late))
        # Taken by the association loop within a sweep or two (the network timeout here is 30 s) ...
        assert until(lambda: acceptor.dimse.peek_msg()[1] is None, within=2)
        # ... and answered (our own loop is parked: the answer stays queued).
        assert until(lambda: assoc.dimse.peek_msg()[1] is not None, within=2)
        answer = assoc.dimse.peek_msg()[1]
        assert isinstance(answer, C_ECHO) and answer.MessageIDBeingRespondedTo == 7 and answer.Status == 0
        assert acceptor.is_established and not acceptor.is_aborted
    assert assoc.is_released


def test_looking_for_a_parked_loop_s_work_leaves_the_release_request_to_it(pynetdicom_edge: Running) -> None:
    """The pacer's sweep asks whether a parked loop has work; the answer must not take the peer's A-RELEASE
    request off the queue, or the woken loop finds nothing to answer and the peer waits for the network
    timeout's abort."""
    edge = pynetdicom_edge
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", edge.port, ae_title="EDGE")
    try:
        assert assoc.is_established
        acceptor = _parked_acceptor(edge)
        # What the DUL queues for the loop when the peer asks to release, looked at as a sweep does (holding
        # the pacer's lock: no sweep may wake the loop for a request the peer never sent), then taken back.
        with edge.listener._pacer._lock:
            request = A_RELEASE()
            acceptor.dul.to_user_queue.put(request)
            assert loop_has_work(acceptor)
            assert acceptor.dul.peek_next_pdu() is request  # still there for the loop
            acceptor.dul.receive_pdu(wait=False)
        # The peer's real request reaches the parked loop, which answers it: released, not aborted.
        assoc.release()
        assert assoc.is_released
        acceptor.join(5)  # its loop ends with the release
        assert acceptor.is_released and not acceptor.is_aborted
    finally:
        if assoc.is_established:
            assoc.abort()


def test_an_idle_association_ends_at_the_network_timeout(tmp_path: Path, mode: ReceiveMode) -> None:
    running = _start(tmp_path, mode, network_timeout=1.0)
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="EDGE")
        assert assoc.is_established
        server = running.listener._server
        if server is not None:
            time.sleep(0.6)  # parked by now
            assert server.active_associations
            assert not server.active_associations[0]._reactor_checkpoint.is_set()
        deadline = time.monotonic() + 5
        while (running.listener.open_connections("127.0.0.1") or assoc.is_established) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        # Aborted by the node (pynetdicom: its own loop, woken by the pacer; native: the blocked read's
        # timeout), with an A-ABORT the sender sees.
        assert running.listener.open_connections("127.0.0.1") == 0
        assert assoc.is_aborted
        assert echoscu(running.port)
    finally:
        running.listener.stop()
        running.store.close()


def test_store_spools_and_release_queues_the_study(edge: Running, tmp_path: Path) -> None:
    files = make_ct_instances(tmp_path / "ct", 5)
    proc = storescu(edge.port, files)
    ok, bad = acknowledged_files(proc.stdout + proc.stderr)
    assert len(ok) == 5 and not bad, proc.stdout + proc.stderr
    # The transports record the last instance and queue the study after their responses: poll.
    assert until(lambda: edge.store.status.counts()["queued"] == 1, 10), edge.store.status.counts()
    assert edge.store.status.counts()["instances"] == 5
    # The worker was woken once the study was queued (and, before, when it first arrived).
    assert edge.woken(lambda c: c["queued"] == 1)
    for f in files:  # each spooled file holds exactly the bytes sent (storescu sends the file as is)
        ds = pydicom.dcmread(f)
        spooled = edge.listener.spool.path_for(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        assert pydicom.dcmread(spooled).PixelData == ds.PixelData


def test_the_spooled_file_is_the_data_set_as_sent_behind_its_transports_file_meta(
    edge: Running, mode: ReceiveMode
) -> None:
    implementation = (
        (UID(IMPLEMENTATION_CLASS_UID), IMPLEMENTATION_VERSION_NAME)
        if mode.transport == "native"
        else (PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
    )
    ds = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")  # explicit VR little endian
    for sop_instance in (generate_uid(), "1.2.3.45"):  # odd and even UID lengths: padding in the meta
        ds.SOPInstanceUID = sop_instance
        assert _scu(edge.port, ds) == 0
        (row,) = edge.store.db.query("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance,))
        spooled = Path(row["path"]).read_bytes()
        meta = create_file_meta(
            sop_class_uid=UID(str(ds.SOPClassUID)),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=ExplicitVRLittleEndian,
            implementation_uid=implementation[0],
            implementation_version=implementation[1],
        )
        # After the spool's own preamble: the File Meta pynetdicom's encoded_dataset(include_meta=True)
        # would give for the transport's implementation, then the data set as sent.
        dataset = encode(ds, False, True)
        assert dataset is not None
        assert spooled[128:] == b"DICM" + encode_file_meta(meta) + dataset
        read = pydicom.dcmread(BytesIO(spooled))
        assert read.file_meta.ImplementationClassUID == implementation[0]
        assert read.PixelData == ds.PixelData


def test_missing_uid_is_cannot_understand_and_listener_lives(edge: Running) -> None:
    ds = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")
    ds.SOPInstanceUID = generate_uid()
    del ds.StudyInstanceUID
    assert _scu(edge.port, ds) == STATUS_CANNOT_UNDERSTAND
    assert edge.store.status.counts()["instances"] == 0
    assert echoscu(edge.port)


def test_too_large_is_out_of_resources(tmp_path: Path, mode: ReceiveMode) -> None:
    running = _start(tmp_path, mode, max_instance_bytes=2048)
    try:
        files = make_ct_instances(tmp_path / "ct", 1)
        proc = storescu(running.port, files)
        out = proc.stdout + proc.stderr
        ok, bad = acknowledged_files(out)
        assert not ok and len(bad) == 1
        assert "0xa700" in out.lower() or "outofresources" in out.replace(" ", "").lower(), out
        assert echoscu(running.port)
    finally:
        running.listener.stop()


def test_handler_errors_become_a_failure_status(edge: Running, mode: ReceiveMode) -> None:
    # Recording an instance now raises (in every process: they share the file): answer, do not crash.
    with edge.store.db.tx() as c:
        c.execute("ALTER TABLE instances RENAME TO instances_gone")
    ct = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")
    sent = []
    for _ in range(3):
        ct.SOPInstanceUID = generate_uid()
        sent.append(copy.deepcopy(ct))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    with sending(ae, edge.port, nodelay=True) as assoc:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in sent[:2]]
        if mode == PYNETDICOM:  # a whole stream is recorded before its response
            assert statuses == [STATUS_PROCESSING_FAILURE, STATUS_PROCESSING_FAILURE]
            return
        # The native transport records after the response: the first is acknowledged (flushed under its
        # slot's durable name), and nothing more is while its row cannot be written.
        assert statuses == [STATUS_SUCCESS, STATUS_SPOOL_FAILURE]
        with edge.store.db.tx() as c:
            c.execute("ALTER TABLE instances_gone RENAME TO instances")
        # Back: the waiting instance is recorded before the next is acknowledged.
        assert int(assoc.send_c_store(sent[2]).Status) == STATUS_SUCCESS
    rows = edge.store.db.query("SELECT sop_instance_uid FROM instances")
    assert sorted(r[0] for r in rows) == sorted(str(ds.SOPInstanceUID) for ds in (sent[0], sent[2]))
    assert echoscu(edge.port)


def test_calling_ae_allow_list_and_called_ae(tmp_path: Path, mode: ReceiveMode) -> None:
    running = _start(tmp_path, mode, allowed=["GOODSCU"])
    try:
        assert echoscu(running.port, calling="GOODSCU")
        assert not echoscu(running.port, calling="BADSCU")
        assert not echoscu(running.port, called="SOMEONE", calling="GOODSCU")
    finally:
        running.listener.stop()


def test_unsupported_sop_class_is_refused_at_negotiation(edge: Running) -> None:
    seg = dicom_dir() / "dcmqi_ct3slice" / "liver_seg.dcm"
    proc = subprocess.run(
        [dcmtk("storescu"), "-v", "-aec", "EDGE", "127.0.0.1", str(edge.port), str(seg)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
    )
    assert "No presentation context" in proc.stdout + proc.stderr
    assert edge.store.status.counts()["instances"] == 0
    assert echoscu(edge.port)


def test_aborted_association_waits_for_quiet_time(edge: Running) -> None:
    ds = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")
    ds.SOPInstanceUID = generate_uid()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", edge.port, ae_title="EDGE", evt_handlers=list(NODELAY_HANDLERS))
    held = ParkedLoop(assoc)
    assert int(assoc.send_c_store(ds).Status) == 0
    held.wake()
    assoc.abort()
    assert echoscu(edge.port)
    # The native transports write the row after the response (and an abort comes with no release to wait
    # for): poll for it.
    assert until(lambda: edge.store.status.counts()["received"] == 1, 5)
    assert edge.store.status.counts()["queued"] == 0
    # The worker was woken (it waits for the study's quiet time), never with the study queued.
    assert edge.woken(lambda c: c["received"] == 1)
    assert not any(w["queued"] for w in edge.wakes)


def _raw_with(tmp_path: Path, name: str, inserted: bytes) -> Path:
    """A CT instance as raw Part 10 bytes with ``inserted`` (encoded elements) between (0008,1032) and on."""
    ds = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    before, after = pydicom.Dataset(), pydicom.Dataset()
    for elem in ds:
        (before if elem.tag < 0x00081140 else after).add(elem)
    parts = []
    for part in (before, after):
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, part)
        parts.append(buf.getvalue())
    meta = DicomBytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path = tmp_path / name
    path.write_bytes(meta.getvalue() + parts[0] + inserted + parts[1])
    return path


def _deep_sequence(depth: int) -> bytes:
    """(0008,1140) nested ``depth`` times, undefined lengths: legal bytes that recurse in any reader."""
    open_sq = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (open_sq + item) * depth + (item_end + sq_end) * depth


def _send_file(port: int, path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the bytes as they are, not re-encoded
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    with sending(ae, port) as assoc:
        return int(assoc.send_c_store(path).Status)


def test_deep_nesting_and_unknown_vr_are_cannot_understand_in_one_line(
    edge: Running,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unknown_vr = struct.pack("<HH2sH", 0x0008, 0x1150, b"ZZ", 4) + b"1234"
    cases = {"deep.dcm": _deep_sequence(5000), "vr.dcm": unknown_vr}
    with caplog.at_level(logging.INFO):
        for name, inserted in cases.items():
            assert _send_file(edge.port, _raw_with(tmp_path, name, inserted), monkeypatch) == (
                STATUS_CANNOT_UNDERSTAND
            ), name
    assert edge.store.status.counts()["instances"] == 0
    assert echoscu(edge.port)
    refusals = [
        r for r in caplog.records if r.name == "edge_node.ingest.storage_sink" and "rejected" in r.message
    ]
    assert len(refusals) == 2 and not any(r.exc_info or r.exc_text for r in caplog.records)
    assert "Traceback" not in caplog.text


def test_the_max_pdu_is_announced_and_a_conforming_sender_stores_through_it(
    tmp_path: Path, mode: ReceiveMode
) -> None:
    running = _start(tmp_path, mode, max_pdu=16384)
    try:
        ds = pydicom.dcmread(make_ct_instances(tmp_path / "ct", 1)[0])  # ~0.5 MB: 33 PDUs of 16 KiB
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        with sending(ae, running.port) as assoc:
            assert assoc.acceptor.maximum_length == 16384
            assert int(assoc.send_c_store(ds).Status) == 0
        assert running.store.status.counts()["instances"] == 1
    finally:
        running.listener.stop()
        running.store.close()


def _pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_a_pdu_longer_than_the_max_closes_the_connection_unread(
    edge: Running, caplog: pytest.LogCaptureFixture
) -> None:
    # Inside an association: a P-DATA-TF header claiming 1 GiB, then a trickle of its body.
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", edge.port, ae_title="EDGE")
    assert assoc.is_established
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    raw = assoc.dul.socket.socket
    assert edge.listener.open_connections("127.0.0.1") == 1
    with caplog.at_level(logging.WARNING):
        raw.sendall(_pdu_header(0x04, 1 << 30) + bytes(4096))
        deadline = time.monotonic() + 5
        while edge.listener.open_connections("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert edge.listener.open_connections("127.0.0.1") == 0, "the node should have ended the association"
    assert any("claims 1073741824 bytes (limit 1048576)" in r.getMessage() for r in caplog.records)
    assoc.abort()

    # Before any association: an A-ASSOCIATE-RQ header claiming 64 MiB.
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(_pdu_header(0x01, 64 << 20) + bytes(1024))
        assert _closed_by_peer(s, within=5.0)
    assert echoscu(edge.port)
    assert edge.store.status.counts()["instances"] == 0


def _one_sample_per_transfer_syntax() -> dict[str, Path]:
    """A real sample of an accepted SOP class for each transfer syntax the samples come in."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in dicom_dir().rglob("*.dcm") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ts, sop_class = str(ds.file_meta.TransferSyntaxUID), str(ds.SOPClassUID)
        except Exception:
            continue
        if sop_class in STORAGE_SOP_CLASSES and ts not in found:
            found[ts] = path
    return found


def test_dcmtk_sends_every_transfer_syntax_we_accept_and_the_pixels_arrive_as_sent(edge: Running) -> None:
    samples = _one_sample_per_transfer_syntax()
    compressed = set(samples) - {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    assert len(compressed) >= 5, sorted(samples)  # JPEG, JPEG-LS, JPEG 2000, RLE, deflated among the samples
    for ts, path in samples.items():
        flags = propose_flag(path) or (["-xi"] if ts == "1.2.840.10008.1.2" else ["-xe"])
        proc = storescu(edge.port, [path], flags=flags)
        ok, bad = acknowledged_files(proc.stdout + proc.stderr)
        assert len(ok) == 1 and not bad, (ts, proc.stdout + proc.stderr)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spooled = edge.listener.spool.path_for(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)).read_bytes()
        received = pydicom.dcmread(BytesIO(spooled))
        if ts == "1.2.840.10008.1.2.2":
            # Big endian is not accepted (retired): storescu converts it to explicit VR little endian.
            assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert (received.pixel_array == pydicom.dcmread(path).pixel_array).all()
            continue
        assert str(received.file_meta.TransferSyntaxUID) == ts
        # dcmtk re-encodes the header it sends, not the (compressed) pixel data; it pads an odd-length value
        # (one sample has one) to even length, as PS3.5 7.1.1 requires.
        sent = pydicom.dcmread(path).PixelData
        assert received.PixelData == sent + b"\0" * (len(sent) % 2), ts
    # Some samples are one instance in several encodings (the same SOP Instance UID): one row each UID.
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in samples.values()}
    assert edge.store.status.counts()["instances"] == len(uids)


def _associate_rq(called: bytes = b"EDGE", contexts: bytes | None = None) -> bytes:
    """A hand-made A-ASSOCIATE-RQ proposing Verification (PS3.8 9.3.2)."""

    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    if contexts is None:
        contexts = item(
            0x20, bytes((1, 0, 0, 0)) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2")
        )
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + b"RAWSCU".ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + item(0x50, item(0x51, struct.pack(">L", 16384)))
    return _pdu_header(0x01, len(body)) + body


def _p_data(context_id: int, control: int, value: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(value) + 2, context_id, control) + value
    return _pdu_header(0x04, len(pdv)) + pdv


def test_hostile_pdus_end_their_connection_at_once_and_the_listener_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The native transport's own PDU parsing (pynetdicom waits for some of these until the ARTIM timer,
    # and logs its decoder's traceback for others).
    edge = _start(tmp_path, THREADS)
    accepted = _associate_rq()
    cases = {
        "data before association": _p_data(1, 3, b"\0" * 16),
        "truncated request": _pdu_header(0x01, 10) + bytes(10),
        # A context whose abstract syntax sub-item claims 500 bytes of a 7-byte item.
        "items past the end": _associate_rq(contexts=b"\x20\x00\x00\x0b\x01\0\0\0\x30\x00\x01\xf41.2"),
        "unknown PDU type": _pdu_header(0x09, 4) + bytes(4),
        "PDV for a context never proposed": accepted + _p_data(99, 3, b"\0" * 16),
        "PDV length past its PDU": accepted
        + _pdu_header(0x04, 8)
        + struct.pack(">LBB", 1000, 1, 3)
        + b"\0\0",
        "command outside group 0000": accepted
        + _p_data(1, 3, struct.pack("<HHL", 0x0008, 0x0100, 2) + b"\0\0"),
        "second association request": accepted + accepted,
    }
    with caplog.at_level(logging.INFO):
        for name, data in cases.items():
            with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
                s.sendall(data)
                assert _closed_by_peer(s, within=5.0), name
    assert echoscu(edge.port)
    assert edge.store.status.counts()["instances"] == 0
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    edge.listener.stop()
    edge.store.close()


def test_associations_beyond_the_limit_are_rejected_as_local_limit(tmp_path: Path, mode: ReceiveMode) -> None:
    running = _start(tmp_path, mode, max_associations=1)
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", running.port, ae_title="EDGE")
        assert first.is_established
        second = ae.associate("127.0.0.1", running.port, ae_title="EDGE")
        assert second.is_rejected
        first.release()
        deadline = time.monotonic() + 5
        while running.listener.open_connections("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert echoscu(running.port)
    finally:
        running.listener.stop()
        running.store.close()
