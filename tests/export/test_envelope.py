"""The input envelope's fit: the shrunk covariance, the split between fitting and thresholding, the
refusals, and the binomial tail a node's drift alarm uses."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.protocol.envelope import EnvelopeCheck, binomial_tail, drift_alarm
from export.envelope import (
    FOLDS,
    MAX_ENVELOPE_DIM,
    MIN_IMAGES,
    cross_fitted_distances,
    fit_envelope,
    ledoit_wolf,
)
from export.errors import ExportError


def _correlated(n: int, d: int, seed: int, noise_seed: int | None = None) -> np.ndarray:
    """Correlated Gaussian samples: the mixing matrix from ``seed``, the draws from ``noise_seed``."""
    mix = np.random.default_rng(seed).normal(size=(d, d))
    draws = np.random.default_rng(seed if noise_seed is None else noise_seed).normal(size=(n, d))
    return draws @ mix.T + 3.0


def test_ledoit_wolf_shrinks_little_with_plenty_of_samples_and_much_with_few() -> None:
    x = _correlated(20000, 8, 0)
    cov, weight = ledoit_wolf(x)
    assert weight < 0.01
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False, bias=True), rtol=0.02, atol=0.05)
    # Isotropic data: the sample covariance's spread is all noise, so the weight goes toward 1.
    _, isotropic = ledoit_wolf(np.random.default_rng(1).normal(size=(30, 20)))
    assert isotropic > 0.5
    # The shrunk covariance is invertible even with fewer samples than dimensions.
    few, _ = ledoit_wolf(np.random.default_rng(2).normal(size=(10, 20)))
    assert np.linalg.eigvalsh(few).min() > 0


def test_the_threshold_is_the_quantile_of_cross_fitted_distances() -> None:
    e = _correlated(4000, 16, 3)
    env = fit_envelope(e, quantile=0.95)
    assert (env.fitted_on, env.folds) == (4000, FOLDS)
    np.testing.assert_allclose(np.asarray(env.mean), e.mean(axis=0))
    # W Σ Wᵀ = I: the whitening undoes the fitted covariance.
    w = np.asarray(env.whitening)
    cov, _ = ledoit_wolf(e)
    np.testing.assert_allclose(w @ cov @ w.T, np.eye(16), atol=1e-8)
    # Each row's distance comes from an envelope that never saw it: recompute fold 2 independently.
    cross = cross_fitted_distances(e)
    fold2 = np.arange(len(e)) % FOLDS == 2
    others = e[~fold2]
    inv = np.linalg.inv(ledoit_wolf(others)[0])
    diff = e[fold2] - others.mean(axis=0)
    np.testing.assert_allclose(cross[fold2], np.einsum("nd,de,ne->n", diff, inv, diff), rtol=1e-8)
    assert env.threshold == pytest.approx(float(np.quantile(cross, 0.95, method="higher")))
    # Distances of fitted rows are smaller: thresholding on them would flag too many new images.
    assert np.quantile(EnvelopeCheck.of(env).distances(e), 0.95) < env.threshold
    # New draws from the same distribution fall outside at about 1 − quantile; shifted ones do not.
    check = EnvelopeCheck.of(env)
    fresh = _correlated(4000, 16, 3, noise_seed=4)
    assert 0.03 < check.outside(fresh).mean() < 0.07
    assert check.outside(fresh + 5.0 * e.std(axis=0)).mean() > 0.9


def test_few_images_still_give_about_the_quantile_on_new_ones() -> None:
    # 60 validation images in 32 dimensions, as a small public split gives: the shrunk, cross-fitted
    # envelope flags new images like them at a few per cent, not at the rate a fitted-only one would.
    rates = []
    for seed in range(20):
        e = _correlated(60, 32, 5, noise_seed=100 + seed)
        check = EnvelopeCheck.of(fit_envelope(e, quantile=0.9))
        rates.append(check.outside(_correlated(2000, 32, 5, noise_seed=1000 + seed)).mean())
    assert 0.04 < float(np.mean(rates)) < 0.16


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(ExportError, match="at least"):
        fit_envelope(_correlated(MIN_IMAGES - 1, 4, 0))
    with pytest.raises(ExportError, match="limited"):
        fit_envelope(np.zeros((MIN_IMAGES, MAX_ENVELOPE_DIM + 1)))
    bad = _correlated(100, 4, 0)
    bad[3, 1] = np.nan
    with pytest.raises(ExportError, match="finite"):
        fit_envelope(bad)
    with pytest.raises(ExportError, match="quantile"):
        fit_envelope(_correlated(100, 4, 0), quantile=1.0)
    with pytest.raises(ExportError, match=r"\(N, D\)"):
        fit_envelope(np.zeros(100))


def test_constant_embeddings_still_give_a_usable_envelope() -> None:
    e = np.ones((60, 4))
    env = fit_envelope(e)
    check = EnvelopeCheck.of(env)
    assert not check.outside(np.ones((2, 4))).any()
    assert check.outside(np.full((1, 4), 2.0)).all()


def test_a_non_finite_embedding_is_outside() -> None:
    check = EnvelopeCheck.of(fit_envelope(_correlated(200, 4, 0)))
    assert check.outside(np.array([[np.nan, 0, 0, 0], [np.inf, 0, 0, 0]])).all()


def test_binomial_tail_matches_the_exact_sum() -> None:
    from math import comb

    for k, n, p in [(5, 100, 0.01), (25, 100, 0.01), (3, 200, 0.01), (7, 20, 0.3)]:
        exact = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_tail(k, n, p) == pytest.approx(exact, rel=1e-9)
    assert binomial_tail(0, 10, 0.01) == 1.0 and binomial_tail(11, 10, 0.5) == 0.0


def test_the_drift_alarm_tolerates_a_few_per_cent_and_fires_on_a_clear_excess() -> None:
    # 4 % of 150 (a clinic at the edge of the validation set) is no alarm; 15 % of 150 is.
    assert not drift_alarm(6, 150, 0.99)
    assert drift_alarm(23, 150, 0.99)
    # The same rate on fewer images is weaker evidence.
    assert not drift_alarm(3, 20, 0.99) and drift_alarm(30, 200, 0.99)
    assert not drift_alarm(0, 0, 0.99)
