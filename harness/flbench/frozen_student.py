"""The student whose frozen backbone the light learner trains on in the benchmark, and its embeddings.

A real clinic gets the student as a bundle and runs its ONNX graph; here the same student runs in torch and
hands each simulated clinic what the bundle's two outputs would give it: the logits of the student's own
head and the head's input (the embedding).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_node.protocol.manifest import ClassLabel, HeadSpec, TaskSpec
from export.embedding_head import WithEmbedding, final_linear, head_spec
from hub.training.learners import normalize

__all__ = ["FrozenStudent", "bench_task", "binary_task", "primary_scores"]


def binary_task() -> TaskSpec:
    """The benchmark's binary tasks as a bundle states them: one sigmoid logit, class 1 positive."""
    return TaskSpec(
        kind="binary",
        classes=[ClassLabel(index=0, name="negative"), ClassLabel(index=1, name="positive")],
        positive_class=1,
        output_activation="sigmoid",
    )


def bench_task(num_classes: int) -> TaskSpec:
    """A benchmark task as a bundle states it: binary (one sigmoid logit) or softmax over K classes."""
    if num_classes == 2:
        return binary_task()
    return TaskSpec(
        kind="multiclass",
        classes=[ClassLabel(index=k, name=f"class{k}") for k in range(num_classes)],
        output_activation="softmax",
    )


def primary_scores(logits: np.ndarray) -> np.ndarray:
    """(N, K) logits as the bench scores them: the one logit (N,) of a binary head, all K columns else."""
    out = np.asarray(logits, dtype=np.float64)
    return out[:, 0] if out.shape[1] == 1 else out


class FrozenStudent:
    """A trained student split at its final linear layer: embeddings and logits of rendered images."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        model.eval()
        found = final_linear(model, normalize(example))
        if found is None:
            raise ValueError("the student has no linear layer to split at")
        prefix, fc = found
        self.head: HeadSpec = head_spec(prefix, fc, "embedding", "logits")
        self._net = WithEmbedding(model, fc).eval()

    def logits_and_embedding(self, x01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, H, W) in [0, 1] → logits (N, K) and embedding (N, D), float32, as a bundle gives them."""
        logits, embeddings = [], []
        with torch.no_grad():
            for i in range(0, len(x01), 512):
                lg, emb = self._net(normalize(x01[i : i + 512]))
                logits.append(lg.numpy())
                embeddings.append(emb.numpy())
        k, d = self.head.num_outputs, self.head.embedding_dim
        if not logits:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, d), dtype=np.float32)
        return np.concatenate(logits).reshape(-1, k), np.concatenate(embeddings).reshape(-1, d)
