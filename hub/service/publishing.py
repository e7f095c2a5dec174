"""Publications: a verified bundle becomes a signed record for a cohort (or a canary subset); rollback.

The bundle zip lives in the data directory's artifacts folder; the record (hash, version, cohort, nodes,
expiry, rollback flag, a strictly increasing ``seq``) is signed with the hub's Ed25519 key and stored as
served, so every API worker answers the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.errors import BundleError
from edge_node.protocol.publication import PublicationRecord, SignedPublication, record_bytes
from edge_node.protocol.signing import fingerprint
from edge_node.protocol.wire import NodeState
from hub.service.audit import audit
from hub.service.errors import ConflictError, NotFoundError, SetupError
from hub.store.database import Database
from hub.store.schema import Artifact, Node, Publication, utcnow

__all__ = [
    "current_publication",
    "list_publications",
    "pack_bundle",
    "publish_bundle",
    "rollback",
    "sign_record",
]

logger = logging.getLogger(__name__)

# A fixed timestamp makes the zip of the same bundle byte-identical, hence the same sha256.
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def pack_bundle(bundle: Path, dest: Path) -> tuple[str, int]:
    """Write the bundle (directory or zip) as a deterministic zip at ``dest``; returns (sha256, size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    if bundle.is_file():
        shutil.copyfile(bundle, tmp)
    else:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(path.relative_to(bundle).as_posix(), date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with path.open("rb") as src, zf.open(info, "w") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
    digest = hashlib.sha256()
    with tmp.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    size = tmp.stat().st_size
    os.replace(tmp, dest)
    return digest.hexdigest(), size


def sign_record(record: PublicationRecord, key: Ed25519PrivateKey) -> SignedPublication:
    signature = key.sign(record_bytes(record))
    return SignedPublication(
        record=record,
        signature_b64=base64.b64encode(signature).decode("ascii"),
        key_fingerprint=fingerprint(key.public_key()),
    )


def _canary_nodes(session: Session, cohort: str, percent: float) -> list[str]:
    if percent >= 100:
        return []
    ids = sorted(
        session.scalars(
            select(Node.id).where(Node.cohort == cohort, Node.state == NodeState.ACTIVE.value)
        ).all()
    )
    if not ids:
        raise ConflictError(f"cohort {cohort!r} has no active node to receive a canary")
    return ids[: max(1, math.ceil(len(ids) * percent / 100))]


def _check_members(db: Database, cohort: str, nodes: Sequence[str]) -> None:
    """Every named node is an active node of ``cohort``, and at least one is named."""
    if not nodes:
        raise ConflictError("a publication for named nodes needs at least one node")
    with db.session() as session:
        members = set(
            session.scalars(
                select(Node.id).where(Node.cohort == cohort, Node.state == NodeState.ACTIVE.value)
            )
        )
    strangers = sorted(set(nodes) - members)
    if strangers:
        raise ConflictError(f"nodes {strangers[:5]} are not active nodes of cohort {cohort!r}")


def _store_publication(
    db: Database,
    key: Ed25519PrivateKey,
    *,
    artifact: Artifact,
    cohort: str,
    percent: float,
    nodes: list[str] | None,
    is_rollback: bool,
    ttl_days: float,
    actor: str,
) -> SignedPublication:
    # seq is unique: two publishers racing for the same number retry with the next one.
    for _attempt in range(5):
        try:
            with db.session() as session:
                if session.get(Artifact, artifact.id) is None:
                    session.add(artifact)
                chosen = nodes if nodes is not None else _canary_nodes(session, cohort, percent)
                seq = int(session.scalar(select(func.coalesce(func.max(Publication.seq), 0))) or 0) + 1
                now = utcnow().replace(microsecond=0)
                record = PublicationRecord(
                    publication_id=secrets.token_hex(8),
                    seq=seq,
                    model_id=artifact.model_id or "",
                    model_version=artifact.model_version or "",
                    bundle_sha256=artifact.sha256,
                    bundle_bytes=artifact.size,
                    cohort=cohort,
                    nodes=chosen,
                    canary_percent=percent,
                    rollback=is_rollback,
                    issued_at=now,
                    expires_at=now + timedelta(days=ttl_days),
                )
                signed = sign_record(record, key)
                session.add(
                    Publication(
                        id=record.publication_id,
                        seq=seq,
                        cohort=cohort,
                        artifact_id=artifact.id,
                        signed=signed.model_dump(mode="json"),
                        created_at=now,
                    )
                )
                action = "publication.rollback" if is_rollback else "publication.published"
                detail = (
                    f"{record.model_id} {record.model_version} cohort={cohort} seq={seq} nodes={len(chosen)}"
                )
                audit(session, actor, action, record.publication_id, detail)
            logger.info("published %s (%s)", record.publication_id, detail)
            return signed
        except IntegrityError:
            continue
    raise ConflictError("could not allocate a publication number; another publisher is busy, retry")


def publish_bundle(
    db: Database,
    key: Ed25519PrivateKey,
    artifacts_dir: Path,
    bundle: Path,
    *,
    cohort: str = "default",
    canary_percent: float = 100.0,
    ttl_days: float = 365.0,
    actor: str = "admin",
    nodes: Sequence[str] | None = None,
) -> SignedPublication:
    """Verify the bundle with the hub's own key, store its zip, and publish a signed record.

    ``nodes``: only these active nodes of the cohort get it (a bundle made for one node, such as its own
    personal part of a pFedNet round); the others keep what they serve."""
    if not 0 < canary_percent <= 100:
        raise ConflictError(f"--canary must be in (0, 100], got {canary_percent}")
    if nodes is not None:
        if canary_percent != 100:
            raise ConflictError("a publication names its nodes or a canary percentage, not both")
        _check_members(db, cohort, nodes)
    with tempfile.TemporaryDirectory(prefix="fedclinic-publish-") as tmp:
        try:
            verified = verify_bundle(bundle, [key.public_key()], extract_to=Path(tmp) / "x")
        except BundleError as exc:
            raise SetupError(f"bundle {bundle} does not verify with this hub's key: {exc}") from exc
        staging = artifacts_dir / f"incoming-{secrets.token_hex(4)}.zip"
        sha, size = pack_bundle(bundle, staging)
    final = artifacts_dir / f"bundle-{sha}.zip"
    os.replace(staging, final)
    artifact = Artifact(
        id="b-" + sha[:40],
        kind="bundle",
        sha256=sha,
        size=size,
        data=None,
        path=final.name,
        model_id=verified.manifest.model_id,
        model_version=verified.manifest.model_version,
        note=None,
        created_at=utcnow(),
    )
    with db.session() as session:
        existing = session.get(Artifact, artifact.id)
    return _store_publication(
        db,
        key,
        artifact=existing or artifact,
        cohort=cohort,
        percent=canary_percent,
        nodes=sorted(set(nodes)) if nodes is not None else None,
        is_rollback=False,
        ttl_days=ttl_days,
        actor=actor,
    )


def rollback(
    db: Database,
    key: Ed25519PrivateKey,
    *,
    to_publication_id: str | None,
    cohort: str = "default",
    ttl_days: float = 365.0,
    actor: str = "admin",
) -> SignedPublication:
    """Publish an earlier bundle again, signed as a rollback (nodes accept the lower version)."""
    with db.session() as session:
        pubs = list(
            session.scalars(
                select(Publication).where(Publication.cohort == cohort).order_by(Publication.seq.desc())
            )
        )
        if to_publication_id is None:
            # The default target is the newest bundle before the one the cohort serves now.
            current = pubs[0].artifact_id if pubs else None
            target = next((p for p in pubs if p.artifact_id != current), None)
            if target is None:
                raise NotFoundError(f"cohort {cohort!r} has no earlier bundle to roll back to")
        else:
            target = next((p for p in pubs if p.id == to_publication_id), None)
            if target is None:
                raise NotFoundError(f"no publication {to_publication_id!r} for cohort {cohort!r}")
        artifact = session.get(Artifact, target.artifact_id)
        if artifact is None:  # the foreign key makes this impossible short of manual deletion
            raise NotFoundError(f"the bundle of publication {target.id} is gone from the store")
    return _store_publication(
        db,
        key,
        artifact=artifact,
        cohort=cohort,
        percent=100.0,
        nodes=[],
        is_rollback=True,
        ttl_days=ttl_days,
        actor=actor,
    )


def current_publication(session: Session, node: Node) -> SignedPublication | None:
    """The newest publication that targets this node (canary lists included), or None."""
    rows = session.scalars(
        select(Publication)
        .where(Publication.cohort == node.cohort)
        .order_by(Publication.seq.desc())
        .limit(50)
    )
    for row in rows:
        signed = SignedPublication.model_validate(row.signed)
        if signed.record.targets(node.id, node.cohort):
            return signed
    return None


def list_publications(session: Session) -> list[SignedPublication]:
    rows = session.scalars(select(Publication).order_by(Publication.seq))
    return [SignedPublication.model_validate(r.signed) for r in rows]
