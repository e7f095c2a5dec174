"""Privacy accounting of Gaussian releases, on Google's dp-accounting library (PLD, or RDP on request).

A *release* is one use of the Gaussian mechanism on an update whose L2 sensitivity is the clip norm C: noise
of standard deviation σ·C is added (σ is the noise multiplier). A learner that samples its records (or a
hub that samples its clients) with Poisson rate q < 1 gets privacy amplification by sampling; q = 1 is a
release on everything. Neighbouring data sets differ by adding or removing one record (or one clinic for
central DP at the hub).

Both sides of the wire account with this module: a node to calibrate its noise and keep its ledger, the
hub's central-DP wrapper to report what it spent. dp-accounting (and the scipy it needs) is imported only
when a number is asked for, so the contract itself installs with numpy, pydantic and cryptography only;
the library is declared in the ``edge`` and ``hub`` extras, which are the processes that account.

Unsampled Gaussian releases compose exactly: T releases with multipliers σ_i are one Gaussian release with
σ = (Σ_i σ_i⁻²)^(-1/2), whose ε is the analytic Gaussian mechanism's (Balle & Wang 2018). Sampled releases
are composed numerically by the privacy-loss-distribution accountant, which is tight up to its
discretisation and always rounds toward more privacy spent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np

from edge_node.protocol.errors import PrivacyError

__all__ = [
    "AccountingMethod",
    "GaussianRelease",
    "PrivacyAccountant",
    "epsilon_of",
    "noise_multiplier_for",
]

#: ``"pld"``: privacy-loss distributions (tight); ``"rdp"``: Rényi DP (looser, classical).
AccountingMethod = Literal["pld", "rdp"]

#: Discretisation of the privacy-loss distribution when calibrating: coarser than the library's default
#: (1e-4) because calibration composes many candidate σ; the result is still an upper bound on ε.
_CALIBRATION_DISCRETIZATION = 1e-3

#: Calibration searches σ above this; less noise than 5 % of the clip norm protects nothing worth stating.
_SMALLEST_SIGMA = 0.05


def _library() -> ModuleType:
    """dp_accounting, or a PrivacyError that says how to install it."""
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - the edge and hub extras install it
        raise PrivacyError(
            "privacy accounting needs the dp-accounting package: pip install 'fedclinic[edge]' (node) "
            "or 'fedclinic[hub]' (hub)"
        ) from exc
    return dp_accounting


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")


@dataclass(frozen=True)
class GaussianRelease:
    """``count`` Gaussian releases with noise multiplier σ, each on a Poisson sample of this rate."""

    noise_multiplier: float
    count: int = 1
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier}")
        if self.count < 0:
            raise PrivacyError(f"a release count must be >= 0, got {self.count}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise PrivacyError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")

    def event(self) -> object:
        """The dp-accounting event of these releases."""
        dpa = _library()
        single = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1.0:
            single = dpa.PoissonSampledDpEvent(self.sampling_rate, single)
        return dpa.SelfComposedDpEvent(single, self.count)


class PrivacyAccountant:
    """Privacy spent by a sequence of Gaussian releases, as (ε, δ)-DP.

    ``record`` adds releases; ``epsilon(delta)`` composes everything recorded so far. ``method="pld"`` (the
    default) is tight; ``"rdp"`` gives the classical Rényi-DP bound (and ``rdp(orders)`` its curve).
    """

    def __init__(self, releases: Sequence[GaussianRelease] = (), *, method: AccountingMethod = "pld") -> None:
        if method not in ("pld", "rdp"):
            raise PrivacyError(f"accounting method must be 'pld' or 'rdp', got {method!r}")
        self.method: AccountingMethod = method
        self.releases: list[GaussianRelease] = list(releases)

    def record(self, release: GaussianRelease) -> None:
        """Add these releases to what has been spent."""
        self.releases.append(release)

    @property
    def steps(self) -> int:
        """Number of releases recorded."""
        return sum(r.count for r in self.releases)

    def epsilon(self, delta: float) -> float:
        """ε of the (ε, ``delta``)-DP guarantee of everything recorded (0 when nothing was released)."""
        return epsilon_of(self.releases, delta, method=self.method)

    def epsilon_after(self, release: GaussianRelease, delta: float) -> float:
        """ε if ``release`` were recorded too (what a ledger checks before it accepts a task)."""
        return epsilon_of([*self.releases, release], delta, method=self.method)

    def rdp(self, orders: Sequence[float]) -> np.ndarray:
        """Rényi-DP of everything recorded at each order α > 1 (the curve a moments accountant bounds)."""
        if not orders or min(orders) <= 1.0:
            raise PrivacyError("Rényi orders must all be > 1")
        dpa = _library()
        acc = dpa.rdp.RdpAccountant(orders=list(orders))
        for r in self.releases:
            if r.count:
                acc.compose(r.event())
        return np.asarray(acc.rdp, dtype=np.float64)


def _merged_unsampled(releases: Sequence[GaussianRelease]) -> tuple[float | None, list[GaussianRelease]]:
    """The one σ equivalent to all unsampled releases (None if there are none), and the sampled ones."""
    precision = sum(r.count / r.noise_multiplier**2 for r in releases if r.sampling_rate == 1.0)
    sampled = [r for r in releases if r.sampling_rate < 1.0 and r.count]
    return (1.0 / math.sqrt(precision) if precision > 0 else None), sampled


def epsilon_of(
    releases: Sequence[GaussianRelease], delta: float, *, method: AccountingMethod = "pld"
) -> float:
    """ε of the (ε, δ)-DP guarantee of all these releases composed."""
    _check_delta(delta)
    dpa = _library()
    sigma, sampled = _merged_unsampled(releases)
    if sigma is None and not sampled:
        return 0.0
    if method == "rdp":
        acc = dpa.rdp.RdpAccountant()
        for r in releases:
            if r.count:
                acc.compose(r.event())
        return float(acc.get_epsilon(delta))
    if not sampled:
        assert sigma is not None
        # The library's bisection evaluates log1p(-1) = -inf on purpose at the edge of its bracket.
        with np.errstate(divide="ignore"):
            return float(dpa.get_epsilon_gaussian(sigma, delta))
    acc = dpa.pld.PLDAccountant()
    if sigma is not None:
        acc.compose(dpa.GaussianDpEvent(sigma))
    for r in sampled:
        acc.compose(r.event())
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(
    epsilon: float, delta: float, *, rounds: int = 1, sampling_rate: float = 1.0
) -> float:
    """The noise multiplier σ for which ``rounds`` releases (Poisson rate ``sampling_rate``) spend ≤ ε.

    Unsampled: the analytic Gaussian σ for one release, times sqrt(rounds) (exact). Sampled: bisection
    with the PLD accountant, rounded up to the next 1e-3 so the stated ε holds.
    """
    _check_delta(delta)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyError(f"target epsilon must be a finite number > 0, got {epsilon}")
    if rounds < 1:
        raise PrivacyError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 < sampling_rate <= 1.0:
        raise PrivacyError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    dpa = _library()
    with np.errstate(divide="ignore"):  # see epsilon_of
        single = float(dpa.get_sigma_gaussian(epsilon, delta))
    if sampling_rate == 1.0:
        return single * math.sqrt(rounds)

    def fresh() -> object:
        return dpa.pld.PLDAccountant(value_discretization_interval=_CALIBRATION_DISCRETIZATION)

    def event(sigma: float) -> object:
        return GaussianRelease(sigma, rounds, sampling_rate).event()

    # Sampling only ever helps, so the unsampled σ bounds the answer from above.
    upper = single * math.sqrt(rounds)
    bracket = dpa.ExplicitBracketInterval(_SMALLEST_SIGMA, max(upper, 2 * _SMALLEST_SIGMA))
    sigma = float(dpa.calibrate_dp_mechanism(fresh, event, epsilon, delta, bracket, tol=1e-4))
    return math.ceil(sigma * 1000.0) / 1000.0
