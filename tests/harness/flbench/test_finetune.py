"""Local fine-tuning after the federation: the budget each clinic keeps is the one its validation loss
chooses, the models it was given stay as they were, and budget 0 is the federation's model itself."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from harness.flbench.datasets import build_bench_data
from harness.flbench.finetune import FINETUNE_EPOCHS, _choose, fine_tune, validation_loss
from harness.flbench.methods import clinic_scores
from harness.flbench.scoring import Predictor
from hub.models.fl_cnn import fl_cnn
from hub.training.learners import LocalConfig, predict, to_params


def test_the_lowest_validation_loss_wins_and_ties_go_to_fewer_epochs() -> None:
    assert _choose({0: 0.7, 1: 0.5, 2: 0.6, 4: 0.9}) == 1
    assert _choose({0: 0.5, 1: 0.5, 2: 0.5, 4: 0.9}) == 0
    assert _choose({0: math.nan, 1: math.nan, 2: math.nan, 4: math.nan}) == 0  # no validation images


def test_validation_loss_is_the_task_loss() -> None:
    torch.manual_seed(0)
    model = fl_cnn(norm="group")
    x = torch.rand(8, 1, 28, 28)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.float32)
    logits = torch.from_numpy(predict(model, x))
    want = float(torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y))
    assert validation_loss(model, x, y) == pytest.approx(want, rel=1e-5)
    assert math.isnan(validation_loss(model, x[:0], y[:0]))


def test_each_clinic_keeps_the_budget_its_validation_loss_chooses() -> None:
    torch.set_num_threads(1)
    data = build_bench_data("breast", "combined", 0, max_train_per_clinic=32, max_test=60, public_size=16)
    torch.manual_seed(0)
    start = fl_cnn(norm="group")
    before = to_params(start)
    models = dict.fromkeys(data.names, start)
    seen: list[Mapping[str, Predictor]] = []

    def scores(per_clinic: Mapping[str, Predictor]) -> dict[str, dict[str, float]]:
        seen.append(per_clinic)
        return clinic_scores(data, per_clinic)

    local = LocalConfig(batch_size=16, augment=True)
    predictors, extra = fine_tune(data, models, local, 3e-4, 0, scores)
    for name, arr in to_params(start).items():  # the given model is untouched
        np.testing.assert_array_equal(arr, before[name], err_msg=name)
    assert len(seen) == len(FINETUNE_EPOCHS)
    chosen = extra["finetune_epochs"]
    for name in data.names:
        losses = {int(e): v for e, v in extra["finetune_val_loss"][name].items()}
        assert chosen[name] == _choose(losses)
        x = data.clinics[name].test_x
        np.testing.assert_array_equal(
            predictors[name](x), seen[FINETUNE_EPOCHS.index(chosen[name])][name](x), err_msg=name
        )
    # Budget 0 is the federation's model; a longer budget changes it (the curve is not one model four times).
    x = data.clinics["A"].test_x
    np.testing.assert_array_equal(seen[0]["A"](x), predict(start, x))
    assert not np.array_equal(seen[-1]["A"](x), seen[0]["A"](x))
    assert set(extra["finetune_auc_by_epochs"]) == {str(e) for e in FINETUNE_EPOCHS}
