"""bench/bench_scanner_ceiling.py: the own-scanner references and the worst-clinic headroom over them.

Real data (BreastMNIST from ``FEDCLINIC_DATA``), capped so that a run takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from harness.flbench.datasets import build_bench_data, unit_images
from harness.flbench.methods import BenchConfig
from hub.data.medmnist import load_medmnist
from tests.support.bench_script import load_bench_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench_script("bench_scanner_ceiling")


def test_each_clinic_records_which_train_images_it_holds() -> None:
    data = build_bench_data("breast", "combined", 3, max_train_per_clinic=24, max_test=40, public_size=16)
    train = load_medmnist("breastmnist", "train")
    held = np.concatenate([data.train_index[c] for c in data.names])
    assert len(np.unique(held)) == len(held)  # no image at two clinics
    for c in data.names:
        idx = data.train_index[c]
        assert len(idx) == data.clinics[c].n_train
        assert np.array_equal(train.labels[idx].reshape(-1), data.clinics[c].train_y.numpy())
    # The unprofiled images behind the largest clinic correlate with what it trains on, its scanner applied.
    a = data.clinics["A"].train_x.numpy().reshape(len(data.train_index["A"]), -1)
    raw = unit_images(train.images[data.train_index["A"]]).reshape(len(a), -1)
    other = unit_images(train.images[data.train_index["B"][: len(a)]]).reshape(-1, raw.shape[1])
    same = np.mean([np.corrcoef(a[i], raw[i])[0, 1] for i in range(len(other))])
    shifted = np.mean([np.corrcoef(a[i], other[i])[0, 1] for i in range(len(other))])
    assert same > 0.9 > shifted


def test_the_reference_learns_the_clinics_task_through_its_scanner(bench: ModuleType) -> None:
    data = build_bench_data("breast", "combined", 3, max_train_per_clinic=80, max_test=80, public_size=16)
    auc = bench.own_scanner_reference(data, 0, BenchConfig(rounds=4))
    assert 0.5 < auc <= 1.0


def test_summary_bounds_the_worst_clinic_by_the_lowest_reference(bench: ModuleType) -> None:
    runs = {
        1: {
            "clinics": ["A", "B"],
            "fedavg_aug": {"A": 0.80, "B": 0.70},
            "ours": {"A": 0.90, "B": 0.72},
            "reference": {"A": 0.85, "B": 0.75},
        },
        2: {
            "clinics": ["A", "B"],
            "fedavg_aug": {"A": 0.60, "B": 0.90},
            "ours": {"A": 0.61, "B": 0.91},
            "reference": {"A": 0.62, "B": 0.95},
        },
    }
    out = bench.summary(runs, ["fedavg_aug", "ours"], "fedavg_aug")
    assert out["worst"]["reference"] == [0.75, 0.62]
    assert out["headroom"] == pytest.approx([0.05, 0.02])
    assert out["seeds_with_room"] == 1
    assert out["above_reference"] == {"fedavg_aug": 0, "ours": 1}
    assert out["clinic_places"] == 4


def test_the_command_writes_its_runs_and_summary(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    argv = ["--task", "breast", "--seeds", "0", "--methods", "fedavg_aug", "--rounds", "2"]
    assert bench.main([*argv, "--train-per-clinic", "40", "--test", "60", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    run = doc["runs"]["0"]
    assert set(run["reference"]) == set(run["fedavg_aug"]) == set(run["clinics"])
    assert doc["summary"]["headroom"] == pytest.approx(
        [min(run["reference"].values()) - min(run["fedavg_aug"].values())]
    )
    with pytest.raises(SystemExit):
        bench.main(["--methods", "central_aug"])  # fedavg_aug is the reference of the headroom
