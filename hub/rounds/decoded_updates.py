"""DecodedUpdates: the tensors of updates this process accepted, kept until their round is aggregated.

An update is decoded once to be validated; without this the aggregation would decode every update of the
round a second time, after the last one arrived, on the round's critical path. The store stays the truth:
an entry is used only if its payload sha256 matches the stored row, and whatever is missing (another
worker accepted it, this process restarted, the cap was reached) is decoded from the store as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from hub.fl.strategy import Params

__all__ = ["DecodedUpdates"]

#: Rounds kept at once; a round aggregated by another worker is forgotten when newer rounds push it out.
MAX_ROUNDS = 4
#: Bytes of tensors kept at once (about 3,500 updates of the 70k-parameter student).
MAX_BYTES = 1 << 30


class DecodedUpdates:
    """Thread-safe map round → node → (payload sha256, tensors), bounded in rounds and bytes."""

    def __init__(self, *, max_rounds: int = MAX_ROUNDS, max_bytes: int = MAX_BYTES) -> None:
        self.max_rounds = max_rounds
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._rounds: OrderedDict[str, dict[str, tuple[str, Params]]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _size(tensors: Params) -> int:
        return sum(int(a.nbytes) for a in tensors.values())

    def keep(self, round_id: str, node_id: str, sha256: str, tensors: Params) -> None:
        size = self._size(tensors)
        with self._lock:
            if round_id not in self._rounds:
                # A new round pushes out the oldest ones first (another worker may have aggregated them).
                while len(self._rounds) >= self.max_rounds:
                    _, dropped = self._rounds.popitem(last=False)
                    self._bytes -= sum(self._size(t) for _, t in dropped.values())
            entries = self._rounds.setdefault(round_id, {})
            old = entries.pop(node_id, None)
            if old is not None:
                self._bytes -= self._size(old[1])
            if self._bytes + size > self.max_bytes:
                return  # the aggregation decodes this one from the store
            entries[node_id] = (sha256, tensors)
            self._bytes += size

    def take(self, round_id: str) -> dict[str, tuple[str, Params]]:
        """Everything kept for the round, which is forgotten here."""
        with self._lock:
            entries = self._rounds.pop(round_id, {})
            self._bytes -= sum(self._size(t) for _, t in entries.values())
            return entries

    @property
    def nbytes(self) -> int:
        return self._bytes
