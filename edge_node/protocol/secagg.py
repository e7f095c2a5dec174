"""Secure aggregation (Bonawitz et al., CCS 2017): the math and the messages both sides share.

Four steps per round, each message signed by the sending node's Ed25519 key and bound to its task and
round (the signature covers both), so a forged, replayed or wrong-round message is refused:

1. ``AdvertiseKeys``: two fresh X25519 public keys — one to encrypt shares between nodes, one for masks.
2. ``ShareKeys``: the node Shamir-shares (t of n) its mask private key and a fresh self-mask seed, and
   sends each peer its two shares encrypted (ChaCha20-Poly1305 under a key agreed with that peer).
3. ``MaskedInput``: y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv) in Z_2^32, where x_u is
   the update in fixed point and s_uv the X25519 secret of u and v; the vector travels as npz, the
   message carries its sha256. Pairwise masks cancel in the sum; the self mask guards a late node whose
   pairwise masks the server had to remove.
4. ``UnmaskResponse`` to the server's ``UnmaskRequest``: for every node that sent its input, the share of
   its self-mask seed; for every node that dropped before, the share of its mask key — never both, and a
   node answers once per round. The server removes all masks from the sum and learns nothing else.

PRG: HKDF-SHA256 of the seed, bound to the task, round and purpose, keys a ChaCha20 keystream read as
little-endian uint32. Fixed point: round(x·2^frac_bits) modulo 2^32 (two's complement), so a sum of n
vectors decodes exactly while |Σ x|·2^frac_bits < 2^31.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field

from edge_node.protocol.compression import TensorLayout
from edge_node.protocol.errors import SecAggError
from edge_node.protocol.signing import verify_signature

__all__ = [
    "MASKED_TENSOR",
    "RING_BITS",
    "AdvertiseKeys",
    "MaskedInput",
    "SecAggMessage",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "agree",
    "decode_fixed",
    "derive_key",
    "encode_fixed",
    "flatten",
    "prg",
    "public_raw",
    "unflatten",
]

#: The ring is Z_2^RING_BITS; vectors are uint32.
RING_BITS = 32
#: The one wire tensor of a masked update.
MASKED_TENSOR = "secagg::masked"
_MOD = 1 << RING_BITS


def encode_fixed(x: np.ndarray, frac_bits: int) -> np.ndarray:
    """Floats to the ring: round(x·2^frac_bits) mod 2^32; values beyond ±2^31 raise SecAggError."""
    scaled = np.rint(np.asarray(x, dtype=np.float64) * float(1 << frac_bits))
    if scaled.size and (not np.all(np.isfinite(scaled)) or float(np.max(np.abs(scaled))) >= 2**31):
        raise SecAggError(
            f"a value does not fit the ring at {frac_bits} fractional bits; clip the update or use fewer bits"
        )
    return scaled.astype(np.int64).astype(np.uint32)  # int64 -> uint32 wraps: two's complement


def decode_fixed(v: np.ndarray, frac_bits: int) -> np.ndarray:
    """Ring elements (uint32, read as signed int32) back to floats."""
    return np.asarray(v, dtype=np.uint32).view(np.int32).astype(np.float64) / float(1 << frac_bits)


def flatten(tensors: Mapping[str, np.ndarray], layout: Mapping[str, TensorLayout]) -> np.ndarray:
    """The float tensors of ``layout`` concatenated in sorted name order, as float64 (D,)."""
    parts = []
    for name in sorted(layout):
        spec = layout[name]
        if spec.dtype.kind != "f":
            continue
        arr = tensors.get(name)
        if arr is None or tuple(arr.shape) != tuple(spec.shape):
            raise SecAggError(f"tensor {name!r} is missing or has the wrong shape for secure aggregation")
        parts.append(np.asarray(arr, dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, layout: Mapping[str, TensorLayout]) -> dict[str, np.ndarray]:
    """The float tensors of ``layout`` from a flat vector (inverse of ``flatten``)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name in sorted(layout):
        spec = layout[name]
        if spec.dtype.kind != "f":
            continue
        size = int(np.prod(spec.shape)) if spec.shape else 1
        out[name] = vector[offset : offset + size].reshape(spec.shape).astype(spec.dtype)
        offset += size
    if offset != vector.size:
        raise SecAggError(f"a vector of {vector.size} values does not fit a layout of {offset}")
    return out


