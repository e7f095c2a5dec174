"""Tail averaging: deploy the mean of a federation's models over its last rounds instead of one round's.

Averaging the weights a training run passes through near its end (stochastic weight averaging, here over
federation rounds) lands nearer the middle of the region those rounds wander in, which is often flatter and
generalises better than any one round. It costs the clinics nothing: the hub keeps a running sum of what it
publishes. With GroupNorm no statistics need re-estimating after the average.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hub.fl.strategy import Params

__all__ = ["TailMean"]


class TailMean:
    """The mean of the models offered for rounds ``last - rounds + 1`` … ``last`` (1-based round numbers).

    Floating-point tensors are averaged; any other tensor (an integer step counter) takes the last round's
    value. Rounds outside the tail are ignored, and a round offered twice is an error: a federation resumed
    from a checkpoint replays its rounds with the restored model, which must not enter the mean.
    """

    def __init__(self, last: int, rounds: int) -> None:
        if rounds < 1 or last < 1:
            raise ValueError(f"tail averaging needs at least one round (last {last}, rounds {rounds})")
        self.first = max(1, last - rounds + 1)
        self.last = last
        self.rounds: list[int] = []
        self._sum: dict[str, np.ndarray] = {}
        self._latest: Params = {}
        #: Euclidean distance (over the floating-point tensors) from each offered round's model to the
        #: previous offered one's: how far the federation still moves within the tail.
        self.steps: list[float] = []

    def offer(self, rnd: int, params: Mapping[str, np.ndarray]) -> None:
        if not self.first <= rnd <= self.last:
            return
        if rnd in self.rounds:
            raise ValueError(f"round {rnd} offered twice to the tail mean")
        if self._latest:
            self.steps.append(_distance(params, self._latest))
        self.rounds.append(rnd)
        for name, value in params.items():
            if np.issubdtype(value.dtype, np.floating):
                self._sum[name] = self._sum.get(name, 0.0) + value.astype(np.float64)
        self._latest = {name: np.array(value, copy=True) for name, value in params.items()}

    def mean(self) -> Params:
        """The averaged model; an error unless every round of the tail was offered."""
        missing = sorted(set(range(self.first, self.last + 1)) - set(self.rounds))
        if missing:
            raise ValueError(f"the tail mean lacks rounds {missing}")
        n = len(self.rounds)
        return {
            name: (self._sum[name] / n).astype(value.dtype) if name in self._sum else value
            for name, value in self._latest.items()
        }

    def distances(self) -> dict[str, float | list[float]]:
        """How far apart the tail's models lie: the steps between consecutive rounds, the mean's distance
        to the last round's model, and that model's norm for scale (floating-point tensors only)."""
        last = self._latest
        return {
            "steps": list(self.steps),
            "mean_to_last": _distance(self.mean(), last),
            "last_norm": _distance(last, {name: np.zeros_like(value) for name, value in last.items()}),
        }


def _distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """‖a − b‖ over the floating-point tensors the two share, in float64."""
    total = 0.0
    for name, value in a.items():
        if np.issubdtype(value.dtype, np.floating) and name in b:
            total += float(((value.astype(np.float64) - b[name].astype(np.float64)) ** 2).sum())
    return float(np.sqrt(total))
