"""Association negotiation for the native receive transport: who may associate, and which contexts we accept.

The same policy the pynetdicom listener applies (``edge_node.ingest.listener``): the called AE title must be
ours, the calling AE title must be on the allow-list when there is one, and each proposed presentation
context is accepted for the first transfer syntax of *our* list (``TRANSFER_SYNTAXES``, in our order of
preference) that the requestor proposed.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_node.ingest.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from edge_node.ingest.upper_layer import APPLICATION_CONTEXT, AssociationRequest

__all__ = [
    "VERIFICATION",
    "Accepted",
    "Rejected",
    "negotiate",
]

VERIFICATION = "1.2.840.10008.1.1"
#: Verification takes the uncompressed syntaxes (its messages carry no data set).
_VERIFICATION_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)
_SUPPORTED: dict[str, tuple[str, ...]] = {
    **{str(uid): tuple(str(ts) for ts in TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES},
    VERIFICATION: _VERIFICATION_SYNTAXES,
}
#: Presentation context results (PS3.8 Table 9-18).
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4
#: A-ASSOCIATE-RJ fields (PS3.8 Table 9-21).
PERMANENT, TRANSIENT = 1, 2
SERVICE_USER, SERVICE_PROVIDER_ACSE, SERVICE_PROVIDER_PRESENTATION = 1, 2, 3


@dataclass(frozen=True)
class Accepted:
    #: (context id, result, transfer syntax) for every proposed context, in the order proposed.
    results: list[tuple[int, int, str]]
    #: Accepted context id -> (abstract syntax, transfer syntax).
    contexts: dict[int, tuple[str, str]]


@dataclass(frozen=True)
class Rejected:
    result: int
    source: int
    reason: int
    #: Why, for the log (names no received value).
    why: str


def negotiate(
    request: AssociationRequest, ae_title: str, allowed_calling: list[str] | None
) -> Accepted | Rejected:
    """Accept or reject ``request`` as this node's policy says."""
    if not request.protocol_version & 1:
        return Rejected(PERMANENT, SERVICE_PROVIDER_ACSE, 2, "protocol version not supported")
    if request.application_context != APPLICATION_CONTEXT:
        return Rejected(PERMANENT, SERVICE_USER, 2, "application context name not supported")
    if request.called_ae != ae_title.strip():
        return Rejected(PERMANENT, SERVICE_USER, 7, "called AE title is not this node's")
    if allowed_calling and request.calling_ae not in allowed_calling:
        return Rejected(PERMANENT, SERVICE_USER, 3, "calling AE title not allowed")
    results: list[tuple[int, int, str]] = []
    contexts: dict[int, tuple[str, str]] = {}
    for proposed in request.contexts:
        ours = _SUPPORTED.get(proposed.abstract_syntax)
        if ours is None:
            results.append(
                (proposed.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, proposed.transfer_syntaxes[0])
            )
            continue
        chosen = next((ts for ts in ours if ts in proposed.transfer_syntaxes), None)
        if chosen is None:
            results.append(
                (proposed.context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, proposed.transfer_syntaxes[0])
            )
            continue
        results.append((proposed.context_id, ACCEPTANCE, chosen))
        contexts[proposed.context_id] = (proposed.abstract_syntax, chosen)
    return Accepted(results, contexts)
