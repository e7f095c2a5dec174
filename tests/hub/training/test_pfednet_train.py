"""pFedNet learner: the stats sketch answers the graph round; personal parts stay per clinic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hub.fl.registry import make_strategy
from hub.fl.strategy import Strategy
from hub.models.fl_cnn import FlCnn, fl_cnn
from hub.training.datasets import ClinicData
from hub.training.learners import LocalConfig, to_params
from hub.training.pfednet_train import PFedNetLearner, is_personal_tensor, last_block_personal, sketch
from hub.training.simulation import RoundCheckpoint, run_federation


def test_sketch_is_label_counts_and_a_coarse_mean_image() -> None:
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, :14, :] = 1.0  # top half bright
    s = sketch(x, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(s["label_counts"], [1.0, 3.0])
    assert s["feature_mean"].shape == (16,)
    np.testing.assert_allclose(s["feature_mean"][:8], 1.0)
    np.testing.assert_allclose(s["feature_mean"][8:], 0.0)


def test_personal_part_is_head_and_norm_affines() -> None:
    names = list(to_params(fl_cnn(norm="group")))
    personal = [n for n in names if is_personal_tensor(n)]
    assert "head.weight" in personal and "features.0.norm.weight" in personal
    assert "features.0.conv.weight" not in personal


def test_larger_personal_part_adds_the_last_conv_block_only() -> None:
    names = list(to_params(fl_cnn(norm="group")))
    is_personal = last_block_personal(names)
    personal = {n for n in names if is_personal(n)}
    assert personal - {n for n in names if is_personal_tensor(n)} == {"features.2.conv.weight"}
    assert "features.1.conv.weight" not in personal and "head.bias" in personal
    deeper = list(to_params(FlCnn(norm="group", depth=2)))  # two blocks per width: the last is features.5
    assert {n for n in deeper if last_block_personal(deeper)(n) and ".conv." in n} == {
        "features.5.conv.weight"
    }
    with pytest.raises(ValueError, match="fl_cnn"):
        last_block_personal(["fc.weight"])


def test_pfednet_stats_round_then_training_rounds(clinics: dict[str, ClinicData]) -> None:
    torch.manual_seed(0)
    init = fl_cnn(norm="group")
    learners = {}
    for k, (c, data) in enumerate(clinics.items()):
        model = fl_cnn(norm="group")
        model.load_state_dict(init.state_dict())
        learners[c] = PFedNetLearner(c, model, data, LocalConfig(batch_size=16), k)
    strategy = make_strategy(
        "pfednet", is_personal=is_personal_tensor, lam=1.0, eta=0.01, mean_gradient=False, graph_k=1,
        graph_keys=("label_counts", "feature_mean"),
    )  # fmt: skip
    strategy.initialize(to_params(init), list(learners))
    run = run_federation(strategy, learners, 3)
    assert not run.rounds[0].applied  # the stats round builds the graph and keeps the model
    assert run.rounds[0].bytes_up["A"] < 2000  # a sketch is tiny
    assert run.rounds[1].applied and run.rounds[2].applied
    assert strategy.graph is not None and len(strategy.graph.edges) >= 1  # type: ignore[attr-defined]
    heads = [strategy.params_for(c)["head.weight"] for c in clinics]
    assert not np.array_equal(heads[0], heads[1])
    assert "head.weight" not in strategy.global_params


def _federation(clinics: dict[str, ClinicData]) -> tuple[Strategy, dict[str, PFedNetLearner]]:
    torch.manual_seed(0)
    init = fl_cnn(norm="group")
    learners = {}
    for k, (c, data) in enumerate(clinics.items()):
        model = fl_cnn(norm="group")
        model.load_state_dict(init.state_dict())
        learners[c] = PFedNetLearner(c, model, data, LocalConfig(batch_size=16), k)
    strategy = make_strategy("pfednet", is_personal=is_personal_tensor, lam=1.0, graph_k=1)
    strategy.initialize(to_params(init), list(learners))
    return strategy, learners


def test_pfednet_resumes_from_a_round_checkpoint_with_its_graph_and_personal_parts(
    clinics: dict[str, ClinicData], tmp_path: Path
) -> None:
    straight, learners = _federation(clinics)
    run_federation(straight, learners, 3)

    ckpt = RoundCheckpoint(tmp_path / "p.npz")
    first, learners = _federation(clinics)
    run_federation(first, learners, 2, checkpoint=ckpt)  # the stats round, then one training round
    resumed, learners = _federation(clinics)
    run = run_federation(resumed, learners, 3, checkpoint=ckpt)
    assert [r.applied for r in run.rounds] == [False, True, True]
    for cid in clinics:  # the personal part of every clinic lives at the server and came back
        want, got = straight.params_for(cid), resumed.params_for(cid)
        assert sorted(want) == sorted(got)
        for name, arr in want.items():
            np.testing.assert_array_equal(got[name], arr)
