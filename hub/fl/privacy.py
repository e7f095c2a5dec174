"""Central differential privacy as a wrapper: clip each delta, average, add Gaussian noise; a zCDP accountant.

Mechanism per round (add/remove-one-client adjacency): every accepted client's delta is scaled to L2 norm
at most ``clip_norm`` (jointly over its float tensors), the K deltas are averaged without weights, and
Gaussian noise of standard deviation ``noise_multiplier · clip_norm / K`` is added to every coordinate of
the mean — i.e. noise σ·C on the sum, whose sensitivity is C (K, the number of clients that answered, is
treated as public, as in DP-FedAvg). Integer tensors (BN batch counters) are not
moved under DP: their deltas would be unprotected counts.

Accounting is our own implementation of zero-concentrated DP (Bun & Steinke 2016): a Gaussian mechanism
with noise multiplier σ is ρ-zCDP with ρ = 1/(2σ²); T rounds compose to ρ = T/(2σ²); ρ-zCDP implies
(ε, δ)-DP with ε = ρ + 2·sqrt(ρ·ln(1/δ)). No amplification by client sampling is claimed, so the bound is
conservative. This is *central* DP: the hub sees individual updates before clipping; with secure
aggregation the clipping and noise move to the nodes (edge-side protection).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hub.fl.errors import StrategyConfigError
from hub.fl.robust import WrappedStrategy
from hub.fl.state import read_json
from hub.fl.strategy import Capability, ClientFailure, ClientResult, Params, StateDict, Strategy
from hub.fl.validation import l2_norm

__all__ = ["DifferentialPrivacy", "ZCDPAccountant", "clip_update"]


class ZCDPAccountant:
    """Privacy spent by repeated Gaussian mechanisms with one noise multiplier, in zCDP."""

    def __init__(self, noise_multiplier: float) -> None:
        if not noise_multiplier > 0:
            raise StrategyConfigError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        self.noise_multiplier = float(noise_multiplier)
        self.steps = 0

    def step(self, count: int = 1) -> None:
        """Record ``count`` more releases."""
        self.steps += count

    @property
    def rho(self) -> float:
        """ρ = T / (2σ²)."""
        return self.steps / (2.0 * self.noise_multiplier**2)

    def epsilon(self, delta: float) -> float:
        """ε of the (ε, δ)-DP guarantee implied by the zCDP so far: ρ + 2·sqrt(ρ·ln(1/δ))."""
        if not 0.0 < delta < 1.0:
            raise StrategyConfigError(f"delta must be in (0, 1), got {delta}")
        rho = self.rho
        return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def clip_update(update: Params, clip_norm: float) -> Params:
    """Scale the float tensors so that their joint L2 norm is at most ``clip_norm`` (computed in float64)."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {
        n: (a.astype(np.float64) * scale).astype(a.dtype) if a.dtype.kind == "f" else a.copy()
        for n, a in update.items()
    }


class DifferentialPrivacy(WrappedStrategy):
    """``inner`` with its mean replaced by clip → unweighted mean → Gaussian noise, and a zCDP accountant.

    ``epsilon()`` is the (ε, ``delta``)-DP spent so far; every round that changes the model adds one step
    and records ``dp_epsilon`` in that round's metrics. ``seed`` fixes the noise (tests only).
    """

    name = "dp"

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        delta: float = 1e-5,
        seed: int | None = None,
    ) -> None:
        super().__init__(inner)
        if not clip_norm > 0:
            raise StrategyConfigError(f"dp: clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.accountant = ZCDPAccountant(noise_multiplier)
        self.epsilon()  # validates delta now, not at the first round
        self._rng = np.random.default_rng(seed)
        self._seeded = seed is not None

    def _refuse(self, inner: Strategy) -> None:
        # Noise on the mean would leave parts that are never averaged unprotected.
        if Capability.PERSONAL_STATE in inner.capabilities:
            raise StrategyConfigError(
                f"dp: {inner.name!r} keeps personal parts per client that are not averaged, so central DP "
                "cannot protect them; use edge-side protection for it"
            )

    def epsilon(self) -> float:
        """ε spent so far at this wrapper's δ."""
        return self.accountant.epsilon(self.delta)

    def aggregate(
        self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> Params | None:
        new = super().aggregate(rnd, results, failures)
        if new is not None:
            self.history[-1].metrics["dp_epsilon"] = self.epsilon()
        return new

    def state_dict(self) -> StateDict:
        """The inner state, the accountant's step count and, for a seeded wrapper only, the noise position.

        An unseeded wrapper never writes its generator's state: whoever read the stored state could
        otherwise predict the noise and take it off the model. After a restart it draws fresh noise.
        """
        state = super().state_dict()
        state["accountant_steps"] = self.accountant.steps
        state["rng"] = self._rng.bit_generator.state if self._seeded else None
        return state

    def load_state_dict(self, state: StateDict) -> None:
        super().load_state_dict(state)
        steps: int = read_json(state, "accountant_steps", int)
        rng: dict[str, Any] | None = read_json(state, "rng", dict[str, Any] | None)
        if rng is not None and rng.get("bit_generator") != type(self._rng.bit_generator).__name__:
            raise StrategyConfigError(
                f"dp: the state's noise generator {rng.get('bit_generator')!r} is not this wrapper's"
            )
        self.accountant.steps = steps
        if rng is not None and self._seeded:
            self._rng.bit_generator.state = rng

    def reduce(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        """Clip each delta, average without weights, add Gaussian noise; one accountant step."""
        k = len(updates)
        std = self.accountant.noise_multiplier * self.clip_norm / k
        clipped = [clip_update(u, self.clip_norm) for u in updates]
        out: Params = {}
        for name, ref in updates[0].items():
            if ref.dtype.kind != "f":
                out[name] = np.zeros_like(ref)
                continue
            mean = np.mean([c[name].astype(np.float64) for c in clipped], axis=0)
            out[name] = (mean + self._rng.normal(0.0, std, size=ref.shape)).astype(ref.dtype)
        self.accountant.step()
        return out
