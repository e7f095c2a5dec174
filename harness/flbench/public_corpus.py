"""The foundation model's corpus for a task: every public dataset the hub holds except the task's primary.

No clinic and no test split of the task ever enters it: the clinics, their validation and test images all
come from the primary dataset, which the corpus leaves out. Classes are the datasets' own, side by side
(e.g. pneumonia's 2 and RetinaMNIST's 5 grades: 7 classes). The benchmark's public set is part of the
corpus; ``held`` says where, so that its soft labels come from teachers that never trained on it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_node.protocol.durable_file import write_text_durably
from harness.flbench.datasets import PUBLIC_SEED, TASKS
from harness.flbench.partition import stratified_subset
from harness.flbench.profiles import to_unit
from hub.data.medmnist import LABELS, load_medmnist
from hub.models.fedhelp_nets import foundation_cnn
from hub.training.foundation import CrossFittedFoundation, soft_label_quality

log = logging.getLogger(__name__)

#: The public datasets the hub holds (hub.data.medmnist); a task's primary dataset is always left out.
SOURCES: tuple[str, ...] = ("pneumoniamnist", "breastmnist", "retinamnist")
#: ITU-R BT.601 luma weights: colour fundus images become grey like every other input.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class PublicCorpus:
    """Images (N, 1, H, W) in [0, 1], class indices (N,), class names, and the public set's positions."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    #: Positions of the benchmark's public set in the corpus, in the public set's order.
    held: np.ndarray
    #: The corpus classes of the public dataset's labels 0 and 1.
    public_binary: tuple[int, int]


def _grey(images: np.ndarray) -> np.ndarray:
    if images.ndim == 4:  # (N, H, W, 3) colour
        return np.asarray(images.astype(np.float32) @ _LUMA).round().clip(0, 255).astype(np.uint8)
    return images


def public_corpus(task: str, public_size: int, data_root: Path | None = None) -> PublicCorpus:
    """All splits of every source except ``task``'s primary dataset, with the bench's public set marked."""
    spec = TASKS[task]
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    classes: list[str] = []
    held = np.zeros(0, dtype=np.int64)
    public_binary = (0, 1)
    offset = 0
    for source in SOURCES:
        if source == spec.primary:
            continue
        first = len(classes)
        if source == spec.public:
            # The bench's public set: these train-split positions, picked exactly as build_bench_data does.
            train = load_medmnist(source, "train", data_root)
            pick = stratified_subset(train.labels, public_size, np.random.default_rng(PUBLIC_SEED))
            held = offset + pick
            public_binary = (first, first + 1)
        for split in ("train", "val", "test"):
            part = load_medmnist(source, split, data_root)
            xs.append(_grey(part.images))
            ys.append(part.labels.reshape(-1).astype(np.int64) + first)
            offset += len(part)
        classes += [f"{source}:{name}" for name in LABELS[source]]
    x = torch.from_numpy(np.ascontiguousarray(to_unit(np.concatenate(xs))[:, None]))
    y = torch.from_numpy(np.concatenate(ys))
    return PublicCorpus(x, y, tuple(classes), held, public_binary)


class BenchFoundation:
    """The bench's ``SoftLabelProvider``: a cross-fitted foundation teacher on the task's public corpus,
    trained only when the soft labels are not stored yet; its soft-label quality on the (held-out) public
    set is written beside them as JSON."""

    def __init__(
        self,
        task: str,
        public_size: int,
        quality_path: Path,
        *,
        max_train: int,
        max_epochs: int,
        seed: int = 0,
    ) -> None:
        self.task = task
        self.public_size = public_size
        self.quality_path = quality_path
        self.max_train = max_train
        self.max_epochs = max_epochs
        self.seed = seed

    def soft_labels(self, images01: torch.Tensor) -> np.ndarray:
        corpus = public_corpus(self.task, self.public_size)
        public = corpus.x[corpus.held]
        if not torch.equal(public, images01):
            raise ValueError("the foundation corpus's public set is not the images asked for")
        teacher = CrossFittedFoundation(
            corpus.x, corpus.y, len(corpus.classes), corpus.held, max_train=self.max_train,
            max_epochs=self.max_epochs, seed=self.seed,
            build=lambda c: foundation_cnn(num_outputs=c, depth=1),
        )  # fmt: skip
        soft = teacher.soft_labels(public)
        labels = corpus.y[corpus.held].numpy()
        report: dict[str, Any] = {
            "classes": list(corpus.classes),
            "corpus_images": len(corpus.y),
            "public_images": len(labels),
            "teachers": [
                {"best_epoch": t.best_epoch, "epochs_run": t.epochs_run, "temperature": t.temperature}
                for t in teacher.teachers
            ],
            "quality_held_out": soft_label_quality(soft, labels, binary=corpus.public_binary),
            "quality_uncalibrated": soft_label_quality(
                teacher.soft_labels(public, calibrated=False), labels, binary=corpus.public_binary
            ),
        }
        write_text_durably(self.quality_path, json.dumps(report, indent=1))
        log.info("foundation soft labels for %s: %s", self.task, report["quality_held_out"])
        return soft
