"""The `bench fl` data: a setting file's clinics, unseen clinics and a public set, rendered per seed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from harness.flbench.partition import clinic_sizes, partition_indices, stratified_subset
from harness.flbench.profiles import IDENTITY, AcquisitionProfile, render, to_unit
from harness.flbench.setting import DEFAULT_SETTING, BenchSetting, load_setting
from hub.data.medmnist import load_medmnist
from hub.training.datasets import ClinicData

log = logging.getLogger(__name__)

Skew = Literal["combined", "quantity", "label", "feature", "none"]
SKEWS: tuple[str, ...] = ("combined", "quantity", "label", "feature", "none")

#: The default setting (harness/flbench/clinics/six-clinics.toml); other settings come with --clinics.
SIX_CLINICS: BenchSetting = load_setting(DEFAULT_SETTING)
CLINICS: tuple[str, ...] = SIX_CLINICS.names
LARGE_CLINICS: tuple[str, ...] = SIX_CLINICS.large
SMALL_CLINICS: tuple[str, ...] = SIX_CLINICS.small
#: The public/anchor subset is the same for every seed and every node (HSL's "held identically").
PUBLIC_SEED = 20_251_122
#: The unseen clinics' unlabeled adaptation images draw their noise from rng([seed, ADAPT_STREAM]).
ADAPT_STREAM = 7
#: The trained clinics' analysed images (``traffic_x``) draw theirs from rng([seed, TRAFFIC_STREAM]).
TRAFFIC_STREAM = 11
#: Each trained clinic's whole-test-split rendering (``whole_test_x``) draws its noise from rng([seed, this]).
WHOLE_TEST_STREAM = 13
#: Each trained clinic's whole-validation-split rendering (``whole_val_x``) draws from rng([seed, this]).
WHOLE_VAL_STREAM = 17
#: Images each trained clinic analyses in ``traffic_x`` (fewer when the validation split is smaller).
TRAFFIC_IMAGES = 120
#: The fewest validation images a clinic gets (both classes present), however small its share.
MIN_VAL = 6


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task: primary dataset and public dataset (clinic shares live in the setting file).

    ``num_classes`` 2 is a binary task (one sigmoid logit); more is a K-class task (K softmax logits).
    """

    name: str
    primary: str
    public: str
    public_size: int = 512
    num_classes: int = 2

    @property
    def num_outputs(self) -> int:
        """Logits a model of this task emits: 1 for a binary task, K for K classes."""
        return 1 if self.num_classes == 2 else self.num_classes


TASKS: dict[str, TaskSpec] = {
    "pneumonia": TaskSpec("pneumonia", "pneumoniamnist", "breastmnist"),
    "breast": TaskSpec("breast", "breastmnist", "pneumoniamnist"),
    # 5-level diabetic-retinopathy grade on colour fundus photographs, read as grey (see ``unit_images``).
    "retina": TaskSpec("retina", "retinamnist", "pneumoniamnist", num_classes=5),
}
#: ITU-R BT.601 luma weights (R, G, B): the edge's preprocessing turns colour into this one channel.
BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class BenchData:
    """Everything one seed of the benchmark trains, selects and tests on."""

    task: str
    skew: str
    seed: int
    clinics: dict[str, ClinicData]
    unseen_x: torch.Tensor
    unseen_y: torch.Tensor
    #: Raw (unprofiled) public set, identical at every node: (P, 1, H, W) in [0, 1] and labels (P,).
    public_x: torch.Tensor
    public_y: torch.Tensor
    #: Clinic names in setting order, and the small ones (the small-clinic metric).
    names: tuple[str, ...] = CLINICS
    small: tuple[str, ...] = SMALL_CLINICS
    #: The unseen-clinic panel: the test split rendered with each panel profile (labels ``unseen_y``).
    panel: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Each unseen clinic's own unlabeled images, keyed like its test ("unseen", "panel/<name>"): the whole
    #: validation split rendered with its profile, what a new clinic holds before its first prediction. For
    #: methods that adapt to a clinic without labels (AdaBN); no label of them exists here.
    adapt_x: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The primary task's whole validation split, raw (no clinic's profile): what the hub itself holds, and
    #: what ``fedclinic-hub export`` fits a bundle's input envelope on. No method trains or selects on it.
    hub_val_x: torch.Tensor | None = None
    #: Each trained clinic's analysed images: ``TRAFFIC_IMAGES`` of the validation split (all of it when
    #: smaller) rendered with the clinic's own profile, what a node has scored in its first weeks and keeps
    #: the envelope features of. Unlabeled; no method trains, selects or tests on them.
    traffic_x: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Which images of the task's train split each clinic holds (indices, before its profile is applied), so
    #: that a reference can render them through another clinic's scanner (``bench_scanner_ceiling``).
    train_index: dict[str, np.ndarray] = field(default_factory=dict)
    #: Each trained clinic's scanner applied to the whole (capped) test split (labels ``unseen_y``): a second
    #: test of the same model, with every test image instead of the clinic's prevalence subset (at the
    #: extreme mixes 10–20 images of one class on breast), so that a clinic's AUC, and so the worst clinic,
    #: is read with less sampling noise. AUC, balanced accuracy and sensitivity do not depend on prevalence.
    whole_test_x: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Each trained clinic's scanner applied to the whole validation split (labels ``whole_val_y``): what a
    #: choice between strategies may read with less noise than the clinic's own 6–10 validation images
    #: (breast) give. No method trains on it; nothing of the test split is in it.
    whole_val_x: dict[str, torch.Tensor] = field(default_factory=dict)
    whole_val_y: torch.Tensor | None = None

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [c.train_x for c in self.clinics.values()]
        ys = [c.train_y for c in self.clinics.values()]
        return torch.cat(xs), torch.cat(ys)

    def pooled_val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([c.val_x for c in self.clinics.values()]), torch.cat(
            [c.val_y for c in self.clinics.values()]
        )


