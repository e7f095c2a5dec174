"""The values the hub CLI's choice options take, as enums: completion offers them, errors list them.

They are spelled out here, not computed from the registries, so that ``--help`` needs neither torch nor the
data; ``tests/hub/test_cli_choices.py`` checks that they match the model registry and the dataset table.
"""

from __future__ import annotations

import enum

__all__ = ["DatasetName", "ModelName", "Split"]


class DatasetName(str, enum.Enum):
    """A MedMNIST dataset the hub knows (``hub.data.medmnist``)."""

    breastmnist = "breastmnist"
    pneumoniamnist = "pneumoniamnist"
    retinamnist = "retinamnist"


class Split(str, enum.Enum):
    """A dataset split."""

    train = "train"
    val = "val"
    test = "test"


class ModelName(str, enum.Enum):
    """A registered model (``hub.models``)."""

    fedhelp_large = "fedhelp_large"
    fedhelp_small = "fedhelp_small"
    fl_cnn = "fl_cnn"
    foundation_cnn = "foundation_cnn"
    hsl_mmoe = "hsl_mmoe"
    student_cnn_s = "student_cnn_s"
    teacher_cnn_l = "teacher_cnn_l"
