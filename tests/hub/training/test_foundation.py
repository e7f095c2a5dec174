"""The hub's foundation teacher: early stopping, temperature, cross-fitted soft labels and their quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hub.models.fl_cnn import FlCnn
from hub.training.foundation import (
    CrossFittedFoundation,
    FoundationTeacher,
    fit_temperature,
    soft_label_quality,
)


def _tiny(classes: int) -> FlCnn:
    return FlCnn(widths=(8, 16), norm="group", num_outputs=classes)


def _corpus(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by where a bright square sits (top, centre, bottom)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.2 + 0.1 * torch.rand(n, 1, 28, 28, generator=gen)
    for cls, row in enumerate((2, 11, 20)):
        x[y == cls, :, row : row + 6, 10:18] += 0.6
    return x, y


def test_quality_of_perfect_and_of_uniform_soft_labels() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    perfect = np.eye(2)[labels]
    q = soft_label_quality(perfect, labels, binary=(0, 1))
    assert q["accuracy"] == 1.0 and q["ece"] == pytest.approx(0.0) and q["auc"] == 1.0
    assert q["nll"] == pytest.approx(0.0, abs=1e-9)
    # Always 90 % sure of class 1, right 3 times in 5: ECE = |0.6 − 0.9| = 0.3.
    sure = np.tile([0.1, 0.9], (5, 1))
    assert soft_label_quality(sure, labels)["ece"] == pytest.approx(0.3)


def test_temperature_above_one_for_overconfident_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=gen)
    # Right 70 % of the time, but with logit gaps of 8 (≈ 100 % sure).
    right = torch.rand(400, generator=gen) < 0.7
    predicted = torch.where(right, labels, 1 - labels)
    logits = 8.0 * torch.nn.functional.one_hot(predicted, 2).float()
    assert fit_temperature(logits, labels) > 2.0
    calibrated = torch.nn.functional.one_hot(labels, 2).float() * 8.0
    assert fit_temperature(calibrated, labels) <= 0.5


def test_teacher_learns_the_corpus_and_keeps_its_best_epoch() -> None:
    x, y = _corpus(150, seed=0)
    vx, vy = _corpus(60, seed=1)
    teacher = FoundationTeacher(
        (x, y), (vx, vy), 3, build=_tiny, max_epochs=6, patience=2, batch_size=16, seed=0
    )
    assert 1 <= teacher.best_epoch <= teacher.epochs_run <= 6
    tx, ty = _corpus(90, seed=2)
    q = soft_label_quality(teacher.soft_labels(tx), ty.numpy())
    assert q["accuracy"] > 0.6  # chance is 1/3
    probs = teacher.soft_labels(tx)
    assert probs.shape == (90, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_cross_fitted_labels_come_from_the_teacher_that_did_not_see_the_image() -> None:
    x, y = _corpus(300, seed=3)
    held = np.arange(0, 300, 10)  # 30 public images inside the corpus
    fm = CrossFittedFoundation(
        x, y, 3, held, folds=2, build=_tiny, max_epochs=6, patience=2, batch_size=16, seed=0
    )
    public = x[held]
    soft = fm.soft_labels(public)
    per_teacher = [t.soft_labels(public) for t in fm.teachers]
    for i, position in enumerate(held):
        f = int(fm.fold_of[i])
        np.testing.assert_allclose(soft[i], per_teacher[f][i], atol=1e-6)
        assert position not in set(fm.train_positions[f].tolist())
    # An image outside the public set gets the teachers' mean.
    other = x[1:2]
    np.testing.assert_allclose(
        fm.soft_labels(other)[0], np.mean([t.soft_labels(other)[0] for t in fm.teachers], axis=0), atol=1e-6
    )
    assert soft_label_quality(soft, y[held].numpy())["accuracy"] > 0.5
