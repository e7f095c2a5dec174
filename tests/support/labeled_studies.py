"""Real PneumoniaMNIST train images written as DICOM studies and labeled by their ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_node.learning.training_set import LabeledInstance
from hub.data.dicomize import dicomize_images
from hub.data.medmnist import load_medmnist

#: The binary task's class names, in class-index order.
NAMES = ("normal", "pneumonia")


def labeled_pneumonia(out: Path, shared_data: Path, *, normal: int, pneumonia: int) -> list[LabeledInstance]:
    """The first ``normal`` and ``pneumonia`` train images of each class as studies in ``out``, labeled."""
    train = load_medmnist("pneumoniamnist", "train", shared_data)
    idx = np.concatenate(
        [np.flatnonzero(train.labels == 0)[:normal], np.flatnonzero(train.labels == 1)[:pneumonia]]
    )
    written = dicomize_images(
        train.images, out, dataset="pneumoniamnist", split="train", indices=[int(i) for i in idx]
    )
    return [
        LabeledInstance(
            w.sop_instance_uid, w.study_instance_uid, w.path, NAMES[int(train.labels[w.index])], "import"
        )
        for w in written
    ]
