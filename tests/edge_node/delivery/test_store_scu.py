"""C-STORE of result files to a real Orthanc, and the failure paths against a real pynetdicom SCP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from edge_node.analysis.analyzer import analyze_study
from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.delivery.store_scu import send_files
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
