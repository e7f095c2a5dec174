"""The envelope fitted from the nodes' sums is the envelope fitted on all their images.

Each test compares the federated arithmetic (what nodes and hub compute in the two envelope rounds) with a
direct computation on the pooled samples: the centred Ledoit–Wolf formula written out here, and numpy's
quantile of the held-out distances.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_node.protocol.envelope import EnvelopeCheck
from edge_node.protocol.envelope_moments import (
    HISTOGRAM_BINS,
    MIN_FOLD_IMAGES,
    MomentSums,
    distance_histogram,
    folds_of,
    histogram_edges,
    histogram_quantile,
)
from edge_node.protocol.envelope_rounds import (
    EMBEDDING,
    INTENSITY,
    EnvelopeRounds,
    added_up,
    fitted_envelope,
    held_out_params,
    node_histograms,
    node_moments,
)

ROUNDS = EnvelopeRounds("chest", "1.2.0", embedding_dim=12, levels=(0.1, 0.5, 0.9), folds=5)


def _centred_ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    n, d = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    m = np.trace(s) / d
    delta = np.sum((s - m * np.eye(d)) ** 2)
    beta = sum(np.sum((np.outer(r, r) - s) ** 2) for r in xc) / n**2
    a = min(beta, delta) / delta
    return (1 - a) * s + a * m * np.eye(d), a


def test_the_shrunk_covariance_from_sums_is_the_centred_one() -> None:
    rng = np.random.default_rng(0)
    # A mean far from zero: the sums must not lose the centred moments to cancellation.
    x = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + 5.0
    mean, cov, a = MomentSums.of(x).shrunk()
    want, want_a = _centred_ledoit_wolf(x)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, want, rtol=1e-9, atol=1e-12)
    assert a == pytest.approx(want_a, rel=1e-9)
    assert 0.0 < a < 1.0


def test_sums_add_up_to_the_sums_of_all_samples() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    both, whole = MomentSums.of(a) + MomentSums.of(b), MomentSums.of(np.concatenate([a, b]))
    for got, want in zip(
        (both.n, both.s1, both.s2, both.s3, both.s4),
        (whole.n, whole.s1, whole.s2, whole.s3, whole.s4),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)


def _real_samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    wide = rng.normal(size=(10, 64)).astype(np.float32) * 300.0 + 1e3  # fewer images than dimensions
    return {
        "gaussian": rng.normal(size=(50, 6)),
        "fewer than dimensions, far from 0": wide.astype(np.float64),
        "all alike": np.ones((12, 5)) * 7.5,
        "one direction constant": np.c_[rng.normal(size=(30, 3)), np.full(30, -2.0)],
        "heavy tails": rng.standard_t(df=2.5, size=(40, 8)),
    }


@pytest.mark.parametrize("name", list(_real_samples()))
def test_the_sums_of_real_samples_are_consistent(name: str) -> None:
    x = _real_samples()[name]
    assert MomentSums.of(x).problem() is None
    assert (MomentSums.of(x) + MomentSums.of(x[: len(x) // 2])).problem() is None
    assert MomentSums.zeros(x.shape[1]).problem() is None


def test_sums_no_samples_could_have_are_refused() -> None:
    x = np.random.default_rng(12).normal(size=(40, 5)) + 3.0
    real = MomentSums.of(x)
    skewed = real.s2.copy()
    skewed[0, 1] += 1.0
    wrong = {
        "not symmetric": replace(real, s2=skewed),
        # Claiming more images than were summed leaves a negative direction in the centred part.
        "negative eigenvalue": replace(real, n=real.n / 4),
        # A threshold-widening lie: a larger spread than the images have, without their fourth powers.
        "Σ|x|⁴ is below": replace(real, s2=real.s2 * 4.0),
        "beyond what Σ|x|⁴": replace(real, s3=real.s3 * 50.0),
        "over 0 images are not 0": replace(MomentSums.zeros(5), s4=1.0),
    }
    for reason, sums in wrong.items():
        problem = sums.problem()
        assert problem is not None and reason in problem, (reason, problem)


def test_folds_give_each_sum_enough_images_and_do_not_change_between_rounds() -> None:
    keys = [f"1.2.3.{i}" for i in range(47)]
    fold = folds_of(keys, 5, "salt")
    counts = np.bincount(fold, minlength=5)
    assert counts.sum() == 47 and sorted(counts[counts > 0].tolist()) == [11, 12, 12, 12]
    np.testing.assert_array_equal(fold, folds_of(keys, 5, "salt"))
    assert not np.array_equal(fold, folds_of(keys, 5, "other salt"))
    small = np.bincount(folds_of(keys[:25], 5, "salt"), minlength=5)
    assert sorted(small[small > 0].tolist()) == [12, 13]
    with pytest.raises(ValueError, match="at least 10"):
        folds_of(keys[: MIN_FOLD_IMAGES - 1], 5, "salt")


def test_the_histogram_reads_the_quantile_within_one_bin_above_it() -> None:
    rng = np.random.default_rng(2)
    d = rng.chisquare(6, size=500) * 1.7
    counts = distance_histogram(d, 6)
    assert counts.shape == (HISTOGRAM_BINS + 2,) and counts.sum() == 500
    exact = float(np.quantile(d, 0.99, method="higher"))
    read = histogram_quantile(counts, 6, 0.99)
    width = histogram_edges(6)[1] / histogram_edges(6)[0]
    assert exact <= read <= exact * width
    # A distance on an edge is counted in the bin that edge closes: the quantile reads exactly that edge.
    edge = float(histogram_edges(6)[700])
    assert histogram_quantile(distance_histogram(np.array([edge]), 6), 6, 0.5) == edge


def test_a_quantile_beyond_the_histogram_is_refused() -> None:
    counts = distance_histogram(np.array([1.0, np.inf, np.nan, 1e9]), 2)
    assert counts[-1] == 3
    with pytest.raises(ValueError, match="beyond"):
        histogram_quantile(counts, 2, 0.9)
    with pytest.raises(ValueError, match="not all 0"):
        histogram_quantile(np.zeros(HISTOGRAM_BINS + 2, dtype=np.int64), 2, 0.9)


def _nodes(rng: np.random.Generator) -> list[tuple[list[str], dict[str, np.ndarray]]]:
    """Three nodes of 80, 33 and 12 images whose features differ in mean and scale, as clinics' do."""
    out = []
    for i, (n, shift) in enumerate(((80, 0.0), (33, 0.6), (12, -0.4))):
        keys = [f"2.25.{i}.{j}" for j in range(n)]
        emb = rng.normal(size=(n, 12)) @ rng.normal(size=(12, 12)) * 0.3 + shift
        grey = np.sort(rng.uniform(0.1, 0.9, size=(n, 3)), axis=1) + shift / 10
        out.append((keys, {EMBEDDING: emb, INTENSITY: grey}))
    return out


