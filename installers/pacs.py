"""PACS connectivity in plain words: C-ECHO out, a listener for what the PACS sends in, a test SR out.

Every failure is explained as an IT person would fix it: wrong host, port blocked or wrong, AE title not
recognised. No element value of a received dataset is read or logged: an arriving study is reported by its
SOP class name and the calling AE title only.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Arrival", "EchoOutcome", "InboundProbe", "echo", "send_test_report"]

# PS3.8 9.3.4: A-ASSOCIATE-RJ reasons when the source is the DICOM UL service-user (source 1).
_CALLING_AE_NOT_RECOGNISED = 3
_CALLED_AE_NOT_RECOGNISED = 7


@dataclass(frozen=True)
class EchoOutcome:
    """A C-ECHO attempt: ok, and else the problem in plain words and what to do."""

    host: str
    port: int
    called_ae: str
    ok: bool
    problem: str = ""
    fix: str = ""
    milliseconds: float = 0.0

    @property
    def address(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"


def _reach(host: str, port: int, timeout: float) -> tuple[str, str] | None:
    """Plain TCP first: it tells a wrong host from a wrong port from a firewall. None when it connects."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return (f"the host name {host!r} does not resolve (wrong host)", "check the PACS address (or DNS)")
    except ConnectionRefusedError:
        return (
            f"{host} refuses connections on port {port}: nothing listens there (wrong port, or the PACS's "
            "DICOM service is stopped)",
            "ask the PACS administrator for the PACS's DICOM port and fix it",
        )
    except TimeoutError:
        return (
            f"no answer from {host}:{port} within {timeout:.0f} s: a firewall drops the traffic, or the host "
            "is wrong",
            f"ask the network administrator to allow TCP {port} from this computer to {host}",
        )
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return (f"{host} is unreachable from here (wrong host or routing)", "check the PACS address")
        return (f"cannot connect to {host}:{port}: {exc.strerror}", "check the PACS address and port")


def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 10.0) -> EchoOutcome:
    """C-ECHO ``called_ae`` at host:port as ``calling_ae``; never raises for a network problem."""
    from pynetdicom import AE

    from edge_node.delivery.association_loop import ParkedLoop

    started = time.perf_counter()

    def outcome(ok: bool, problem: str = "", fix: str = "") -> EchoOutcome:
        ms = (time.perf_counter() - started) * 1000
        return EchoOutcome(host, port, called_ae, ok, problem, fix, ms)

    unreachable = _reach(host, port, timeout)
    if unreachable is not None:
        return outcome(False, *unreachable)
    client = AE(ae_title=calling_ae)
    client.add_requested_context("1.2.840.10008.1.1")  # Verification
    client.acse_timeout = client.dimse_timeout = client.network_timeout = timeout
    client.connection_timeout = timeout
    quiet = logging.getLogger("pynetdicom")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the failure is explained below, in words
    try:
        assoc = client.associate(host, port, ae_title=called_ae)
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            diagnostic = getattr(primitive, "diagnostic", None)
            if diagnostic == _CALLED_AE_NOT_RECOGNISED:
                return outcome(
                    False,
                    f"the PACS at {host}:{port} does not recognise the AE title {called_ae!r} we called",
                    "ask the PACS administrator for the PACS's exact AE title (case matters)",
                )
            if diagnostic == _CALLING_AE_NOT_RECOGNISED:
                return outcome(
                    False,
                    f"the PACS does not know this node's AE title {calling_ae!r}",
                    f"ask the PACS administrator to add AE {calling_ae!r} at this computer's address",
                )
            return outcome(
                False,
                f"the PACS rejected the association ({getattr(primitive, 'reason_str', 'no reason given')})",
                f"ask the PACS administrator to allow AE {calling_ae!r} from this computer",
            )
        if not assoc.is_established:
            return outcome(
                False,
                f"{host}:{port} accepted TCP but did not speak DICOM (wrong port?)",
                "check that this is the PACS's DICOM port, not its web port",
            )
        held = ParkedLoop(assoc)  # pynetdicom's loop cannot take the answer
        try:
            answer = assoc.send_c_echo()
        finally:
            held.end()
    finally:
        quiet.setLevel(level)
    status = int(answer.Status) if answer is not None and "Status" in answer else -1
    if status != 0:
        return outcome(
            False,
            f"the PACS answered C-ECHO with status 0x{status & 0xFFFF:04X}",
            "ask the PACS administrator",
        )
    return outcome(True)


