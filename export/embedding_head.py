"""The student's final linear layer, and the export wrapper that also outputs its input (the embedding)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_node.protocol.manifest import HeadSpec, HeadTensor
from export.errors import ParityError

__all__ = ["WithEmbedding", "check_head", "final_linear", "head_spec"]


def final_linear(model: nn.Module, example: torch.Tensor | None = None) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` of ``model`` with its state-dict prefix (``head.fc``), or None.

    With an ``example`` input, the last one that runs in a forward: a model may hold heads its forward
    does not use (FedHelp's public head); without, the last one registered. Whether it really is the last
    operation is not assumed here: ``check_head`` proves it on real outputs.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if example is None or not linears:
        return linears[-1] if linears else None
    ran: list[tuple[str, nn.Linear]] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, entry=(name, m): ran.append(entry)) for name, m in linears
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return ran[-1] if ran else None


class WithEmbedding(nn.Module):
    """``model`` whose forward returns (logits, embedding): the embedding is the final linear layer's input.

    A forward pre-hook records that input during the traced forward, so the ONNX graph gets it as an output
    without the model's code changing.
    """

    def __init__(self, model: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self._seen: list[torch.Tensor] = []
        head.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._seen.append(args[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen.clear()
        logits = self.model(x)  # (B, K)
        if len(self._seen) != 1:
            raise RuntimeError(f"the final linear layer ran {len(self._seen)} times in one forward")
        embedding = self._seen[0].flatten(1)  # (B, D)
        self._seen.clear()
        return logits, embedding


def head_spec(prefix: str, head: nn.Linear, embedding_output: str, prediction_output: str) -> HeadSpec:
    """The manifest's description of ``head`` (state-dict names ``<prefix>.weight``/``.bias``)."""
    if head.bias is None:
        raise ParityError(f"the final linear layer {prefix} has no bias; the edge's head learner needs one")
    return HeadSpec(
        embedding_output=embedding_output,
        prediction_output=prediction_output,
        weight=HeadTensor(name=f"{prefix}.weight", shape=list(head.weight.shape)),
        bias=HeadTensor(name=f"{prefix}.bias", shape=list(head.bias.shape)),
    )


def check_head(logits: np.ndarray, embedding: np.ndarray, head: nn.Linear, *, bound: float) -> float:
    """Largest |logits - (embedding @ W.T + b)| over real images; ParityError above ``bound``.

    This is the contract the edge relies on: a head trained on the embedding output replaces the model's own.
    """
    w = head.weight.detach().double().numpy()  # (K, D)
    b = head.bias.detach().double().numpy() if head.bias is not None else np.zeros(w.shape[0])  # (K,)
    recomputed = embedding.astype(np.float64) @ w.T + b  # (N, K)
    diff = float(np.abs(recomputed - logits.astype(np.float64)).max()) if len(logits) else 0.0
    if not diff <= bound:
        raise ParityError(
            f"the prediction is not the final linear layer of the embedding output (max diff {diff:.3g}, "
            f"bound {bound:.1g}); something runs after that layer. Export without the embedding output"
        )
    return diff
