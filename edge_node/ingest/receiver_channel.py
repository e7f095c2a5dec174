"""The control channel between the node and one receiver process: small JSON messages, a socket at times.

One end of an ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair each (created by the node, the receiver's end
inherited at spawn): every message is one packet, so there is no framing to get wrong, and a connection
travels as its file descriptor (``SCM_RIGHTS``) inside the message that announces it. When either process
ends, however it ends (kill -9 included), the kernel closes its end and the other reads end-of-file: that is
how each learns the other is gone.

Messages (``op`` and its fields), node → receiver:

* ``take`` (``number``, ``peer``) with a connection's descriptor: run this connection;
* ``admitted`` (``number``, ``ok``): the answer to ``admit``;
* ``stop``: abort every association and exit.

Receiver → node:

* ``ready``: recovered its slot pool, opened the database; it takes connections now;
* ``admit`` (``number``): the association negotiated; may it count against max_associations?
* ``ended`` (``number``): the connection closed (it no longer counts against its address);
* ``studies``: the worker should look again (``edge_node.ingest.storage_sink``);
* ``log`` (``name``, ``level``, ``message``, ``exc_text``, ``func``, ``created``): a log record, already
  past the receiver's privacy guard (``edge_node.log_privacy``), for the node to emit through its own
  logging, so that one configuration (level, handlers, guard) covers every process.

Messages carry numbers, addresses, flags and log lines written by this package, never anything received
from a sender.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import threading
from typing import Any

__all__ = ["MAX_MESSAGE", "Channel", "ChannelClosed", "channel_pair"]

#: The largest message (bytes of JSON): every control message is well under 200, a log record with its
#: (bounded, ``edge_node.log_privacy.MAX_FRAMES``) traceback a few kB.
MAX_MESSAGE = 64 * 1024


class ChannelClosed(Exception):
    """The other end is gone (it exited or was killed), or the channel was closed here."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(node's end, receiver's end); the receiver's end is inheritable, the node's is not."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return mine, theirs


class Channel:
    """One end of a control channel; ``send`` from any thread, ``receive`` from one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any], fd: int | None = None) -> None:
        """Send one message (and ``fd``, duplicated into the other process); ChannelClosed if it is gone."""
        data = json.dumps(message, separators=(",", ":")).encode()
        ancillary = []
        if fd is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        try:
            with self._send_lock:
                self.sock.sendmsg([data], ancillary)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def receive(self) -> tuple[dict[str, Any], socket.socket | None]:
        """The next message and the connection it carries, if any; ChannelClosed at end-of-file."""
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        carried = [socket.socket(fileno=fd) for fd in fds]
        if not data:
            for sock in carried:
                sock.close()
            raise ChannelClosed("end of file")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(carried) > 1:
            for sock in carried:
                sock.close()
            raise ChannelClosed("a message longer than the channel allows")
        try:
            message = json.loads(data)
        except ValueError as exc:
            for sock in carried:
                sock.close()
            raise ChannelClosed("a message that is not JSON") from exc
        if not isinstance(message, dict):
            for sock in carried:
                sock.close()
            raise ChannelClosed("a message that is not a JSON object")
        return message, (carried[0] if carried else None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
