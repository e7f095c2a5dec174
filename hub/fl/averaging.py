"""DeltaAveraging: the shared engine of the averaging strategies (FedAvg, FedProx, FedBN, HSL, FedHelp).

One round: ``configure_round`` sends each client the shared global tensors (copies) and a config; the client
answers with ``update = local_after - params_sent`` for exactly those tensors; ``aggregate`` rejects broken
updates (they become ``ClientFailure`` with a reason, see ``hub.fl.validation``), reduces the accepted
deltas with the strategy's mean (weighted by ``num_examples`` or not; a wrapper passes its own to
``aggregate_with``) and applies the result: ``global += server_lr * mean_delta`` (integer tensors get the
rounded mean delta, without ``server_lr``). Fewer accepted results than ``min_results`` keeps the model
(``aggregate`` returns None). Each round leaves a ``RoundRecord`` in ``history``. ``state_dict`` holds the
global tensors, the clients, the history and the update specs of rounds configured but not yet
aggregated, so a hub that restarts mid-round can still aggregate that round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from hub.fl.aggregate import unweighted_mean, weighted_mean
from hub.fl.errors import StrategyConfigError
from hub.fl.state import (
    pack_params,
    read_json,
    records_from_json,
    records_to_json,
    specs_from_json,
    specs_to_json,
    unpack_params,
)
from hub.fl.strategy import (
    Capability,
    ClientFailure,
    ClientResult,
    ClientTask,
    Config,
    Params,
    Reducer,
    RoundRecord,
    StateDict,
    Strategy,
)
from hub.fl.validation import TensorSpec, screen, spec_of

__all__ = ["DeltaAveraging", "apply_delta", "copy_params"]

logger = logging.getLogger(__name__)


def copy_params(params: Mapping[str, np.ndarray]) -> Params:
    """Independent copies of named tensors."""
    return {name: np.array(arr, copy=True) for name, arr in params.items()}


def apply_delta(params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], lr: float = 1.0) -> Params:
    """``params + lr * delta`` for the tensors in ``delta`` (float math in float64, result in params' dtype).

    Integer tensors get ``params + delta`` (no lr: a step counter moves by whole counts). Tensors not in
    ``delta`` are copied unchanged.
    """
    out = copy_params(params)
    for name, step in delta.items():
        base = params[name]
        if base.dtype.kind in "iu":
            out[name] = (base + np.rint(step).astype(base.dtype)).astype(base.dtype)
        else:
            out[name] = (base.astype(np.float64) + lr * step.astype(np.float64)).astype(base.dtype)
    return out


def _mean_metrics(results: Sequence[ClientResult]) -> dict[str, float]:
    metrics: dict[str, float] = {"num_examples": float(sum(r.num_examples for r in results))}
    if results:
        common = set.intersection(*(set(r.metrics) for r in results))
        for key in sorted(common):
            metrics[key] = float(np.mean([float(r.metrics[key]) for r in results]))
    return metrics


class DeltaAveraging(Strategy):
    """Average client deltas of the shared tensors and apply them to the global state."""

    name = "delta_averaging"
    capabilities = Capability.REPLACEABLE_MEAN

    def __init__(
        self,
        *,
        weighted: bool,
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        local: Callable[[str], bool] | None = None,
        client_config: Config | None = None,
    ) -> None:
        if not server_lr > 0:
            raise StrategyConfigError(f"server_lr must be > 0, got {server_lr}")
        if max_norm is not None and not max_norm > 0:
            raise StrategyConfigError(f"max_norm must be > 0 or None, got {max_norm}")
        if min_results < 1:
            raise StrategyConfigError(f"min_results must be >= 1, got {min_results}")
        self.weighted = weighted
        self.server_lr = float(server_lr)
        self.max_norm = max_norm
        self.min_results = min_results
        self._local = local
        self.client_config: dict[str, float | int | str | bool] = dict(client_config or {})
        self._mean: Reducer = weighted_mean if weighted else unweighted_mean
        self._history: list[RoundRecord] = []
        self._global: Params | None = None
        self._clients: tuple[str, ...] = ()
        self._expected: dict[int, dict[str, dict[str, TensorSpec]]] = {}

    # -- Strategy interface -------------------------------------------------------------------------------

    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        """Keep the shared tensors of ``params`` as the global state; local ones are left to the clients."""
        shared = {name: arr for name, arr in params.items() if self.shares(name)}
        if not shared:
            raise StrategyConfigError(
                f"{self.name}: no tensor of the model is shared; check the name predicate"
            )
        if len(set(clients)) != len(clients):
            raise StrategyConfigError(f"{self.name}: client ids must be unique")
        self._global = copy_params(shared)
        self._clients = tuple(clients)
        self._expected.clear()
        self._history.clear()

    def configure_round(self, rnd: int, clients: Sequence[str]) -> list[ClientTask]:
        tasks = [
            ClientTask(
                client_id=cid,
                round=rnd,
                kind=self.update_kind,
                params=self.params_for(cid),
                config=self.task_config(cid),
            )
            for cid in clients
        ]
        self._expected[rnd] = {t.client_id: spec_of(t.params) for t in tasks}
        # Specs of rounds that can no longer be aggregated are dropped to bound memory.
        for old in [r for r in self._expected if r < rnd - 1]:
            del self._expected[old]
        return tasks

    def aggregate(
        self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> Params | None:
        return self.aggregate_with(rnd, results, failures, self._mean)

    def aggregate_with(
        self,
        rnd: int,
        results: Sequence[ClientResult],
        failures: Sequence[ClientFailure],
        mean: Reducer,
    ) -> Params | None:
        expected = self._expected.get(rnd)
        if expected is None:
            raise StrategyConfigError(
                f"{self.name}: round {rnd} was never configured or is already aggregated"
            )
        accepted, rejected = screen(rnd, results, expected, max_norm=self.max_norm)
        if self.weighted:
            empty = [r for r in accepted if r.num_examples == 0]
            accepted = [r for r in accepted if r.num_examples > 0]
            rejected += [
                ClientFailure(r.client_id, rnd, "reported 0 examples; a sample-weighted mean cannot use it")
                for r in empty
            ]
        all_failures = (*failures, *rejected)
        if len(accepted) < self.min_results:
            logger.warning(
                "round %d: %d usable results (< %d); keeping the model", rnd, len(accepted), self.min_results
            )
            self._history.append(RoundRecord(rnd, (), all_failures, _mean_metrics([]), applied=False))
            return None
        self._fold(rnd, accepted, mean)
        del self._expected[rnd]  # a round changes the model once
        record = RoundRecord(rnd, tuple(r.client_id for r in accepted), all_failures, _mean_metrics(accepted))
        self._history.append(record)
        self._after_round(rnd, accepted, record)
        return self.global_params

    @property
    def global_params(self) -> Params:
        return copy_params(self._state())

    def state_dict(self) -> StateDict:
        state: StateDict = {
            "strategy": self.name,
            "clients": list(self._clients),
            "history": records_to_json(self._history),
            "open_rounds": specs_to_json(self._expected),
        }
        state.update(pack_params("global/", self._state()))
        return state

    def load_state_dict(self, state: StateDict) -> None:
        saved = read_json(state, "strategy", str)
        if saved != self.name:
            raise StrategyConfigError(f"{self.name}: this state was saved by strategy {saved!r}")
        shared = unpack_params(state, "global/")
        if not shared:
            raise StrategyConfigError(f"{self.name}: the state holds no global tensors")
        self._clients = tuple(read_json(state, "clients", list[str]))
        self._history = records_from_json(state, "history")
        self._expected = specs_from_json(state, "open_rounds")
        self._global = shared

    @property
    def history(self) -> list[RoundRecord]:
        return self._history

    def shares(self, name: str) -> bool:
        return self._local is None or not self._local(name)

    # -- hooks for subclasses -----------------------------------------------------------------------------

    def task_config(self, client_id: str) -> Config:
        """The config each client gets with its task (``client_config``; subclasses add their own keys)."""
        return dict(self.client_config)

    def weights(self, results: Sequence[ClientResult]) -> list[float]:
        """Weights of the accepted results in the mean: sample counts, or all 1 when unweighted."""
        return [float(r.num_examples) if self.weighted else 1.0 for r in results]

    def _fold(self, rnd: int, accepted: Sequence[ClientResult], mean: Reducer) -> None:
        """Reduce the accepted deltas with ``mean`` and apply them to the global state."""
        mean_delta = mean([r.update for r in accepted], self.weights(accepted))
        self._global = apply_delta(self._state(), mean_delta, self.server_lr)

    def _after_round(self, rnd: int, accepted: Sequence[ClientResult], record: RoundRecord) -> None:
        """Called after a round changed the model (HSL tracks its best round here)."""

    def _state(self) -> Params:
        if self._global is None:
            raise StrategyConfigError(f"{self.name}: call initialize(params, clients) first")
        return self._global
