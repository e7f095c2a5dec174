"""FedHelp learners through the real strategy: only the small model travels; large models stay private."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub.fl.registry import make_strategy
from hub.models.fedhelp_nets import fedhelp_large, fedhelp_small
from hub.training.datasets import ClinicData
from hub.training.fedhelp_train import FedHelpLargeLearner, FedHelpSmallLearner
from hub.training.foundation import stored_soft_labels
from hub.training.learners import LocalConfig, to_params
from hub.training.simulation import RoundCheckpoint, run_federation


class FixedSoftLabels:
    def __init__(self) -> None:
        self.calls = 0

    def soft_labels(self, images01: torch.Tensor) -> np.ndarray:
        self.calls += 1
        p = images01.mean(dim=(1, 2, 3)).numpy()
        return np.stack([1 - p, p], axis=1).astype(np.float32)


def test_soft_labels_are_computed_once_and_stored(tmp_path: Path) -> None:
    x, y = torch.rand(8, 1, 28, 28), torch.tensor([0.0, 1.0] * 4)
    provider = FixedSoftLabels()
    first = stored_soft_labels(tmp_path / "fm.npz", x, y, provider)
    again = stored_soft_labels(tmp_path / "fm.npz", x, y, provider)
    assert provider.calls == 1
    np.testing.assert_array_equal(first, again)
    stored_soft_labels(tmp_path / "fm.npz", x * 0.5, y, provider)  # another public set: recomputed
    assert provider.calls == 2


def test_fedhelp_round_uploads_only_the_small_model(clinics: dict[str, ClinicData]) -> None:
    torch.manual_seed(0)
    public_x = torch.rand(20, 1, 28, 28)
    soft = torch.from_numpy(FixedSoftLabels().soft_labels(public_x))
    init = fedhelp_small()
    learners: dict[str, FedHelpLargeLearner | FedHelpSmallLearner] = {}
    cfg = LocalConfig(batch_size=16, augment=True)
    for k, (c, data) in enumerate(clinics.items()):
        small = fedhelp_small()
        small.load_state_dict(init.state_dict())
        if c == "A":
            learners[c] = FedHelpLargeLearner(c, small, fedhelp_large(), data, cfg, k)
        else:
            learners[c] = FedHelpSmallLearner(c, small, data, public_x, soft, cfg, k)
    large_before = to_params(learners["A"].large)  # type: ignore[union-attr]
    strategy = make_strategy("fedhelp", large_clients=["A"])
    strategy.initialize(to_params(init), list(learners))
    tasks = strategy.configure_round(1, list(learners))
    assert {t.client_id: t.config["role"] for t in tasks} == {"A": "large", "B": "small", "C": "small"}
    assert not any(n.startswith("public_head") for n in tasks[0].params)
    run = run_federation(strategy, learners, 1)
    assert run.rounds[0].applied and not run.rounds[0].failures
    small_bytes = sum(a.nbytes for n, a in to_params(init).items() if not n.startswith("public_head"))
    assert run.rounds[0].bytes_up["A"] <= small_bytes + 4096  # the proxy, never the large model
    large_after = to_params(learners["A"].large)  # type: ignore[union-attr]
    assert any(not np.array_equal(large_after[k], large_before[k]) for k in large_before)  # it trained
    assert sum(a.size for a in large_after.values()) > 2 * sum(a.size for a in to_params(init).values())


def test_fedhelp_resumes_exactly_from_a_round_checkpoint(
    clinics: dict[str, ClinicData], tmp_path: Path
) -> None:
    public_x = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    soft = torch.from_numpy(FixedSoftLabels().soft_labels(public_x))
    cfg = LocalConfig(batch_size=16, augment=True)

    def build() -> tuple[dict[str, Any], Any]:
        torch.manual_seed(0)
        init, large, small = fedhelp_small(), fedhelp_large(), fedhelp_small()
        small.load_state_dict(init.state_dict())
        learners: dict[str, Any] = {
            "A": FedHelpLargeLearner("A", init, large, clinics["A"], cfg, 0),
            "B": FedHelpSmallLearner("B", small, clinics["B"], public_x, soft, cfg, 1),
        }
        strategy = make_strategy("fedhelp", large_clients=["A"])
        strategy.initialize(to_params(small), list(learners))
        return learners, strategy

    straight, s_straight = build()
    run_federation(s_straight, straight, 3)
    ckpt = RoundCheckpoint(tmp_path / "fedhelp.npz")
    first, s_first = build()
    run_federation(s_first, first, 2, checkpoint=ckpt)
    resumed, s_resumed = build()
    run_federation(s_resumed, resumed, 3, checkpoint=ckpt)
    for name, arr in s_straight.global_params.items():
        np.testing.assert_array_equal(s_resumed.global_params[name], arr)
    for name, arr in to_params(straight["A"].large).items():
        np.testing.assert_array_equal(to_params(resumed["A"].large)[name], arr)
