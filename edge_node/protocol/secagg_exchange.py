"""Secure aggregation over the hub API: the HTTP bodies around the protocol's signed messages.

Every message of a round is bound to the round's id (``task_id`` of the protocol messages, shared by all
nodes) and number. A node signs with an Ed25519 key it makes for the round; it sends the public half with
its ``AdvertiseKeys``, and the hub binds that key to the node's API credential (the request's sender). The
hub relays each closed step to the nodes that took part in it: the roster (advertised keys and the signing
keys they are bound to), the share messages, then the unmask request.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from edge_node.protocol.secagg import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskRequest

__all__ = [
    "SecAggAdvertisement",
    "SecAggMasked",
    "SecAggReceipt",
    "SecAggRelay",
    "SecAggStep",
]


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


class SecAggMasked(_Body):
    """Step 3's body: the signed message and the npz payload of the masked vector it covers (base64)."""

    message: MaskedInput
    payload_b64: str


class SecAggReceipt(_Body):
    round_id: str
    node_id: str
    step: SecAggStep


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
