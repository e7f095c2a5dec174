"""The Strategy interface every federated algorithm implements, and the round's data types."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

import numpy as np

from edge_node.protocol.updates import UpdateKind
from hub.fl.errors import StrategyConfigError

#: Named tensors: a model state, a part of one, or an update.
Params = dict[str, np.ndarray]
Config = Mapping[str, float | int | str | bool]
#: A reduction of client updates with their weights (sample counts) into one update.
Reducer = Callable[[Sequence[Params], Sequence[float]], Params]
#: A value that JSON can hold as it is.
JsonValue: TypeAlias = bool | int | float | str | Sequence["JsonValue"] | Mapping[str, "JsonValue"] | None
#: What ``Strategy.state_dict`` returns: numpy arrays and JSON values under string keys, nothing else, so a
#: round controller can store it without pickle (``hub.fl.state`` writes it as one npz).
StateDict = dict[str, np.ndarray | JsonValue]


class Capability(enum.Flag):
    """What a strategy lets a wrapper do with it; a wrapper checks these instead of the strategy's class."""

    NONE = 0
    #: The aggregate is a (weighted) mean of client deltas that ``aggregate_with`` lets a caller replace
    #: (a robust median, a clipped and noised mean).
    REPLACEABLE_MEAN = enum.auto()
    #: The hub keeps a part of the model per client that is not averaged (pFedNet's personal heads), so a
    #: mechanism that protects only the mean does not protect it.
    PERSONAL_STATE = enum.auto()


@dataclass(frozen=True)
class ClientTask:
    """What one client is asked to do in a round."""

    client_id: str
    round: int
    kind: UpdateKind
    #: Tensors the client starts from (e.g. the global shared weights, plus its own personal part).
    params: Params
    config: Config = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    """One client's answer: an update of the kind the task asked for."""

    client_id: str
    round: int
    num_examples: int
    #: For weights_delta: local_after - params_sent, per tensor name (a subset of the task's params).
    update: Params
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not answer usefully, with the reason (timeout, rejected update, error)."""

    client_id: str
    round: int
    reason: str


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one aggregated round."""

    rnd: int
    #: Clients whose updates were used.
    accepted: tuple[str, ...]
    #: Failures reported by the caller plus updates rejected by validation, with reasons.
    failures: tuple[ClientFailure, ...]
    #: Unweighted mean over accepted clients of every metric they all reported, plus "num_examples" (sum).
    metrics: dict[str, float] = field(default_factory=dict)
    #: False when the round kept the previous model.
    applied: bool = True


class Strategy(ABC):
    """A federated algorithm as a pure object: no I/O, no torch.

    The round controller (real nodes) and the simulation runner call the same three methods:
    ``initialize`` once, then per round ``configure_round`` and ``aggregate``.
    """

    name: ClassVar[str]
    update_kind: ClassVar[UpdateKind] = UpdateKind.WEIGHTS_DELTA
    #: What a wrapper may do with this strategy (an instance attribute where it depends on what it wraps).
    capabilities: Capability = Capability.NONE

    @abstractmethod
    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        """Set the starting global state for these clients."""

    @abstractmethod
    def configure_round(self, rnd: int, clients: Sequence[str]) -> list[ClientTask]:
        """Tasks for the clients sampled this round."""

    @abstractmethod
    def aggregate(
        self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> Params | None:
        """Fold the round's results into a new global state; None keeps the previous one."""

    def aggregate_with(
        self,
        rnd: int,
        results: Sequence[ClientResult],
        failures: Sequence[ClientFailure],
        mean: Reducer,
    ) -> Params | None:
        """``aggregate`` with ``mean`` in place of the strategy's own mean of the accepted deltas.

        Only strategies with ``Capability.REPLACEABLE_MEAN`` implement it; wrappers call it.
        """
        raise StrategyConfigError(f"{self.name}: its aggregate is not a mean that a wrapper can replace")

    @abstractmethod
    def state_dict(self) -> StateDict:
        """Everything the strategy learned or counted since ``initialize``: arrays and JSON values.

        Settings given to the constructor are not included: build the same strategy, then
        ``load_state_dict`` to carry on exactly where this one stands.
        """

    @abstractmethod
    def load_state_dict(self, state: StateDict) -> None:
        """Restore what ``state_dict`` returned (by a strategy of the same name and settings)."""

    @property
    @abstractmethod
    def global_params(self) -> Params:
        """The current global (shared) state."""

    @property
    def history(self) -> Sequence[RoundRecord]:
        """One record per aggregated round, oldest first (empty for a strategy that keeps none)."""
        return ()

    def shares(self, name: str) -> bool:
        """Whether tensor ``name`` travels between hub and clients; the others stay on each client.

        The default shares everything; FedBN keeps BN tensors local, FedHelp keeps private heads local.
        """
        return True

    def params_for(self, client_id: str) -> Params:
        """The hub's tensors for this client's model (shared state plus, if any, its personal part).

        Tensors for which ``shares`` is False are not included: the client's own values complete the model.
        """
        return self.global_params
