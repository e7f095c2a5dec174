"""Enrollment: a join code becomes this node's credential, and the hub's key becomes a trusted key.

The join code names the hub's URL, the sha256 of its TLS certificate and a one-time secret. The node checks
the certificate before it sends anything, generates its own secret, and sends it once over the pinned
connection; the hub answers with the node id and its bundle-signing public key.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from edge_node.protocol.wire import (
    EnrollRequest,
    EnrollResponse,
    JoinCodeError,
    decode_join_code,
)
from edge_node.uplink.credential import NodeCredential, new_secret
from edge_node.uplink.errors import EnrollmentError, HubRefusedError, UplinkError
from edge_node.uplink.transport import DEFAULT_TIMEOUT, HubTransport, fetch_certificate

__all__ = ["enroll"]

logger = logging.getLogger(__name__)


def _check_hub_key(pem: str) -> None:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise EnrollmentError("the hub sent a signing key that is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise EnrollmentError(f"the hub's signing key is a {type(key).__name__}, not Ed25519")


def enroll(
    code_text: str,
    uplink_dir: Path,
    *,
    edge_version: str,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    now: datetime | None = None,
) -> NodeCredential:
    """Enroll with the hub the join code names; save and return the node's credential.

    Raises EnrollmentError (bad, expired or used code; already enrolled without ``force``), PinningError
    (the server is not the hub the code names), HubUnreachableError.
    """
    existing = NodeCredential.load(uplink_dir)
    if existing is not None and not force:
        raise EnrollmentError(
            f"this node is already enrolled as {existing.node_name} ({existing.node_id}) with "
            f"{existing.hub_url}; pass --force to replace that enrollment"
        )
    try:
        code = decode_join_code(code_text)
    except JoinCodeError as exc:
        raise EnrollmentError(str(exc)) from exc
    moment = now or datetime.now(timezone.utc)
    if code.expires_at <= moment:
        raise EnrollmentError(
            f"the join code expired at {code.expires_at.isoformat(timespec='seconds')}; "
            "ask the hub operator for a new one (fedclinic-hub nodes enroll NAME)"
        )
    cert_pem = fetch_certificate(code.hub_url, code.tls_sha256, timeout=timeout)
    secret = new_secret()
    request = EnrollRequest(join_secret=code.secret, credential=secret, edge_version=edge_version)
    with HubTransport(code.hub_url, cert_pem, timeout=timeout) as transport:
        try:
            response = transport.request("POST", "/v1/enroll", json=request.model_dump(mode="json"))
        except HubRefusedError as exc:
            raise EnrollmentError(
                f"the hub refused the join code ({exc.code}): {exc.reason}; ask the operator for a new code"
            ) from exc
    try:
        answer = EnrollResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise UplinkError(f"the hub's enrollment answer does not match the contract: {exc}") from exc
    _check_hub_key(answer.hub_public_key_pem)
    credential = NodeCredential(
        hub_url=code.hub_url,
        tls_sha256=code.tls_sha256,
        cert_pem=cert_pem,
        node_id=answer.node_id,
        node_name=answer.node_name,
        cohort=answer.cohort,
        secret=secret,
        hub_public_key_pem=answer.hub_public_key_pem,
        heartbeat_interval_s=answer.heartbeat_interval_s,
    )
    credential.save(uplink_dir)
    logger.info("enrolled as %s (%s) with %s", answer.node_name, answer.node_id, code.hub_url)
    return credential
