"""Clinic partitioning: exact sizes/prevalences, distinct small-clinic images, top-up of a dry class."""

from __future__ import annotations

import numpy as np

from harness.flbench.partition import class_counts, clinic_sizes, partition_indices, stratified_subset


def test_clinic_sizes_of_the_pneumonia_shares() -> None:
    assert clinic_sizes(4708, [0.60, 0.20, 0.02, 0.015, 0.01, 0.005]) == [2825, 942, 94, 71, 47, 24]


def test_class_counts_keeps_both_classes() -> None:
    assert class_counts(24, 0.2) == (19, 5)
    assert class_counts(10, 0.99) == (1, 9)
    assert class_counts(10, 0.0) == (9, 1)


def test_partition_exact_sizes_and_prevalence_and_small_clinics_distinct() -> None:
    labels = np.array([0] * 300 + [1] * 700)
    sizes, prev = [500, 200, 40, 20], [0.75, 0.5, 0.85, 0.2]
    parts = partition_indices(labels, sizes, prev, np.random.default_rng(0))
    for idx, size, p in zip(parts, sizes, prev, strict=True):
        assert len(idx) == size
        assert labels[idx].sum() == class_counts(size, p)[1]
    small = np.concatenate(parts[1:])
    assert len(np.unique(small)) == len(small)  # filled first, without replacement


def test_partition_tops_up_a_dry_class_with_replacement() -> None:
    labels = np.array([0] * 10 + [1] * 90)
    parts = partition_indices(labels, [50, 10], [0.5, 0.5], np.random.default_rng(1))
    assert (labels[parts[0]] == 0).sum() == 25  # only 5 normals were left after the small clinic
    assert len(np.unique(parts[1])) == 10


def test_stratified_subset_keeps_proportions() -> None:
    labels = np.array([0] * 250 + [1] * 750)
    idx = stratified_subset(labels, 100, np.random.default_rng(0))
    assert len(idx) == 100 and labels[idx].sum() == 75
