"""The agreement term across augmented views: its value, that training with it makes a model's predictions
agree across the augmentation, and that a task's config turns it (and the random convolutions) on at a
node."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_node.protocol.updates import UpdateKind
from hub.fl.strategy import ClientTask
from hub.models.fl_cnn import fl_cnn
from hub.training.learners import (
    AUGMENT,
    LocalConfig,
    SupervisedLearner,
    normalize,
    primary_logits,
    to_params,
    train_local,
    view_consistency,
)
from tests.hub.training.conftest import make_clinic


def test_agreeing_views_score_zero_and_disagreeing_ones_up_to_log_of_the_views() -> None:
    logits = torch.tensor([-2.0, 0.5, 3.0])
    assert float(view_consistency([logits, logits, logits])) == pytest.approx(0.0, abs=1e-6)
    opposite = [torch.full((4,), 30.0), torch.full((4,), -30.0)]
    assert float(view_consistency(opposite)) == pytest.approx(math.log(2), rel=1e-4)
    mild = float(view_consistency([logits, logits + 0.5]))
    assert 0.0 < mild < float(view_consistency([logits, logits + 3.0]))
    # K classes: softmax distributions, the same bound.
    k3 = torch.eye(3) * 40.0
    assert float(view_consistency([k3, k3.roll(1, dims=1), k3.roll(2, dims=1)])) == pytest.approx(
        math.log(3), rel=1e-4
    )


def _disagreement_after_training(weight: float) -> float:
    """Train the benchmark CNN on a toy clinic with the term at ``weight``; the views' disagreement on held
    images under fresh draws of the augmentation."""
    torch.manual_seed(0)
    model = fl_cnn(norm="group")
    clinic = make_clinic("C", 96, seed=4)
    cfg = LocalConfig(epochs=6, batch_size=32, augment=True, consistency=weight)
    train_local(model, clinic.train_x, clinic.train_y, cfg, torch.Generator().manual_seed(1))
    held = make_clinic("H", 64, seed=9).train_x
    gen = torch.Generator().manual_seed(2)
    model.eval()
    with torch.no_grad():
        views = [primary_logits(model(normalize(AUGMENT(held, gen)))) for _ in range(3)]
    return float(view_consistency(views))


def test_training_with_the_term_makes_predictions_agree_across_the_augmentation() -> None:
    without, with_term = _disagreement_after_training(0.0), _disagreement_after_training(12.0)
    assert with_term < 0.5 * without, (with_term, without)


@pytest.mark.parametrize(
    ("cfg", "reason"),
    [
        (LocalConfig(consistency=1.0), "needs augment"),
        (LocalConfig(randconv=True), "stage of the augmentation"),
    ],
)
def test_the_term_and_random_convolutions_need_augmentation(cfg: LocalConfig, reason: str) -> None:
    clinic = make_clinic("C", 16, seed=1)
    with pytest.raises(ValueError, match=reason):
        gen = torch.Generator().manual_seed(0)
        train_local(fl_cnn(norm="group"), clinic.train_x, clinic.train_y, cfg, gen)


def _node_update(config: dict[str, float | bool]) -> dict[str, np.ndarray]:
    """A node's weights update for one task carrying ``config``, from the same start and seed every time."""
    torch.manual_seed(0)
    model = fl_cnn(norm="group")
    learner = SupervisedLearner("C", model, make_clinic("C", 32, seed=3), LocalConfig(batch_size=16), 5)
    task = ClientTask("C", 1, UpdateKind.WEIGHTS_DELTA, to_params(model), config)
    return dict(learner.fit(task).update)


def test_a_task_config_turns_the_term_on_at_the_node() -> None:
    """The hub's round config carries the weight: the node's update differs from one without it."""
    plain = _node_update({"augment": True})
    agreeing = _node_update({"augment": True, "consistency": 4.0})
    assert LocalConfig.from_task({"consistency": 4.0}, LocalConfig()).consistency == 4.0
    assert any(not np.allclose(plain[n], agreeing[n]) for n in plain)


@pytest.mark.parametrize("base", [{"augment": True}, {"augment": True, "consistency": 4.0}])
def test_a_task_config_turns_random_convolutions_on_at_the_node(base: dict[str, float | bool]) -> None:
    plain, convolved = _node_update(base), _node_update({**base, "randconv": True})
    assert LocalConfig.from_task({**base, "randconv": True}, LocalConfig()).randconv
    assert any(not np.allclose(plain[n], convolved[n]) for n in plain)
