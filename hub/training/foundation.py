"""One-time foundation-model soft labels on the public set (docs/algorithms.md §2.2), behind a provider.

Any source of soft outputs can implement ``SoftLabelProvider`` (an external model API, a CLIP endpoint).
Here the hub builds its own: ``FoundationTeacher`` is a larger CNN trained once on a public corpus (every
public dataset the hub holds, none of them a clinic's), with augmentation, early stopping on a held-out
validation slice and a temperature fitted on that slice. ``CrossFittedFoundation`` trains one teacher per
fold of the public set so that every public image gets its soft label from a teacher that never saw it.
Outputs are computed once and stored as npz (allow_pickle=False), keyed by a hash of the public images so
another public set never gets stale labels.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_node.protocol.durable_file import write_durably
from hub.models.fedhelp_nets import foundation_cnn
from hub.training.learners import AUGMENT, minibatches, normalize
from hub.training.supervised import binary_auc

log = logging.getLogger(__name__)

#: Builds the foundation network for a number of classes.
FoundationBuilder = Callable[[int], nn.Module]
#: Temperatures tried when calibrating on the validation slice (NLL is minimised over this grid).
TEMPERATURES = np.geomspace(0.25, 8.0, 41)


class SoftLabelProvider(Protocol):
    """Returns class probabilities (N, C) for rendered public images (N, 1, H, W) in [0, 1]."""

    def soft_labels(self, images01: torch.Tensor) -> np.ndarray: ...


class TeacherSoftLabels:
    """The old stand-in: a deeper CNN trained on the public set alone, in-sample, without selection."""

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


@torch.inference_mode()
def _logits(model: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(images01[i : i + 512])) for i in range(0, len(images01), 512)])


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature (from ``TEMPERATURES``) with the lowest NLL of ``labels`` (N,) under logits (N, C)."""
    nll = [float(F.cross_entropy(logits / t, labels)) for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


class FoundationTeacher:
    """A larger CNN trained once on a labelled public corpus: augmented, early-stopped on ``val``'s NLL
    (patience ``patience`` epochs, the best epoch's weights kept), then temperature-scaled on ``val``."""

    def __init__(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        num_classes: int,
        *,
        build: FoundationBuilder = lambda c: foundation_cnn(num_outputs=c),
        max_epochs: int = 20,
        patience: int = 3,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        (x, y), (vx, vy) = train, val  # images (N, 1, H, W) in [0, 1], class indices (N,)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = build(num_classes)
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        best_nll, best_state, stale = math.inf, copy.deepcopy(self.model.state_dict()), 0
        self.epochs_run = self.best_epoch = 0
        for epoch in range(1, max_epochs + 1):
            self.model.train()
            for idx in minibatches(len(y), batch_size, gen):
                loss = F.cross_entropy(self.model(normalize(AUGMENT(x[idx], gen))), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.epochs_run = epoch
            nll = float(F.cross_entropy(_logits(self.model, vx), vy))
            if nll < best_nll:
                best_nll, best_state, stale, self.best_epoch = (
                    nll,
                    copy.deepcopy(self.model.state_dict()),
                    0,
                    epoch,
                )
            else:
                stale += 1
                if stale >= patience:
                    break
        self.model.load_state_dict(best_state)
        self.model.eval()
        self.temperature = fit_temperature(_logits(self.model, vx), vy)
        log.info(
            "foundation teacher: %d classes, %d train / %d val images, best epoch %d of %d, T = %.2f",
            num_classes, len(y), len(vy), self.best_epoch, self.epochs_run, self.temperature,
        )  # fmt: skip

    def soft_labels(self, images01: torch.Tensor, *, calibrated: bool = True) -> np.ndarray:
        """Class probabilities (N, C), at the fitted temperature (``calibrated``) or at T = 1."""
        t = self.temperature if calibrated else 1.0
        probs = torch.softmax(_logits(self.model, images01) / t, dim=1)
        return probs.numpy().astype(np.float32)


def _row_keys(images01: torch.Tensor) -> list[bytes]:
    return [hashlib.sha256(row.numpy().tobytes()).digest() for row in images01]


class CrossFittedFoundation:
    """Foundation soft labels for a public set that is itself part of the teachers' corpus.

    The public set (``held`` positions in the corpus) is split into ``folds``; teacher f trains on the corpus
    without fold f (a random ``val_fraction`` of the rest is its validation slice) and labels fold f. Any
    other image gets the mean of the teachers' outputs. So each public image's soft label comes from a
    teacher that never trained on it, and the labels' quality on the public set is a held-out measure.
    """

    def __init__(
        self,
        corpus_x: torch.Tensor,
        corpus_y: torch.Tensor,
        num_classes: int,
        held: np.ndarray,
        *,
        folds: int = 2,
        val_fraction: float = 0.1,
        max_train: int | None = None,
        build: FoundationBuilder = lambda c: foundation_cnn(num_outputs=c),
        max_epochs: int = 20,
        patience: int = 3,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        held = np.asarray(held)
        fold_of = rng.permutation(len(held)) % folds
        #: The fold of each public image (in ``held`` order) and each teacher's training positions.
        self.fold_of = fold_of
        self.train_positions: list[np.ndarray] = []
        self.teachers: list[FoundationTeacher] = []
        self._fold_keys: list[set[bytes]] = []
        for f in range(folds):
            out = held[fold_of == f]
            pool = np.setdiff1d(np.arange(len(corpus_y)), out)
            pool = rng.permutation(pool)
            n_val = max(1, round(val_fraction * len(pool)))
            val_idx, train_idx = pool[:n_val], pool[n_val:]
            if max_train is not None:
                train_idx = train_idx[:max_train]
            teacher = FoundationTeacher(
                (corpus_x[train_idx], corpus_y[train_idx]),
                (corpus_x[val_idx], corpus_y[val_idx]),
                num_classes,
                build=build,
                max_epochs=max_epochs,
                patience=patience,
                batch_size=batch_size,
                seed=seed + f,
            )
            self.teachers.append(teacher)
            self.train_positions.append(train_idx)
            self._fold_keys.append(set(_row_keys(corpus_x[out])))

    def soft_labels(self, images01: torch.Tensor, *, calibrated: bool = True) -> np.ndarray:
        each = np.stack([t.soft_labels(images01, calibrated=calibrated) for t in self.teachers])  # (F, N, C)
        out = each.mean(axis=0)
        for i, key in enumerate(_row_keys(images01)):
            for f, keys in enumerate(self._fold_keys):
                if key in keys:
                    out[i] = each[f, i]  # the teacher that never saw this image
        return out.astype(np.float32)


def soft_label_quality(
    probs: np.ndarray, labels: np.ndarray, *, binary: tuple[int, int] | None = None, bins: int = 15
) -> dict[str, float]:
    """Accuracy, NLL and expected calibration error of ``probs`` (N, C) against ``labels`` (N,); with
    ``binary`` = (negative class, positive class), also the AUC of p_pos / (p_neg + p_pos) on those items."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    quality = {
        "accuracy": float(correct.mean()),
        "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)))),
        "ece": float(ece),
        "mean_confidence": float(conf.mean()),
    }
    if binary is not None:
        neg, pos = binary
        keep = (labels == neg) | (labels == pos)
        score = probs[keep, pos] / np.clip(probs[keep, neg] + probs[keep, pos], 1e-12, None)
        quality["auc"] = binary_auc((labels[keep] == pos).astype(np.int64), score)
    return quality


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
