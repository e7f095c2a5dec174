"""The hub's side of secure aggregation for one round: relay, collect, and unmask only the sum.

``SecAggServer`` is pure (no I/O, no FastAPI): the API hands it each node message as it arrives and asks it
what to send back. It checks every message against the node's registered Ed25519 key, its task and its
round, and refuses a second message of the same step from a node (a replay). It holds masked vectors
only; after the unmask step it computes the sum of the survivors' inputs and nothing else.

Threat model: an honest-but-curious hub and any minority of colluding nodes learn nothing but the sum.
A node answers one unmask request per round, so a hub cannot ask one node for both shares of a peer;
against a hub that tells different nodes different stories about who dropped, choose a threshold above
two thirds of the cohort (the paper's extra consistency round, which also covers that, is not run here).

Robust aggregation (median, trimmed mean, norm filtering) needs the individual updates, which secure
aggregation hides by design: the two do not combine. Norm bounds are enforced at the node instead (the
clip before masking), which is what bounds one clinic's influence on the sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_node.protocol import shamir
from edge_node.protocol.compression import TensorLayout
from edge_node.protocol.errors import EncodingError, SecAggError
from edge_node.protocol.secagg import (
    MASKED_TENSOR,
    AdvertiseKeys,
    MaskedInput,
    SecAggMessage,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    agree,
    decode_fixed,
    prg,
    unflatten,
)
from edge_node.protocol.tensors import decode_tensors

__all__ = ["SecAggServer"]

logger = logging.getLogger(__name__)


class SecAggServer:
    """One round of secure aggregation over the nodes in ``node_keys`` (node id -> Ed25519 public key)."""

    def __init__(
        self,
        *,
        task_id: str,
        round: int,
        node_keys: Mapping[str, Ed25519PublicKey],
        threshold: int,
        layout: Mapping[str, TensorLayout],
        frac_bits: int = 16,
    ) -> None:
        if not 2 <= threshold <= len(node_keys):
            raise SecAggError(f"threshold must be between 2 and the {len(node_keys)} nodes, got {threshold}")
        self.task_id = task_id
        self.round = round
        self.threshold = threshold
        self.layout = dict(layout)
        self.frac_bits = frac_bits
        self.length = sum(
            int(np.prod(s.shape)) if s.shape else 1 for s in layout.values() if s.dtype.kind == "f"
        )
        self._keys = dict(node_keys)
        self.advertised: dict[str, AdvertiseKeys] = {}
        self.shared: dict[str, ShareKeys] = {}
        self.masked: dict[str, np.ndarray] = {}
        self.responses: dict[str, UnmaskResponse] = {}
        # A step closes when the hub relays its result: a late message would make the nodes disagree on
        # who takes part, and the masks would no longer cancel.
        self._closed: set[str] = set()

    # -- receiving ----------------------------------------------------------------------------------------

    def _accept(self, msg: SecAggMessage, seen: Mapping[str, object], allowed: Mapping[str, object]) -> None:
        if (msg.task_id, msg.round) != (self.task_id, self.round):
            raise SecAggError(
                f"refused: a {type(msg).__name__} for task {msg.task_id!r} round {msg.round}, "
                f"this is task {self.task_id!r} round {self.round}"
            )
        key = self._keys.get(msg.node_id)
        if key is None or not msg.verify(key):
            raise SecAggError(f"refused: a {type(msg).__name__} claiming {msg.node_id!r} is not signed by it")
        if msg.node_id in seen:
            raise SecAggError(f"refused: {msg.node_id!r} already sent its {type(msg).__name__} (replay)")
        if msg.node_id not in allowed:
            raise SecAggError(f"refused: {msg.node_id!r} did not take part in the previous step")
        if type(msg).__name__ in self._closed:
            raise SecAggError(f"refused: the {type(msg).__name__} step of this round is closed (too late)")

    def bind_key(self, node_id: str, key: Ed25519PublicKey) -> None:
        """Set the signing key of a cohort node that has not advertised yet (it arrives with its message)."""
        if node_id not in self._keys:
            raise SecAggError(f"refused: {node_id!r} is not in this round's cohort")
        if node_id in self.advertised:
            raise SecAggError(f"refused: {node_id!r} already sent its AdvertiseKeys (replay)")
        self._keys[node_id] = key

    def signing_key(self, node_id: str) -> Ed25519PublicKey | None:
        """The signing key this server checks ``node_id``'s messages with (None: not in the cohort)."""
        return self._keys.get(node_id)

    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        """Step 1 from a node."""
        self._accept(msg, self.advertised, self._keys)
        self.advertised[msg.node_id] = msg

    def key_list(self) -> list[AdvertiseKeys]:
        """What every advertising node receives for step 2 (the signed messages, so nodes can check them)."""
        if len(self.advertised) < self.threshold:
            raise SecAggError(
                f"{len(self.advertised)} nodes advertised keys; the threshold is {self.threshold}"
            )
        self._closed.add(AdvertiseKeys.__name__)
        return [self.advertised[n] for n in sorted(self.advertised)]

    def receive_shares(self, msg: ShareKeys) -> None:
        """Step 2 from a node: encrypted shares for every other advertising node."""
        self._accept(msg, self.shared, self.advertised)
        if set(msg.ciphertexts) != set(self.advertised) - {msg.node_id}:
            raise SecAggError(f"refused: {msg.node_id!r} did not share with exactly the advertising nodes")
        self.shared[msg.node_id] = msg

    def share_list(self) -> list[ShareKeys]:
        """What every node that shared receives before masking (each picks out its own ciphertexts)."""
        if len(self.shared) < self.threshold:
            raise SecAggError(f"{len(self.shared)} nodes shared keys; the threshold is {self.threshold}")
        self._closed.add(ShareKeys.__name__)
        return [self.shared[n] for n in sorted(self.shared)]

    def receive_masked(self, msg: MaskedInput, payload: bytes) -> None:
        """Step 3 from a node: its signed message and the npz payload it covers."""
        self._accept(msg, self.masked, self.shared)
        if not msg.matches(payload):
            raise SecAggError(f"refused: the masked payload of {msg.node_id!r} is not the one it signed")
        try:
            tensors = decode_tensors(payload)
        except EncodingError as exc:
            raise SecAggError(f"refused: masked payload of {msg.node_id!r}: {exc}") from exc
        vec = tensors.get(MASKED_TENSOR)
        if (
            set(tensors) != {MASKED_TENSOR}
            or vec is None
            or vec.dtype != np.uint32
            or vec.shape != (self.length,)
        ):
            raise SecAggError(
                f"refused: masked payload of {msg.node_id!r} is not one uint32 vector of {self.length}"
            )
        self.masked[msg.node_id] = vec

    def unmask_request(self) -> UnmaskRequest:
        """Step 4's request to every survivor: who sent an input, who dropped after sharing."""
        if len(self.masked) < self.threshold:
            raise SecAggError(
                f"only {len(self.masked)} masked inputs arrived; unmasking needs at least {self.threshold}"
            )
        self._closed.add(MaskedInput.__name__)
        return UnmaskRequest(
            task_id=self.task_id,
            round=self.round,
            survivors=sorted(self.masked),
            dropped=sorted(set(self.shared) - set(self.masked)),
        )

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Step 4 from a survivor."""
        self._accept(msg, self.responses, self.masked)
        request = self.unmask_request()
        if set(msg.seed_shares) != set(request.survivors) or set(msg.key_shares) != set(request.dropped):
            raise SecAggError(f"refused: the unmask response of {msg.node_id!r} does not answer the request")
        self.responses[msg.node_id] = msg

    # -- the sum ------------------------------------------------------------------------------------------

    def ring_sum(self) -> np.ndarray:
        """Σ x_u over the survivors in the ring (uint32), all self and dropped pairwise masks removed."""
        if len(self.responses) < self.threshold:
            raise SecAggError(f"{len(self.responses)} unmask responses; at least {self.threshold} are needed")
        request = self.unmask_request()
        total = np.zeros(self.length, dtype=np.uint32)
        for vec in self.masked.values():
            total += vec
        for u in request.survivors:
            seed = shamir.combine(self._collect(u, "seed"), self.threshold)
            total -= prg(seed, self.length, task_id=self.task_id, round=self.round, purpose="self")
        for u in request.dropped:
            key = X25519PrivateKey.from_private_bytes(shamir.combine(self._collect(u, "key"), self.threshold))
            for v in request.survivors:
                pair = agree(key, self.advertised[v].mask_public)
                mask = prg(pair, self.length, task_id=self.task_id, round=self.round, purpose="pair")
                # v added +mask if v < u, else −mask: take it back out.
                total = total - mask if v < u else total + mask
        logger.info(
            "secure aggregation: task round %d unmasked from %d inputs (%d dropped)",
            self.round,
            len(request.survivors),
            len(request.dropped),
        )
        return total

    def sum(self) -> dict[str, np.ndarray]:
        """The survivors' summed update as float tensors of the layout (fixed point decoded)."""
        return unflatten(decode_fixed(self.ring_sum(), self.frac_bits), self.layout)

    def _collect(self, node: str, kind: str) -> list[shamir.Share]:
        shares = []
        for resp in self.responses.values():
            raw = (resp.seed_shares if kind == "seed" else resp.key_shares).get(node)
            if raw is not None:
                shares.append(shamir.Share.from_bytes(bytes.fromhex(raw)))
        return shares