def skew_flags(skew: str) -> tuple[bool, bool, bool]:
    """(quantity, label, feature) switched on by a --skew value; 'combined' is all three."""
    if skew not in SKEWS:
        raise ValueError(f"unknown skew {skew!r}; choose one of {', '.join(SKEWS)}")
    if skew == "combined":
        return True, True, True
    return skew == "quantity", skew == "label", skew == "feature"


def _as_tensor(x01: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x01[:, None, :, :], dtype=np.float32))  # (N, 1, H, W)


def unit_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) grey or (N, H, W, 3) RGB → float32 (N, H, W) in [0, 1].

    Colour becomes one channel with BT.601 luma weights, as an edge node's preprocessing does with a
    colour DICOM (manifest ``color = "luminance"``): the models, the acquisition profiles and the training
    augmentation are single-channel, and what the bench trains on must be what the edge will feed. The
    grading loses the colour cues of fundus photographs (red lesions on the orange background); green
    carries most of the lesion contrast and weighs most in luma.
    """
    if images.ndim == 4 and images.shape[-1] == 3:
        return (images.astype(np.float32) @ BT601) / 255.0
    if images.ndim != 3:
        raise ValueError(f"bench fl expects (N, H, W) grey or (N, H, W, 3) colour images, got {images.shape}")
    return to_unit(images)


def mix_sample(labels: np.ndarray, mix: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """The largest subset of ``labels`` (without replacement) with these class proportions (K classes).

    The K-class form of ``prevalence_sample``; every class with a share keeps at least one image.
    """
    labels = np.asarray(labels).reshape(-1)
    props = np.asarray(mix, dtype=np.float64) / float(np.sum(mix))
    pools = [np.flatnonzero(labels == k) for k in range(len(props))]
    n = int(min(len(pool) / p for pool, p in zip(pools, props, strict=True) if p > 0))
    picked = [
        rng.choice(pool, min(len(pool), max(1, round(n * p))), replace=False)
        for pool, p in zip(pools, props, strict=True)
        if p > 0 and len(pool)
    ]
    return np.sort(np.concatenate(picked))


def prevalence_sample(labels: np.ndarray, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """The largest subset of ``labels`` (without replacement) whose positive fraction is ``prevalence``.

    This is how a clinic's test set is drawn: the shared test split resampled at the clinic's own label
    mix, so label skew shows in its AUC, balanced accuracy and sensitivity.
    """
    labels = np.asarray(labels).reshape(-1)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n = int(min(len(pos) / prevalence, len(neg) / (1.0 - prevalence)))
    n_pos = min(len(pos), max(1, round(n * prevalence)))
    n_neg = min(len(neg), max(1, n - n_pos))
    picked = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    return np.sort(picked)


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
    setting: BenchSetting = SIX_CLINICS,
    panel: dict[str, AcquisitionProfile] | None = None,
) -> BenchData:
    """Partition, profile and render the task's data for one seed (quick mode caps sizes).

    Each clinic gets train and validation images at its size share and label skew, and a test set drawn
    from the test split at its own prevalence; the unseen clinics (the setting's and the panel's) test on
    the whole (capped) test split, and each trained clinic's scanner is applied to it as well
    (``whole_test_x``, a second, less noisy reading of the clinic).
    """
    spec = TASKS[task]
    quantity, label, feature = skew_flags(skew)
    rng = np.random.default_rng(seed)
    train = load_medmnist(spec.primary, "train", data_root)
    val = load_medmnist(spec.primary, "val", data_root)
    test = load_medmnist(spec.primary, "test", data_root)
    public = load_medmnist(spec.public, "train", data_root)
    n_clinics = len(setting.clinics)
    shares = [c.share(task) for c in setting.clinics]
    sizes = clinic_sizes(len(train), shares)
    val_sizes = [max(MIN_VAL, s) for s in clinic_sizes(len(val), shares)]
    if not quantity:
        sizes = [sum(sizes) // n_clinics] * n_clinics
        val_sizes = [max(MIN_VAL, sum(val_sizes) // n_clinics)] * n_clinics
    if max_train_per_clinic is not None:
        sizes = [min(s, max_train_per_clinic) for s in sizes]
        val_sizes = [min(s, max(MIN_VAL, max_train_per_clinic // 4)) for s in val_sizes]
    base = np.bincount(train.labels.reshape(-1), minlength=spec.num_classes) / len(train)
    if spec.num_classes == 2:  # binary: a positive prevalence per clinic, exactly as before K classes
        mixes: list[tuple[float, ...]] = [
            (1.0 - p, p)
            for p in ([c.prevalence for c in setting.clinics] if label else [float(base[1])] * n_clinics)
        ]
    else:
        mixes = [c.label_mix(task, base.tolist()) if label else tuple(base.tolist()) for c in setting.clinics]
    parts = partition_indices(train.labels, sizes, mixes, rng)
    val_parts = partition_indices(val.labels, val_sizes, mixes, rng)

    test_idx = np.arange(len(test))
    if max_test is not None and max_test < len(test):
        test_idx = stratified_subset(test.labels, max_test, np.random.default_rng(seed + 1))
    test01 = unit_images(test.images[test_idx])
    test_labels = test.labels[test_idx].reshape(-1)
    test_y = torch.from_numpy(test_labels.astype(np.float32))
    train01, val01 = unit_images(train.images), unit_images(val.images)

    def labels_of(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values.reshape(-1).astype(np.float32))

    clinics: dict[str, ClinicData] = {}
    # Each clinic's scanner as this skew applies it (none without feature skew).
    profiles = {c.name: c.profile.scaled(strength) if feature else IDENTITY for c in setting.clinics}
    for c, idx, v_idx, mix in zip(setting.clinics, parts, val_parts, mixes, strict=True):
        profile = profiles[c.name]
        own = (
            prevalence_sample(test_labels, mix[1], rng)
            if len(mix) == 2
            else mix_sample(test_labels, mix, rng)
        )
        clinics[c.name] = ClinicData(
            name=c.name,
            train_x=_as_tensor(render(train01[idx], profile, rng)),
            train_y=labels_of(train.labels[idx]),
            test_x=_as_tensor(render(test01[own], profile, rng)),
            test_y=labels_of(test_labels[own]),
            val_x=_as_tensor(render(val01[v_idx], profile, rng)),
            val_y=labels_of(val.labels[v_idx]),
        )
    unseen_profile = next(iter(setting.unseen.values()))
    unseen_x = _as_tensor(render(test01, unseen_profile, rng))
    rendered_panel = {name: _as_tensor(render(test01, prof, rng)) for name, prof in (panel or {}).items()}
    # Their unlabeled images, from a stream of their own: every rendering above is as it was without them.
    adapt_rng = np.random.default_rng([seed, ADAPT_STREAM])
    adapt_x = {"unseen": _as_tensor(render(val01, unseen_profile, adapt_rng))}
    adapt_x.update(
        {f"panel/{name}": _as_tensor(render(val01, prof, adapt_rng)) for name, prof in (panel or {}).items()}
    )

    # The trained clinics' analysed images, from a stream of their own as well.
    traffic_rng = np.random.default_rng([seed, TRAFFIC_STREAM])
    traffic_x = {}
    for c in setting.clinics:
        profile = profiles[c.name]
        pick = traffic_rng.choice(len(val01), min(TRAFFIC_IMAGES, len(val01)), replace=False)
        traffic_x[c.name] = _as_tensor(render(val01[pick], profile, traffic_rng))

    # Each clinic's scanner on the whole test split, from a stream of its own too.
    whole_rng = np.random.default_rng([seed, WHOLE_TEST_STREAM])
    whole_test_x = {name: _as_tensor(render(test01, prof, whole_rng)) for name, prof in profiles.items()}
    # And on the whole validation split, from another.
    whole_val_rng = np.random.default_rng([seed, WHOLE_VAL_STREAM])
    whole_val_x = {name: _as_tensor(render(val01, prof, whole_val_rng)) for name, prof in profiles.items()}

    size = public_size if public_size is not None else spec.public_size
    pub_idx = stratified_subset(public.labels, size, np.random.default_rng(PUBLIC_SEED))
    public_x = _as_tensor(unit_images(public.images[pub_idx]))
    public_y = torch.from_numpy(public.labels[pub_idx].astype(np.float32))
    log.info(
        "bench data task=%s skew=%s seed=%d clinics=%d train sizes=%s public=%d test=%d panel=%d",
        task, skew, seed, n_clinics, [c.n_train for c in clinics.values()], len(public_y), len(test_y),
        len(rendered_panel),
    )  # fmt: skip
    return BenchData(
        task, skew, seed, clinics, unseen_x, test_y, public_x, public_y,
        setting.names, setting.small, rendered_panel, adapt_x, _as_tensor(val01), traffic_x,
        {c.name: np.asarray(idx) for c, idx in zip(setting.clinics, parts, strict=True)}, whole_test_x,
        whole_val_x, labels_of(val.labels),
    )  # fmt: skip