def test_the_two_rounds_fit_the_envelope_of_all_the_nodes_images() -> None:
    nodes = _nodes(np.random.default_rng(3))
    moments = added_up([node_moments(f, keys, ROUNDS) for keys, f in nodes])
    params = held_out_params(moments, ROUNDS)
    histograms = added_up([node_histograms(f, keys, ROUNDS, params) for keys, f in nodes])
    envelope = fitted_envelope(moments, histograms, ROUNDS, quantile=0.9)
    assert envelope.intensity is not None

    folds = np.concatenate([folds_of(keys, ROUNDS.folds, ROUNDS.salt) for keys, _ in nodes])
    for part, got in ((EMBEDDING, envelope), (INTENSITY, envelope.intensity)):
        pooled = np.concatenate([f[part] for _, f in nodes])
        cov, shrinkage = _centred_ledoit_wolf(pooled)
        np.testing.assert_allclose(got.mean, pooled.mean(axis=0), rtol=1e-10)
        w = np.asarray(got.whitening)
        np.testing.assert_allclose(w @ cov @ w.T, np.eye(pooled.shape[1]), atol=1e-8)
        assert got.shrinkage == pytest.approx(shrinkage, rel=1e-8)
        assert got.fitted_on == 125 and got.folds == 5
        # The held-out distances, each image's from the envelope fitted on the pooled images of other folds.
        held = np.empty(len(pooled))
        for k in range(ROUNDS.folds):
            out = pooled[folds != k]
            c, _ = _centred_ledoit_wolf(out)
            z = pooled[folds == k] - out.mean(axis=0)
            held[folds == k] = np.einsum("nd,de,ne->n", z, np.linalg.inv(c), z)
        exact = float(np.quantile(held, 0.9, method="higher"))
        width = histogram_edges(pooled.shape[1])[1] / histogram_edges(pooled.shape[1])[0]
        assert exact <= got.threshold <= exact * width
    assert envelope.intensity.levels == [0.1, 0.5, 0.9] and envelope.intensity.augmented_copies == 0
    # The envelope the manifest carries judges images as its check does.
    check = EnvelopeCheck.of(envelope)
    assert check.outside(nodes[0][1][EMBEDDING]).mean() < 0.25


