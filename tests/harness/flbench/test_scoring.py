"""Validation-chosen thresholds and the metrics read at them; per-clinic test sets at their own prevalence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.flbench.datasets import build_bench_data, prevalence_sample
from harness.flbench.scoring import threshold_metrics, validation_threshold
from harness.flbench.setting import load_panel


def test_threshold_maximises_youden_on_validation() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    logits = np.array([-3.0, -2.0, 1.5, 1.0, 2.0, 3.0])
    thr = validation_threshold(y, logits)
    # Best split: positives at ≥ 2.0 (TPR 2/3, FPR 0) or ≥ 1.0 (TPR 1, FPR 1/3): both J = 2/3; sklearn
    # returns the first maximum, the stricter one.
    assert thr in (2.0, 1.0)
    m = threshold_metrics(y, logits, 1.0)
    assert (m["sens"], m["spec"], m["bacc"]) == pytest.approx((1.0, 2 / 3, 5 / 6))
    assert validation_threshold(np.array([1, 1]), np.array([0.3, 0.4])) == 0.0  # one class: nothing to learn
    assert validation_threshold(np.zeros(0), np.zeros(0)) == 0.0


def test_threshold_metrics_of_a_broken_model_are_nan() -> None:
    m = threshold_metrics(np.array([0, 1]), np.array([np.nan, 1.0]), 0.0)
    assert all(math.isnan(v) for v in m.values())


def test_prevalence_sample_hits_the_prevalence_without_replacement() -> None:
    labels = np.array([1] * 390 + [0] * 234)
    for p in (0.2, 0.5, 0.9):
        idx = prevalence_sample(labels, p, np.random.default_rng(0))
        assert len(np.unique(idx)) == len(idx)
        assert labels[idx].mean() == pytest.approx(p, abs=0.01)
    assert len(prevalence_sample(labels, 0.9, np.random.default_rng(0))) == pytest.approx(390 / 0.9, abs=2)


def test_clinics_get_validation_images_and_test_at_their_own_prevalence() -> None:
    data = build_bench_data(
        "pneumonia", "combined", 0, max_train_per_clinic=40, max_test=200, public_size=16, panel=load_panel()
    )
    prevalences = {"A": 0.75, "B": 0.5, "C": 0.85, "D": 0.3, "E": 0.9, "F": 0.2}
    for name, c in data.clinics.items():
        assert len(c.val_y) >= 6 and 0 < float(c.val_y.mean()) < 1
        assert float(c.test_y.mean()) == pytest.approx(prevalences[name], abs=0.03)
        assert float(c.train_y.mean()) == pytest.approx(prevalences[name], abs=0.05)
    # Different prevalences → different test sets; the unseen panel tests on the whole (capped) split.
    assert len(data.clinics["E"].test_y) != len(data.clinics["F"].test_y)
    assert len(data.panel) >= 4 and all(x.shape == data.unseen_x.shape for x in data.panel.values())
    assert len(data.unseen_y) == 200
    assert not any(torch.equal(x, data.unseen_x) for x in data.panel.values())
    # Each trained clinic's analysed images: 120 of the validation split under its own profile, unlabeled.
    assert set(data.traffic_x) == set(data.clinics)
    assert all(x.shape == (120, 1, 28, 28) for x in data.traffic_x.values())
    assert not torch.equal(data.traffic_x["A"], data.traffic_x["E"])
