"""The PDU limit: a peer cannot make the listener buffer a PDU longer than the maximum it announced.

The listener announces its maximum PDU length in the A-ASSOCIATE-AC (PS3.8 D.3.3.1, "Maximum Length
Received": the largest P-DATA-TF variable field it accepts). pynetdicom 3.0 announces it but does not
enforce it: its DUL reads the 6-byte PDU header, then reads and holds as many bytes as the header claims, up
to 4 GiB. ``PduLimitedSocket`` sits under pynetdicom's ``AssociationSocket`` (installed by an
``EVT_CONN_OPEN`` handler, before the association's DUL thread reads a byte), follows the PDU framing of
what it receives and, when a header claims more than the limit, ends the connection before the body is
read: pynetdicom then sees a connection closed mid-PDU ("shorter than expected"), ends the association,
and the peer's TCP connection is shut down. A refusal is one log line with the peer's address.

Limits: a P-DATA-TF may carry ``max_pdu`` bytes; any other PDU (association request, release, abort) at
most ``MAX_CONTROL_PDU`` bytes, far more than a real A-ASSOCIATE-RQ with every presentation context.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable

from pynetdicom.events import Event

from edge_node.ingest.upper_layer import MAX_CONTROL_PDU

__all__ = ["MAX_CONTROL_PDU", "PduLimitedSocket", "limit_pdus"]

logger = logging.getLogger(__name__)

_HEADER = 6
_P_DATA_TF = 0x04
_socket_recv = socket.socket.recv


class PduLimitedSocket(socket.socket):
    """A TCP socket that ends the connection when a received PDU header claims more than the limit."""

    # Set by ``adopt`` right after construction.
    max_pdu: int
    _header: bytearray
    _body_left: int
    _refused: bool

    @classmethod
    def adopt(cls, sock: socket.socket, max_pdu: int) -> PduLimitedSocket:
        """The same connection (file descriptor, timeout) under a PDU-limited socket; ``sock`` is detached."""
        timeout = sock.gettimeout()
        limited = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        limited.settimeout(timeout)
        limited.max_pdu = max_pdu
        limited._header = bytearray()
        limited._body_left = 0
        limited._refused = False
        return limited

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        left = self._body_left
        if left >= bufsize and not flags:
            # Inside a PDU's body, the call pynetdicom makes ~32 times per 128 KiB PDU (4 kB reads): kept to
            # the plain read and one subtraction (the framing below doubled the CPU of a read).
            data = _socket_recv(self, bufsize)
            self._body_left = left - len(data)
            return data
        return self._recv_framed(bufsize, flags)

    def _recv_framed(self, bufsize: int, flags: int) -> bytes:
        if self._refused:
            return b""
        # Never read across a PDU boundary: each header is seen whole before any byte of its body.
        want = min(bufsize, self._body_left if self._body_left else _HEADER - len(self._header))
        try:
            data = _socket_recv(self, want, flags)
        except ConnectionResetError:
            # The peer dropped the connection (a port scan, a flooding host): the end of the stream, as a
            # close is. Raised, pynetdicom would log two errors and a traceback per connection.
            return b""
        if not data or flags & socket.MSG_PEEK:
            return data
        if self._body_left:
            self._body_left -= len(data)
            return data
        self._header += data
        if len(self._header) == _HEADER:
            pdu_type, _, length = struct.unpack(">BBL", self._header)
            self._header.clear()
            limit = self.max_pdu if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU
            if length > limit:
                self._refuse(pdu_type, length, limit)
            else:
                self._body_left = length
        return data

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        self._refused = True
        try:
            peer = self.getpeername()[0]
        except OSError:
            peer = "(gone)"
        logger.warning(
            "closed the connection from %s: a PDU of type 0x%02X claims %d bytes (limit %d)",
            peer,
            pdu_type,
            length,
            limit,
        )
        with contextlib.suppress(OSError):  # already gone: nothing to shut down
            self.shutdown(socket.SHUT_RDWR)


def limit_pdus(max_pdu: int) -> Callable[[Event], None]:
    """An ``EVT_CONN_OPEN`` handler that puts the association's TCP socket under a PDU limit."""

    def handler(event: Event) -> None:
        assoc_socket = event.assoc.dul.socket
        if assoc_socket is None or assoc_socket.socket is None:
            return
        sock = assoc_socket.socket
        # Plain TCP only: a TLS socket (not used by the listener) cannot be re-wrapped this way.
        if type(sock) is socket.socket:
            assoc_socket.socket = PduLimitedSocket.adopt(sock, max_pdu)

    return handler
