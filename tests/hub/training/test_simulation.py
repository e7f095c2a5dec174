"""The simulation runner drives real Strategy objects and the real update codec; failures and resume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_node.protocol.tensors import encode_tensors
from hub.fl.compress import TopKCompressor
from hub.fl.registry import make_strategy
from hub.fl.strategy import ClientResult, ClientTask
from hub.models.fl_cnn import fl_cnn
from hub.training.datasets import ClinicData
from hub.training.learners import LocalConfig, SupervisedLearner, to_params
from hub.training.pfednet_train import PFedNetLearner
from hub.training.simulation import FederationRun, RoundCheckpoint, run_federation

CFG = LocalConfig(epochs=1, batch_size=16, augment=True)


def _learners(
    clinics: dict[str, ClinicData], norm: str = "batch"
) -> tuple[dict[str, SupervisedLearner], dict]:
    torch.manual_seed(0)
    init = fl_cnn(norm=norm)  # type: ignore[arg-type]
    learners = {}
    for k, (c, data) in enumerate(clinics.items()):
        model = fl_cnn(norm=norm)  # type: ignore[arg-type]
        model.load_state_dict(init.state_dict())
        learners[c] = SupervisedLearner(c, model, data, CFG, seed=k)
    return learners, to_params(init)


class BrokenLearner(SupervisedLearner):
    def fit(self, task: ClientTask) -> ClientResult:
        raise RuntimeError("disk full")


def test_bytes_per_round_are_the_codec_payload_sizes(clinics: dict[str, ClinicData]) -> None:
    learners, init = _learners(clinics)
    strategy = make_strategy("fedavg")
    strategy.initialize(init, list(learners))
    run = run_federation(strategy, learners, 2)
    assert [r.rnd for r in run.rounds] == [1, 2]
    # A delta has every tensor of the model; its compressed npz (the upload) is at most the raw npz.
    raw = len(encode_tensors(init, compress=False))
    for r in run.rounds:
        assert set(r.bytes_up) == set(clinics)
        for b in r.bytes_up.values():
            assert 1000 < b <= raw
    # And the global model really moved (aggregation was applied).
    assert any(not np.array_equal(strategy.global_params[k], init[k]) for k in init)


def test_a_failing_clinic_becomes_a_client_failure_and_the_round_goes_on(
    clinics: dict[str, ClinicData],
) -> None:
    learners, init = _learners(clinics)
    broken = learners["B"]
    learners["B"] = BrokenLearner("B", broken.model, broken.data, CFG, seed=9)
    strategy = make_strategy("fedavg")
    strategy.initialize(init, list(learners))
    run = run_federation(strategy, learners, 1)
    assert run.rounds[0].applied
    assert "B" not in run.rounds[0].bytes_up
    assert run.rounds[0].failures == ["B: RuntimeError: disk full"]
    assert strategy.history[-1].accepted == ("A", "C")


def test_resume_from_round_checkpoint_matches_an_uninterrupted_run(
    clinics: dict[str, ClinicData], tmp_path: Path
) -> None:
    learners, init = _learners(clinics, norm="group")
    straight = make_strategy("fedprox", mu=0.01)
    straight.initialize(init, list(learners))
    run_federation(straight, learners, 3)

    # Interrupted after round 2 ...
    ckpt = RoundCheckpoint(tmp_path / "fedprox.npz")
    learners, init = _learners(clinics, norm="group")
    first = make_strategy("fedprox", mu=0.01)
    first.initialize(init, list(learners))
    run_federation(first, learners, 2, checkpoint=ckpt)
    # ... a new process builds everything afresh and resumes.
    learners, init = _learners(clinics, norm="group")
    resumed = make_strategy("fedprox", mu=0.01)
    resumed.initialize(init, list(learners))
    seen: list[int] = []
    run = run_federation(resumed, learners, 3, checkpoint=ckpt, on_round=seen.append)
    assert seen == [1, 2, 3]
    assert [r.rnd for r in run.rounds] == [1, 2, 3]
    for name, arr in straight.global_params.items():
        np.testing.assert_array_equal(resumed.global_params[name], arr)


def test_checkpoint_load_is_none_when_nothing_was_saved(tmp_path: Path) -> None:
    assert RoundCheckpoint(tmp_path / "x.npz").load() is None


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_fedbn_keeps_norms_local(clinics: dict[str, ClinicData], norm: str) -> None:
    learners, init = _learners(clinics, norm=norm)
    strategy = make_strategy("fedbn")
    strategy.initialize(init, list(learners))
    run_federation(strategy, learners, 1)
    assert not any(".norm." in k for k in strategy.global_params)
    a, b = to_params(learners["A"].model), to_params(learners["B"].model)
    assert not np.array_equal(a["features.0.norm.weight"], b["features.0.norm.weight"])


def test_topk_compression_runs_end_to_end_and_cuts_the_measured_bytes(
    clinics: dict[str, ClinicData],
) -> None:
    """k < 1 through the node's path: error feedback at the clinic, the codec, decompression at the hub."""
    learners, init = _learners(clinics, norm="group")
    dense = make_strategy("fedavg")
    dense.initialize(init, list(learners))
    dense_run = run_federation(dense, learners, 2)

    learners, init = _learners(clinics, norm="group")
    sparse = make_strategy("fedavg")
    sparse.initialize(init, list(learners))
    sparse_run = run_federation(sparse, learners, 2, compressor=TopKCompressor(0.05))
    dense_b, sparse_b = dense_run.bytes_per_client_round(), sparse_run.bytes_per_client_round()
    for c in clinics:
        # 5 % of the values plus an int32 index each: well under a quarter of the dense upload.
        assert sparse_b[c] < 0.25 * dense_b[c], (c, sparse_b[c], dense_b[c])
    assert not any(r.failures for r in sparse_run.rounds)
    # The hub aggregated decompressed updates: the model moved, but only in the coordinates sent.
    moved = {k: np.count_nonzero(sparse.global_params[k] != init[k]) for k in init}
    total = sum(a.size for a in init.values())
    assert 0 < sum(moved.values()) < 0.5 * total


