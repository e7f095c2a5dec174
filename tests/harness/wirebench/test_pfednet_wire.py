"""The benchmark's pFedNet over the wire (a real hub over HTTPS on loopback, six real edge nodes training
with the torch learner on their clinic's images imported as labeled DICOM) is the simulation's rounds, tensor
for tensor, once the two differences the design keeps (one seed for every node, the 8-bit pixels a node
reads) are replayed; the clinics' models come back through ``models from-round --node``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.flbench.datasets import build_bench_data
from harness.flbench.methods import BenchConfig
from harness.wirebench.comparison import Caps, compare_seed
from harness.wirebench.pfednet_wire import round_settings

pytestmark = pytest.mark.slow

#: 32 labeled ultrasound images per clinic (the smallest, F, keeps its 16: over the sketch's minimum of 10).
CAPS = Caps(train_per_clinic=32, test=120, public=32)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["pfednet_rc_cons", "pfednet_bn"])
def test_pfednet_over_the_wire_is_the_replayed_simulation(tmp_path: Path, method: str) -> None:
    """On BatchNorm (``pfednet_bn``) the running statistics stay at the nodes: a ``kept_tensors`` round
    collects them, and each clinic's model is built with its own (``from-round --kept-from --node``)."""
    torch.set_num_threads(1)
    row = compare_seed(3, BenchConfig(rounds=1), tmp_path, caps=CAPS, method=method, task="breast")
    # Bit for bit: every clinic's model as the hub makes it for that clinic, and the published model.
    assert row.tensor_gap["uint8"] == {"clinic_models": 0.0, "published": 0.0}, row.tensor_gap
    for key, pair in row.metrics().items():
        assert math.isfinite(pair["sim"]) and math.isfinite(pair["wire"]), key
    wire_clinics = row.wire["clinics"]
    assert sorted(wire_clinics) == list("ABCDEF")
    # The sketch round is reported apart: label counts and a 4 × 4 mean image, not a model.
    stats = row.wire["stats_bytes_per_client_round"]
    assert sorted(stats) == list("ABCDEF") and all(0 < b < 2_000 for b in stats.values()), stats
    trained = row.wire["bytes_per_client_round"]
    assert all(b > 50 * stats[c] for c, b in trained.items()), (trained, stats)


def test_round_settings_are_the_methods() -> None:
    data = build_bench_data("breast", "combined", 0, max_train_per_clinic=16, max_test=16, public_size=16)
    cfg = BenchConfig()
    settings = round_settings("pfednet_rc_cons", data, cfg, 7)
    assert settings["client.consistency"] == cfg.consistency and settings["client.randconv"] is True
    assert settings["client.seed"] == 700 and settings["lam"] == cfg.pfednet_lam
    assert settings["graph_keys"] == "label_counts,feature_mean"
    assert "client.randconv" not in round_settings("pfednet", data, cfg, 7)
    assert settings["client.model.norm"] == "group" and "local" not in settings
    batch = round_settings("pfednet_bn_cons", data, cfg, 7)
    assert batch["client.model.norm"] == "batch" and batch["local"] == "norm_buffers"
    assert batch["client.consistency"] == cfg.consistency
    with pytest.raises(ValueError, match="does not run over the wire"):
        round_settings("pfednet_bnstats", data, cfg, 7)
