"""FedProx (Li et al. 2020): FedAvg at the server; clients add (mu/2)·‖w − w_global‖² to their local loss."""

from __future__ import annotations

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging
from hub.fl.errors import StrategyConfigError
from hub.fl.strategy import Config

__all__ = ["FedProx"]


class FedProx(DeltaAveraging):
    """FedAvg aggregation; every task's config carries ``mu`` for the client's proximal term.

    The proximal term is the client's job: the learner adds (mu/2)·‖w − w_sent‖² over the task's tensors.
    """

    name = "fedprox"
    update_kind = UpdateKind.WEIGHTS_DELTA

    def __init__(
        self,
        *,
        mu: float = 0.01,
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        client_config: Config | None = None,
    ) -> None:
        if not mu >= 0:
            raise StrategyConfigError(f"fedprox: mu must be >= 0, got {mu}")
        super().__init__(
            weighted=True,
            server_lr=server_lr,
            max_norm=max_norm,
            min_results=min_results,
            client_config=client_config,
        )
        self.mu = float(mu)

    def task_config(self, client_id: str) -> Config:
        return {**self.client_config, "mu": self.mu}
