"""The node's side of secure aggregation for one round: keys, shares, the masked input, unmasking.

One ``SecAggClient`` per round (its keys are fresh and die with it). The hub relays the messages; this
client verifies every peer message against the peer's Ed25519 key (the federation's node registry) and its
task and round, so the hub cannot slip in keys of its own. ``mask`` is the pipeline's last step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from edge_node.protocol import shamir
from edge_node.protocol.compression import TensorLayout
from edge_node.protocol.errors import SecAggError
from edge_node.protocol.secagg import (
    MASKED_TENSOR,
    AdvertiseKeys,
    MaskedInput,
    SecAggMessage,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    agree,
    derive_key,
    encode_fixed,
    flatten,
    prg,
    public_raw,
)
from edge_node.protocol.tensors import Tensors

__all__ = ["SecAggClient", "share_aad"]

logger = logging.getLogger(__name__)


def share_aad(task_id: str, round: int, sender: str, recipient: str) -> bytes:
    """Associated data of an encrypted share: it opens only for this task, round, sender and recipient."""
    return f"{task_id}\x00{round}\x00{sender}\x00{recipient}".encode()


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class SecAggClient:
    """One node in one round of secure aggregation (threshold ``threshold`` of the advertised nodes)."""

    def __init__(
        self,
        node_id: str,
        signing_key: Ed25519PrivateKey,
        peers: Mapping[str, Ed25519PublicKey],
        *,
        task_id: str,
        round: int,
        threshold: int,
        layout: Mapping[str, TensorLayout],
        frac_bits: int = 16,
    ) -> None:
        self.node_id = node_id
        self.task_id = task_id
        self.round = round
        self.threshold = threshold
        self.layout = dict(layout)
        self.frac_bits = frac_bits
        self._signing_key = signing_key
        self._peers = dict(peers)
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(32)
        self._advertised: dict[str, AdvertiseKeys] = {}
        self._inbox: dict[str, str] = {}  # sender -> ciphertext of its shares for this node
        self._answered = False

    def trust(self, peers: Mapping[str, Ed25519PublicKey]) -> None:
        """Take signing keys of peers this client did not know (the roster the hub relays for the round).

        A key that contradicts one the client already holds is refused: the hub may add peers, never
        replace one.
        """
        for node, key in peers.items():
            known = self._peers.get(node)
            if known is None:
                self._peers[node] = key
            elif known.public_bytes_raw() != key.public_bytes_raw():
                raise SecAggError(f"the roster gives {node!r} another signing key than the one known")

    # -- messages ------------------------------------------------------------------------------------------

    def advertise(self) -> AdvertiseKeys:
        """Step 1."""
        msg = AdvertiseKeys(
            task_id=self.task_id,
            round=self.round,
            node_id=self.node_id,
            cipher_public=public_raw(self._cipher_key),
            mask_public=public_raw(self._mask_key),
        )
        return msg.signed(self._signing_key)  # type: ignore[return-value]

    def share_keys(self, advertised: Sequence[AdvertiseKeys]) -> ShareKeys:
        """Step 2: check every peer's keys, then share this node's mask key and seed with all of them."""
        for msg in advertised:
            self._check(msg)
        self._advertised = {m.node_id: m for m in advertised}
        if self.node_id not in self._advertised:
            raise SecAggError("the hub's key list leaves this node out")
        if len(self._advertised) < self.threshold:
            raise SecAggError(
                f"only {len(self._advertised)} nodes advertised keys; the threshold is {self.threshold}"
            )
        ids = sorted(self._advertised)
        key_shares = shamir.split(_raw_private(self._mask_key), self.threshold, len(ids))
        seed_shares = shamir.split(self._seed, self.threshold, len(ids))
        ciphertexts = {}
        for i, peer in enumerate(ids):
            if peer == self.node_id:
                continue
            plain = key_shares[i].to_bytes() + seed_shares[i].to_bytes()
            aead = ChaCha20Poly1305(self._pair_key(peer))
            nonce = os.urandom(12)
            aad = share_aad(self.task_id, self.round, self.node_id, peer)
            ciphertexts[peer] = (nonce + aead.encrypt(nonce, plain, aad)).hex()
        # This node's own shares stay with it: it is a shareholder of itself too.
        own = ids.index(self.node_id)
        self._own_shares = (key_shares[own], seed_shares[own])
        shares = ShareKeys(
            task_id=self.task_id, round=self.round, node_id=self.node_id, ciphertexts=ciphertexts
        )
        return shares.signed(self._signing_key)  # type: ignore[return-value]

    def receive_shares(self, messages: Sequence[ShareKeys]) -> None:
        """Step 2, receiving: the peers' signed share messages as the hub relays them."""
        for msg in messages:
            self._check(msg)
            if msg.node_id not in self._advertised:
                raise SecAggError(f"shares from {msg.node_id!r}, which did not advertise keys")
            if msg.node_id != self.node_id:
                if self.node_id not in msg.ciphertexts:
                    raise SecAggError(f"{msg.node_id!r} sent no share to this node")
                self._inbox[msg.node_id] = msg.ciphertexts[self.node_id]

    def mask(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        """Step 3 as the pipeline's mask step: the update in fixed point plus all masks, in the ring."""
        if not self._inbox:
            raise SecAggError("mask only after the peers' shares arrived (receive_shares)")
        x = encode_fixed(flatten(tensors, self.layout), self.frac_bits)
        n = x.size
        y = x + prg(self._seed, n, task_id=self.task_id, round=self.round, purpose="self")
        for peer in self._inbox:  # the peers that shared keys: U2
            pair = agree(self._mask_key, self._advertised[peer].mask_public)
            mask = prg(pair, n, task_id=self.task_id, round=self.round, purpose="pair")
            y = y + mask if self.node_id < peer else y - mask  # uint32 arithmetic wraps: the ring
        return {MASKED_TENSOR: y.astype(np.uint32)}

    def masked_input(self, payload: bytes) -> MaskedInput:
        """Step 3's signed message for the npz payload of ``mask``'s tensors."""
        msg = MaskedInput(
            task_id=self.task_id,
            round=self.round,
            node_id=self.node_id,
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_bytes=len(payload),
        )
        return msg.signed(self._signing_key)  # type: ignore[return-value]

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Step 4: seed shares of survivors, key shares of the dropped; once per round."""
        if (request.task_id, request.round) != (self.task_id, self.round):
            raise SecAggError("the unmask request is for another task or round")
        if self._answered:
            raise SecAggError("this node already answered an unmask request this round")
        survivors, dropped = set(request.survivors), set(request.dropped)
        known = set(self._inbox) | {self.node_id}
        if survivors & dropped or not (survivors | dropped) <= known:
            raise SecAggError("the unmask request names nodes twice or nodes that shared no keys")
        if self.node_id not in survivors or len(survivors) < self.threshold:
            raise SecAggError(f"too few survivors ({len(survivors)}) to unmask at threshold {self.threshold}")
        self._answered = True
        seed_shares: dict[str, str] = {}
        key_shares: dict[str, str] = {}
        for peer in sorted(survivors | dropped):
            key_share, seed_share = self._shares_of(peer)
            if peer in survivors:
                seed_shares[peer] = seed_share.to_bytes().hex()
            else:
                key_shares[peer] = key_share.to_bytes().hex()
        msg = UnmaskResponse(
            task_id=self.task_id,
            round=self.round,
            node_id=self.node_id,
            seed_shares=seed_shares,
            key_shares=key_shares,
        )
        return msg.signed(self._signing_key)  # type: ignore[return-value]

    # -- internals -----------------------------------------------------------------------------------------

    def _check(self, msg: SecAggMessage) -> None:
        if (msg.task_id, msg.round) != (self.task_id, self.round):
            raise SecAggError(f"a message of {msg.node_id!r} is for another task or round")
        key = self._peers.get(msg.node_id)
        if key is None or not msg.verify(key):
            raise SecAggError(f"a message claiming to come from {msg.node_id!r} has no valid signature")

    def _pair_key(self, peer: str) -> bytes:
        secret = agree(self._cipher_key, self._advertised[peer].cipher_public)
        return derive_key(secret, task_id=self.task_id, round=self.round, purpose="shares")

    def _shares_of(self, peer: str) -> tuple[shamir.Share, shamir.Share]:
        if peer == self.node_id:
            return self._own_shares
        raw = bytes.fromhex(self._inbox[peer])
        aead = ChaCha20Poly1305(self._pair_key(peer))
        try:
            plain = aead.decrypt(raw[:12], raw[12:], share_aad(self.task_id, self.round, peer, self.node_id))
        except InvalidTag as exc:
            raise SecAggError(f"the shares from {peer!r} do not decrypt: tampered or misaddressed") from exc
        half = len(plain) // 2
        return shamir.Share.from_bytes(plain[:half]), shamir.Share.from_bytes(plain[half:])
