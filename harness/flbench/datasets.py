"""The `bench fl` data: six simulated clinics, an unseen clinic and a public set, rendered once per seed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from harness.flbench.partition import clinic_sizes, partition_indices, stratified_subset
from harness.flbench.profiles import (
    CLINIC_PROFILES,
    IDENTITY,
    UNSEEN_PROFILE,
    render,
    to_unit,
)
from hub.data.medmnist import load_medmnist
from hub.training.datasets import ClinicData

log = logging.getLogger(__name__)

Skew = Literal["combined", "quantity", "label", "feature", "none"]
SKEWS: tuple[str, ...] = ("combined", "quantity", "label", "feature", "none")

CLINICS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")
LARGE_CLINICS: tuple[str, ...] = ("A", "B")
SMALL_CLINICS: tuple[str, ...] = ("C", "D", "E", "F")
#: Positive-class prevalence per clinic under label skew: mostly negative (F) to mostly positive (E).
LABEL_SKEW_PREVALENCE: tuple[float, ...] = (0.75, 0.5, 0.85, 0.3, 0.9, 0.2)
#: The public/anchor subset is the same for every seed and every node (HSL's "held identically").
PUBLIC_SEED = 20_251_122


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task: primary dataset, public dataset, and the clinics' train shares."""

    name: str
    primary: str
    public: str
    shares: tuple[float, ...]
    public_size: int = 512


TASKS: dict[str, TaskSpec] = {
    # 60/20/2/1.5/1/0.5 % of 4708 → 2825/942/94/71/47/24 images.
    "pneumonia": TaskSpec(
        "pneumonia", "pneumoniamnist", "breastmnist", (0.60, 0.20, 0.02, 0.015, 0.01, 0.005)
    ),
    # BreastMNIST has 546 train images: 326/108 for the hospitals (3:1), 40/32/24/16 for the small clinics.
    "breast": TaskSpec(
        "breast",
        "breastmnist",
        "pneumoniamnist",
        (326 / 546, 108 / 546, 40 / 546, 32 / 546, 24 / 546, 16 / 546),
    ),
}


@dataclass(frozen=True)
class BenchData:
    """Everything one seed of the benchmark trains and tests on."""

    task: str
    skew: str
    seed: int
    clinics: dict[str, ClinicData]
    unseen_x: torch.Tensor
    unseen_y: torch.Tensor
    #: Raw (unprofiled) public set, identical at every node: (P, 1, H, W) in [0, 1] and labels (P,).
    public_x: torch.Tensor
    public_y: torch.Tensor

    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [c.train_x for c in self.clinics.values()]
        ys = [c.train_y for c in self.clinics.values()]
        return torch.cat(xs), torch.cat(ys)


def skew_flags(skew: str) -> tuple[bool, bool, bool]:
    """(quantity, label, feature) switched on by a --skew value; 'combined' is all three."""
    if skew not in SKEWS:
        raise ValueError(f"unknown skew {skew!r}; choose one of {', '.join(SKEWS)}")
    if skew == "combined":
        return True, True, True
    return skew == "quantity", skew == "label", skew == "feature"


def _as_tensor(x01: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x01[:, None, :, :], dtype=np.float32))  # (N, 1, H, W)


def build_bench_data(
    task: str,
    skew: str,
    seed: int,
    *,
    strength: float = 1.0,
    data_root: Path | None = None,
    max_train_per_clinic: int | None = None,
    max_test: int | None = None,
    public_size: int | None = None,
) -> BenchData:
    """Partition, profile and render the task's data for one seed (quick mode caps sizes)."""
    spec = TASKS[task]
    quantity, label, feature = skew_flags(skew)
    rng = np.random.default_rng(seed)
    train = load_medmnist(spec.primary, "train", data_root)
    test = load_medmnist(spec.primary, "test", data_root)
    public = load_medmnist(spec.public, "train", data_root)
    if train.images.ndim != 3:
        raise ValueError(f"{spec.primary} is not single-channel; bench fl expects grayscale images")

    sizes = clinic_sizes(len(train), spec.shares)
    if not quantity:
        sizes = [sum(sizes) // len(CLINICS)] * len(CLINICS)
    if max_train_per_clinic is not None:
        sizes = [min(s, max_train_per_clinic) for s in sizes]
    base_prev = float(train.labels.mean())
    prevalences = list(LABEL_SKEW_PREVALENCE) if label else [base_prev] * len(CLINICS)
    parts = partition_indices(train.labels, sizes, prevalences, rng)

    test_idx = np.arange(len(test))
    if max_test is not None and max_test < len(test):
        test_idx = stratified_subset(test.labels, max_test, np.random.default_rng(seed + 1))
    test01 = to_unit(test.images[test_idx])
    test_y = torch.from_numpy(test.labels[test_idx].astype(np.float32))
    train01 = to_unit(train.images)

    clinics: dict[str, ClinicData] = {}
    for name, idx in zip(CLINICS, parts, strict=True):
        profile = CLINIC_PROFILES[name].scaled(strength) if feature else IDENTITY
        clinics[name] = ClinicData(
            name=name,
            train_x=_as_tensor(render(train01[idx], profile, rng)),
            train_y=torch.from_numpy(train.labels[idx].astype(np.float32)),
            test_x=_as_tensor(render(test01, profile, rng)),
            test_y=test_y,
        )
    unseen_x = _as_tensor(render(test01, UNSEEN_PROFILE, rng))

    size = public_size if public_size is not None else spec.public_size
    pub_idx = stratified_subset(public.labels, size, np.random.default_rng(PUBLIC_SEED))
    public_x = _as_tensor(to_unit(public.images[pub_idx]))
    public_y = torch.from_numpy(public.labels[pub_idx].astype(np.float32))
    log.info(
        "bench data task=%s skew=%s seed=%d train sizes=%s public=%d test=%d",
        task, skew, seed, [c.n_train for c in clinics.values()], len(public_y), len(test_y),
    )  # fmt: skip
    return BenchData(task, skew, seed, clinics, unseen_x, test_y, public_x, public_y)
