"""Why an association we requested did not come up, in words a clinic's IT person can act on.

pynetdicom only says "rejected" or "aborted", and logs its own error lines on every attempt. The reason is
recovered from the A-ASSOCIATE-RJ the peer sent (called AE not recognised, calling AE not recognised, busy)
or, when no answer came at all, from a plain TCP connection to the same address (refused, timed out, name
not resolved). ``RequestorNoiseFilter`` drops pynetdicom's own lines for these failures, which the sender and
``echo`` report once, in these words, instead of on every retry.
"""

from __future__ import annotations

import logging
import socket

from pynetdicom.association import Association

from edge_node.delivery.destination import Destination

__all__ = ["PYNETDICOM_REQUESTOR_LOGGERS", "RequestorNoiseFilter", "why_not_established"]

#: The pynetdicom loggers that report a failed association request (transport: connect; acse: reject/abort).
PYNETDICOM_REQUESTOR_LOGGERS = ("pynetdicom.transport", "pynetdicom.acse")

_NOISE = (
    "Association request failed: unable to connect to remote",
    "TCP Initialisation Error",
    "Association Rejected",
    "Association Aborted",
)


class RequestorNoiseFilter(logging.Filter):
    """Drops pynetdicom's lines about a failed association request (reported by us, once, with the reason)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE)


def _rejection(assoc: Association, dest: Destination, calling_ae: str) -> str:
    primitive = assoc.acceptor.primitive
    if primitive is None or primitive.result_source is None or primitive.diagnostic is None:
        return f"{dest.address} rejected the association"
    source, diagnostic = int(primitive.result_source), int(primitive.diagnostic)
    transient = primitive.result == 2
    if source == 1 and diagnostic == 7:
        return (
            f"{dest.address} rejected the association: called AE title {dest.ae_title!r} not recognised "
            "(check the destination's AE title)"
        )
    if source == 1 and diagnostic == 3:
        return (
            f"{dest.address} rejected the association: calling AE title {calling_ae!r} not recognised "
            "(add it to the PACS's list of known nodes)"
        )
    if source == 3 and diagnostic in (1, 2):
        return f"{dest.address} is busy (too many associations); it will be retried"
    kind = "transiently" if transient else "permanently"
    return f"{dest.address} rejected the association {kind} ({primitive.reason_str})"


def _connect_problem(dest: Destination, timeout: float) -> str | None:
    """What a plain TCP connection to ``dest`` runs into, or None when it connects."""
    where = f"{dest.host}:{dest.port}"
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return f"{dest.address}: connection refused (nothing listens on {where}: check host and port)"
    except TimeoutError:
        return (
            f"{dest.address}: timed out after {timeout:.0f} s connecting to {where} "
            "(host down, or a firewall drops the connection)"
        )
    except socket.gaierror:
        return f"{dest.address}: host name {dest.host!r} cannot be resolved"
    except OSError as exc:
        return f"{dest.address}: cannot connect to {where} ({exc.strerror or exc})"


def why_not_established(assoc: Association, dest: Destination, calling_ae: str, timeout: float) -> str:
    """The reason an association request to ``dest`` failed (call only when it is not established)."""
    if assoc.is_rejected:
        return _rejection(assoc, dest, calling_ae)
    problem = _connect_problem(dest, timeout)
    if problem is not None:
        return problem
    return (
        f"{dest.address} accepted the connection but did not answer the association request within "
        f"{timeout:.0f} s (is it a DICOM port?)"
    )
