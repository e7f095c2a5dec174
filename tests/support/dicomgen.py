"""DICOM test studies from MedMNIST images: the product's wrapper (hub.data.dicomize), re-exported."""

from __future__ import annotations

from pathlib import Path

from hub.data.dicomize import WINDOW_CENTER, WINDOW_WIDTH, WrappedImage, dicomize_images, wrap_image
from hub.data.medmnist import load_medmnist

__all__ = [
    "WINDOW_CENTER",
    "WINDOW_WIDTH",
    "WrappedImage",
    "dicomize_images",
    "medmnist_studies",
    "wrap_image",
]


def medmnist_studies(
    name: str, split: str, indices: list[int], out_dir: Path, root: Path | None = None
) -> list[WrappedImage]:
    """Write the chosen images of a MedMNIST split as single-image CR studies (one file each)."""
    images = load_medmnist(name, split, root=root).images  # type: ignore[arg-type]
    return dicomize_images(images, out_dir, dataset=name, split=split, indices=indices)
