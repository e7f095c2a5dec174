"""Load MedMNIST v2 .npz files from a local folder (the official files, byte-identical to Zenodo)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "val", "test"]

#: Official MedMNIST v2 (28x28) files and their MD5 as published in the medmnist package's INFO table.
OFFICIAL_MD5 = {
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
}
#: Label names per dataset, index = label value.
LABELS = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "retinamnist": ["grade0", "grade1", "grade2", "grade3", "grade4"],
}
DOWNLOAD_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"

DATA_ENV = "FEDCLINIC_DATA"


class DataNotFoundError(FileNotFoundError):
    """A dataset file is missing; the message names the path and how to get the file."""


def data_root() -> Path:
    """The shared data folder: $FEDCLINIC_DATA, else ../shared/data from the working directory."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / ".." / "shared" / "data").resolve()


@dataclass(frozen=True)
class ImageSet:
    """Images (N, H, W) or (N, H, W, 3) uint8 and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    name: str
    split: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def medmnist_path(name: str, root: Path | None = None) -> Path:
    return (root or data_root()) / "medmnist" / f"{name}.npz"


def load_medmnist(name: str, split: Split, root: Path | None = None) -> ImageSet:
    """Read one split of a MedMNIST dataset from local disk; never downloads."""
    if name not in LABELS:
        raise ValueError(f"unknown MedMNIST dataset {name!r}; known: {sorted(LABELS)}")
    path = medmnist_path(name, root)
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} not found. Set {DATA_ENV} to the folder that holds medmnist/{name}.npz, or on a machine "
            f"with internet run `fedclinic-hub data download {name}` (official Zenodo file: "
            f"{DOWNLOAD_URL.format(name=name)})."
        )
    with np.load(path, allow_pickle=False) as npz:
        images = np.asarray(npz[f"{split}_images"])
        labels = np.asarray(npz[f"{split}_labels"]).reshape(-1).astype(np.int64)
    return ImageSet(images=images, labels=labels, name=name, split=split)
