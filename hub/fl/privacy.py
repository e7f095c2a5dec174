"""Central differential privacy as a wrapper: clip each delta, average, add Gaussian noise; PLD accounting.

Mechanism per round (add/remove-one-client adjacency): every accepted client's delta is scaled to L2 norm
at most ``clip_norm`` (jointly over its float tensors), the K deltas are averaged without weights, and
Gaussian noise of standard deviation ``noise_multiplier · clip_norm / K`` is added to every coordinate of
the mean — i.e. noise σ·C on the sum, whose sensitivity is C (K, the number of clients that answered, is
treated as public, as in DP-FedAvg). Integer tensors (BN batch counters) are not
moved under DP: their deltas would be unprotected counts.

Accounting is ``edge_node.protocol.accountant`` (dp-accounting underneath), the same accountant the nodes
use: each round that changes the model is one Gaussian release with multiplier σ on everyone who answered
(no amplification by client sampling is claimed: every configured client is asked). This is *central* DP:
the hub sees individual updates before clipping; with secure aggregation the clipping and noise move to the
nodes (edge-side protection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_node.protocol.accountant import GaussianRelease, PrivacyAccountant
from edge_node.protocol.errors import PrivacyError
from hub.fl.errors import StrategyConfigError
from hub.fl.robust import WrappedStrategy
from hub.fl.state import read_json
from hub.fl.strategy import Capability, ClientFailure, ClientResult, Params, StateDict, Strategy
from hub.fl.validation import l2_norm

__all__ = ["DifferentialPrivacy", "clip_update"]


def clip_update(update: Params, clip_norm: float) -> Params:
    """Scale the float tensors so that their joint L2 norm is at most ``clip_norm`` (computed in float64)."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {
        n: (a.astype(np.float64) * scale).astype(a.dtype) if a.dtype.kind == "f" else a.copy()
        for n, a in update.items()
    }


class DifferentialPrivacy(WrappedStrategy):
    """``inner`` with its mean replaced by clip → unweighted mean → Gaussian noise, and a PLD accountant.

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
        try:
            # Both validate now, not at the first round.
            self._release = GaussianRelease(noise_multiplier)
            PrivacyAccountant().epsilon(self.delta)
        except PrivacyError as exc:
            raise StrategyConfigError(f"dp: {exc}") from exc
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = PrivacyAccountant()
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
        # Every round of this wrapper spends the same release, so the count restores the ledger exactly.
        self.accountant.releases = [self._release] * steps
        if rng is not None and self._seeded:
            self._rng.bit_generator.state = rng

    def reduce(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        """Clip each delta, average without weights, add Gaussian noise; one accountant step."""
        k = len(updates)
        std = self.noise_multiplier * self.clip_norm / k
        clipped = [clip_update(u, self.clip_norm) for u in updates]
        out: Params = {}
        for name, ref in updates[0].items():
            if ref.dtype.kind != "f":
                out[name] = np.zeros_like(ref)
                continue
            mean = np.mean([c[name].astype(np.float64) for c in clipped], axis=0)
            out[name] = (mean + self._rng.normal(0.0, std, size=ref.shape)).astype(ref.dtype)
        self.accountant.record(self._release)
        return out
