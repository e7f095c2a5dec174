"""rebundle_with_envelope on the real signed test bundle: the copy verifies on the edge with the new envelope
and version and the source's bytes, a version that does not move forward, a source signed by another key and
an envelope of the wrong dimension are refused with nothing written, and the edge judges images by the new
envelope."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_node.inference.loaded_model import load_model
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
from edge_node.protocol.errors import SignatureError
from edge_node.protocol.manifest import InputEnvelope, Manifest
from edge_node.protocol.signing import load_public_keys
from export.bundle_writer import zip_bundle
from export.errors import ExportError
from export.rebundle import rebundle_with_envelope
from export.signing import generate_private_key, load_private_key
from hub.data.medmnist import load_medmnist
from tests.hub.service.conftest import bundle_root

Rebundle = Callable[..., Manifest]

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def root() -> Path:
    return bundle_root()


@pytest.fixture(scope="module")
def source(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test bundle (the shared one stays out of reach of a faulty rebundle)."""
    return Path(shutil.copytree(root / "bundle", tmp_path_factory.mktemp("source") / "bundle"))


@pytest.fixture(scope="module")
def hub_key(root: Path) -> Ed25519PrivateKey:
    return load_private_key(root / "keys" / "hub.key")


@pytest.fixture(scope="module")
def trusted(root: Path) -> list[Ed25519PublicKey]:
    return load_public_keys(root / "hub.pub")


@pytest.fixture(scope="module")
def source_manifest(source: Path, trusted: list[Ed25519PublicKey]) -> Manifest:
    manifest = verify_bundle(source, trusted).manifest
    assert manifest.envelope is not None and manifest.head is not None, "rebuild the test bundle"
    return manifest


@pytest.fixture(scope="module")
def rebundle(hub_key: Ed25519PrivateKey, trusted: list[Ed25519PublicKey]) -> Rebundle:
    """``rebundle_with_envelope`` signing with the hub's key and trusting it (a test may pass other keys)."""
    return partial(rebundle_with_envelope, private_key=hub_key, trusted_keys=trusted)


def _envelope(manifest: Manifest, *, threshold: float) -> InputEnvelope:
    assert manifest.envelope is not None
    return manifest.envelope.model_copy(update={"threshold": threshold})


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_rebundled_bundle_verifies_with_the_new_envelope_and_the_source_bytes(
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    trusted: list[Ed25519PublicKey],
    tmp_path: Path,
) -> None:
    assert source_manifest.envelope is not None
    before = _digests(source)
    envelope = _envelope(source_manifest, threshold=source_manifest.envelope.threshold * 0.5)
    out = tmp_path / "rebundled"
    written = rebundle(
        source,
        out,
        envelope=envelope,
        model_version="1.1.0",
        federation="pneumonia-fed",
        round_number=3,
    )
    manifest = verify_bundle(out, trusted).manifest
    assert manifest == written
    assert manifest.envelope == envelope
    assert manifest.model_version == "1.1.0"
    assert manifest.provenance.federation == "pneumonia-fed" and manifest.provenance.round == 3
    kept = {"model_version", "envelope", "provenance"}
    assert manifest.model_dump(exclude=kept) == source_manifest.model_dump(exclude=kept)
    assert manifest.producer == source_manifest.producer
    metrics = source_manifest.provenance.metrics
    assert manifest.provenance.metrics == {k: v for k, v in metrics.items() if "_outside_" not in k}
    assert manifest.provenance.created_at == source_manifest.provenance.created_at
    for entry in source_manifest.files:
        assert (out / entry.path).read_bytes() == (source / entry.path).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "manifest.sig", *(f.path for f in source_manifest.files)]
    )
    assert _digests(source) == before


def test_a_zip_source_is_rebundled_and_a_prerelease_above_it_is_forward(
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    trusted: list[Ed25519PublicKey],
    tmp_path: Path,
) -> None:
    archive = zip_bundle(source, tmp_path / "source.zip")
    assert source_manifest.envelope is not None
    envelope = _envelope(source_manifest, threshold=source_manifest.envelope.threshold * 2.0)
    out = tmp_path / "rebundled"
    rebundle(
        archive,
        out,
        envelope=envelope,
        model_version="1.0.1-rc.1",
    )
    manifest = verify_bundle(out, trusted).manifest
    assert manifest.envelope == envelope and manifest.model_version == "1.0.1-rc.1"
    assert manifest.provenance.federation == source_manifest.provenance.federation
    assert manifest.provenance.round == source_manifest.provenance.round


@pytest.mark.parametrize("version", ["1.0.0", "0.9.9", "1.0.0-rc.1", "1.0.0+rebuilt.2"])
def test_a_version_not_above_the_source_is_refused_and_nothing_is_written(
    version: str,
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    tmp_path: Path,
) -> None:
    assert source_manifest.model_version == "1.0.0"
    before = _digests(source)
    with pytest.raises(ExportError, match=r"not above the source bundle's 1\.0\.0"):
        rebundle(
            source,
            tmp_path / "rebundled",
            envelope=_envelope(source_manifest, threshold=10.0),
            model_version=version,
        )
    assert list(tmp_path.iterdir()) == []
    assert _digests(source) == before


