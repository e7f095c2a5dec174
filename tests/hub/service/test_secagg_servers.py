"""SecAggServers: a kept server is fed only the rows it lacks; one that disagrees with the store is stale."""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_node.protection.masking import SecAggClient
from edge_node.protocol.compression import layout_of
from edge_node.protocol.secagg_exchange import SecAggStep
from hub.fl.secagg import SecAggServer
from hub.rounds.secagg_servers import FedServer, SecAggServers
from hub.store.schema import SecAggMessageRow

TASK = "round-1"
LAYOUT = layout_of({"w": np.zeros((4, 5), dtype=np.float32)})
NOBODY = Ed25519PrivateKey.generate().public_key()
NODES = ["a", "b", "c"]


def _hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _public(hex_key: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))


def _server() -> FedServer:
    keys = dict.fromkeys(NODES, NOBODY)
    return FedServer(SecAggServer(task_id=TASK, round=1, node_keys=keys, threshold=2, layout=LAYOUT))


def _advertise_rows() -> dict[str, SecAggMessageRow]:
    private = {n: Ed25519PrivateKey.generate() for n in NODES}
    pubs = {n: k.public_key() for n, k in private.items()}
    rows = {}
    for n in NODES:
        client = SecAggClient(n, private[n], pubs, task_id=TASK, round=1, threshold=2, layout=LAYOUT)
        body = {"signing_public": _hex(pubs[n]), "message": client.advertise().model_dump(mode="json")}
        rows[n] = SecAggMessageRow(round_id=TASK, node_id=n, step="advertise", body=body)
    return rows


class Store:
    """The stored advertise rows; counts the bodies a server reads (only those it lacks)."""

    def __init__(self, rows: dict[str, SecAggMessageRow]) -> None:
        self.rows = rows
        self.read: list[str] = []

    def sent(self, nodes: list[str]) -> dict[SecAggStep, list[str]]:
        out: dict[SecAggStep, list[str]] = {s: [] for s in SecAggStep}
        out[SecAggStep.ADVERTISE] = nodes
        return out

    def bodies(self, step: SecAggStep, nodes: list[str]) -> dict[str, tuple[dict[str, Any], bytes | None]]:
        assert step is SecAggStep.ADVERTISE
        self.read += nodes
        return {n: (self.rows[n].body, None) for n in nodes}


def test_a_kept_server_is_fed_only_what_it_lacks_then_the_step_closing() -> None:
    store = Store(_advertise_rows())
    fed = _server()
    assert fed.catch_up(store.sent(["a", "b"]), set(), store.bodies, _public)
    assert fed.fed[SecAggStep.ADVERTISE] == {"a", "b"}
    # Fed again with the same rows plus one: a second feeding of a or b would be refused as a replay.
    assert fed.catch_up(store.sent(NODES), {SecAggStep.ADVERTISE}, store.bodies, _public)
    assert sorted(fed.server.advertised) == NODES
    assert fed.closed == {SecAggStep.ADVERTISE}
    assert [m.node_id for m in fed.server.key_list()] == NODES
    assert store.read == NODES  # every body read once, never again
    assert fed.catch_up(store.sent(NODES), {SecAggStep.ADVERTISE}, store.bodies, _public)
    assert store.read == NODES


def test_a_server_holding_a_message_the_closed_step_left_out_is_stale() -> None:
    store = Store(_advertise_rows())
    fed = _server()
    assert fed.catch_up(store.sent(NODES), set(), store.bodies, _public)
    # c's message raced the closing of the step: the store's step has only a and b.
    assert not fed.catch_up(store.sent(["a", "b"]), {SecAggStep.ADVERTISE}, store.bodies, _public)


def test_a_round_server_serves_one_request_and_is_kept_only_when_handed_back() -> None:
    servers = SecAggServers()
    fed = _server()
    with servers.hold(TASK) as slot:
        assert slot.fed is None
        with servers.hold(TASK, wait=False) as busy:
            assert busy.fed is None  # the round is held: an empty slot, no waiting
            busy.fed = _server()  # not kept: this caller never held the round
        slot.fed = fed
    with servers.hold(TASK) as slot:
        assert slot.fed is fed
        slot.fed = None  # a failed request: nothing is kept
    with servers.hold(TASK) as slot:
        assert slot.fed is None
