"""Shared-head averaging: rounds in which nodes train only the model's final linear layer (``head_delta``).

Edge nodes without torch train a shared and a personal head on the frozen backbone's embedding (the light
learner); they send the delta of the shared head alone. The hub sends the current shared head, averages the
deltas weighted by each node's example count and applies them. The aggregate is a partial student state dict
(just the head tensors, under the student's names), which the student takes as it is before export.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging
from hub.fl.errors import StrategyConfigError
from hub.fl.pfednet import is_head_tensor
from hub.fl.strategy import Config, Params, StateDict

__all__ = ["HeadAveraging"]


class HeadAveraging(DeltaAveraging):
    """head += server_lr · Σ_k n_k·Δ_k / Σ_k n_k over the head tensors only.

    ``head`` names the tensors (comma-separated, e.g. ``head.fc.weight,head.fc.bias``); by default, the
    tensors of a top-level ``fc``, ``classifier`` or ``head`` module, which must be exactly one weight
    (K, D) and one bias (K,): the node's learner trains one linear layer. Starting tensors may be a whole
    student state dict; only the head is kept.
    """

    name = "head_avg"
    update_kind = UpdateKind.HEAD_DELTA

    def __init__(
        self,
        *,
        head: str = "",
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        client_config: Config | None = None,
    ) -> None:
        self.head_names = tuple(n.strip() for n in head.split(",") if n.strip())
        super().__init__(
            weighted=True,
            server_lr=server_lr,
            max_norm=max_norm,
            min_results=min_results,
            local=self._not_head,
            client_config=client_config,
        )

    def _not_head(self, name: str) -> bool:
        return name not in self.head_names if self.head_names else not is_head_tensor(name)

    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        head = {name: arr for name, arr in params.items() if not self._not_head(name)}
        missing = [n for n in self.head_names if n not in params]
        if missing:
            raise StrategyConfigError(f"{self.name}: the starting tensors hold no {missing}")
        weights = [n for n, a in head.items() if a.ndim == 2 and a.dtype.kind == "f"]
        biases = [n for n, a in head.items() if a.ndim == 1 and a.dtype.kind == "f"]
        if len(head) != 2 or len(weights) != 1 or len(biases) != 1:
            shapes = {n: list(a.shape) for n, a in head.items()}
            raise StrategyConfigError(
                f"{self.name}: the head must be one float weight (K, D) and one bias (K,), got {shapes}; "
                "name them with head=WEIGHT,BIAS"
            )
        if head[weights[0]].shape[0] != head[biases[0]].shape[0]:
            raise StrategyConfigError(f"{self.name}: weight {weights[0]} and bias {biases[0]} differ in K")
        super().initialize(head, clients)

    def load_state_dict(self, state: StateDict) -> None:
        # A round may start from a whole student state dict (initialize kept its head); only a saved state
        # of this strategy carries the key "strategy" and the rest of what it learned.
        if "strategy" in state:
            super().load_state_dict(state)
