"""The round kept for one-global-model methods: chosen on validation, ties on the small clinics broken."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from harness.flbench.methods import BestRound, validation_aucs


def _data() -> Any:
    """Two hospitals with 40 validation images, two small clinics with 6; the image is its own score. The
    whole validation split (80 images) through each clinic's scanner as well."""
    rng = np.random.default_rng(0)

    def images(y: np.ndarray) -> torch.Tensor:
        return torch.tensor(y + rng.normal(0, 0.1, len(y)))

    def clinic(n: int) -> SimpleNamespace:
        y = np.arange(n) % 2
        return SimpleNamespace(val_x=images(y), val_y=torch.tensor(y))

    clinics = {"A": clinic(40), "B": clinic(40), "C": clinic(6), "D": clinic(6)}
    whole_y = np.arange(80) % 2
    whole_x = {c: images(whole_y) for c in clinics}
    return SimpleNamespace(
        names=("A", "B", "C", "D"),
        small=("C", "D"),
        clinics=clinics,
        whole_val_x=whole_x,
        whole_val_y=torch.tensor(whole_y),
    )


def _model(noise: float, seed: int) -> Any:
    """Scores the image plus noise: less noise, a better model."""
    rng = np.random.default_rng(seed)
    return lambda x: x.numpy() + rng.normal(0, noise, len(x))


def test_a_tie_on_the_small_clinics_goes_to_the_round_better_on_every_clinic() -> None:
    data = _data()
    first = validation_aucs(data, dict.fromkeys(data.names, _model(0.45, 2)))
    assert first["C"] == first["D"] == 1.0 and first["A"] < 1.0 and first["B"] < 1.0  # the tie this is about
    best = BestRound(data, {})
    best.offer(1, {"r": np.zeros(1)}, _model(0.45, 2))  # separates C and D perfectly, not A and B
    best.offer(2, {"r": np.ones(1)}, _model(0.0, 2))  # perfect everywhere
    best.offer(3, {"r": np.full(1, 3.0)}, _model(0.45, 2))  # same as round 1: no better, not taken
    assert best.round == 2 and best.params["r"][0] == 1.0
    assert best.extra()["best_round_val_auc"] == 1.0 and best.extra()["best_round_all_val_auc"] == 1.0
    # The last round's reading is kept beside the best one's: what a choice between methods compares.
    assert best.extra()["last_round_val_auc"] == 1.0
    assert best.extra()["last_round_all_val_auc"] == np.mean([first["A"], first["B"], 1.0, 1.0])


def test_the_small_clinics_come_first() -> None:
    data = _data()
    best = BestRound(data, {})
    best.offer(1, {}, _model(0.0, 0))
    flip_small = _model(0.0, 0)
    best.offer(2, {}, lambda x: -flip_small(x) if len(x) == 6 else flip_small(x))  # worse on C, D only
    assert best.round == 1


def test_on_the_whole_split_a_round_lucky_on_six_images_is_not_kept() -> None:
    """A round that orders the small clinics' six own images perfectly and the whole split at chance wins
    on the own images and loses on the whole split."""
    data = _data()
    good = _model(1.0, 0)  # right on most images, AUC < 1 on the six

    def lucky(x: torch.Tensor) -> np.ndarray:  # perfect on six images, noise on the whole split
        return x.numpy() if len(x) == 6 else np.random.default_rng(1).normal(0, 1, len(x))

    own, whole = BestRound(data, {}), BestRound(data, {}, on_whole=True)
    for best in (own, whole):
        best.offer(1, {}, good)
        best.offer(2, {}, lucky)
    assert own.round == 2 and whole.round == 1
    assert whole.extra()["last_round_val_auc_whole"] < 0.7 < whole.extra()["best_round_val_auc"]