def test_too_few_images_over_all_nodes_fit_no_envelope() -> None:
    keys, features = _nodes(np.random.default_rng(4))[1]
    moments = node_moments(features, keys, ROUNDS)
    with pytest.raises(ValueError, match="33 images; the envelope needs 40"):
        held_out_params(moments, ROUNDS)
    with pytest.raises(ValueError, match="no answers"):
        added_up([])


def test_the_rounds_config_travels_as_scalars_and_refuses_what_it_cannot_be() -> None:
    assert EnvelopeRounds.from_config(ROUNDS.to_config()) == ROUNDS
    shapes = ROUNDS.moment_shapes()
    assert shapes["embedding/s2"] == (5, 12, 12) and shapes["intensity/s3"] == (5, 3)
    assert ROUNDS.histogram_shapes() == {
        "embedding/histogram": (HISTOGRAM_BINS + 2,),
        "intensity/histogram": (HISTOGRAM_BINS + 2,),
    }
    with pytest.raises(ValueError, match="lacks 'levels'"):
        EnvelopeRounds.from_config({"model_id": "m", "model_version": "1.0.0", "embedding_dim": 4})
    with pytest.raises(ValueError, match="strictly increasing"):
        EnvelopeRounds("m", "1.0.0", 4, (0.5, 0.5))
    with pytest.raises(ValueError, match="integers"):
        EnvelopeRounds.from_config({**ROUNDS.to_config(), "folds": 2.5})


def _ratio_to_pooled_cross_fit(sizes: tuple[int, ...], seed: int) -> float:
    """The federated threshold over a cross-fit of the pooled images, for clinics of ``sizes`` images whose
    embeddings each sit at their own offset."""
    from export.envelope import cross_fitted_distances

    rng = np.random.default_rng(seed)
    rounds = EnvelopeRounds("chest", "1.0.0", embedding_dim=8, levels=(0.1, 0.5, 0.9), folds=5)
    nodes = []
    for i, n in enumerate(sizes):
        emb = rng.normal(size=(n, 8)) + 1.5 * rng.normal(size=8)
        grey = np.sort(rng.uniform(size=(n, 3)), axis=1)
        nodes.append(([f"2.25.{i}.{j}" for j in range(n)], {EMBEDDING: emb, INTENSITY: grey}))
    moments = added_up([node_moments(f, keys, rounds) for keys, f in nodes])
    params = held_out_params(moments, rounds)
    histograms = added_up([node_histograms(f, keys, rounds, params) for keys, f in nodes])
    federated = fitted_envelope(moments, histograms, rounds, quantile=0.9).threshold
    pooled = np.concatenate([f[EMBEDDING] for _, f in nodes])
    return federated / float(np.quantile(cross_fitted_distances(pooled), 0.9, method="higher"))


def test_small_nodes_widen_the_threshold_beyond_the_pooled_cross_fit() -> None:
    """A node of 10–49 images fills fewer folds than the rounds ask: its images are measured against an
    envelope fitted without most of its own clinic, so where clinics differ the threshold is wider than a
    cross-fit over the pooled images; with every node filling its folds it is not (docs/envelope.md,
    "Against the exporter's fit")."""
    small = [_ratio_to_pooled_cross_fit((30, 20, 12), seed) for seed in range(5, 10)]
    large = [_ratio_to_pooled_cross_fit((100, 60, 50), seed) for seed in range(5, 10)]
    assert min(small) > 1.5
    assert all(0.9 < r < 1.1 for r in large)
