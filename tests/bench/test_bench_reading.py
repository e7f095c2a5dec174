"""bench/bench_reading.py: the reading of honest rounds of each strategy, counted by the rule that named.

Real data (PneumoniaMNIST from ``FEDCLINIC_DATA``), at sizes that keep a run to seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.hub.fl.test_update_audit import SIX, round_of, scaled
from tests.support.bench_script import load_bench_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench_script("bench_reading")


def test_each_rule_is_counted_by_the_words_of_its_reason(bench: ModuleType) -> None:
    honest = {k: (u, float(n)) for k, (u, n) in round_of(SIX).items()}
    flipped = {**honest, "A": (scaled(honest["A"][0], -1.0), honest["A"][1])}
    rider = {**honest, "F": (scaled(honest["F"][0], 0.01), 1_000 * honest["F"][1])}
    loud = {**honest, "E": (scaled(honest["E"][0], -10.0), honest["E"][1])}
    reading = bench.read_rounds([honest, flipped, rider, loud, {"A": honest["A"], "B": ({}, 1.0)}])
    assert reading["named"] == {"turns": 1, "too long": 1, "too short": 1, "agrees least": 0}
    assert reading["named_nodes"] == {"A": 1, "F": 1, "E": 1}
    assert reading["rounds"] == 5 and reading["unreadable"] == 1 and reading["node_rounds"] == 4 * 6
    low, high = reading["size_range"]
    assert low < 0.01 and high > 9.0  # the free rider and the loud node


def test_honest_rounds_of_two_strategies_are_read(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "reading.json"
    argv = ["--seeds", "0", "--methods", "fedavg,hsl", "--rounds", "2", "--train-per-clinic", "40"]
    assert bench.main([*argv, "--test", "60", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fedavg", "hsl"]
    for row in rows:
        reading = row["reading"]
        assert reading["rounds"] == 2 and reading["node_rounds"] == 2 * 6 and reading["unreadable"] == 0
        assert 0.0 <= row["small_clinic_auc"] <= 1.0
    with pytest.raises(SystemExit):
        bench.main(["--methods", "fedavg,nope"])
