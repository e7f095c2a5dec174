"""Errors of the uplink; each says what to do next.

EdgeError (edge_node.errors)
 └── UplinkError           the hub could not be used
      ├── HubUnreachableError  no answer: network down, proxy refused, timeout (retried with backoff)
      ├── PinningError         the hub's TLS certificate is not the one the join code named (never retried)
      ├── HubRefusedError      the hub answered with an error body {code, reason}
      └── EnrollmentError      a join code is malformed, expired, or the node is enrolled already

A refused publication is ``edge_node.protocol.errors.PublicationError`` (the contract's own check).
"""

from __future__ import annotations

from edge_node.errors import EdgeError

__all__ = [
    "EnrollmentError",
    "HubRefusedError",
    "HubUnreachableError",
    "PinningError",
    "UplinkError",
]


class UplinkError(EdgeError):
    """Base of the uplink's errors."""


class HubUnreachableError(UplinkError):
    """The hub did not answer (connection refused, DNS, proxy, timeout); the sync loop retries later."""


class PinningError(UplinkError):
    """The server's certificate does not have the fingerprint this node pinned at enrollment."""


class HubRefusedError(UplinkError):
    """The hub answered with an error; ``code`` is its machine-readable code, ``reason`` its words."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(f"hub refused ({status} {code}): {reason}")
        self.status = status
        self.code = code
        self.reason = reason


class EnrollmentError(UplinkError):
    """Enrollment cannot go on: a bad or expired join code, or a node already enrolled."""
