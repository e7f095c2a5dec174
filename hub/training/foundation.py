"""One-time foundation-model soft labels on the public set (docs/algorithms.md §2.2), behind a provider.

Any source of soft outputs can implement ``SoftLabelProvider`` (an external model API, a CLIP endpoint).
Here the stand-in is a deeper CNN trained once on the public set; its outputs are computed once and stored
as npz (allow_pickle=False), keyed by a hash of the public images so another public set never gets stale
labels.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from edge_node.protocol.durable_file import write_durably
from hub.models.fedhelp_nets import foundation_cnn
from hub.training.learners import AUGMENT, minibatches, normalize

log = logging.getLogger(__name__)


class SoftLabelProvider(Protocol):
    """Returns class probabilities (N, C) for rendered public images (N, 1, H, W) in [0, 1]."""

    def soft_labels(self, images01: torch.Tensor) -> np.ndarray: ...


class TeacherSoftLabels:
    """The stand-in foundation model: a deeper CNN trained once, with augmentation, on the public set."""

    def __init__(
        self, public_x: torch.Tensor, public_y: torch.Tensor, *, epochs: int = 15, seed: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = foundation_cnn(num_outputs=2)
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        y = public_y.long()
        self.model.train()
        for _ in range(epochs):
            for idx in minibatches(len(y), 64, gen):
                loss = F.cross_entropy(self.model(normalize(AUGMENT(public_x[idx], gen))), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.model.eval()

    @torch.inference_mode()
    def soft_labels(self, images01: torch.Tensor) -> np.ndarray:
        logits = torch.cat(
            [self.model(normalize(images01[i : i + 512])) for i in range(0, len(images01), 512)]
        )
        return torch.softmax(logits, dim=1).numpy().astype(np.float32)


def images_digest(images01: torch.Tensor) -> str:
    return hashlib.sha256(images01.numpy().tobytes()).hexdigest()[:16]


def stored_soft_labels(
    path: Path, public_x: torch.Tensor, public_y: torch.Tensor, provider: SoftLabelProvider | None = None
) -> np.ndarray:
    """Soft labels for the public set: read from ``path`` if it matches these images, else computed once."""
    digest = images_digest(public_x)
    if path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["digest"]) == digest:
                return np.asarray(npz["soft_labels"])
        log.info("%s is for another public set; recomputing the soft labels", path.name)
    source = provider if provider is not None else TeacherSoftLabels(public_x, public_y)
    soft = source.soft_labels(public_x)
    # Several benchmark processes may share an out dir: each writes its own temporary file.
    write_durably(path, lambda tmp: np.savez(tmp, soft_labels=soft, digest=np.array(digest)))
    log.info("stored %d foundation soft labels in %s", len(soft), path.name)
    return soft
