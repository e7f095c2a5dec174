"""pFedNet-style clinic learner: answers the stats round, then trains shared + personal parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_node.protocol.updates import UpdateKind
from hub.fl.graph import FEATURE_MEAN, LABEL_COUNTS
from hub.fl.strategy import ClientResult, ClientTask, Params
from hub.training.learners import SupervisedLearner

#: The mean-image sketch is pooled to this many pixels per side: too coarse to say much about any patient.
SKETCH_SIDE = 4


def is_personal_tensor(name: str) -> bool:
    """Personal part: the classifier head and the normalisation affine parameters (GroupNorm: no buffers)."""
    return name.startswith("head.") or ".norm." in name


def sketch(train_x: torch.Tensor, train_y: torch.Tensor) -> Params:
    """The clinic's sketch: class counts (2,) and a 4×4 pooled mean image (16,) in [0, 1]."""
    counts = torch.stack([(train_y == 0).sum(), (train_y == 1).sum()]).to(torch.float32)
    mean_image = train_x.mean(dim=0, keepdim=True)  # (1, 1, H, W)
    pooled = F.adaptive_avg_pool2d(mean_image, SKETCH_SIDE).reshape(-1)  # (16,)
    return {LABEL_COUNTS: counts.numpy(), FEATURE_MEAN: pooled.numpy().astype("float32")}


class PFedNetLearner(SupervisedLearner):
    """Stats tasks get the sketch; weights tasks (shared + personal part) train locally."""

    def fit(self, task: ClientTask) -> ClientResult:
        if task.kind == UpdateKind.STATS:
            return ClientResult(
                client_id=self.client_id,
                round=task.round,
                num_examples=self.data.n_train,
                update=sketch(self.data.train_x, self.data.train_y),
            )
        return super().fit(task)
