"""LoadedModel.scores on the real test bundle: probabilities and the envelope result from one run, the
personal head's path kept, a bundle without an envelope scored exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_node.inference.loaded_model import LoadedModel, ModelScores, load_model
from edge_node.inference.personal_head import PersonalHead
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck, intensity_features
from edge_node.protocol.signing import load_public_keys
from hub.data.medmnist import load_medmnist
from tests.edge_node.conftest import TrustedBundle


@pytest.fixture(scope="module")
def model(test_bundle: TrustedBundle) -> LoadedModel:
    verified = verify_bundle(test_bundle.bundle, load_public_keys(test_bundle.public_key))
    loaded = load_model(verified, ["CPUExecutionProvider"], 1)
    assert loaded.manifest.envelope is not None, "the test bundle has no input envelope; rebuild it"
    return loaded


def _batch(n: int) -> np.ndarray:
    """Inputs spread from ordinary (normalised grey levels) to far off (large values): some in, some out."""
    rng = np.random.default_rng(7)
    batch = rng.normal(0.0, 1.0, size=(n, 1, 28, 28)).astype(np.float32)
    batch[n // 2 :] *= 40.0
    return batch


def test_scores_give_the_probabilities_and_the_envelope_of_the_same_embedding(model: LoadedModel) -> None:
    assert model.manifest.envelope is not None and model.envelope is not None
    batch = _batch(40)  # more than MAX_BATCH: two model calls
    scores = model.scores(batch)
    np.testing.assert_allclose(scores.probabilities, model.probabilities(batch), rtol=0, atol=1e-12)
    check = EnvelopeCheck.of(model.manifest.envelope)  # built here, independently of the model's own
    embedding = model.embed(batch)
    assert scores.outside_envelope is not None and scores.envelope_ratio is not None
    np.testing.assert_array_equal(scores.outside_envelope, check.outside(embedding))
    np.testing.assert_allclose(scores.envelope_ratio, check.distances(embedding) / check.threshold, rtol=1e-6)
    assert scores.outside_envelope[20:].all()  # the far-off half
    # The embedding judged comes with the scores, as the model gave it.
    assert scores.embedding is not None and scores.embedding.shape == embedding.shape
    np.testing.assert_array_equal(scores.embedding, model.logits_and_embedding(batch)[1])
    np.testing.assert_allclose(scores.envelope_ratio, check.distances(scores.embedding) / check.threshold)
    # Split per study as the worker does.
    parts = scores.split([15, 0, 25])
    assert [len(p.probabilities) for p in parts] == [15, 0, 25]
    assert parts[2].outside_envelope is not None
    np.testing.assert_array_equal(parts[2].outside_envelope, scores.outside_envelope[15:])
    assert parts[1].embedding is not None and parts[1].embedding.shape == (0, embedding.shape[1])
    assert parts[2].embedding is not None
    np.testing.assert_array_equal(parts[2].embedding, scores.embedding[15:])


def test_the_grey_values_count_too(model: LoadedModel, shared_data: Path) -> None:
    envelope = model.manifest.envelope
    assert envelope is not None and envelope.intensity is not None, "rebuild the test bundle"
    pre = model.preprocessing
    images = load_medmnist("pneumoniamnist", "test", shared_data).images[:40] / 255.0
    images[20:] = 1.0 - images[20:]  # half of them a negative display
    batch = ((images - pre.mean[0]) / pre.std[0])[:, None].astype(np.float32)
    np.testing.assert_allclose(model.grey(batch), images, atol=1e-6)
    scores = model.scores(batch)
    seen = IntensityCheck.of(envelope.intensity).judge(model.grey(batch))
    embedding_outside = EnvelopeCheck.of(envelope).outside(model.embed(batch))
    assert scores.intensity_outside is not None and scores.negative is not None
    np.testing.assert_array_equal(scores.intensity_outside, seen.outside)
    np.testing.assert_array_equal(scores.negative, seen.negative)
    np.testing.assert_array_equal(scores.outside_envelope, embedding_outside | seen.outside)
    assert scores.envelope_ratio is not None
    assert (scores.envelope_ratio >= seen.ratio - 1e-12).all()
    assert seen.outside[20:].sum() > seen.outside[:20].sum()
    # The grey-value features judged are the images' own (not their inverses'), computed once.
    own = intensity_features(images, envelope.intensity.levels)
    assert scores.intensity_features is not None
    np.testing.assert_array_equal(scores.intensity_features, seen.features)
    np.testing.assert_allclose(scores.intensity_features, own, atol=1e-6)
    assert not np.allclose(
        scores.intensity_features, intensity_features(1.0 - images, envelope.intensity.levels)
    )
    part = scores.split([5, 35])[1]
    assert part.negative is not None
    np.testing.assert_array_equal(part.negative, seen.negative[5:])
    assert part.intensity_features is not None
    np.testing.assert_array_equal(part.intensity_features, scores.intensity_features[5:])
    # Without the intensity part the flags are absent and the envelope is the embedding's alone.
    no_grey = envelope.model_copy(update={"intensity": None})
    plain = LoadedModel(
        manifest=model.manifest.model_copy(update={"envelope": no_grey}),
        backend=model.backend,
        model_file=model.model_file,
        precision=model.precision,
    )
    alone = plain.scores(batch)
    assert alone.intensity_outside is None and alone.negative is None and alone.intensity_features is None
    assert alone.embedding is not None and alone.embedding.shape[0] == 40
    np.testing.assert_array_equal(alone.outside_envelope, embedding_outside)


def test_a_personal_head_changes_the_probabilities_not_the_envelope(model: LoadedModel) -> None:
    head = model.head
    assert head is not None
    batch = _batch(6)
    shared = model.scores(batch)
    personal = PersonalHead(
        np.full(head.weight.shape, 0.05), np.full(head.bias.shape, -0.3), model.model_id, 3, "t"
    )
    model.personal = personal
    try:
        personalised = model.scores(batch)
        expected = model.probabilities(batch)  # the personal head's path, as before envelopes
    finally:
        model.personal = None
    np.testing.assert_allclose(personalised.probabilities, expected, rtol=0, atol=1e-12)
    assert not np.allclose(personalised.probabilities, shared.probabilities)
    assert personalised.outside_envelope is not None and shared.outside_envelope is not None
    np.testing.assert_array_equal(personalised.outside_envelope, shared.outside_envelope)


def test_without_an_envelope_the_scores_are_the_probabilities_as_before(model: LoadedModel) -> None:
    plain = LoadedModel(
        manifest=model.manifest.model_copy(update={"envelope": None}),
        backend=model.backend,
        model_file=model.model_file,
        precision=model.precision,
    )
    assert plain.envelope is None
    batch = _batch(5)
    scores = plain.scores(batch)
    assert isinstance(scores, ModelScores)
    assert scores.outside_envelope is None and scores.envelope_ratio is None
    assert scores.embedding is None and scores.intensity_features is None
    assert all(p.embedding is None and p.intensity_features is None for p in scores.split([2, 3]))
    np.testing.assert_array_equal(scores.probabilities, plain.probabilities(batch))
