"""Must-show 5 at the hub (and 6 on PostgreSQL/2 workers): publish, canary, promote, ETag, rollback."""

from __future__ import annotations

import hashlib
import secrets
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.errors import PublicationError
from edge_node.protocol.publication import SignedPublication, check_publication
from hub.service.datadir import load_signing_key
from hub.service.errors import ConflictError
from hub.service.publishing import publish_bundle
from hub.service.settings import load_settings
from hub.store.database import open_database
from tests.hub.service.conftest import bundle_root
from tests.support.hub_server import HubServer

pytestmark = [pytest.mark.hub, pytest.mark.slow]


def test_publish_canary_promote_and_roll_back(any_hub: HubServer, tmp_path: Path) -> None:
    server = any_hub
    settings = load_settings(server.data_dir)
    db = open_database(settings.db_url, migrate=False)
    key = load_signing_key(settings)
    cohort = f"pub{secrets.token_hex(3)}"
    try:
        with server.client() as client:
            nodes = [server.enroll(client, f"{cohort}-{i}", cohort=cohort) for i in range(3)]
            hub_key = load_pem_public_key(nodes[0].hub_public_key_pem.encode())
            assert isinstance(hub_key, Ed25519PublicKey)
            for node in nodes:
                assert client.get("/v1/node/bundle", headers=node.headers).status_code == 404

            # Canary to one node in three: only that node is told to switch.
            canary = publish_bundle(
                db, key, settings.artifacts_dir, bundle_root() / "bundle", cohort=cohort, canary_percent=33
            )
            assert len(canary.record.nodes) == 1
            seen = {n.node_id: client.get("/v1/node/bundle", headers=n.headers) for n in nodes}
            assert [n for n, r in seen.items() if r.status_code == 200] == canary.record.nodes
            assert all(r.status_code == 404 for n, r in seen.items() if n not in canary.record.nodes)

            # Promotion to the whole cohort: every node gets the newer record; ETag makes re-polls free.
            full = publish_bundle(db, key, settings.artifacts_dir, bundle_root() / "bundle", cohort=cohort)
            assert full.record.seq > canary.record.seq and full.record.nodes == []
            for node in nodes:
                r = client.get("/v1/node/bundle", headers=node.headers)
                assert r.status_code == 200
                signed = SignedPublication.model_validate(r.json())
                assert signed == full
                assert (
                    check_publication(
                        signed,
                        [hub_key],
                        node_id=node.node_id,
                        cohort=cohort,
                        last_seq=canary.record.seq,
                        current_version=None,
                    )
                    == full.record
                )
                again = client.get(
                    "/v1/node/bundle", headers={**node.headers, "If-None-Match": r.headers["ETag"]}
                )
                assert again.status_code == 304 and again.content == b""
            # The archive is the bundle the record names, and it verifies with the hub's key.
            archive = client.get(
                f"/v1/bundles/{full.record.publication_id}/archive", headers=nodes[0].headers
            )
            assert archive.status_code == 200
            assert hashlib.sha256(archive.content).hexdigest() == full.record.bundle_sha256
            assert len(archive.content) == full.record.bundle_bytes
            zpath = tmp_path / "b.zip"
            zpath.write_bytes(archive.content)
            assert zipfile.is_zipfile(zpath)
            verified = verify_bundle(zpath, [hub_key], extract_to=tmp_path / "x")
            assert verified.manifest.model_version == full.record.model_version

            # A replay of the older record is refused by the node's check.
            with pytest.raises(PublicationError, match="replay"):
                check_publication(
                    canary,
                    [hub_key],
                    node_id=canary.record.nodes[0],
                    cohort=cohort,
                    last_seq=full.record.seq,
                    current_version=None,
                )

            # Rollback through the admin API: a new, higher seq, flagged as a rollback, for everyone.
            r = client.post(
                "/v1/admin/publications/rollback",
                json={"to_publication_id": canary.record.publication_id, "cohort": cohort},
                headers=server.admin_headers,
            )
            assert r.status_code == 201, r.text
            back = SignedPublication.model_validate(r.json())
            assert back.record.rollback and back.record.seq > full.record.seq
            assert back.record.bundle_sha256 == canary.record.bundle_sha256
            for node in nodes:
                got = SignedPublication.model_validate(
                    client.get("/v1/node/bundle", headers=node.headers).json()
                )
                assert got == back
            listed = client.get("/v1/admin/publications", headers=server.admin_headers).json()["publications"]
            seqs = [p["record"]["seq"] for p in listed if p["record"]["cohort"] == cohort]
            assert seqs == sorted(seqs) and len(seqs) == 3
    finally:
        db.close()


def test_a_bundle_for_named_nodes_reaches_them_alone(any_hub: HubServer) -> None:
    """A pFedNet clinic's own student goes to that clinic; its cohort keeps the bundle it had."""
    server = any_hub
    settings = load_settings(server.data_dir)
    db = open_database(settings.db_url, migrate=False)
    key = load_signing_key(settings)
    cohort = f"own{secrets.token_hex(3)}"
    bundle = bundle_root() / "bundle"
    try:
        with server.client() as client:
            nodes = [server.enroll(client, f"{cohort}-{i}", cohort=cohort) for i in range(3)]
            stranger = server.enroll(client, f"{cohort}-x", cohort=f"{cohort}-other")
            shared = publish_bundle(db, key, settings.artifacts_dir, bundle, cohort=cohort)
            own = publish_bundle(
                db, key, settings.artifacts_dir, bundle, cohort=cohort, nodes=[nodes[1].node_id]
            )
            assert own.record.nodes == [nodes[1].node_id] and own.record.seq > shared.record.seq
            seen = {
                n.node_id: SignedPublication.model_validate(
                    client.get("/v1/node/bundle", headers=n.headers).json()
                )
                for n in nodes
            }
            assert seen == {n.node_id: own if n is nodes[1] else shared for n in nodes}
            for bad, said in (
                ([stranger.node_id], "not active nodes of cohort"),
                (["n-nobody"], "not active nodes of cohort"),
                ([], "at least one node"),
            ):
                with pytest.raises(ConflictError, match=said):
                    publish_bundle(db, key, settings.artifacts_dir, bundle, cohort=cohort, nodes=bad)
            with pytest.raises(ConflictError, match="not both"):
                publish_bundle(
                    db,
                    key,
                    settings.artifacts_dir,
                    bundle,
                    cohort=cohort,
                    nodes=[nodes[0].node_id],
                    canary_percent=50,
                )
    finally:
        db.close()
