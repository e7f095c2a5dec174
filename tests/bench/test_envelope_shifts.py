"""bench/envelope_shifts.py on the test bundle: images like the validation set stay inside its envelope,
heavily altered ones fall outside, and a bundle without an envelope is refused with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from edge_node.protocol.manifest import MANIFEST_FILE
from tests.edge_node.conftest import require_test_bundle
from tests.support.bench_script import load_bench_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench_script("envelope_shifts")


def test_the_shifts_fall_outside_and_the_test_split_does_not(
    bench: ModuleType, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = require_test_bundle().bundle
    assert bench.main(["--bundle", str(bundle), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["outside"]
    outside = {name: row["either (the node)"] for name, row in rows.items()}
    assert outside["unchanged"] < 0.05  # about 1-2 % by chance (the test split is a little unlike val)
    assert outside["Gaussian noise, sd 25 grey levels"] > 0.9
    assert outside["BreastMNIST test images"] > 0.3
    assert all(outside[name] > outside["unchanged"] for name in outside if name != "unchanged")
    for row in rows.values():  # either part counts, and only images outside the grey-value part look negative
        assert row["either (the node)"] >= max(row["embedding"], row["grey values"])
        assert row["look negative"] <= row["grey values"]
    assert rows["inverted"]["look negative"] > 10 * rows["unchanged"]["look negative"]


def test_a_bundle_without_an_envelope_is_refused(bench: ModuleType, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(require_test_bundle().bundle, bundle)
    doc = json.loads((bundle / MANIFEST_FILE).read_bytes())
    doc.pop("envelope")
    (bundle / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(SystemExit):
        bench.main(["--bundle", str(bundle)])
