"""HSL learner pieces: pairing, primary class balancing, the anchored single-input model, one real round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub.fl.registry import make_strategy
from hub.models.hsl_mmoe import hsl_mmoe
from hub.training.datasets import ClinicData
from hub.training.hsl_train import HslLearner, anchor_choices, anchored, balance_primary, padded_order
from hub.training.learners import LocalConfig, normalize, predict, to_params
from hub.training.simulation import RoundCheckpoint, run_federation


def test_padded_order_covers_every_item_then_resamples() -> None:
    order = padded_order(10, 25, torch.Generator().manual_seed(0))
    assert len(order) == 25
    assert set(order.tolist()) == set(range(10))


def test_balance_primary_gives_an_expected_fifty_fifty_mix() -> None:
    labels = torch.tensor([1.0] * 80 + [0.0] * 20)  # p_max 0.8, p_min 0.2 → swap prob 0.375
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 100, (20000,), generator=gen)
    balanced = balance_primary(idx, labels, gen)
    assert abs(float(labels[balanced].mean()) - 0.5) < 0.02
    assert torch.equal(balance_primary(idx, torch.tensor([1.0, 0.0] * 50), gen), idx)  # already balanced


def test_anchored_model_is_the_two_input_net_with_the_frozen_anchor() -> None:
    torch.manual_seed(0)
    net = hsl_mmoe().eval()
    x = torch.rand(5, 1, 28, 28)
    anchor = torch.rand(1, 1, 28, 28)
    deploy = anchored(net, anchor)
    with torch.no_grad():
        expected = net(normalize(x), normalize(anchor).expand(5, -1, -1, -1))[:, :1]
        torch.testing.assert_close(deploy(normalize(x)), expected)
    assert deploy(normalize(x)).shape == (5, 1)


def test_anchor_choices_has_the_mean_and_images_of_both_classes() -> None:
    x, y = torch.rand(20, 1, 28, 28), torch.tensor([0.0, 1.0] * 10)
    choices = anchor_choices(x, y)
    assert len(choices) >= 6 and "mean" in choices
    torch.testing.assert_close(choices["mean"], x.mean(dim=0, keepdim=True))
    assert {k.rsplit("_", 1)[1] for k in choices if k != "mean"} == {"y0", "y1"}


def test_hsl_round_through_the_strategy_learns_both_tasks(clinics: dict[str, ClinicData]) -> None:
    torch.manual_seed(0)
    init = hsl_mmoe()
    anchor_x = torch.rand(30, 1, 28, 28)
    anchor_y = (anchor_x.mean(dim=(1, 2, 3)) > 0.5).float()
    learners = {}
    for k, (c, data) in enumerate(clinics.items()):
        model = hsl_mmoe()
        model.load_state_dict(init.state_dict())
        learners[c] = HslLearner(c, model, data, anchor_x, anchor_y, LocalConfig(epochs=3, batch_size=16), k)
    strategy = make_strategy("hsl")
    strategy.initialize(to_params(init), list(learners))
    run = run_federation(strategy, learners, 2)
    assert all(r.applied and not r.failures for r in run.rounds)
    net = hsl_mmoe()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in strategy.global_params.items()})
    deploy = anchored(net.eval(), anchor_x.mean(dim=0, keepdim=True))
    scores = predict(deploy, clinics["A"].test_x)
    pos, neg = scores[clinics["A"].test_y.numpy() == 1], scores[clinics["A"].test_y.numpy() == 0]
    assert pos.mean() > neg.mean()  # the toy signal is learnt through the averaged model


def test_hsl_resumes_exactly_from_a_round_checkpoint(clinics: dict[str, ClinicData], tmp_path: Path) -> None:
    anchor_x = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    anchor_y = (anchor_x.mean(dim=(1, 2, 3)) > 0.5).float()

    def build() -> tuple[dict[str, HslLearner], Any]:
        torch.manual_seed(0)
        init = hsl_mmoe()
        learners = {}
        for k, (c, data) in enumerate(clinics.items()):
            model = hsl_mmoe()
            model.load_state_dict(init.state_dict())
            learners[c] = HslLearner(c, model, data, anchor_x, anchor_y, LocalConfig(batch_size=16), k)
        strategy = make_strategy("hsl")
        strategy.initialize(to_params(init), list(learners))
        return learners, strategy

    straight, s_straight = build()
    run_federation(s_straight, straight, 3)
    ckpt = RoundCheckpoint(tmp_path / "hsl.npz")
    first, s_first = build()
    run_federation(s_first, first, 2, checkpoint=ckpt)
    torch.manual_seed(12345)  # a new process: the global RNG is wherever it is
    resumed, s_resumed = build()
    run_federation(s_resumed, resumed, 3, checkpoint=ckpt)
    for name, arr in s_straight.global_params.items():
        np.testing.assert_array_equal(s_resumed.global_params[name], arr)