def derive_key(secret: bytes, *, task_id: str, round: int, purpose: str) -> bytes:
    """A 32-byte key from a seed or shared secret, bound to this task, round and purpose (HKDF-SHA256)."""
    info = json.dumps(["fedclinic-secagg", task_id, round, purpose]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, length: int, *, task_id: str, round: int, purpose: str) -> np.ndarray:
    """``length`` pseudo-random ring elements from ``seed`` (ChaCha20 keystream, bound to task and round)."""
    key = derive_key(seed, task_id=task_id, round=round, purpose=purpose)
    # The key is single-use (it is bound to task, round and purpose), so a zero nonce is safe.
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def agree(private: X25519PrivateKey, peer_public_hex: str) -> bytes:
    """The X25519 shared secret with a peer's advertised public key (hex of its 32 raw bytes)."""
    try:
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(peer_public_hex))
    except ValueError as exc:
        raise SecAggError("an advertised X25519 key is malformed") from exc
    return private.exchange(peer)


def public_raw(key: X25519PrivateKey | Ed25519PrivateKey) -> str:
    """Hex of a private key's raw 32-byte public key."""
    pub = key.public_key()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class SecAggMessage(BaseModel):
    """Fields every node message carries; the signature covers all others."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str = Field(min_length=1)
    round: int = Field(ge=0)
    node_id: str = Field(min_length=1)
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """Canonical JSON of everything but the signature (including the message type)."""
        body = self.model_dump(mode="json", exclude={"signature"})
        body["type"] = type(self).__name__
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, key: Ed25519PrivateKey) -> SecAggMessage:
        """This message with its Ed25519 signature."""
        return self.model_copy(update={"signature": key.sign(self.signed_bytes()).hex()})

    def verify(self, key: Ed25519PublicKey) -> bool:
        """Whether the signature is ``key``'s over this exact message."""
        try:
            sig = bytes.fromhex(self.signature)
        except ValueError:
            return False
        return verify_signature(key, self.signed_bytes(), sig)


class AdvertiseKeys(SecAggMessage):
    """Step 1: the node's fresh X25519 public keys for this round (hex of the raw 32 bytes)."""

    step: Literal["advertise"] = "advertise"
    cipher_public: str = Field(pattern=r"^[0-9a-f]{64}$")
    mask_public: str = Field(pattern=r"^[0-9a-f]{64}$")


class ShareKeys(SecAggMessage):
    """Step 2: for each peer, its two shares (mask key, self-mask seed) encrypted to it (hex)."""

    step: Literal["share"] = "share"
    ciphertexts: dict[str, str]


class MaskedInput(SecAggMessage):
    """Step 3: the sha256 and length of the masked vector's npz payload, which travels beside it."""

    step: Literal["masked"] = "masked"
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    payload_bytes: int = Field(ge=0)

    def matches(self, payload: bytes) -> bool:
        """Whether ``payload`` is the one this message was signed for."""
        return (
            len(payload) == self.payload_bytes and hashlib.sha256(payload).hexdigest() == self.payload_sha256
        )


class UnmaskRequest(BaseModel):
    """Step 4, from the hub: who sent a masked input (survivors) and who dropped after sharing keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str
    round: int
    survivors: list[str]
    dropped: list[str]


class UnmaskResponse(SecAggMessage):
    """Step 4: self-mask seed shares of the survivors, mask-key shares of the dropped (hex)."""

    step: Literal["unmask"] = "unmask"
    seed_shares: dict[str, str]
    key_shares: dict[str, str]
