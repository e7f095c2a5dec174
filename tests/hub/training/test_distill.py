"""Distillation: the student stays under the edge budget and learns the teacher's function."""

from __future__ import annotations

import pytest
import torch

from hub.models.fl_cnn import FlCnn, fl_cnn
from hub.training.distill import MAX_STUDENT_PARAMS, count_params, distill_student
from hub.training.learners import normalize


def test_student_matches_a_simple_teacher() -> None:
    def teacher(x: torch.Tensor) -> torch.Tensor:
        return (8.0 * x[:, :, 10:18, 10:18].mean(dim=(1, 2, 3))).reshape(-1, 1)  # brightness of the centre

    def images(n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = 0.2 * torch.rand(n, 1, 28, 28, generator=gen)
        x[:, :, 10:18, 10:18] += 0.8 * torch.rand(n, 1, 1, 1, generator=gen)  # centre brightness varies
        return x

    student = distill_student(teacher, images(256, 0), epochs=6, seed=0, augment=False)
    assert count_params(student) <= MAX_STUDENT_PARAMS
    probe = images(128, 1)
    with torch.no_grad():
        s, t = student(normalize(probe))[:, 0], teacher(normalize(probe))[:, 0]
    assert torch.corrcoef(torch.stack([s, t]))[0, 1] > 0.8


def test_oversized_student_is_refused() -> None:
    big = FlCnn(widths=(128, 256, 512))
    assert count_params(big) > MAX_STUDENT_PARAMS
    with pytest.raises(ValueError, match="edge budget"):
        distill_student(lambda x: x[:, :1, 0, 0], torch.rand(4, 1, 28, 28), epochs=1, student=big)
    assert count_params(fl_cnn()) < 100_000