def test_stats_round_bytes_are_reported_apart(clinics: dict[str, ClinicData]) -> None:
    torch.manual_seed(0)
    init = fl_cnn(norm="group")
    learners = {}
    for k, (c, data) in enumerate(clinics.items()):
        model = fl_cnn(norm="group")
        model.load_state_dict(init.state_dict())
        learners[c] = PFedNetLearner(c, model, data, CFG, seed=k)
    strategy = make_strategy("pfednet", personal="head_norm", graph_k=1)
    strategy.initialize(to_params(init), list(learners))
    seen: list[tuple[int, str, list[str], int]] = []

    def on_results(rnd: int, kind: str, results: Sequence[ClientResult]) -> None:
        # What the strategy is about to aggregate: every clinic's answer, decoded, before aggregation.
        assert strategy.global_params is not None and len(seen) == rnd - 1
        seen.append((rnd, kind, sorted(r.client_id for r in results), sum(r.num_examples for r in results)))

    run = run_federation(strategy, learners, 2, on_results=on_results)  # round 1: stats; round 2: training
    assert [r.kind for r in run.rounds] == ["stats", "weights_delta"]
    images = sum(d.n_train for d in clinics.values())
    assert seen == [(1, "stats", sorted(clinics), images), (2, "weights_delta", sorted(clinics), images)]
    stats, train = run.stats_bytes_per_client_round(), run.bytes_per_client_round()
    for c in clinics:
        assert stats[c] < 2000 < train[c]  # the sketch is tiny; it no longer pulls the training mean down


def _pfednet_run(clinics: dict[str, ClinicData], gamma: float) -> tuple[object, dict, FederationRun]:
    torch.manual_seed(0)
    init = fl_cnn(norm="group")
    learners = {}
    for k, (c, data) in enumerate(clinics.items()):
        model = fl_cnn(norm="group")
        model.load_state_dict(init.state_dict())
        learners[c] = PFedNetLearner(c, model, data, CFG, seed=k)
    strategy = make_strategy("pfednet", personal="head_norm", graph_k=1, differential_gamma=gamma)
    strategy.initialize(to_params(init), list(learners))
    return strategy, learners, run_federation(strategy, learners, 4)  # 1 stats + 3 training rounds


def test_pfednet_differential_sparsity_end_to_end_saves_upload_bytes(clinics: dict[str, ClinicData]) -> None:
    _, _, dense = _pfednet_run(clinics, 0.0)
    strategy, learners, sparse = _pfednet_run(clinics, 1.0)
    assert not any(r.failures for r in sparse.rounds)
    # Round 2 sends the shared part whole (nothing to differ from yet); rounds 3–4 send only big changes.
    # (A clinic that takes one Adam step a round, like C, changes every group about equally: it saves little.)
    for rnd in (3, 4):
        sent, full = sparse.rounds[rnd - 1].bytes_up, dense.rounds[rnd - 1].bytes_up
        assert all(sent[c] <= full[c] for c in clinics), (rnd, sent, full)
        assert sum(sent.values()) < 0.8 * sum(full.values()), (rnd, sent, full)
    # The hub holds for each clinic exactly what that clinic holds (both sides of the sparse channel).
    for c, learner in learners.items():
        held = strategy._assembler.reference[c]  # type: ignore[attr-defined]
        assert learner.sparsifier is not None and learner.sparsifier.last.groups_zeroed > 0
        for name, arr in learner.sparsifier.reference.items():
            np.testing.assert_allclose(held[name], arr, atol=1e-6)
