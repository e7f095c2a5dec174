"""Robust aggregation as a wrapper: an averaging strategy whose mean is a median or a trimmed mean."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

from hub.fl.aggregate import Reducer, coordinate_median, norm_filtered_mean, trimmed_mean
from hub.fl.averaging import DeltaAveraging
from hub.fl.errors import StrategyConfigError
from hub.fl.strategy import ClientFailure, ClientResult, ClientTask, Params, RoundRecord, Strategy

__all__ = ["Robust", "WrappedStrategy"]

RobustMethod = Literal["median", "trimmed_mean", "norm_filter"]


class WrappedStrategy(Strategy):
    """A strategy that delegates everything to ``inner`` (an averaging strategy whose mean it replaces)."""

    name = "wrapped"

    def __init__(self, inner: Strategy) -> None:
        if not isinstance(inner, DeltaAveraging):
            raise StrategyConfigError(
                f"{type(self).__name__} wraps an averaging strategy (fedavg, fedprox, fedbn, hsl, fedhelp, "
                f"pfednet), not {type(inner).__name__}; wrap the inner strategy only once"
            )
        self.inner: DeltaAveraging = inner

    @property
    def history(self) -> list[RoundRecord]:
        """The inner strategy's round records."""
        return self.inner.history

    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        self.inner.initialize(params, clients)

    def configure_round(self, rnd: int, clients: Sequence[str]) -> list[ClientTask]:
        return self.inner.configure_round(rnd, clients)

    def aggregate(
        self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> Params | None:
        return self.inner.aggregate(rnd, results, failures)

    @property
    def global_params(self) -> Params:
        return self.inner.global_params

    def shares(self, name: str) -> bool:
        return self.inner.shares(name)

    def params_for(self, client_id: str) -> Params:
        return self.inner.params_for(client_id)


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
        self.inner.reducer = reducer
