"""bench/envelope_cost.py on the test bundle: it times the three ways a node can score a batch and reports
each against the probabilities alone (no timing is asserted: the figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.edge_node.conftest import require_test_bundle
from tests.support.bench_script import load_bench_script


def test_the_cost_table_has_the_three_ways_against_the_probabilities_alone(
    shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench_script("envelope_cost")
    bundle = require_test_bundle().bundle
    assert bench.main(["--bundle", str(bundle), "--images", "4", "--repeats", "3", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["rows"]
    assert doc["images"] == 4
    assert list(rows) == ["probabilities only", "embedding part", "embedding and grey-value parts"]
    assert rows["probabilities only"]["ratio"] == 1.0
    assert all(row["us_per_image"] > 0 for row in rows.values())
