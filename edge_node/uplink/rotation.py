"""Credential rotation: the node replaces its secret at the hub, then on disk, and survives losing a step.

The new secret is saved beside the credential (``uplink/rotating``) before the hub is asked to take it. If
the hub's answer is lost (a crash, a cut connection), the next rotation first asks the hub which secret it
holds: when the pending one works it is adopted, when the hub refuses it with 401 it is discarded. Either
way the node never ends up holding only a secret the hub no longer accepts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edge_node.protocol.wire import CredentialRotation
from edge_node.uplink.credential import NodeCredential, new_secret
from edge_node.uplink.errors import EnrollmentError, HubRefusedError
from edge_node.uplink.transport import DEFAULT_TIMEOUT, HubTransport

__all__ = ["Rotation", "pending_dir", "rotate_credential"]

logger = logging.getLogger(__name__)


def pending_dir(uplink_dir: Path) -> Path:
    """Where a new secret waits while the hub is asked to take it."""
    return uplink_dir / "rotating"


@dataclass(frozen=True)
class Rotation:
    credential: NodeCredential
    #: True when this call completed an earlier rotation whose answer from the hub had been lost.
    resumed: bool


def _drop_pending(uplink_dir: Path) -> None:
    NodeCredential.path_in(pending_dir(uplink_dir)).unlink(missing_ok=True)


def _finish_interrupted(uplink_dir: Path, current: NodeCredential, timeout: float) -> NodeCredential | None:
    """Adopt a pending secret the hub already holds; discard one it refuses. None: nothing to adopt."""
    pending = NodeCredential.load(pending_dir(uplink_dir))
    if pending is None:
        return None
    if pending.node_id != current.node_id or pending.secret == current.secret:
        _drop_pending(uplink_dir)  # left from an earlier enrollment, or already adopted
        return None
    with HubTransport(pending.hub_url, pending.cert_pem, auth=pending.auth(), timeout=timeout) as transport:
        try:
            transport.request("GET", "/v1/node/tasks", params={"wait": "0"})
        except HubRefusedError as exc:
            if exc.status != 401:
                raise
            _drop_pending(uplink_dir)
            logger.info("the hub never took the pending secret; it was discarded")
            return None
    pending.save(uplink_dir)
    _drop_pending(uplink_dir)
    logger.info("completed an interrupted credential rotation of node %s", pending.node_id)
    return pending


def rotate_credential(uplink_dir: Path, *, timeout: float = DEFAULT_TIMEOUT) -> Rotation:
    """Give this node a new secret; the old one is refused by the hub from its next request on.

    Raises EnrollmentError (not enrolled), HubRefusedError (the hub refused: revoked, rotated out),
    HubUnreachableError, PinningError. After an error the rotation can simply be run again.
    """
    current = NodeCredential.load(uplink_dir)
    if current is None:
        raise EnrollmentError("this node is not enrolled; run `fedclinic-edge enroll CODE` first")
    finished = _finish_interrupted(uplink_dir, current, timeout)
    if finished is not None:
        return Rotation(finished, resumed=True)
    secret = new_secret()
    rotated = current.model_copy(update={"secret": secret})
    # Kept beside the credential first: if the hub's answer is lost, the new secret is not.
    rotated.save(pending_dir(uplink_dir))
    with HubTransport(current.hub_url, current.cert_pem, auth=current.auth(), timeout=timeout) as transport:
        transport.request(
            "POST", "/v1/node/credential", json=CredentialRotation(new_credential=secret).model_dump()
        )
    rotated.save(uplink_dir)
    _drop_pending(uplink_dir)
    logger.info("node %s rotated its credential", current.node_id)
    return Rotation(rotated, resumed=False)
