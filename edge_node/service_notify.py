"""Tell systemd (``Type=notify``) that the node is ready or stopping, through $NOTIFY_SOCKET.

The protocol is one datagram of ``KEY=value`` lines to a Unix socket; an address starting with "@" is in
the abstract namespace. Without $NOTIFY_SOCKET (not run by systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify_service"]

logger = logging.getLogger(__name__)


def notify_service(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to the service manager; True when it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        # Not fatal: the node works; systemd will only think it is not ready yet.
        logger.warning("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True
