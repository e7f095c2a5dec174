"""DIMSE command sets (PS3.7 9.3, E.1), parsed and encoded by hand: implicit VR little endian, group 0000.

The native receive transport reads the request's few fields it needs and answers with a response built
from bytes: pydicom's general machinery cost more per C-STORE than the rest of the receive path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_STORE_RQ",
    "MAX_COMMAND_BYTES",
    "NO_DATA_SET",
    "REQUESTS_WITH_RESPONSES",
    "Command",
    "CommandError",
    "parse_command",
    "response",
]

C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
#: Request command fields other than C-STORE and C-ECHO that have a response (PS3.7 E.1, E.2): C-GET,
#: C-FIND, C-MOVE and the N-services. They are answered "unrecognized operation".
REQUESTS_WITH_RESPONSES = frozenset({0x0010, 0x0020, 0x0021, 0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150})
#: Command Data Set Type: no data set follows (any other value: one follows).
NO_DATA_SET = 0x0101
#: A command set is a few hundred bytes; more than this is refused before it is held.
MAX_COMMAND_BYTES = 64 * 1024

_ELEMENT = struct.Struct("<HHL")
_U16 = struct.Struct("<H")
_UL = struct.Struct("<L")
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID = 0x0002, 0x0100, 0x0110
_DATA_SET_TYPE, _AFFECTED_SOP_INSTANCE, _REQUESTED_SOP_CLASS = 0x0800, 0x1000, 0x0003
_MESSAGE_ID_RESPONDED, _STATUS, _ERROR_COMMENT = 0x0120, 0x0900, 0x0902


class CommandError(Exception):
    """A command set that cannot be parsed; the text quotes nothing received."""


@dataclass(frozen=True)
class Command:
    command_field: int
    message_id: int
    data_set_type: int
    affected_sop_class: str
    affected_sop_instance: str

    @property
    def has_data_set(self) -> bool:
        return self.data_set_type != NO_DATA_SET


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\0 ").strip()


def parse_command(raw: bytes) -> Command:
    """The fields of a command set this node acts on; other elements are skipped."""
    pos = 0
    end = len(raw)
    values: dict[int, bytes] = {}
    while pos < end:
        if pos + 8 > end:
            raise CommandError("a command element header runs past the end of the command set")
        group, element, length = _ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise CommandError("a command element is outside group 0000 or runs past the end")
        values[element] = raw[pos : pos + length]
        pos += length

    def number(element: int) -> int:
        value = values.get(element)
        if value is None or len(value) != 2:
            raise CommandError(f"the command set has no valid (0000,{element:04X})")
        return int(_U16.unpack(value)[0])

    sop_class = values.get(_AFFECTED_SOP_CLASS, values.get(_REQUESTED_SOP_CLASS, b""))
    return Command(
        command_field=number(_COMMAND_FIELD),
        message_id=number(_MESSAGE_ID),
        data_set_type=number(_DATA_SET_TYPE),
        affected_sop_class=_text(sop_class),
        affected_sop_instance=_text(values.get(_AFFECTED_SOP_INSTANCE, b"")),
    )


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def response(request: Command, status: int, comment: str | None = None) -> bytes:
    """The response to ``request`` (its command field with bit 15 set) carrying ``status``.

    ``comment`` becomes the Error Comment (LO, at most 64 characters); it must not carry identifiers.
    """
    elements = []
    if request.affected_sop_class:
        elements.append(_element(_AFFECTED_SOP_CLASS, _padded(request.affected_sop_class[:64], b"\0")))
    elements += [
        _element(_COMMAND_FIELD, _U16.pack(request.command_field | 0x8000)),
        _element(_MESSAGE_ID_RESPONDED, _U16.pack(request.message_id)),
        _element(_DATA_SET_TYPE, _U16.pack(NO_DATA_SET)),
        _element(_STATUS, _U16.pack(status)),
    ]
    if comment:
        elements.append(_element(_ERROR_COMMENT, _padded(comment[:64], b" ")))
    if request.affected_sop_instance:
        elements.append(_element(_AFFECTED_SOP_INSTANCE, _padded(request.affected_sop_instance[:64], b"\0")))
    body = b"".join(elements)
    return _element(0x0000, _UL.pack(len(body))) + body
