"""TCP_NODELAY on pynetdicom sockets, set per association through an event handler (no monkey-patching).

pynetdicom 3.0 leaves Nagle's algorithm on. A C-STORE-RSP is small and follows a request the peer has not
finished acknowledging, so Nagle holds it back until the peer's delayed ACK fires (~40 ms on Linux): every
instance then costs ~40-90 ms on loopback. pynetdicom triggers ``EVT_CONN_OPEN`` once the TCP connection
exists, for acceptors (``RequestHandler.handle``) and requestors (``AssociationSocket.connect``) alike, with
the association's ``dul.socket.socket`` already in place; setting the option there covers both directions.
"""

from __future__ import annotations

import logging
import socket

from pynetdicom import evt
from pynetdicom.events import Event

__all__ = ["NODELAY_HANDLERS", "set_nodelay"]

logger = logging.getLogger(__name__)


def set_nodelay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's TCP socket."""
    assoc_socket = event.assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        # Not fatal: the association works, only slower. Never let a socket option break a transfer.
        logger.warning("could not set TCP_NODELAY on an association socket: %s", exc)


#: Pass as (part of) ``evt_handlers`` to ``AE.start_server`` or ``AE.associate``.
NODELAY_HANDLERS: list[evt.EventHandlerType] = [(evt.EVT_CONN_OPEN, set_nodelay)]
