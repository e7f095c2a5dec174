"""Every clinic's scanner on the whole test split: a second, less noisy reading of each clinic.

Real data (BreastMNIST from ``FEDCLINIC_DATA``), capped so that it takes a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.flbench.datasets import BenchData, build_bench_data
from harness.flbench.methods import clinic_scores
from harness.flbench.scoring import threshold_metrics, validation_threshold


@pytest.fixture(scope="module")
def data() -> BenchData:
    return build_bench_data("breast", "combined", 3, max_train_per_clinic=24, max_test=60, public_size=16)


def _rows(x: torch.Tensor) -> np.ndarray:
    return x.numpy().reshape(len(x), -1)


def test_each_clinic_holds_the_whole_test_split_through_its_own_scanner(data: BenchData) -> None:
    assert set(data.whole_test_x) == set(data.names)
    for c in data.names:
        assert data.whole_test_x[c].shape == data.unseen_x.shape  # every test image, labels unseen_y
        assert len(data.clinics[c].test_y) < len(data.unseen_y)  # the prevalence subset is smaller
    # D's scanner adds no noise: its prevalence subset is exactly some rows of its whole-split rendering.
    whole, own = _rows(data.whole_test_x["D"]), _rows(data.clinics["D"].test_x)
    nearest = np.abs(own[:, None, :] - whole[None, :, :]).max(axis=2).min(axis=1)
    assert nearest.max() < 1e-6
    # E's scanner is noisy: the same images again, with noise of their own (drawn from another stream).
    whole, own = _rows(data.whole_test_x["E"]), _rows(data.clinics["E"].test_x)
    distance = np.abs(own[:, None, :] - whole[None, :, :]).mean(axis=2)
    assert distance.min(axis=1).min() > 1e-3
    assert (distance.min(axis=1) / np.median(distance, axis=1)).max() < 0.8
    # Two scanners render the same image differently.
    assert np.abs(_rows(data.whole_test_x["C"]) - _rows(data.whole_test_x["D"])).mean() > 0.05


def test_clinic_scores_read_the_whole_split_at_the_validation_threshold(data: BenchData) -> None:
    def brightness(x: torch.Tensor) -> np.ndarray:
        return x.mean(dim=(1, 2, 3)).numpy().astype(np.float64)

    scores = clinic_scores(data, dict.fromkeys(data.names, brightness))
    for c in data.names:
        clinic = data.clinics[c]
        thr = validation_threshold(clinic.val_y.numpy(), brightness(clinic.val_x))
        want = threshold_metrics(data.unseen_y.numpy(), brightness(data.whole_test_x[c]), thr)
        assert {k: scores[c][f"{k}_whole"] for k in want} == pytest.approx(want)
        own = threshold_metrics(clinic.test_y.numpy(), brightness(clinic.test_x), thr)
        assert scores[c]["auc"] == pytest.approx(own["auc"])
    assert len({round(scores[c]["auc_whole"], 6) for c in data.names}) > 1  # each its own scanner


def test_each_clinic_holds_the_whole_validation_split_through_its_own_scanner(data: BenchData) -> None:
    """What the third choice rule reads: every validation image through each clinic's scanner, and no test
    image; the clinic's own few validation images are some of them (D's scanner adds no noise)."""
    assert data.whole_val_y is not None and set(data.whole_val_x) == set(data.names)
    assert data.hub_val_x is not None
    for c in data.names:
        assert data.whole_val_x[c].shape == data.hub_val_x.shape  # the whole split, raw on the hub's side
        assert len(data.clinics[c].val_y) < len(data.whole_val_y)
    whole, own = _rows(data.whole_val_x["D"]), _rows(data.clinics["D"].val_x)
    assert np.abs(own[:, None, :] - whole[None, :, :]).max(axis=2).min(axis=1).max() < 1e-6
    test = _rows(data.whole_test_x["D"])
    assert np.abs(whole[:, None, :] - test[None, :, :]).max(axis=2).min(axis=1).min() > 1e-3  # no test image

    def brightness(x: torch.Tensor) -> np.ndarray:
        return x.mean(dim=(1, 2, 3)).numpy().astype(np.float64)

    scores = clinic_scores(data, dict.fromkeys(data.names, brightness))
    for c in data.names:
        want = threshold_metrics(data.whole_val_y.numpy(), brightness(data.whole_val_x[c]), 0.0)["auc"]
        assert scores[c]["val_auc_whole"] == pytest.approx(want)
    assert len({round(scores[c]["val_auc_whole"], 6) for c in data.names}) > 1
