"""The Strategy interface every federated algorithm implements, and the round's data types."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from edge_node.protocol.updates import UpdateKind

#: Named tensors: a model state, a part of one, or an update.
Params = dict[str, np.ndarray]
Config = Mapping[str, float | int | str | bool]


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
