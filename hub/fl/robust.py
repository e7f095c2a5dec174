"""Robust aggregation as a wrapper: a strategy whose mean is replaced by a median, trimmed or bounded mean."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from functools import partial
from typing import Literal

import numpy as np

from edge_node.protocol.updates import UpdateKind
from hub.fl.aggregate import (
    NORM_FILTER_FACTOR,
    check_compatible,
    coordinate_median,
    norm_filtered_mean,
    trimmed_mean,
    unweighted_mean,
    weighted_mean,
    within_norm_filter,
)
from hub.fl.errors import AggregationError, StrategyConfigError
from hub.fl.state import INNER, nest, read_json, unnest
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
from hub.fl.update_audit import audit_updates
from hub.fl.validation import l2_norm

__all__ = [
    "NORM_FILTERS",
    "Robust",
    "RobustMethod",
    "WrappedStrategy",
    "audited_weighted_mean",
    "clip_to_median_norm",
    "norm_bounded_mean",
    "norm_bounded_trimmed_mean",
    "norm_filtered_weighted_mean",
]

#: The robust reductions that drop an update beyond the norm bound (``within_norm_filter``).
NORM_FILTERS = ("norm_filter", "norm_filter_weighted")

RobustMethod = Literal[
    "median",
    "trimmed_mean",
    "norm_filter",
    "norm_filter_weighted",
    "norm_bound",
    "norm_bound_trimmed",
    "audited",
]


def clip_to_median_norm(params_list: Sequence[Params], factor: float = 1.0) -> list[Params]:
    """Every update scaled down so its joint L2 norm is at most ``factor`` × the median norm.

    The median norm is set by the honest majority, so a scaled (poisoned) update keeps its vote but loses
    its weight; unlike dropping it, an honest large update that happens to point elsewhere still counts.
    Integer tensors (counters) are left as they are.
    """
    check_compatible(params_list)
    if not factor > 0.0 or not math.isfinite(factor):
        raise AggregationError(f"norm bound factor must be a positive number, got {factor}")
    norms = [l2_norm(p) for p in params_list]
    if not all(math.isfinite(n) for n in norms):
        raise AggregationError("an update has non-finite values; it cannot be norm-bounded")
    bound = factor * float(np.median(norms))
    out: list[Params] = []
    for params, norm in zip(params_list, norms, strict=True):
        scale = bound / norm if norm > bound else 1.0
        out.append(
            {
                n: (a.astype(np.float64) * scale).astype(a.dtype) if a.dtype.kind == "f" else a
                for n, a in params.items()
            }
        )
    return out


def norm_filtered_weighted_mean(
    params_list: Sequence[Params], weights: Sequence[float], *, factor: float = NORM_FILTER_FACTOR
) -> Params:
    """FedAvg's weighted mean of the updates whose joint L2 norm is at most ``factor`` × the median norm.

    Unlike ``norm_filtered_mean`` it keeps the sample-count weights of the updates that pass, so dropping
    one clinic leaves what FedAvg over the others would give. The weights are the clients' word, but a
    weighted mean of vectors each within the bound stays within it: a client that lies about its count
    can pull the aggregate at most ``factor`` × the median norm, in the direction of its own update.
    """
    check_compatible(params_list)
    if len(weights) != len(params_list):
        raise AggregationError(f"got {len(params_list)} tensor sets but {len(weights)} weights")
    keep = within_norm_filter([l2_norm(p) for p in params_list], factor)
    kept = [k for k, ok in enumerate(keep) if ok]
    return weighted_mean([params_list[k] for k in kept], [weights[k] for k in kept])


def audited_weighted_mean(params_list: Sequence[Params], weights: Sequence[float]) -> Params:
    """FedAvg's weighted mean without the updates that alone turn the round's mean round, or are three times
    too long or a quarter as long or shorter for the images their node claims (``UpdateAudit.left_out``,
    what ``fedclinic-hub rounds updates`` names first).

    A node named only because it agrees least of several that pull the mean far stays in: dropping it in
    the rounds where it is named did worse than FedAvg on the benchmark (docs/benchmarks.md). Unlike the
    norm filter it does not drop a large clinic's honest update for being long; with fewer than three
    updates it is FedAvg.
    """
    check_compatible(params_list)
    if len(weights) != len(params_list):
        raise AggregationError(f"got {len(params_list)} tensor sets but {len(weights)} weights")
    ids = [f"{k:06d}" for k in range(len(params_list))]
    audit = audit_updates({i: (p, w) for i, p, w in zip(ids, params_list, weights, strict=True)})
    left_out = {node.node_id for node in audit.left_out()}
    kept = [k for k, i in enumerate(ids) if i not in left_out]
    return weighted_mean([params_list[k] for k in kept], [weights[k] for k in kept])


def norm_bounded_mean(
    params_list: Sequence[Params], weights: Sequence[float] | None = None, *, factor: float = 1.0
) -> Params:
    """Unweighted mean after clipping every update to ``factor`` × the median norm; weights are ignored."""
    return unweighted_mean(clip_to_median_norm(params_list, factor))


def norm_bounded_trimmed_mean(
    params_list: Sequence[Params],
    weights: Sequence[float] | None = None,
    *,
    factor: float = 1.0,
    beta: float = 0.2,
) -> Params:
    """Trimmed mean (``beta`` per side) of the updates clipped to ``factor`` × the median norm.

    The clip takes a scaled attacker's magnitude, the trim what is left of its direction where it is
    extreme in a coordinate.
    """
    return trimmed_mean(clip_to_median_norm(params_list, factor), beta=beta)


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
        return {"strategy": self.name, **nest(INNER, self.inner.state_dict())}

    def load_state_dict(self, state: StateDict) -> None:
        saved = read_json(state, "strategy", str)
        if saved != self.name:
            raise StrategyConfigError(f"{self.name}: this state was saved by strategy {saved!r}")
        self.inner.load_state_dict(unnest(INNER, state))


class Robust(WrappedStrategy):
    """``inner`` with its (weighted or unweighted) mean replaced by a Byzantine-robust reduction.

    ``method="median"``: coordinate-wise median; ``"trimmed_mean"``: drop the floor(beta·K) largest and
    smallest values per coordinate, then average; ``"norm_filter"``: drop updates whose L2 norm exceeds
    ``norm_factor`` × the median norm, then average; ``"norm_filter_weighted"``: the same filter, then
    FedAvg's weighted mean of what passed; ``"norm_bound"``: clip every update to
    ``bound_factor`` × the median norm, then average; ``"norm_bound_trimmed"``: clip the same way, then the
    trimmed mean with ``beta``; ``"audited"``: FedAvg's weighted mean without the updates that
    ``fedclinic-hub rounds updates`` names (``audited_weighted_mean``).

    All but ``norm_filter_weighted`` and ``audited`` ignore sample counts (a client could lie about them;
    under the norm filter a lie can only move the aggregate within the norm bound, and the audit weighs a
    node by the images it claims, so a lie that makes it large makes what it does to the mean plainer).
    Everything else — validation, what is shared, personal parts — is the inner strategy's. They need the
    individual updates, so none combines with secure aggregation (the hub sees only the sum); there the
    nodes' clip bounds each clinic's influence instead.
    """

    name = "robust"

    def __init__(
        self,
        inner: Strategy,
        method: RobustMethod = "median",
        beta: float = 0.1,
        norm_factor: float = NORM_FILTER_FACTOR,
        bound_factor: float = 1.0,
    ) -> None:
        super().__init__(inner)
        reducer: Reducer
        if method == "median":
            reducer = coordinate_median
        elif method == "trimmed_mean":
            if not 0.0 <= beta < 0.5:
                raise StrategyConfigError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta}")
            reducer = partial(trimmed_mean, beta=beta)
        elif method in NORM_FILTERS:
            if not norm_factor >= 1.0:
                raise StrategyConfigError(f"{method} needs norm_factor >= 1, got {norm_factor}")
            filtered = norm_filtered_mean if method == "norm_filter" else norm_filtered_weighted_mean
            reducer = partial(filtered, factor=norm_factor)
        elif method in ("norm_bound", "norm_bound_trimmed"):
            if not bound_factor > 0.0 or not math.isfinite(bound_factor):
                raise StrategyConfigError(f"{method} needs a positive bound_factor, got {bound_factor}")
            if method == "norm_bound":
                reducer = partial(norm_bounded_mean, factor=bound_factor)
            else:
                if not 0.0 <= beta < 0.5:
                    raise StrategyConfigError(f"norm_bound_trimmed needs 0 <= beta < 0.5, got {beta}")
                reducer = partial(norm_bounded_trimmed_mean, factor=bound_factor, beta=beta)
        elif method == "audited":
            if inner.update_kind is not UpdateKind.WEIGHTS_DELTA:
                raise StrategyConfigError(
                    f"robust=audited reads weights_delta rounds; {inner.name} sends "
                    f"{inner.update_kind.value}, where its rules named honest clinics in about 1 of 9 "
                    "clinic-rounds on the benchmark (docs/benchmarks.md): it would leave honest clinics out"
                )
            reducer = audited_weighted_mean
        else:
            raise StrategyConfigError(
                "robust method must be 'median', 'trimmed_mean', 'norm_filter', 'norm_filter_weighted', "
                f"'norm_bound', 'norm_bound_trimmed' or 'audited', got {method!r}"
            )
        self.method = method
        self.beta = beta
        self._reducer = reducer

    def reduce(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        return self._reducer(updates, weights)
