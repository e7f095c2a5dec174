"""pFedNet learner: the stats sketch answers the graph round; personal parts stay per clinic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_node.protocol.sketch import feature_mean
from edge_node.protocol.updates import UpdateKind
from hub.fl.errors import StrategyConfigError
from hub.fl.registry import make_strategy
from hub.fl.strategy import ClientTask, Config, Strategy
from hub.models.fl_cnn import fl_cnn
from hub.training.datasets import ClinicData
from hub.training.learners import LocalConfig, to_params
from hub.training.pfednet_train import PFedNetLearner, sketch
from hub.training.simulation import RoundCheckpoint, run_federation


def test_sketch_is_label_counts_and_a_coarse_mean_image() -> None:
    x = np.zeros((4, 1, 28, 28), dtype=np.float32)
    x[:, :, :14, :] = 1.0  # top half bright
    s = sketch(x, np.array([0, 1, 1, 1]))
    np.testing.assert_array_equal(s["label_counts"], [1, 3])
    assert s["feature_mean"].shape == (16,)
    np.testing.assert_allclose(s["feature_mean"][:8], 1.0)
    np.testing.assert_allclose(s["feature_mean"][8:], 0.0)


@pytest.mark.parametrize(("channels", "height", "width"), [(1, 28, 28), (1, 30, 27), (3, 9, 13), (1, 4, 4)])
def test_the_sketch_pools_as_torch_does(channels: int, height: int, width: int) -> None:
    """The node's numpy sketch (edge_node.protocol.sketch) is torch's adaptive average pooling of the mean
    image, also where the regions do not divide the image."""
    rng = np.random.default_rng(channels * height + width)
    x = rng.random((7, channels, height, width), dtype=np.float32)
    want = F.adaptive_avg_pool2d(torch.from_numpy(x).double().mean(dim=0, keepdim=True), 4).reshape(-1)
    got = feature_mean(x)
    assert got.dtype == np.float32 and got.shape == (channels * 16,)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_a_differentially_sparse_task_must_name_its_personal_part(clinics: dict[str, ClinicData]) -> None:
    """The clinic leaves out of its sparse change exactly the part the hub keeps per clinic."""
    torch.manual_seed(0)
    data = next(iter(clinics.values()))
    params = to_params(fl_cnn(norm="group"))
    for personal, whole, shared in (
        ("head", "head.weight", "features.0.norm.weight"),
        ("head_norm", "features.0.norm.weight", "features.0.conv.weight"),
    ):
        model = fl_cnn(norm="group")
        learner = PFedNetLearner("A", model, data, LocalConfig(batch_size=16), 0)
        config: Config = {"differential_gamma": 1.0, "personal": personal}
        update = learner.fit(ClientTask("A", 1, UpdateKind.WEIGHTS_DELTA, params, config)).update
        assert learner.sparsifier is not None
        assert whole not in learner.sparsifier.reference and shared in learner.sparsifier.reference
        assert "head.bias" not in learner.sparsifier.reference
        assert np.abs(update[whole]).max() > 0
    with pytest.raises(StrategyConfigError, match="personal part"):
        learner.fit(ClientTask("A", 2, UpdateKind.WEIGHTS_DELTA, params, {"differential_gamma": 1.0}))


def test_pfednet_stats_round_then_training_rounds(clinics: dict[str, ClinicData]) -> None:
    torch.manual_seed(0)
    init = fl_cnn(norm="group")
    learners = {}
    for k, (c, data) in enumerate(clinics.items()):
        model = fl_cnn(norm="group")
        model.load_state_dict(init.state_dict())
        learners[c] = PFedNetLearner(c, model, data, LocalConfig(batch_size=16), k)
    strategy = make_strategy(
        "pfednet", personal="head_norm", lam=1.0, eta=0.01, mean_gradient=False, graph_k=1,
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
    strategy = make_strategy("pfednet", personal="head_norm", lam=1.0, graph_k=1)
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