@dataclass(frozen=True)
class Arrival:
    """Something the PACS sent to the probe: a C-ECHO or one instance (its SOP class name only)."""

    kind: str  # "C-ECHO" or "C-STORE"
    calling_ae: str
    what: str
    at: float


@dataclass
class InboundProbe:
    """A short-lived DICOM listener on the node's AE title and port, so the IT person sees the PACS reach it.

    Received instances are acknowledged and discarded (the node itself is not running yet).
    """

    ae_title: str
    host: str
    port: int
    arrivals: list[Arrival] = field(default_factory=list)
    _server: Any = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def _record(self, arrival: Arrival) -> None:
        with self._changed:
            self.arrivals.append(arrival)
            self._changed.notify_all()

    def start(self) -> InboundProbe:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        def on_echo(event: Any) -> int:
            self._record(Arrival("C-ECHO", event.assoc.requestor.ae_title, "verification", time.time()))
            return 0x0000

        def on_store(event: Any) -> int:
            from pydicom.uid import UID

            # Only the SOP class UID from the request: no element of the dataset is decoded.
            sop_class = UID(event.request.AffectedSOPClassUID)
            self._record(Arrival("C-STORE", event.assoc.requestor.ae_title, sop_class.name, time.time()))
            return 0x0000

        server_ae = AE(ae_title=self.ae_title)
        server_ae.add_supported_context("1.2.840.10008.1.1")
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                server_ae.add_supported_context(context.abstract_syntax)
        self._server = server_ae.start_server(
            (self.host, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_ECHO, on_echo), (evt.EVT_C_STORE, on_store)],
        )
        return self

    def wait(self, timeout: float, count: int = 1) -> list[Arrival]:
        """Wait until ``count`` arrivals (or the timeout); returns what arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.arrivals) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return list(self.arrivals)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> InboundProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connectivity_report() -> Any:
    """A Basic Text SR that says it is a connectivity test, with a made-up test patient (no real data)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    sop_class = UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR Storage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "FEDCLINIC^CONNECTIVITY^TEST"
    ds.PatientID = "FEDCLINIC-TEST"
    ds.StudyDescription = "fedclinic installer connectivity test"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDate = ds.ContentDate = time.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = time.strftime("%H%M%S")
    ds.Manufacturer = "fedclinic"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "121060", "DCM", "History"
    ds.ConceptNameCodeSequence = [title]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [title]
    item.TextValue = "fedclinic installer: results can reach this PACS. This object can be deleted."
    ds.ContentSequence = [item]
    return ds


def send_test_report(
    host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 10.0
) -> EchoOutcome:
    """C-STORE the test SR; the outcome explains a failure like ``echo`` does."""
    from pynetdicom import AE

    from edge_node.delivery.association_loop import ParkedLoop

    reached = echo(host, port, called_ae, calling_ae, timeout)
    if not reached.ok:
        return reached
    started = time.perf_counter()
    report = connectivity_report()
    client = AE(ae_title=calling_ae)
    client.add_requested_context(report.SOPClassUID, report.file_meta.TransferSyntaxUID)
    client.acse_timeout = client.dimse_timeout = client.network_timeout = timeout
    assoc = client.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return EchoOutcome(
            host,
            port,
            called_ae,
            False,
            "the PACS refused the association for storing",
            "ask the PACS administrator to accept storage from this AE",
        )
    held = ParkedLoop(assoc)
    try:
        answer = assoc.send_c_store(report)
    finally:
        held.end()
    status = int(answer.Status) if answer is not None and "Status" in answer else -1
    ms = (time.perf_counter() - started) * 1000
    if status not in (0x0000, 0xB000, 0xB007, 0xB006):
        return EchoOutcome(
            host,
            port,
            called_ae,
            False,
            f"the PACS refused the test report (status 0x{status & 0xFFFF:04X}; it may not accept "
            "Structured Reports)",
            "ask the PACS administrator to accept Basic Text SR",
            ms,
        )
    return EchoOutcome(host, port, called_ae, True, milliseconds=ms)
