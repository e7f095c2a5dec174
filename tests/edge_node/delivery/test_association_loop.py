"""ParkedLoop against a real pynetdicom SCP: the loop cannot take a response meant for the sender."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import DimseServiceType
from pynetdicom.transport import ThreadedAssociationServer

from edge_node.delivery.association_loop import ParkedLoop
from harness.demo.orthanc import free_port

#: How long the loop's thread stays away after its wait returns: a thread that waits for the GIL under load.
DESCHEDULED_S = 0.3


class _DescheduledCheckpoint(threading.Event):
    """A checkpoint whose waiter, once let through, is held off before it runs its next line.

    It makes the moment the flag ``_is_paused`` cannot show (the loop let through, not yet past its next
    line) last long enough for a response to arrive, as it can on a loaded machine.
    """

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        if passed and threading.current_thread() is not threading.main_thread():
            time.sleep(DESCHEDULED_S)
        return passed


@pytest.fixture
def storage_scp() -> Iterator[int]:
    """A real pynetdicom SCP that answers every C-STORE at once."""
    ae = AE(ae_title="STORE")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = cast(
        ThreadedAssociationServer,
        ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)]),
    )
    try:
        yield port
    finally:
        server.shutdown()


def _instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "LOOP"
    ds.set_original_encoding(False, True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _associate(port: int) -> Association:
    ae = AE(ae_title="SENDER")
    ae.dimse_timeout = 3
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORE")
    assert assoc.is_established
    return assoc


def test_the_loop_is_parked_even_when_it_was_just_let_through(storage_scp: int) -> None:
    assoc = _associate(storage_scp)
    # The loop is running (its checkpoint set): from now on each of its turns waits on this checkpoint.
    assoc._reactor_checkpoint = _DescheduledCheckpoint()
    assoc._reactor_checkpoint.set()
    time.sleep(0.05)  # the loop passes the checkpoint and is held off, with _is_paused still true
    assert assoc._is_paused
    loop = ParkedLoop(assoc, wait_s=5)
    assert loop.parked
    turns: list[object] = []
    take = assoc.dimse.get_msg

    def watched(block: bool = False) -> tuple[None, None] | tuple[int, DimseServiceType]:
        if threading.current_thread() is not threading.main_thread():
            turns.append(block)  # the loop took a turn: it looks for a message to serve
        return take(block)

    assoc.dimse.get_msg = watched  # type: ignore[method-assign]
    try:
        time.sleep(DESCHEDULED_S + 0.1)  # a loop that was not parked takes its next turn in this time
        statuses = [assoc.send_c_store(_instance()) for _ in range(5)]
        assert turns == []
        assert [int(s.Status) for s in statuses if "Status" in s] == [0] * 5
        assert not loop.needs_loop()
    finally:
        loop.end()
    assert not assoc.is_established
    assert assoc.is_released


def test_a_lost_connection_is_seen_while_the_loop_is_parked(storage_scp: int) -> None:
    assoc = _associate(storage_scp)
    loop = ParkedLoop(assoc)
    assert loop.parked
    assert int(assoc.send_c_store(_instance()).Status) == 0
    assoc.dul.socket.close()  # type: ignore[union-attr]  # the connection goes away under the parked loop
    deadline = time.monotonic() + 5
    while not loop.needs_loop() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert loop.needs_loop()
    t0 = time.monotonic()
    loop.end()
    assert time.monotonic() - t0 < 2  # aborted, no A-RELEASE waiting for an answer
    assert not assoc.is_established