def test_a_release_after_its_prerelease_is_refused_where_nodes_would_refuse_it(
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    hub_key: Ed25519PrivateKey,
    tmp_path: Path,
) -> None:
    """Semantic versioning puts 1.0.0 after 1.0.0-rc.1; nodes, comparing part by part
    (``publication.version_key``), take it for older and refuse it: so it is refused here, before signing."""
    rc = Path(shutil.copytree(source, tmp_path / "rc"))
    manifest = source_manifest.model_copy(update={"model_version": "1.0.0-rc.1"})
    (rc / "manifest.json").write_bytes(manifest.canonical_bytes())
    (rc / "manifest.sig").write_bytes(hub_key.sign(manifest.canonical_bytes()))
    envelope = _envelope(source_manifest, threshold=10.0)
    with pytest.raises(ExportError, match=r"would take 1\.0\.0 for older than 1\.0\.0-rc\.1"):
        rebundle(rc, tmp_path / "release", envelope=envelope, model_version="1.0.0")
    assert not (tmp_path / "release").exists()
    rebundle(rc, tmp_path / "next", envelope=envelope, model_version="1.0.1")
    assert verify_bundle(tmp_path / "next", [hub_key.public_key()]).manifest.model_version == "1.0.1"


def test_a_version_that_is_not_semver_is_refused(
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    tmp_path: Path,
) -> None:
    with pytest.raises(ExportError, match="not a semantic version"):
        rebundle(
            source,
            tmp_path / "rebundled",
            envelope=_envelope(source_manifest, threshold=10.0),
            model_version="v2",
        )
    assert list(tmp_path.iterdir()) == []


def test_a_source_signed_by_another_key_is_refused(
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    trusted: list[Ed25519PublicKey],
    tmp_path: Path,
) -> None:
    forged = Path(shutil.copytree(source, tmp_path / "forged"))
    other = generate_private_key()
    (forged / "manifest.sig").write_bytes(other.sign(source_manifest.canonical_bytes()))
    for bundle, keys in ((forged, trusted), (source, [other.public_key()])):
        out = tmp_path / "rebundled"
        with pytest.raises(ExportError, match="does not verify") as caught:
            rebundle(
                bundle,
                out,
                envelope=_envelope(source_manifest, threshold=10.0),
                model_version="1.1.0",
                trusted_keys=keys,
            )
        assert isinstance(caught.value.__cause__, SignatureError)
        assert not out.exists()


def test_an_envelope_of_the_wrong_dimension_is_refused(
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    tmp_path: Path,
) -> None:
    envelope = source_manifest.envelope
    assert envelope is not None and source_manifest.head is not None
    d = source_manifest.head.embedding_dim
    smaller = envelope.model_copy(
        update={"mean": envelope.mean[:-1], "whitening": [row[:-1] for row in envelope.whitening[:-1]]}
    )
    with pytest.raises(ExportError, match=f"{d - 1}-dimensional but .* has {d} dimensions"):
        rebundle(
            source,
            tmp_path / "rebundled",
            envelope=smaller,
            model_version="1.1.0",
        )
    assert list(tmp_path.iterdir()) == []


def test_the_edge_judges_images_by_the_new_envelope(
    source: Path,
    source_manifest: Manifest,
    rebundle: Rebundle,
    trusted: list[Ed25519PublicKey],
    shared_data: Path,
    tmp_path: Path,
) -> None:
    pre = source_manifest.preprocessing
    grey = load_medmnist("pneumoniamnist", "test", shared_data).images[:40] / 255.0
    batch = ((grey - pre.mean[0]) / pre.std[0])[:, None].astype(np.float32)
    original = load_model(verify_bundle(source, trusted), CPU, 1)
    assert original.manifest.envelope is not None
    distances = EnvelopeCheck.of(original.manifest.envelope).distances(original.embed(batch))
    # A threshold at the median distance: about half of the images fall outside, where the source's had few.
    envelope = _envelope(source_manifest, threshold=float(np.median(distances)))
    out = tmp_path / "rebundled"
    rebundle(source, out, envelope=envelope, model_version="1.1.0")
    model = load_model(verify_bundle(out, trusted), CPU, 1)
    assert model.model_version == "1.1.0"
    scores = model.scores(batch)
    assert envelope.intensity is not None
    expected = (
        EnvelopeCheck.of(envelope).outside(model.embed(batch))
        | IntensityCheck.of(envelope.intensity).judge(model.grey(batch)).outside
    )
    assert scores.outside_envelope is not None
    np.testing.assert_array_equal(scores.outside_envelope, expected)
    assert 0 < scores.outside_envelope.sum() < len(batch)
    before = original.scores(batch).outside_envelope
    assert before is not None and scores.outside_envelope.sum() > before.sum()
    np.testing.assert_array_equal(scores.probabilities, original.scores(batch).probabilities)
