"""pFedNet-style clinic learner: answers the stats round, then trains shared + personal parts."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from edge_node.protocol.updates import UpdateKind
from hub.fl.differential_sparsity import DifferentialSparsifier
from hub.fl.graph import FEATURE_MEAN, LABEL_COUNTS
from hub.fl.strategy import ClientResult, ClientTask, Params
from hub.training.learners import SupervisedLearner

#: The mean-image sketch is pooled to this many pixels per side: too coarse to say much about any patient.
SKETCH_SIDE = 4


def is_personal_tensor(name: str) -> bool:
    """Personal part: the classifier head and the normalisation affine parameters (GroupNorm: no buffers)."""
    return name.startswith("head.") or ".norm." in name


def last_block_personal(names: list[str]) -> Callable[[str], bool]:
    """A larger personal part: ``is_personal_tensor``'s tensors plus the last conv block of ``features``.

    ``names`` are the model's tensor names; the last block is the highest-numbered ``features.<i>.conv``.
    """
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("features.") and ".conv." in n})
    if not blocks:
        raise ValueError("no features.<i>.conv tensor among the names: not an fl_cnn-style model")
    prefix = f"features.{blocks[-1]}."
    return lambda name: is_personal_tensor(name) or name.startswith(prefix)


def sketch(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int = 2) -> Params:
    """The clinic's sketch: class counts (K,), K = 2 or the task's classes, and a 4×4 pooled mean image
    (16,) in [0, 1]."""
    k = max(2, num_classes)
    counts = torch.stack([(train_y == c).sum() for c in range(k)]).to(torch.float32)
    mean_image = train_x.mean(dim=0, keepdim=True)  # (1, 1, H, W)
    pooled = F.adaptive_avg_pool2d(mean_image, SKETCH_SIDE).reshape(-1)  # (16,)
    return {LABEL_COUNTS: counts.numpy(), FEATURE_MEAN: pooled.numpy().astype("float32")}


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
                update=sketch(self.data.train_x, self.data.train_y, self.num_classes),
            )
        result = super().fit(task)
        gamma = float(task.config.get("differential_gamma", 0.0))
        if gamma <= 0:
            return result
        if self.sparsifier is None or self.sparsifier.gamma != gamma:
            held = self.sparsifier.reference if self.sparsifier is not None else {}
            self.sparsifier = DifferentialSparsifier(gamma)
            self.sparsifier.reference = held
        shared = {n: a for n, a in result.update.items() if not is_personal_tensor(n)}
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
