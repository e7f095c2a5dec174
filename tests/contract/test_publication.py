"""The publication and join-code contract: what a node accepts, and what it refuses with a reason."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_node.protocol.errors import PublicationError
from edge_node.protocol.publication import (
    PublicationRecord,
    SignedPublication,
    check_publication,
    version_key,
)
from edge_node.protocol.wire import JoinCode, JoinCodeError, decode_join_code, encode_join_code

# Records are signed by the hub's publishing code (SQL store): where only the edge is installed, these
# checks of the node's side need records made elsewhere, so they skip.
pytest.importorskip("sqlalchemy", reason="signing publication records needs the hub extra (fedclinic[hub])")
from hub.service.publishing import sign_record

KEY = Ed25519PrivateKey.generate()
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)


def record(**changes: object) -> PublicationRecord:
    base = PublicationRecord(
        publication_id="00aa11bb22cc33dd",
        seq=5,
        model_id="pneumonia-student",
        model_version="1.2.0",
        bundle_sha256="ab" * 32,
        bundle_bytes=1000,
        cohort="default",
        issued_at=NOW,
        expires_at=NOW + timedelta(days=30),
    )
    return base.model_copy(update=changes)


def check(signed: SignedPublication, **kwargs: object) -> PublicationRecord:
    args: dict[str, object] = {
        "node_id": "n-1",
        "cohort": "default",
        "last_seq": 4,
        "current_version": "1.1.0",
        "now": NOW,
    }
    args.update(kwargs)
    return check_publication(signed, [KEY.public_key()], **args)  # type: ignore[arg-type]


def test_a_newer_signed_record_for_this_node_is_accepted() -> None:
    signed = sign_record(record(), KEY)
    assert check(signed) == signed.record
    # The JSON a node receives round-trips to the very bytes that were signed.
    assert check(SignedPublication.model_validate_json(signed.model_dump_json())) == signed.record


@pytest.mark.parametrize(
    ("signed", "kwargs", "reason"),
    [
        (sign_record(record(), Ed25519PrivateKey.generate()), {}, "not signed by a trusted key"),
        (
            sign_record(record(), KEY).model_copy(update={"record": record(model_version="9.9.9")}),
            {},
            "not signed",
        ),
        (sign_record(record(), KEY).model_copy(update={"signature_b64": "%%%"}), {}, "not base64"),
        (sign_record(record(expires_at=NOW - timedelta(seconds=1)), KEY), {}, "expired"),
        (sign_record(record(seq=4), KEY), {}, "a replay"),
        (sign_record(record(), KEY), {"last_seq": 9}, "a replay"),
        (sign_record(record(cohort="other"), KEY), {}, "not meant for this node"),
        (sign_record(record(nodes=["n-2"]), KEY), {}, "not meant for this node"),
        (sign_record(record(model_version="1.0.9"), KEY), {}, "without being signed as a rollback"),
    ],
)
def test_refused_records_say_why(signed: SignedPublication, kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(PublicationError, match=reason):
        check(signed, **kwargs)


def test_a_signed_rollback_may_lower_the_version() -> None:
    signed = sign_record(record(model_version="1.0.9", rollback=True), KEY)
    assert check(signed).rollback


def test_versions_compare_numerically() -> None:
    assert version_key("1.10.0") > version_key("1.9.3")
    assert version_key("1.2.0") < version_key("1.2.1") and version_key("0.9") < version_key("0.10")


def test_join_codes_round_trip_and_damage_is_reported() -> None:
    code = JoinCode(
        hub_url="https://127.0.0.1:8443",
        tls_sha256="c" * 64,
        secret=secrets.token_urlsafe(32),
        node_name="clinic-a",
        expires_at=NOW,
    )
    text = encode_join_code(code)
    assert text.startswith("fcj1.") and decode_join_code(f"  {text}\n") == code
    with pytest.raises(JoinCodeError, match="starts with"):
        decode_join_code(text[5:])
    with pytest.raises(JoinCodeError, match="damaged"):
        decode_join_code(text[:-6])
