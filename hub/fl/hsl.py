"""HeteroSync Learning (HSL, docs/algorithms.md §1): unweighted mean of all tensors, BN stats included.

The shared anchor task (SAT) and the MMoE heads live in the client's learner; the server's part is small:
every tensor is shared, the mean is unweighted (w = (1/K) Σ_k w_k, not by sample count, §1.5), and the final
model is the averaged model of the round with the highest mean validation AUC reported by the nodes
(fedclinic's learner reports none: the last round).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging, copy_params
from hub.fl.state import pack_params, read_json, unpack_params
from hub.fl.strategy import ClientResult, Config, Params, RoundRecord, StateDict

__all__ = ["HSL"]

logger = logging.getLogger(__name__)


class HSL(DeltaAveraging):
    """Unweighted averaging of every tensor; tracks the best round by the clients' mean validation AUC.

    In the paper each node uploads ``best_checkpoint_of_round - params_sent`` (its best-validation
    checkpoint, §1.5) and reports ``metrics[auc_key]`` (validation AUC of that checkpoint). The mean over
    the nodes that reported it goes into ``auc_by_round``; ``best_round`` / ``best_params`` are the round
    with the highest mean and the averaged model it produced. fedclinic's learner
    (``hub.training.hsl_train.HslLearner``) uploads its state at the end of the round and reports no AUC,
    so ``best_params`` is the last round's (a small clinic's few validation images would choose badly).
    Tasks carry the fixed loss weights ``primary_weight`` and ``sat_weight`` (0.5 / 0.5 in the paper's
    code, §1.4).
    """

    name = "hsl"
    update_kind = UpdateKind.WEIGHTS_DELTA

    def __init__(
        self,
        *,
        auc_key: str = "val_auc",
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
        self.auc_key = auc_key
        self.primary_weight = float(primary_weight)
        self.sat_weight = float(sat_weight)
        self.auc_by_round: dict[int, float] = {}
        self.best_round: int | None = None
        self._best: Params | None = None

    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        super().initialize(params, clients)
        self.auc_by_round.clear()
        self.best_round = None
        self._best = None

    def task_config(self, client_id: str) -> Config:
        return {**self.client_config, "primary_weight": self.primary_weight, "sat_weight": self.sat_weight}

    def _after_round(self, rnd: int, accepted: Sequence[ClientResult], record: RoundRecord) -> None:
        aucs = [float(r.metrics[self.auc_key]) for r in accepted if self.auc_key in r.metrics]
        if not aucs:
            return
        mean_auc = float(np.mean(aucs))
        self.auc_by_round[rnd] = mean_auc
        record.metrics[f"mean_{self.auc_key}"] = mean_auc
        if self.best_round is None or mean_auc > self.auc_by_round[self.best_round]:
            self.best_round = rnd
            self._best = self.global_params
            logger.info("round %d: new best mean %s %.4f", rnd, self.auc_key, mean_auc)

    def state_dict(self) -> StateDict:
        state = super().state_dict()
        state["auc_by_round"] = {str(r): auc for r, auc in self.auc_by_round.items()}
        state["best_round"] = self.best_round
        if self._best is not None:
            state.update(pack_params("best/", self._best))
        return state

    def load_state_dict(self, state: StateDict) -> None:
        super().load_state_dict(state)
        self.auc_by_round = dict(read_json(state, "auc_by_round", dict[int, float]))
        self.best_round = read_json(state, "best_round", int | None)
        best = unpack_params(state, "best/")
        self._best = best or None

    @property
    def best_params(self) -> Params:
        """The averaged model of the best round so far (the current global if no AUC was reported yet)."""
        return copy_params(self._best) if self._best is not None else self.global_params
