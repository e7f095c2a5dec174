"""Must-show 4: schemathesis against the running hub's OpenAPI, ≥ 1,000 requests over every route.

Every operation is exercised with schema-valid data as a node, as the operator and without a credential,
and with schema-violating data; every response must be non-5xx and match its documented status, media
type, headers and schema.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis.checks import not_a_server_error
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.result import Err, Result
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.hub.service.conftest import start_hub
from tests.support.hub_server import EnrolledNode, HubServer

pytestmark = [pytest.mark.hub, pytest.mark.slow]

EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = start_hub(tmp_path_factory.mktemp("hub-schemathesis"))
    try:
        yield server
    finally:
        server.stop()


def _fuzz(
    hub: HubServer,
    session: requests.Session,
    op: Any,
    mode: GenerationMode,
    headers: dict[str, str] | None,
    node: EnrolledNode,
    sent: Counter[str],
    statuses: Counter[int],
) -> None:
    label = f"{op.method.upper()} {op.path}"
    strategy: SearchStrategy[schemathesis.Case] = op.as_strategy(generation_mode=mode, headers=headers)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def exercise(case: schemathesis.Case) -> None:
        response = case.call(base_url=hub.url, session=session, timeout=30, verify=str(hub.cert))
        sent[label] += 1
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)
        if op.path == "/v1/node/credential" and response.status_code == 204:
            # The fuzzer rotated our node's secret: keep using the one it set.
            body = case.body
            assert isinstance(body, dict) and isinstance(body["new_credential"], str)
            node.secret = body["new_credential"]

    try:
        exercise()
    except Unsatisfiable:
        # Negative generation for an operation with nothing left to violate (no body, no free parameter).
        if mode is not GenerationMode.NEGATIVE:
            raise


def _operation(result: Result[schemathesis.APIOperation, InvalidSchema]) -> schemathesis.APIOperation:
    """An operation of the schema; one the schema could not describe fails the test, saying why."""
    if isinstance(result, Err):
        raise AssertionError(f"the hub's OpenAPI has an invalid operation: {result.err()}")
    return result.ok()


def test_every_route_conforms_to_the_openapi(hub: HubServer) -> None:
    with hub.client() as client:
        document = client.get("/v1/openapi.json").json()
        node: EnrolledNode = hub.enroll(client, f"fuzz-{secrets.token_hex(3)}")
        # A live round so that task routes have something real behind them for this node.
        r = client.post(
            "/v1/admin/rounds",
            json={
                "strategy": "stats",
                "config": {"num_classes": 2},
                "nodes": [node.node_id],
                "deadline_s": 3600,
            },
            headers=hub.admin_headers,
        )
        assert r.status_code == 201, r.text
    schema = schemathesis.openapi.from_dict(document)
    operations = [_operation(result) for result in schema.get_all_operations()]
    documented = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    assert {(op.method.upper(), op.path) for op in operations} == documented

    session = requests.Session()
    session.verify = str(hub.cert)
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    admin = f"Bearer {hub.admin_token}"

    for op in operations:
        own = admin if op.path.startswith("/v1/admin") else node.headers["Authorization"]
        variants = [
            (GenerationMode.POSITIVE, {"authorization": own}),
            (
                GenerationMode.POSITIVE,
                {"authorization": admin if own != admin else node.headers["Authorization"]},
            ),
            (GenerationMode.POSITIVE, None),
            (GenerationMode.NEGATIVE, {"authorization": own}),
        ]
        for mode, headers in variants:
            _fuzz(hub, session, op, mode, headers, node, sent, statuses)
    total = sum(sent.values())
    print(
        f"schemathesis: {total} requests, {len(sent)} operations, statuses {dict(sorted(statuses.items()))}"
    )
    assert set(sent) == {f"{m} {p}" for m, p in documented}
    assert total >= 1000, f"only {total} requests were generated"
    assert not any(code >= 500 for code in statuses)
