"""Distributed DP under secure aggregation: each node adds σ²C²/t of noise variance, the sum of at least t
masked updates carries σ²C², and the clinic's ledger charges the ε of that sum."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from edge_node.protection import PrivacyFloor, PrivacyGate, PrivacyLedger, ProtectionPipeline
from edge_node.protocol.accountant import GaussianRelease, epsilon_of
from edge_node.protocol.protection import ProtectionSpec
from edge_node.protocol.tensors import Tensors

D = 100_000
T = 6
SPEC = ProtectionSpec(
    cohort_size=10, clip_norm=0.5, epsilon=4.0, delta=1e-5, secure_aggregation=True, secagg_threshold=T
)


def _identity(t: object) -> Tensors:
    """The mask step's place: masks cancel in the sum, so the noise arithmetic is checked without them."""
    return dict(t)  # type: ignore[call-overload]


def _variance_interval(sample: np.ndarray, level: float = 1e-6) -> tuple[float, float]:
    """Chi-square confidence interval of the variance of a zero-mean normal sample."""
    n = sample.size
    ss = float(sample.astype(np.float64) @ sample.astype(np.float64))
    return ss / stats.chi2.ppf(1 - level / 2, n), ss / stats.chi2.ppf(level / 2, n)


def test_each_node_adds_a_1_over_t_share_and_t_shares_make_the_full_variance() -> None:
    pipe = ProtectionPipeline(rng=np.random.default_rng(5))
    sigma = pipe.noise_multiplier(SPEC)
    assert sigma is not None and SPEC.clip_norm is not None
    full = (sigma * SPEC.clip_norm) ** 2  # the variance the stated ε needs in what is released
    zero = {"w": np.zeros(D)}
    outs = [pipe.protect(zero, SPEC, masker=_identity) for _ in range(T)]
    one = outs[0].wire["w"]
    lo, hi = _variance_interval(one)
    assert lo <= full / T <= hi  # a single node's share: σ²C²/t
    assert not lo <= full <= hi  # ...which alone would not be the stated protection
    total = np.sum([o.wire["w"] for o in outs], axis=0)  # the smallest sum the protocol unmasks
    lo, hi = _variance_interval(total)
    assert lo <= full <= hi
    # Every release reports the sum's σ and ε: the numbers the ledger charges.
    assert {(o.noise_multiplier, o.epsilon, o.noise_shares) for o in outs} == {(sigma, 4.0, T)}
    assert epsilon_of([GaussianRelease(sigma)], 1e-5) == pytest.approx(4.0, abs=1e-6)


def test_without_a_threshold_each_node_adds_all_of_the_noise() -> None:
    pipe = ProtectionPipeline(rng=np.random.default_rng(6))
    plain = SPEC.model_copy(update={"secagg_threshold": None})
    sigma = pipe.noise_multiplier(plain)
    assert sigma is not None and plain.noise_shares == 1
    out = pipe.protect({"w": np.zeros(D)}, plain, masker=_identity)
    lo, hi = _variance_interval(out.wire["w"])
    assert lo <= (sigma * 0.5) ** 2 <= hi


def test_the_ledger_charges_the_sums_epsilon_and_the_floor_checks_the_threshold(tmp_path: Path) -> None:
    floor = PrivacyFloor(max_epsilon_total=10.0, min_cohort=3)
    gate = PrivacyGate(floor, PrivacyLedger(tmp_path / "ledger.sqlite3", delta=1e-5), ProtectionPipeline())
    gate.release("t-1", 1, {"w": np.zeros(100)}, SPEC, masker=_identity)
    (entry,) = gate.ledger.entries()
    assert entry.epsilon == 4.0 and entry.noise_multiplier == gate.pipeline.noise_multiplier(SPEC)
    assert gate.ledger.spent() == pytest.approx(4.0, abs=1e-6)
    # A threshold below the clinic's minimum per sum would leave its noise share in too small a sum.
    strict = PrivacyFloor(min_cohort=8)
    reason = strict.refusal(SPEC)
    assert reason is not None and "threshold of 6" in reason and "minimum of 8" in reason
    assert strict.refusal(SPEC.model_copy(update={"secagg_threshold": 8})) is None


def test_a_threshold_needs_secure_aggregation_and_fits_the_cohort() -> None:
    with pytest.raises(ValueError, match="needs secure aggregation"):
        ProtectionSpec(cohort_size=5, clip_norm=1.0, secagg_threshold=3)
    with pytest.raises(ValueError, match="exceeds the round's 5 nodes"):
        ProtectionSpec(cohort_size=5, clip_norm=1.0, secure_aggregation=True, secagg_threshold=6)
    assert math.isclose(SPEC.noise_shares, T)
