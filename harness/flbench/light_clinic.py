"""A simulated clinic that answers head_delta tasks with the node's own light learner (``head_update``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_node.learning.head_update import head_update
from edge_node.learning.light import HeadPair
from edge_node.protocol.manifest import HeadSpec, TaskSpec
from hub.fl.strategy import ClientResult, ClientTask, Params

__all__ = ["LightClinic"]


class LightClinic:
    """One clinic of the simulation, trained exactly as a real node trains: same function, same inputs.

    It holds what a node computes once per round from its labeled studies: the served logits (N, K) and the
    embeddings (N, D) of the frozen backbone, and the labels (N,). Its personal head stays here, as it stays
    on a node; only the shared head's delta goes into the result.
    """

    def __init__(
        self,
        client_id: str,
        head: HeadSpec,
        task: TaskSpec,
        logits: np.ndarray,
        embeddings: np.ndarray,
        y: np.ndarray,
    ) -> None:
        self.client_id = client_id
        self.head, self.task = head, task
        self.logits, self.embeddings, self.y = logits, embeddings, y
        self.personal: HeadPair | None = None

    def fit(self, task: ClientTask) -> ClientResult:
        expected = {name: list(arr.shape) for name, arr in task.params.items()}
        result = head_update(
            self.head,
            self.task,
            task.config,
            task.params,
            expected,
            self.logits,
            self.embeddings,
            self.y,
            self.personal,
        )
        self.personal = result.personal
        return ClientResult(
            self.client_id,
            task.round,
            result.num_examples,
            dict(result.shared_delta),
            {"loss_before": result.loss_before, "loss_after": result.loss_after},
        )

    def personal_logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) → (N, K): what the personal head adds to the served logits (zeros before any round)."""
        e = np.asarray(embeddings, dtype=np.float64)
        if self.personal is None:
            return np.zeros((e.shape[0], self.head.num_outputs))
        return e @ self.personal.weight.T + self.personal.bias

    def state(self) -> Params:
        if self.personal is None:
            return {}
        return {"personal.weight": self.personal.weight, "personal.bias": self.personal.bias}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        if "personal.weight" in state:
            self.personal = HeadPair(np.asarray(state["personal.weight"]), np.asarray(state["personal.bias"]))
