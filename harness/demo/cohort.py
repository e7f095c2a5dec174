"""The demo's four clinics: the benchmark's partitions and acquisition profiles, and the public data.

Two hospitals (A, B) hold most of PneumoniaMNIST's train split and two small clinics (C, D) tens of images,
partitioned with the benchmark's quantity and label skew and rendered with the benchmark's scanner profiles.
Each clinic's held-out studies are test images under its own profile. The initial student learns from the
val split (public data: neither a clinic's studies nor a held-out study), so it has seen none of their images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.flbench.datasets import SIX_CLINICS
from harness.flbench.partition import clinic_sizes, partition_indices, stratified_subset
from harness.flbench.profiles import render, to_unit
from hub.data.medmnist import load_medmnist

__all__ = ["DATASET", "DEMO_CLINICS", "ClinicSite", "Cohort", "build_cohort"]

DATASET = "pneumoniamnist"
#: Benchmark clinic letter → the demo's clinic name; A and B are the hospitals.
DEMO_CLINICS: dict[str, str] = {
    "A": "hospital-A",
    "B": "hospital-B",
    "C": "clinic-C",
    "D": "clinic-D",
}
HOSPITALS = frozenset({"A", "B"})


@dataclass(frozen=True)
class ClinicSite:
    """One clinic's images as its PACS holds them (uint8, profile applied) and their ground truth."""

    letter: str
    name: str
    hospital: bool
    studies: np.ndarray  # (N, 28, 28) uint8: the clinic's own studies (some get labels)
    study_labels: np.ndarray  # (N,) 0/1
    held_out: np.ndarray  # (M, 28, 28) uint8: test images under this clinic's profile
    held_out_labels: np.ndarray  # (M,) 0/1


@dataclass(frozen=True)
class Cohort:
    sites: list[ClinicSite]
    public_images: np.ndarray  # (P, 28, 28) uint8: the unprofiled val split
    public_labels: np.ndarray  # (P,) 0/1


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x01 * 255.0), 0, 255).astype(np.uint8)


def build_cohort(seed: int, *, max_studies: int, held_out: int) -> Cohort:
    """Partition and render the four clinics for ``seed``; hospitals keep at most ``max_studies`` studies.

    The partition is the benchmark's (all six clinics are drawn, so the four kept ones hold exactly what they
    hold in ``bench fl``); the cap only trims how many of a hospital's studies its PACS sends in the demo.
    """
    setting = SIX_CLINICS
    shares = [c.share("pneumonia") for c in setting.clinics]
    prevalences = [c.prevalence for c in setting.clinics]
    profiles = {c.name: c.profile for c in setting.clinics}
    train = load_medmnist(DATASET, "train")
    test = load_medmnist(DATASET, "test")
    rng = np.random.default_rng(seed)
    parts = dict(
        zip(
            setting.names,
            partition_indices(train.labels, clinic_sizes(len(train), shares), prevalences, rng),
            strict=True,
        )
    )
    test_idx = stratified_subset(test.labels, held_out, np.random.default_rng(seed + 1))
    train01, test01 = to_unit(train.images), to_unit(test.images[test_idx])
    sites = []
    for letter, name in DEMO_CLINICS.items():
        idx = parts[letter][:max_studies] if letter in HOSPITALS else parts[letter]
        profile = profiles[letter]
        sites.append(
            ClinicSite(
                letter=letter,
                name=name,
                hospital=letter in HOSPITALS,
                studies=_to_uint8(render(train01[idx], profile, rng)),
                study_labels=train.labels[idx].astype(np.int64),
                held_out=_to_uint8(render(test01, profile, rng)),
                held_out_labels=test.labels[test_idx].astype(np.int64),
            )
        )
    public = load_medmnist(DATASET, "val")
    return Cohort(sites, public.images, public.labels.astype(np.int64))
