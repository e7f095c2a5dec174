"""Secure aggregation over the hub API: the HTTP bodies around the protocol's signed messages.

Every message of a round is bound to the round's id (``task_id`` of the protocol messages, shared by all
nodes) and number. A node signs with an Ed25519 key it makes for the round; it sends the public half with
its ``AdvertiseKeys``, and the hub binds that key to the node's API credential (the request's sender). The
hub relays each closed step to the nodes that took part in it: the roster (advertised keys and the signing
keys they are bound to), the share messages, then the unmask request.

A node may ask the POST of its step's message to wait for the step to close (``?wait=``, as a relay GET):
the receipt then carries the step's relay, and the node needs no GET for it.

The masked input, the one large message, travels as a binary body (``pack_masked``): the signed
``MaskedInput`` (which carries the payload's sha256 and length) and the npz payload it covers, with no
base64 or JSON around the payload.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_node.protocol.errors import SecAggError
from edge_node.protocol.secagg import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskRequest

__all__ = [
    "MASKED_MEDIA_TYPE",
    "MAX_MASKED_MESSAGE",
    "SecAggAdvertisement",
    "SecAggReceipt",
    "SecAggRelay",
    "SecAggStep",
    "pack_masked",
    "receipt_json",
    "unpack_masked",
]

#: The media type of the masked step's body.
MASKED_MEDIA_TYPE = "application/octet-stream"
#: The masked body's header: the length of the message's JSON that follows it (4 bytes, big-endian).
_HEADER = struct.Struct(">I")
#: The signed message is a few hundred bytes; a header naming more is not a masked body.
MAX_MASKED_MESSAGE = 16 * 1024


class SecAggStep(str, Enum):
    """The four node steps, in order; each closes before the next opens."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED = "masked"
    UNMASK = "unmask"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecAggAdvertisement(_Body):
    """Step 1's body: the signed keys and the round's signing key that signed them (hex of 32 raw bytes)."""

    signing_public: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    message: AdvertiseKeys


def pack_masked(message: MaskedInput, payload: bytes) -> bytes:
    """Step 3's body: the message's JSON length (4 bytes, big-endian), the JSON, then the npz payload."""
    head = message.model_dump_json().encode()
    return _HEADER.pack(len(head)) + head + payload


def unpack_masked(body: bytes) -> tuple[MaskedInput, bytes]:
    """The signed message and the payload of a ``pack_masked`` body; SecAggError if it is not one.

    Whether the payload is the one the message covers (sha256, length) and who signed it is checked by
    the receiver, as for every message.
    """
    if len(body) < _HEADER.size:
        raise SecAggError(f"the masked body is {len(body)} bytes, shorter than its 4-byte header")
    (size,) = _HEADER.unpack_from(body)
    if size > MAX_MASKED_MESSAGE or _HEADER.size + size > len(body):
        raise SecAggError(
            f"the masked body's header names a {size}-byte message; the body has "
            f"{len(body) - _HEADER.size} bytes after it (at most {MAX_MASKED_MESSAGE} are a message)"
        )
    end = _HEADER.size + size
    try:
        message = MaskedInput.model_validate_json(body[_HEADER.size : end])
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem.get("loc", ())) or "the message"
        reason = f"the masked body's message is not a MaskedInput ({where}: {problem['msg']})"
        raise SecAggError(reason) from None
    return message, body[end:]


class SecAggRelay(_Body):
    """What the hub relays after a step closed; ``ready`` is False while it is still open.

    ``failed`` carries the reason when the round can no longer unmask (fewer than ``threshold`` nodes).
    """

    round_id: str
    round: int
    step: SecAggStep
    ready: bool
    threshold: int
    failed: str | None = None
    #: After ``advertise``: node id -> the round signing key bound to its credential, and its keys.
    signing_keys: dict[str, str] = Field(default_factory=dict)
    advertised: list[AdvertiseKeys] = Field(default_factory=list)
    #: After ``share``: every node's signed share message (each node opens only its own ciphertexts).
    shares: list[ShareKeys] = Field(default_factory=list)
    #: After ``masked``: who sent an input, who dropped.
    unmask_request: UnmaskRequest | None = None


class SecAggReceipt(_Body):
    """The hub kept a node's message. ``relay``: the step's relay once it closed, when the POST asked to
    wait for it (``?wait=``) and it closed (or the round failed) within the wait; else absent."""

    round_id: str
    node_id: str
    step: SecAggStep
    relay: SecAggRelay | None = None


def receipt_json(receipt: SecAggReceipt, relay_json: bytes | None) -> bytes:
    """``receipt`` as JSON with ``relay_json`` (a ``SecAggRelay``'s JSON, serialised once per closed step
    by the hub) as its ``relay``, without parsing and serialising the relay again."""
    plain = receipt.model_dump_json(exclude_none=True).encode()
    if relay_json is None:
        return plain
    return plain[:-1] + b',"relay":' + relay_json + b"}"
