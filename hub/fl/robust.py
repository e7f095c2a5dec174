"""Robust aggregation as a wrapper: a strategy whose mean is replaced by a median or a trimmed mean."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from functools import partial
from typing import Literal

from hub.fl.aggregate import coordinate_median, norm_filtered_mean, trimmed_mean
from hub.fl.errors import StrategyConfigError
from hub.fl.state import nest, read_json, unnest
from hub.fl.strategy import (
    Capability,
    ClientFailure,
    ClientResult,
    ClientTask,
    Params,
    Reducer,
    RoundRecord,
    StateDict,
    Strategy,
)

__all__ = ["Robust", "RobustMethod", "WrappedStrategy"]

RobustMethod = Literal["median", "trimmed_mean", "norm_filter"]


class WrappedStrategy(Strategy):
    """A strategy that delegates everything to ``inner`` but aggregates with its own ``reduce``.

    ``inner`` must declare ``Capability.REPLACEABLE_MEAN``; the wrapper hands ``reduce`` to
    ``inner.aggregate_with`` each round and never changes ``inner`` itself. A wrapper does not offer that
    capability again (one replacement of the mean is all there is); a subclass refuses, in ``_refuse``, the
    capabilities it cannot work with.
    """

    name = "wrapped"

    def __init__(self, inner: Strategy) -> None:
        if Capability.REPLACEABLE_MEAN not in inner.capabilities:
            raise StrategyConfigError(
                f"{type(self).__name__} replaces the mean of a strategy that averages client deltas "
                f"(fedavg, fedprox, fedbn, hsl, fedhelp, pfednet); {inner.name!r} does not offer that: "
                "wrap the inner strategy only once"
            )
        self._refuse(inner)
        self.inner = inner
        self.capabilities = inner.capabilities & ~Capability.REPLACEABLE_MEAN

    def _refuse(self, inner: Strategy) -> None:
        """Raise ``StrategyConfigError`` if ``inner`` has a capability this wrapper cannot work with."""

    @abstractmethod
    def reduce(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        """The wrapper's replacement for the inner strategy's mean of the accepted deltas."""

    @property
    def history(self) -> Sequence[RoundRecord]:
        """The inner strategy's round records."""
        return self.inner.history

    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        self.inner.initialize(params, clients)

    def configure_round(self, rnd: int, clients: Sequence[str]) -> list[ClientTask]:
        return self.inner.configure_round(rnd, clients)

    def aggregate(
        self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> Params | None:
        mean: Reducer = self.reduce
        return self.inner.aggregate_with(rnd, results, failures, mean)

    @property
    def global_params(self) -> Params:
        return self.inner.global_params

    def shares(self, name: str) -> bool:
        return self.inner.shares(name)

    def params_for(self, client_id: str) -> Params:
        return self.inner.params_for(client_id)

    def state_dict(self) -> StateDict:
        """The inner strategy's state under ``inner/``, plus this wrapper's name."""
        return {"strategy": self.name, **nest("inner/", self.inner.state_dict())}

    def load_state_dict(self, state: StateDict) -> None:
        saved = read_json(state, "strategy", str)
        if saved != self.name:
            raise StrategyConfigError(f"{self.name}: this state was saved by strategy {saved!r}")
        self.inner.load_state_dict(unnest("inner/", state))


class Robust(WrappedStrategy):
    """``inner`` with its (weighted or unweighted) mean replaced by a Byzantine-robust reduction.

    ``method="median"``: coordinate-wise median; ``"trimmed_mean"``: drop the floor(beta·K) largest and
    smallest values per coordinate, then average; ``"norm_filter"``: drop updates whose L2 norm exceeds
    ``norm_factor`` × the median norm, then average. All ignore sample counts (a client could lie about
    them). Everything else — validation, what is shared, personal parts — is the inner strategy's. They
    need the individual updates, so none combines with secure aggregation (the hub sees only the sum);
    there the nodes' clip bounds each clinic's influence instead.
    """

    name = "robust"

    def __init__(
        self, inner: Strategy, method: RobustMethod = "median", beta: float = 0.1, norm_factor: float = 3.0
    ) -> None:
        super().__init__(inner)
        reducer: Reducer
        if method == "median":
            reducer = coordinate_median
        elif method == "trimmed_mean":
            if not 0.0 <= beta < 0.5:
                raise StrategyConfigError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta}")
            reducer = partial(trimmed_mean, beta=beta)
        elif method == "norm_filter":
            if not norm_factor >= 1.0:
                raise StrategyConfigError(f"norm_filter needs norm_factor >= 1, got {norm_factor}")
            reducer = partial(norm_filtered_mean, factor=norm_factor)
        else:
            raise StrategyConfigError(
                f"robust method must be 'median', 'trimmed_mean' or 'norm_filter', got {method!r}"
            )
        self.method = method
        self.beta = beta
        self._reducer = reducer

    def reduce(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        return self._reducer(updates, weights)
