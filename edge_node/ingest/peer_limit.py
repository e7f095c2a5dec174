"""The association server with a per-peer connection limit: one address cannot take every slot.

pynetdicom limits associations per AE (``maximum_associations``), counted only once an association is
negotiated; a peer that opens TCP connections and says nothing, or opens and closes them in a loop, holds a
thread each and can keep the legitimate PACS out. Here each accepted connection counts against its source
address from accept to close, and a connection over the address's limit is closed at once, before any
thread or DUL reactor exists for it. Silent connections end after ``acse_timeout`` (pynetdicom's ARTIM
timer), idle associations after ``network_timeout``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["PeerLimitedServer"]

logger = logging.getLogger(__name__)

#: At most one refusal line per address in this many seconds: a flood must not flood the log too.
_LOG_EVERY_S = 10.0


def _peer(client_address: tuple[str, int] | str) -> str:
    return client_address[0] if isinstance(client_address, tuple) else str(client_address)


class PeerLimitedServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer that keeps at most ``per_peer`` open connections per source address."""

    #: The listen backlog (socketserver's default is 5, the native transport's 128). Under a connect flood a
    #: backlog of 5 fills between two accepts, the kernel drops the PACS's SYN, and its client retries after
    #: 1 s and again after 2 s more (measured: a C-STORE under the flood test's churn answered in 4.1 s).
    request_queue_size = 128

    def __init__(self, *args: Any, per_peer: int, **kwargs: Any) -> None:
        self.per_peer = per_peer
        # Accepted connections whose association thread is not running yet (it starts in a handler thread).
        self._pending: dict[str, int] = {}
        self._refused_logged: dict[str, float] = {}
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def open_connections(self, address: str) -> int:
        """Connections from ``address`` that are accepted and not yet closed."""
        running = 0
        for assoc in self.active_associations:
            info = assoc.requestor.address_info
            running += info is not None and info.address == address
        with self._lock:
            return running + self._pending.get(address, 0)

    def verify_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> bool:
        """socketserver's hook, called after accept: False closes the connection without a thread."""
        peer = _peer(client_address)
        count = self.open_connections(peer)  # the accept loop is one thread: no other accept races this
        with self._lock:
            if count < self.per_peer:
                self._pending[peer] = self._pending.get(peer, 0) + 1
                return True
            now = time.monotonic()
            log = now - self._refused_logged.get(peer, 0.0) >= _LOG_EVERY_S
            if log:
                self._refused_logged[peer] = now
        if log:
            logger.warning(
                "refused connections from %s: %d already open from that address (limit %d)",
                peer,
                count,
                self.per_peer,
            )
        return False

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        try:
            super().process_request_thread(request, client_address)  # starts the association's thread
        finally:
            peer = _peer(client_address)
            with self._lock:
                left = self._pending.get(peer, 1) - 1
                if left > 0:
                    self._pending[peer] = left
                else:
                    self._pending.pop(peer, None)
