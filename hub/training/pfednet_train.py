"""pFedNet-style clinic learner: answers the stats round, then trains shared + personal parts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_node.protocol.sketch import FEATURE_MEAN, LABEL_COUNTS, feature_mean, label_counts
from edge_node.protocol.updates import UpdateKind
from hub.fl.differential_sparsity import DifferentialSparsifier
from hub.fl.pfednet import personal_part
from hub.fl.strategy import ClientResult, ClientTask, Params
from hub.training.learners import SupervisedLearner


def sketch(train_x01: np.ndarray, train_y: np.ndarray, num_classes: int = 2) -> Params:
    """The clinic's sketch (``edge_node.protocol.sketch``, as a node computes it): class counts (K,),
    K = 2 or the task's classes, and the pooled mean image (16,) of its [0, 1] training images."""
    return {
        LABEL_COUNTS: label_counts(train_y, max(2, num_classes)),
        FEATURE_MEAN: feature_mean(train_x01),
    }


_DIFF = "__differential__/"


class PFedNetLearner(SupervisedLearner):
    """Stats tasks get the sketch; weights tasks (shared + personal part) train locally.

    A task with ``differential_gamma`` > 0 gets the shared part's update as its differentially sparse
    change (``hub.fl.differential_sparsity``); the personal part is always sent whole.
    """

    sparsifier: DifferentialSparsifier | None = None
    #: Classes of the task (the sketch counts each); the benchmark sets it for K-class tasks.
    num_classes: int = 2

    def fit(self, task: ClientTask) -> ClientResult:
        if task.kind == UpdateKind.STATS:
            return ClientResult(
                client_id=self.client_id,
                round=task.round,
                num_examples=self.data.n_train,
                update=sketch(
                    self.data.train_x.numpy(), self.data.train_y.numpy().astype(np.int64), self.num_classes
                ),
            )
        result = super().fit(task)
        gamma = float(task.config.get("differential_gamma", 0.0))
        if gamma <= 0:
            return result
        if self.sparsifier is None or self.sparsifier.gamma != gamma:
            held = self.sparsifier.reference if self.sparsifier is not None else {}
            self.sparsifier = DifferentialSparsifier(gamma)
            self.sparsifier.reference = held
        # The task names the personal part the hub keeps per clinic; it is sent whole, outside the change.
        is_personal = personal_part(str(task.config.get("personal", "")), list(result.update))
        shared = {n: a for n, a in result.update.items() if not is_personal(n)}
        change = self.sparsifier.encode(shared)
        return ClientResult(
            result.client_id, result.round, result.num_examples, {**result.update, **change}, result.metrics
        )

    def state(self) -> Params:
        held = self.sparsifier.reference if self.sparsifier is not None else {}
        gamma = self.sparsifier.gamma if self.sparsifier is not None else 0.0
        return {
            **super().state(),
            **{f"{_DIFF}{n}": a.copy() for n, a in held.items()},
            f"{_DIFF}gamma": np.array(gamma),
        }

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        super().restore({k: v for k, v in state.items() if not k.startswith(_DIFF)})
        gamma = float(state.get(f"{_DIFF}gamma", np.array(0.0)))
        held = {
            k[len(_DIFF) :]: np.array(v)
            for k, v in state.items()
            if k.startswith(_DIFF) and k != f"{_DIFF}gamma"
        }
        self.sparsifier = DifferentialSparsifier(gamma) if gamma > 0 else None
        if self.sparsifier is not None:
            self.sparsifier.reference = held
