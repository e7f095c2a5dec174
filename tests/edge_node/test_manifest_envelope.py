"""The signed manifest's input envelope: it must fit the head it is over, and bundles without one keep
their bytes."""

from __future__ import annotations

import json

import pytest

from edge_node.protocol.errors import SchemaError
from edge_node.protocol.manifest import MANIFEST_FILE, InputEnvelope, parse_manifest
from tests.edge_node.conftest import TrustedBundle


def _manifest_with(envelope: dict[str, object] | None, bundle_manifest: bytes) -> bytes:
    doc = json.loads(bundle_manifest)
    if envelope is None:
        doc.pop("envelope", None)
    else:
        doc["envelope"] = envelope
    return json.dumps(doc).encode()


def test_the_manifest_refuses_an_envelope_that_does_not_fit_its_head(test_bundle: TrustedBundle) -> None:
    raw = (test_bundle.bundle / MANIFEST_FILE).read_bytes()
    m = parse_manifest(raw)
    assert m.envelope is not None and m.head is not None
    good = m.envelope.model_dump()
    assert parse_manifest(_manifest_with(good, raw)).envelope == m.envelope
    assert parse_manifest(_manifest_with(None, raw)).envelope is None
    short = {**good, "mean": good["mean"][:-1]}
    with pytest.raises(SchemaError, match="input envelope must be"):
        parse_manifest(_manifest_with(short, raw))
    ragged = {**good, "whitening": [*good["whitening"][:-1], good["whitening"][-1][:-1]]}
    with pytest.raises(SchemaError, match="input envelope must be"):
        parse_manifest(_manifest_with(ragged, raw))
    with pytest.raises(SchemaError, match="positive threshold"):
        parse_manifest(_manifest_with({**good, "threshold": 0.0}, raw))
    headless = json.loads(raw)
    headless.pop("head")
    with pytest.raises(SchemaError, match="no head"):
        parse_manifest(json.dumps(headless).encode())
    assert InputEnvelope.model_validate(good).dim == m.head.embedding_dim


def test_the_intensity_part_must_fit_its_levels_and_is_left_out_when_absent(
    test_bundle: TrustedBundle,
) -> None:
    raw = (test_bundle.bundle / MANIFEST_FILE).read_bytes()
    m = parse_manifest(raw)
    assert m.envelope is not None and m.envelope.intensity is not None, "rebuild the test bundle"
    good = m.envelope.model_dump()
    part = good["intensity"]
    assert len(part["levels"]) == m.envelope.intensity.dim
    assert parse_manifest(_manifest_with(good, raw)).envelope == m.envelope
    for levels in ([*part["levels"][:-1], 1.5], list(reversed(part["levels"]))):
        with pytest.raises(SchemaError, match="levels must increase"):
            parse_manifest(_manifest_with({**good, "intensity": {**part, "levels": levels}}, raw))
    with pytest.raises(SchemaError, match="intensity envelope must be"):
        parse_manifest(_manifest_with({**good, "intensity": {**part, "levels": part["levels"][:-1]}}, raw))
    with pytest.raises(SchemaError, match="quantile must be the input envelope's"):
        parse_manifest(_manifest_with({**good, "intensity": {**part, "quantile": 0.95}}, raw))
    # An envelope from before the intensity part keeps its bytes: no "intensity" key, not even null.
    without = {k: v for k, v in good.items() if k != "intensity"}
    older = parse_manifest(_manifest_with(without, raw))
    assert older.envelope is not None and older.envelope.intensity is None
    assert "intensity" not in json.loads(older.canonical_bytes())["envelope"]
