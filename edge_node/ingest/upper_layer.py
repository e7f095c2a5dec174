"""The DICOM upper layer's PDUs (PS3.8 9.3): the association request parsed, every answer encoded by hand.

Only what an acceptor needs: it parses an A-ASSOCIATE-RQ and encodes A-ASSOCIATE-AC/RJ, A-RELEASE-RP,
A-ABORT and the P-DATA-TF that carries a response. P-DATA-TF bodies are walked in place by the transport
(``pdvs``), so a data fragment is never copied on its way to the spool. A malformed request raises
``PduError`` with a short reason that names no received value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from edge_node.ingest.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = [
    "ABORT_INVALID_PARAMETER",
    "ABORT_NOT_SPECIFIED",
    "ABORT_UNEXPECTED_PDU",
    "APPLICATION_CONTEXT",
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "HEADER",
    "MAX_CONTROL_PDU",
    "P_DATA_TF",
    "AssociationRequest",
    "PduError",
    "ProposedContext",
    "abort",
    "associate_ac",
    "associate_rj",
    "p_data",
    "parse_associate_rq",
    "pdvs",
    "release_rp",
]

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
#: Every PDU starts with type (1), reserved (1) and the length of what follows (4, big endian).
HEADER = struct.Struct(">BBL")
#: Largest non-data PDU accepted (bytes after the 6-byte header): far more than a real A-ASSOCIATE-RQ with
#: every presentation context. Both receive transports enforce it.
MAX_CONTROL_PDU = 1024 * 1024
#: The DICOM application context name (PS3.7 A.2.1), the only one there is.
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

#: A-ABORT reasons from the service provider (PS3.8 9.3.8).
ABORT_NOT_SPECIFIED, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x00, 0x02, 0x06

_ITEM = struct.Struct(">BBH")
_PDV = struct.Struct(">LBB")
_U32 = struct.Struct(">L")
#: Fixed fields of A-ASSOCIATE-RQ/AC after the PDU header: version, reserved, called AE, calling AE, 32 zeros.
_FIXED = 2 + 2 + 16 + 16 + 32


class PduError(Exception):
    """A PDU that does not follow PS3.8; the text is safe to log (it quotes nothing received)."""


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociationRequest:
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    #: The requestor's Maximum Length Received (0: no limit).
    max_pdu: int = 0
    implementation_class_uid: str = ""


def _text(raw: bytes | memoryview) -> str:
    # AE titles and UIDs are ASCII; anything else is kept visibly wrong rather than raising.
    return bytes(raw).decode("ascii", "replace").strip(" \0")


def _items(body: memoryview) -> Iterator[tuple[int, memoryview]]:
    pos = 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise PduError("an item header runs past the end of its PDU")
        item_type, _, length = _ITEM.unpack_from(body, pos)
        end = pos + 4 + length
        if end > len(body):
            raise PduError("an item runs past the end of its PDU")
        yield item_type, body[pos + 4 : end]
        pos = end


def _context(body: memoryview) -> ProposedContext:
    if len(body) < 4:
        raise PduError("a presentation context item is too short")
    abstract: str | None = None
    transfer: list[str] = []
    for sub_type, value in _items(body[4:]):
        if sub_type == 0x30:
            abstract = _text(value)
        elif sub_type == 0x40:
            transfer.append(_text(value))
    if abstract is None or not transfer:
        raise PduError("a presentation context lacks its abstract or transfer syntax")
    return ProposedContext(body[0], abstract, tuple(transfer))


def parse_associate_rq(body: bytes) -> AssociationRequest:
    """The A-ASSOCIATE-RQ whose body (after the 6-byte header) is ``body``."""
    view = memoryview(body)
    if len(view) < _FIXED:
        raise PduError("the association request is too short")
    version = struct.unpack_from(">H", view, 0)[0]
    called, calling = _text(view[4:20]), _text(view[20:36])
    application_context = ""
    contexts: list[ProposedContext] = []
    max_pdu = 0
    implementation = ""
    counts: dict[int, int] = {}
    for item_type, value in _items(view[_FIXED:]):
        counts[item_type] = counts.get(item_type, 0) + 1
        if item_type == 0x10:
            application_context = _text(value)
        elif item_type == 0x20:
            contexts.append(_context(value))
        elif item_type == 0x50:
            for sub_type, sub in _items(value):
                if sub_type == 0x51 and len(sub) == 4:
                    max_pdu = _U32.unpack_from(sub)[0]
                elif sub_type == 0x52:
                    implementation = _text(sub)
    if counts.get(0x10) != 1 or counts.get(0x50, 0) > 1:
        raise PduError("the association request has no or several application contexts or user infos")
    return AssociationRequest(
        version, called, calling, application_context, tuple(contexts), max_pdu, implementation
    )


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return HEADER.pack(pdu_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16)


def associate_ac(request: AssociationRequest, results: list[tuple[int, int, str]], max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC: ``results`` holds (context id, result, transfer syntax) for every proposed context."""
    fixed = struct.pack(">HH", 1, 0) + _ae(request.called_ae) + _ae(request.calling_ae) + bytes(32)
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for context_id, result, syntax in results:
        # Result 0 is acceptance; for any other the transfer syntax sub-item is present and ignored.
        items.append(_item(0x21, bytes((context_id, 0, result, 0)) + _item(0x40, syntax.encode())))
    user = (
        _item(0x51, _U32.pack(max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
        + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode())
    )
    items.append(_item(0x50, user))
    return _pdu(A_ASSOCIATE_AC, fixed + b"".join(items))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source and reason as in Table 9-21."""
    return _pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


def release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, bytes(4))


def abort(reason: int = ABORT_NOT_SPECIFIED) -> bytes:
    """A-ABORT from the service provider (source 2) with ``reason``."""
    return _pdu(A_ABORT, bytes((0, 0, 2, reason)))


def p_data(context_id: int, command: bool, last: bool, value: bytes) -> bytes:
    """One P-DATA-TF carrying one PDV (the whole of a small command set)."""
    control = (1 if command else 0) | (2 if last else 0)
    return _pdu(P_DATA_TF, _PDV.pack(len(value) + 2, context_id, control) + value)


def pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of every PDV in a P-DATA-TF body, without copying."""
    pos = 0
    end = len(body)
    while pos < end:
        if pos + 6 > end:
            raise PduError("a PDV header runs past the end of its PDU")
        length, context_id, control = _PDV.unpack_from(body, pos)
        stop = pos + 4 + length
        if length < 2 or stop > end:
            raise PduError("a PDV length does not fit its PDU")
        yield context_id, control, body[pos + 6 : stop]
        pos = stop
