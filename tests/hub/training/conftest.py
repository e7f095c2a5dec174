"""Fixtures for hub.training tests: tiny synthetic clinics (fast) and one thread for torch."""

from __future__ import annotations

import pytest
import torch

from hub.training.datasets import ClinicData


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_clinic(name: str, n: int, seed: int, prevalence: float = 0.5) -> ClinicData:
    """A learnable toy clinic: positives have a brighter centre square."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=gen) < prevalence).float()
    y[0], y[-1] = 0.0, 1.0  # both classes present
    x = 0.3 + 0.1 * torch.rand(n, 1, 28, 28, generator=gen)
    x[:, :, 10:18, 10:18] += 0.4 * y.reshape(-1, 1, 1, 1)
    return ClinicData(name, x, y, x[: min(n, 40)].clone(), y[: min(n, 40)].clone())


@pytest.fixture
def clinics() -> dict[str, ClinicData]:
    return {c: make_clinic(c, n, seed=k) for k, (c, n) in enumerate([("A", 48), ("B", 24), ("C", 12)])}
