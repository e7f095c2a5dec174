"""C-STORE of result files to a real Orthanc, and the failure paths against a real pynetdicom SCP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from edge_node.analysis.analyzer import analyze_study
from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.delivery.store_scu import RESULT_SOP_CLASSES, StoreLink, send_files
from edge_node.errors import SendError
from edge_node.inference.loaded_model import load_model
from harness.demo.orthanc import Orthanc, free_port
from tests.edge_node.conftest import instance_rows
from tests.support.onnxgen import make_bundle
from tests.support.orthanc_fixtures import orthanc  # noqa: F401  (fixture; the lead registers the plugin)


@pytest.fixture
def results(tmp_path: Path, shared_data: Path) -> list[ResultFile]:
    """An SR and three SCs for a real three-image CR study."""
    root = shared_data / "dicom" / "pydicom_testfiles" / "dicomdirtests" / "77654033"
    model = load_model(make_bundle(tmp_path / "bundle"), ["CPUExecutionProvider"], 1)
    files = [root / "CR1" / "6154", root / "CR2" / "6247", root / "CR3" / "6278"]
    out = analyze_study(instance_rows(files), model, tmp_path / "out")
    return out.outputs


def test_results_land_in_orthanc(orthanc: Orthanc, results: list[ResultFile]) -> None:  # noqa: F811
    dest = Destination("ORTHANC", "127.0.0.1", orthanc.dicom_port)
    send_files(results, dest, "FEDCLINIC")
    (study_id,) = orthanc.studies()
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.study_instances(study_id)}
    sent = {str(pydicom.dcmread(f.path, stop_before_pixels=True).SOPInstanceUID) for f in results}
    assert sent == {f.sop_instance_uid for f in results}
    assert stored == sent
    classes = {orthanc.instance_tags(i["ID"])["SOPClassUID"] for i in orthanc.study_instances(study_id)}
    assert classes == {ComprehensiveSRStorage, SecondaryCaptureImageStorage}
    # A re-send (e.g. after a crash) is the same objects again, not new copies.
    send_files(results, dest, "FEDCLINIC")
    assert len(orthanc.study_instances(study_id)) == len(results)


def test_nothing_to_send_opens_no_association() -> None:
    send_files([], Destination("NOBODY", "127.0.0.1", free_port()), "FEDCLINIC")


def test_unreachable_destination_is_a_send_error(results: list[ResultFile]) -> None:
    dest = Destination("PACS", "127.0.0.1", free_port())
    with pytest.raises(SendError, match=r"PACS@127\.0\.0\.1:\d+: connection refused"):
        send_files(results[:1], dest, "FEDCLINIC", timeout=5)


def test_a_missing_result_file_is_a_send_error(tmp_path: Path, results: list[ResultFile]) -> None:
    results[0].path.unlink()
    with pytest.raises(SendError, match="is missing"):
        send_files(results[:1], Destination("PACS", "127.0.0.1", free_port()), "FEDCLINIC")


def test_a_wrong_called_ae_is_named(results: list[ResultFile], refusing_scp: tuple[int, list[str]]) -> None:
    port, _ = refusing_scp
    with pytest.raises(SendError, match="called AE title 'NOBODY' not recognised"):
        send_files(results[:1], Destination("NOBODY", "127.0.0.1", port), "FC", timeout=5)


@pytest.fixture
def refusing_scp() -> Iterator[tuple[int, list[str]]]:
    """A real pynetdicom storage SCP that answers 0xA700 (out of resources) to every C-STORE."""
    received: list[str] = []

    def on_store(event: Event) -> int:
        request = cast(C_STORE, event.request)
        received.append(str(request.AffectedSOPInstanceUID))
        return 0xA700

    ae = AE(ae_title="REFUSER")
    ae.require_called_aet = True
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class)
    port = free_port()
    server: ThreadedAssociationServer | None = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield port, received
    finally:
        server.shutdown()


def test_failure_status_is_a_send_error_with_the_status(
    results: list[ResultFile], refusing_scp: tuple[int, list[str]]
) -> None:
    port, received = refusing_scp
    with pytest.raises(SendError, match=r"REFUSER@127\.0\.0\.1:\d+ refused sr-.*: status 0xA700 Failure"):
        send_files(
            sorted(results, key=lambda f: f.path.name, reverse=True),
            Destination("REFUSER", "127.0.0.1", port),
            "FC",
        )
    assert len(received) == 1  # stops at the first refused file


@pytest.fixture
def implicit_only_scp() -> Iterator[tuple[int, list[pydicom.Dataset], list[str]]]:
    """A pynetdicom SCP that accepts results in Implicit VR Little Endian only, keeping what it receives."""
    received: list[pydicom.Dataset] = []
    syntaxes: list[str] = []

    def on_store(event: Event) -> int:
        request = cast(C_STORE, event.request)
        syntaxes.append(str(event.context.transfer_syntax))
        received.append(event.dataset)
        assert request.AffectedSOPInstanceUID == event.dataset.SOPInstanceUID
        return 0x0000

    ae = AE(ae_title="IMPLICIT")
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_supported_context(sop_class, ImplicitVRLittleEndian)
    port = free_port()
    server = cast(
        ThreadedAssociationServer,
        ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]),
    )
    try:
        yield port, received, syntaxes
    finally:
        server.shutdown()


def test_a_peer_without_the_files_syntax_gets_the_data_set_converted(
    results: list[ResultFile], implicit_only_scp: tuple[int, list[pydicom.Dataset], list[str]]
) -> None:
    port, received, syntaxes = implicit_only_scp
    # The SR is written in Explicit VR: its bytes cannot go as they are, its data set is converted.
    assert any(f.transfer_syntax == ExplicitVRLittleEndian for f in results)
    send_files(results, Destination("IMPLICIT", "127.0.0.1", port), "FC")
    assert syntaxes == [ImplicitVRLittleEndian] * len(results)
    for f, ds in zip(results, received, strict=True):
        on_disk = pydicom.dcmread(f.path)
        assert ds.SOPInstanceUID == on_disk.SOPInstanceUID
        assert [e.tag for e in ds] == [e.tag for e in on_disk]


def test_the_files_bytes_go_as_they_are_on_disk(
    results: list[ResultFile], refusing_scp: tuple[int, list[str]], tmp_path: Path
) -> None:
    # An SCP that stores every object: what it receives equals the file's data set byte for byte.
    got: list[bytes] = []

    def on_store(event: Event) -> int:
        got.append(bytes(cast(C_STORE, event.request).DataSet.getvalue()))  # type: ignore[union-attr]
        return 0x0000

    ae = AE(ae_title="KEEPER")
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = cast(
        ThreadedAssociationServer,
        ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]),
    )
    try:
        send_files(results, Destination("KEEPER", "127.0.0.1", port), "FC")
    finally:
        server.shutdown()
    for f, data in zip(results, got, strict=True):
        raw = f.path.read_bytes()
        assert raw.endswith(data)  # the file is its meta, then exactly the bytes that were sent


def test_a_resting_link_notices_that_the_peer_aborted(results: list[ResultFile]) -> None:
    links: list[Association] = []
    ae = AE(ae_title="ABORTER")
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = cast(
        ThreadedAssociationServer,
        ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, lambda event: 0x0000),
                (evt.EVT_ESTABLISHED, lambda event: links.append(event.assoc)),
            ],
        ),
    )
    try:
        link = StoreLink(Destination("ABORTER", "127.0.0.1", port), "FC")
        link.store(results[0])
        link.pace(False)
        assert link.alive
        links[0].abort()
        deadline = time.monotonic() + 5
        while link.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.alive
        t0 = time.monotonic()
        link.close()
        assert time.monotonic() - t0 < 2  # no A-RELEASE waiting for an answer from a peer that is gone
        with pytest.raises(SendError, match=r"ABORTER@127\.0\.0\.1"):
            link.store(results[1])
    finally:
        server.shutdown()
