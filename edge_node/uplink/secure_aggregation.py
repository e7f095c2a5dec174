"""SecureAggregationRound: this node's part in one round's secure aggregation, over the hub API.

The node makes an Ed25519 signing key for the round and sends its public half with its advertised keys;
the hub binds it to this node's credential and relays every node's key in the roster. The steps, in
order: ``advertise`` → wait for the roster → ``share`` → wait for the peers' shares → ``send_masked``
(the protection pipeline's clip → noise → mask) → wait for the unmask request → ``unmask``. A node
waits for a step to close with long-polls of the hub (each up to ``long_poll_s``, never asked more often
than every ``poll_s``): first the POST of its message, whose receipt carries the step's relay once it
closed, then, if it did not close in that time, GETs of the relay; a round that failed (below the
threshold) raises with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_node.protection.masking import SecAggClient
from edge_node.protection.pipeline import ProtectedUpdate, ProtectionPipeline
from edge_node.protocol.compression import Layout, TensorLayout
from edge_node.protocol.errors import SecAggError
from edge_node.protocol.protection import ProtectionSpec
from edge_node.protocol.secagg import public_raw
from edge_node.protocol.secagg_exchange import (
    MASKED_MEDIA_TYPE,
    SecAggAdvertisement,
    SecAggReceipt,
    SecAggRelay,
    SecAggStep,
    pack_masked,
)
from edge_node.protocol.wire import Task
from edge_node.uplink.transport import DEFAULT_TIMEOUT, HubTransport

__all__ = ["SecureAggregationRound"]

logger = logging.getLogger(__name__)


class SecureAggregationRound:
    """One node in one round (``round_id`` binds every message; ``round`` is its number)."""

    def __init__(
        self,
        transport: HubTransport,
        *,
        node_id: str,
        round_id: str,
        round: int,
        layout: Mapping[str, TensorLayout],
        poll_s: float = 0.2,
        long_poll_s: float = 25.0,
        wait_s: float = 300.0,
        threshold: int | None = None,
    ) -> None:
        self.transport = transport
        self.node_id = node_id
        self.round_id = round_id
        self.round = round
        self.layout = dict(layout)
        self.poll_s = poll_s
        self.long_poll_s = long_poll_s
        self.wait_s = wait_s
        #: The round's t, from the task's protection (None: asked of the hub before advertising).
        self.threshold = threshold
        self._key = Ed25519PrivateKey.generate()
        self._client: SecAggClient | None = None
        #: Relays the hub sent with this node's receipts (a POST that waited for its step to close).
        self._relayed: dict[SecAggStep, SecAggRelay] = {}
        #: Bytes this node sent and received in the protocol (request and response bodies).
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    def for_task(cls, transport: HubTransport, node_id: str, task: Task) -> SecureAggregationRound:
        """The protocol for ``task``'s round, over the tensors the task expects back."""
        layout = {t.name: Layout(tuple(t.shape), np.dtype(t.dtype)) for t in task.expected}
        threshold = task.protection.unmask_threshold if task.protection is not None else None
        return cls(
            transport,
            node_id=node_id,
            round_id=task.round_id,
            round=task.round,
            layout=layout,
            threshold=threshold,
        )

    @property
    def signing_public(self) -> str:
        """Hex of this round's signing key (what the hub binds to the node's credential)."""
        return public_raw(self._key)

    @property
    def client(self) -> SecAggClient:
        if self._client is None:
            raise SecAggError("advertise keys first")
        return self._client

    def _path(self, step: SecAggStep) -> str:
        return f"/v1/secagg/{self.round_id}/{step.value}"

    def _post(
        self, step: SecAggStep, body: str | bytes, media_type: str = "application/json", *, wait: bool = True
    ) -> None:
        """Send this node's message of ``step``; with ``wait`` the hub answers once the step closed (within
        ``long_poll_s``) with its relay, kept for ``wait`` (else ``wait`` asks with GETs)."""
        data = body.encode() if isinstance(body, str) else body
        self.bytes_sent += len(data)
        headers = {"Content-Type": media_type}
        if wait and self.long_poll_s > 0:
            params = {"wait": f"{self.long_poll_s:.1f}"}
            timeout = self.long_poll_s + DEFAULT_TIMEOUT
            response = self.transport.request(
                "POST", self._path(step), content=data, headers=headers, params=params, timeout=timeout
            )
        else:
            response = self.transport.request("POST", self._path(step), content=data, headers=headers)
        self.bytes_received += len(response.content)
        if wait:
            receipt = SecAggReceipt.model_validate_json(response.content)
            if (
                receipt.relay is not None
                and receipt.relay.step is step
                and receipt.relay.round_id == self.round_id
            ):
                self._relayed[step] = receipt.relay

    def relay(self, step: SecAggStep, wait_s: float = 0.0) -> SecAggRelay:
        """What the hub relays for ``step`` (``ready`` False while it is open), waiting up to ``wait_s``."""
        if wait_s > 0:
            params = {"wait": f"{wait_s:.1f}"}
            response = self.transport.request(
                "GET", self._path(step), params=params, timeout=wait_s + DEFAULT_TIMEOUT
            )
        else:
            response = self.transport.request("GET", self._path(step))
        self.bytes_received += len(response.content)
        return SecAggRelay.model_validate_json(response.content)

    def wait(self, step: SecAggStep) -> SecAggRelay:
        """Long-poll until the hub closed ``step``; SecAggError if the round failed or the wait ran out."""
        deadline = time.monotonic() + self.wait_s
        while True:
            asked = time.monotonic()
            relayed = self._relayed.pop(step, None) or self.relay(
                step, wait_s=max(0.0, min(self.long_poll_s, deadline - asked))
            )
            if relayed.failed:
                raise SecAggError(f"the round failed: {relayed.failed}")
            if relayed.ready:
                return relayed
            if time.monotonic() >= deadline:
                raise SecAggError(f"the hub did not close the {step.value} step within {self.wait_s:.0f} s")
            # A hub whose own bound is shorter answers early: never ask more often than every poll_s.
            time.sleep(max(0.0, self.poll_s - (time.monotonic() - asked)))

    # -- the steps ----------------------------------------------------------------------------------------

    def advertise(self) -> None:
        """Step 1: fresh keys for the round, at its threshold (the task's; else the hub is asked)."""
        if self.threshold is None:
            self.threshold = self.relay(SecAggStep.ADVERTISE).threshold
        threshold = self.threshold
        own: dict[str, Ed25519PublicKey] = {self.node_id: self._key.public_key()}
        self._client = SecAggClient(
            self.node_id,
            self._key,
            own,
            task_id=self.round_id,
            round=self.round,
            threshold=threshold,
            layout=self.layout,
        )
        body = SecAggAdvertisement(signing_public=public_raw(self._key), message=self._client.advertise())
        self._post(SecAggStep.ADVERTISE, body.model_dump_json())

    def share(self) -> None:
        """Step 2: take the roster, share this node's secrets with every peer in it, take theirs."""
        roster = self.wait(SecAggStep.ADVERTISE)
        if roster.threshold != self.client.threshold:
            raise SecAggError(
                f"the hub runs the round at threshold {roster.threshold}; this node's task says "
                f"{self.client.threshold}"
            )
        mine = roster.signing_keys.get(self.node_id)
        if mine != public_raw(self._key):
            raise SecAggError("the roster does not carry this node's own signing key")
        try:
            keys = roster.signing_keys
            peers = {n: Ed25519PublicKey.from_public_bytes(bytes.fromhex(k)) for n, k in keys.items()}
        except ValueError as exc:
            raise SecAggError("the roster carries a malformed signing key") from exc
        self.client.trust(peers)
        shares = self.client.share_keys(roster.advertised)
        self._post(SecAggStep.SHARE, shares.model_dump_json())
        self.client.receive_shares(self.wait(SecAggStep.SHARE).shares)

    def protect(
        self, update: Mapping[str, np.ndarray], spec: ProtectionSpec, pipeline: ProtectionPipeline
    ) -> ProtectedUpdate:
        """Step 3's input: the update clipped, noised and masked (nothing is sent yet)."""
        return pipeline.protect(update, spec, masker=self.client.mask)

    def send_masked(self, protected: ProtectedUpdate) -> None:
        """Step 3: the masked payload and the signed message that covers it, as one binary body."""
        body = pack_masked(self.client.masked_input(protected.payload), protected.payload)
        self._post(SecAggStep.MASKED, body, MASKED_MEDIA_TYPE)

    def unmask(self) -> None:
        """Step 4: answer the hub's unmask request once."""
        request = self.wait(SecAggStep.MASKED).unmask_request
        if request is None:
            raise SecAggError("the hub closed the masked step without an unmask request")
        self._post(SecAggStep.UNMASK, self.client.unmask(request).model_dump_json(), wait=False)

    def run(
        self, update: Mapping[str, np.ndarray], spec: ProtectionSpec, pipeline: ProtectionPipeline
    ) -> ProtectedUpdate:
        """All four steps for ``update``; returns what left the node (masked)."""
        self.advertise()
        self.share()
        protected = self.protect(update, spec, pipeline)
        self.send_masked(protected)
        self.unmask()
        logger.info(
            "secure aggregation of round %d: %d bytes sent, %d received",
            self.round,
            self.bytes_sent,
            self.bytes_received,
        )
        return protected
