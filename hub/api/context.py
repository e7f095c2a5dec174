"""HubContext: what every route needs (store, rounds, keys, settings), built once per worker process."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Request

from edge_node.protocol.signing import public_key_pem
from hub.api.signal import TaskSignal
from hub.rounds.controller import RoundController
from hub.service.datadir import admin_token_matches, load_signing_key, read_admin_token
from hub.service.settings import HubSettings
from hub.service.tls import certificate_sha256
from hub.store.database import Database, open_database

__all__ = ["HubContext", "context_of"]


@dataclass
class HubContext:
    settings: HubSettings
    db: Database
    rounds: RoundController
    signing_key: Ed25519PrivateKey
    public_key_pem: str
    admin_sha256: str
    tls_sha256: str
    #: Wakes long-polling nodes when rounds change.
    signal: TaskSignal = field(default_factory=TaskSignal)
    #: Wakes long-polling secure-aggregation relays when a step may have closed (``SecAggDesk.watch``).
    secagg_signal: TaskSignal = field(default_factory=TaskSignal)

    @classmethod
    def build(cls, settings: HubSettings) -> HubContext:
        db = open_database(settings.db_url)
        key = load_signing_key(settings)
        cert = settings.tls_cert_path
        ctx = cls(
            settings=settings,
            db=db,
            rounds=RoundController(db, settings),
            signing_key=key,
            public_key_pem=public_key_pem(key.public_key()).decode(),
            admin_sha256=hashlib.sha256(read_admin_token(settings).encode()).hexdigest(),
            tls_sha256=certificate_sha256(cert),
        )
        ctx.rounds.secagg.watch(ctx.secagg_signal.notify)
        return ctx

    def is_admin_token(self, token: str) -> bool:
        return admin_token_matches(self.admin_sha256, token)


def context_of(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.hub
    return ctx
