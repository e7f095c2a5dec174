"""FedAvg (McMahan et al. 2017): sample-weighted mean of client deltas, applied with a server step size."""

from __future__ import annotations

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging
from hub.fl.strategy import Config

__all__ = ["FedAvg"]


class FedAvg(DeltaAveraging):
    """global += server_lr · Σ_k n_k·Δ_k / Σ_k n_k over the accepted clients (n_k = ``num_examples``).

    With ``server_lr=1`` and every client starting from the global, this is the sample-weighted mean of
    the client models. ``max_norm`` rejects updates whose L2 norm is larger; ``min_results`` is the
    operator's minimum number of usable updates for a round to change the model.
    """

    name = "fedavg"
    update_kind = UpdateKind.WEIGHTS_DELTA

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        client_config: Config | None = None,
    ) -> None:
        super().__init__(
            weighted=True,
            server_lr=server_lr,
            max_norm=max_norm,
            min_results=min_results,
            client_config=client_config,
        )
