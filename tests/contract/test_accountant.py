"""The shared privacy accountant: published numbers, exact composition, sampling and calibration."""

from __future__ import annotations

import math

import pytest

from edge_node.protocol.accountant import GaussianRelease, PrivacyAccountant, epsilon_of, noise_multiplier_for
from edge_node.protocol.errors import PrivacyError


def test_twelve_unsampled_rounds_at_sigma_one_cost_the_exact_20_1() -> None:
    # 12 Gaussian releases with σ = 1 are one Gaussian release with σ = 1/sqrt(12); the analytic Gaussian
    # mechanism (Balle & Wang 2018, Thm. 8) gives ε = 20.125 at δ = 1e-5. The old zCDP bound said 22.6.
    acc = PrivacyAccountant()
    for _ in range(12):
        acc.record(GaussianRelease(1.0))
    assert acc.steps == 12
    assert acc.epsilon(1e-5) == pytest.approx(20.125, abs=1e-3)
    # the PLD accountant composing the releases numerically agrees (its discretisation only adds a little)
    sampled_once = GaussianRelease(1.0, count=12, sampling_rate=1.0 - 1e-12)
    assert epsilon_of([sampled_once], 1e-5) == pytest.approx(20.125, abs=0.01)
    # RDP is a valid but looser bound; the zCDP formula is looser still
    rdp = PrivacyAccountant(acc.releases, method="rdp").epsilon(1e-5)
    zcdp = 6.0 + 2.0 * math.sqrt(6.0 * math.log(1e5))
    assert 20.125 < rdp < zcdp


def test_abadi_et_al_2016_moments_accountant_number_is_reproduced() -> None:
    # Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Sec. 3.1: with sampling ratio
    # q = 0.01, σ = 4, δ = 1e-5 and T = 10000 steps the moments accountant gives ε ≈ 1.26 (strong
    # composition: 9.34). Their accountant bounds the log moments at integer λ ≤ 32 and converts with
    # ε = min_λ (α(λ) + ln(1/δ)) / λ, i.e. ε = min_α (RDP(α) + ln(1/δ)/(α − 1)) over orders α = λ + 1.
    acc = PrivacyAccountant([GaussianRelease(4.0, count=10_000, sampling_rate=0.01)])
    orders = list(range(2, 34))
    curve = acc.rdp(orders)
    moments = min(r + math.log(1e5) / (a - 1) for a, r in zip(orders, curve, strict=True))
    assert round(moments, 2) == 1.26
    # the tight PLD accountant spends less than that published bound, and amplification by sampling is
    # real: the same 10000 releases without sampling cost far more
    tight = acc.epsilon(1e-5)
    assert 0.8 < tight < 1.26
    assert epsilon_of([GaussianRelease(4.0, count=10_000)], 1e-5) > 50


def test_calibration_gives_the_stated_epsilon() -> None:
    sigma = noise_multiplier_for(1.0, 1e-5)
    # one release: the analytic Gaussian σ for (1, 1e-5) is 3.7306 (Balle & Wang's exact calibration)
    assert sigma == pytest.approx(3.7306, abs=1e-3)
    assert epsilon_of([GaussianRelease(sigma)], 1e-5) == pytest.approx(1.0, abs=1e-6)
    # 8 rounds: σ·sqrt(8) spends the same ε in total
    sigma8 = noise_multiplier_for(1.0, 1e-5, rounds=8)
    assert epsilon_of([GaussianRelease(sigma8, count=8)], 1e-5) == pytest.approx(1.0, abs=1e-6)
    # sampled: rounded up, so the target is met, and close to it
    sq = noise_multiplier_for(4.0, 1e-5, rounds=50, sampling_rate=0.1)
    eps = epsilon_of([GaussianRelease(sq, count=50, sampling_rate=0.1)], 1e-5)
    assert 3.9 < eps <= 4.0
    assert sq < noise_multiplier_for(4.0, 1e-5, rounds=50)  # sampling buys less noise


def test_accountant_refuses_settings_that_cannot_work() -> None:
    for bad in (
        lambda: GaussianRelease(0.0),
        lambda: GaussianRelease(1.0, sampling_rate=0.0),
        lambda: GaussianRelease(1.0, count=-1),
        lambda: PrivacyAccountant().epsilon(0.0),
        lambda: noise_multiplier_for(-1.0, 1e-5),
        lambda: PrivacyAccountant(method="zcdp"),  # type: ignore[arg-type]
    ):
        with pytest.raises(PrivacyError):
            bad()
    assert PrivacyAccountant().epsilon(1e-5) == 0.0
    acc = PrivacyAccountant([GaussianRelease(2.0)])
    assert acc.epsilon_after(GaussianRelease(2.0), 1e-5) > acc.epsilon(1e-5)
    assert acc.steps == 1  # asking does not spend
