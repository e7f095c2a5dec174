"""HeteroSync Learning (HSL, docs/algorithms.md §1): unweighted mean of all tensors, BN stats included.

The shared anchor task (SAT) and the MMoE heads live in the client's learner; the server's part is small:
every tensor is shared and the mean is unweighted (w = (1/K) Σ_k w_k, not by sample count, §1.5). The model
it hands on is the last round's, as for every strategy: the paper's choice of the round with the best mean
validation AUC needs each node to report one, and a small clinic's few validation images would choose
badly (§1.5).
"""

from __future__ import annotations

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging
from hub.fl.strategy import Config

__all__ = ["HSL"]


class HSL(DeltaAveraging):
    """Unweighted averaging of every tensor; tasks carry the fixed loss weights of the two tasks.

    ``primary_weight`` and ``sat_weight`` weigh the primary task and the shared anchor task in each node's
    loss (0.5 / 0.5 in the paper's code, §1.4). fedclinic's learner (``hub.training.hsl_train.HslLearner``)
    uploads its state at the end of the round. A state saved by earlier versions, which also tracked a best
    round by reported validation AUC, loads: those entries are ignored.
    """

    name = "hsl"
    update_kind = UpdateKind.WEIGHTS_DELTA

    def __init__(
        self,
        *,
        primary_weight: float = 0.5,
        sat_weight: float = 0.5,
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        client_config: Config | None = None,
    ) -> None:
        super().__init__(
            weighted=False,
            server_lr=server_lr,
            max_norm=max_norm,
            min_results=min_results,
            client_config=client_config,
        )
        self.primary_weight = float(primary_weight)
        self.sat_weight = float(sat_weight)

    def task_config(self, client_id: str) -> Config:
        return {**self.client_config, "primary_weight": self.primary_weight, "sat_weight": self.sat_weight}
