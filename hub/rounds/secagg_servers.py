"""SecAggServers: each worker's rebuilt ``SecAggServer`` per round, extended with new rows instead of rebuilt.

The store stays the truth. A kept server remembers which stored messages it was fed and which step closings
it applied; before use it is checked against who sent what as the store says (node ids, not message rows)
and fed only what it lacks, so a request reads message bodies only for rows another worker stored. A server
that holds a message the store does not (one that raced the closing of its step) is thrown away and rebuilt.
A round's server serves one request at a time (the others of that round wait), so two threads of a worker
never feed the same one; it is kept only after the request's commit, so a request that fails leaves
nothing half-fed behind.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_node.protocol.secagg import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskResponse
from edge_node.protocol.secagg_exchange import SecAggStep
from hub.fl.secagg import SecAggServer

__all__ = ["Bodies", "FedServer", "SecAggServers", "ServerSlot"]

STEPS = list(SecAggStep)
#: Rounds whose servers a worker keeps; a round past them is rebuilt on its next message.
_KEPT_ROUNDS = 16

#: Reads the stored messages of a step for the nodes given: node -> (the message's JSON, the masked payload).
Bodies = Callable[[SecAggStep, list[str]], Mapping[str, tuple[dict[str, Any], bytes | None]]]


class FedServer:
    """A ``SecAggServer`` and what it was fed: the nodes of each step, the step closings applied."""

    def __init__(self, server: SecAggServer) -> None:
        self.server = server
        self.fed: dict[SecAggStep, set[str]] = {s: set() for s in STEPS}
        self.closed: set[SecAggStep] = set()

    def catch_up(
        self,
        sent: Mapping[SecAggStep, Collection[str]],
        closed: Collection[SecAggStep],
        bodies: Bodies,
        public: Callable[[str], Ed25519PublicKey],
    ) -> bool:
        """Feed the stored messages and step closings this server lacks, in order; False if it is stale.

        ``sent`` are the nodes with a stored message of each step (of a closed step only its members),
        ``closed`` the closed steps; ``bodies`` reads the stored messages of the nodes given, only those this
        server lacks. The masked inputs of an open masked step are not fed from the store: each new one is
        checked on its own (its replay by the store's key), and they are all fed once the step closed.
        """
        for step in STEPS:
            stored = set(sent[step])
            if not self.fed[step] <= stored:
                return False
            if step is SecAggStep.MASKED and step not in closed:
                return True
            missing = sorted(stored - self.fed[step])
            read = bodies(step, missing) if missing else {}
            for node in missing:
                body, payload = read[node]
                if step is SecAggStep.ADVERTISE:
                    self.server.bind_key(node, public(body["signing_public"]))
                    self.server.receive_advertise(AdvertiseKeys.model_validate(body["message"]))
                elif step is SecAggStep.SHARE:
                    self.server.receive_shares(ShareKeys.model_validate(body))
                elif step is SecAggStep.MASKED:
                    self.server.receive_masked(MaskedInput.model_validate(body), payload or b"")
                else:
                    self.server.receive_unmask(UnmaskResponse.model_validate(body))
                self.fed[step].add(node)
            if step not in closed:
                return True
            if step not in self.closed:
                if step is SecAggStep.ADVERTISE:
                    self.server.key_list()
                elif step is SecAggStep.SHARE:
                    self.server.share_list()
                elif step is SecAggStep.MASKED:
                    self.server.unmask_request()
                self.closed.add(step)
        return True


class ServerSlot:
    """A round's place in ``SecAggServers`` while one request holds it: ``fed`` is kept when it ends."""

    def __init__(self, fed: FedServer | None) -> None:
        self.fed = fed


class SecAggServers:
    """The servers one worker keeps; a round's server serves one request at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, FedServer] = OrderedDict()
        # One lock per round ever seen by this worker: a few bytes a round, so they are not pruned.
        self._rounds: dict[str, threading.Lock] = {}

    @contextmanager
    def hold(self, round_id: str, *, wait: bool = True) -> Iterator[ServerSlot]:
        """The round's kept server, the caller's alone until the block ends; what ``slot.fed`` then is stays.

        Requests of one round wait for each other (``wait``) rather than each rebuilding the server. A
        caller that may hold a database lock passes ``wait=False``: if the round is busy it gets an empty
        slot (a rebuild), never a deadlock against a request waiting on the database.
        """
        with self._lock:
            lock = self._rounds.setdefault(round_id, threading.Lock())
        if not lock.acquire(blocking=wait):
            yield ServerSlot(None)
            return
        try:
            with self._lock:
                slot = ServerSlot(self._kept.pop(round_id, None))
            try:
                yield slot
            finally:
                if slot.fed is not None:
                    with self._lock:
                        self._kept[round_id] = slot.fed
                        while len(self._kept) > _KEPT_ROUNDS:
                            self._kept.popitem(last=False)
        finally:
            lock.release()
