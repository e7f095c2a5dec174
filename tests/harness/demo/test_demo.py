"""`fedclinic-lab demo`: it reads results from the PACS and asks the node, as an operator would."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from harness.cli import app
from harness.demo.clinic import table_rows
from harness.demo.orthanc import orthanc_available


def test_table_rows_reads_the_body_of_a_rich_table_as_the_node_prints_it() -> None:
    table = Table(title="recent studies (last 5)")
    for column in ("study", "state", "finding"):
        table.add_column(column)
    table.add_row("a1b2c3", "done", "pneumonia")
    table.add_row("d4e5f6", "skipped", "modality CT is not one the model takes")
    out = io.StringIO()
    Console(file=out, width=200).print("totals: done 1, skipped 1", table)
    assert table_rows(out.getvalue()) == [
        ["a1b2c3", "done", "pneumonia"],
        ["d4e5f6", "skipped", "modality CT is not one the model takes"],
    ]
    assert table_rows("no table here\n") == []


@pytest.mark.slow
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (apt-get install orthanc)")
def test_demo_trains_exports_deploys_and_reports_from_pacs_and_node_status(
    tmp_path: Path, shared_data: Path
) -> None:
    workdir = tmp_path / "demo"
    args = ["demo", "--workdir", str(workdir), "--clinics", "1", "--studies", "2", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--rounds", "0"])
    assert result.exit_code == 0, result.output
    assert (workdir / "bundles" / "pneumonia-1.0.0" / "manifest.sig").is_file()
    # Two CR studies came back as SR and SC in the clinic's Orthanc; the CT study was skipped by the node,
    # whose reason the demo read from `fedclinic-edge status`, not from the node's database.
    (row,) = [cells for cells in table_rows(result.output) if cells[0] == "clinic-A"]
    assert row[1:5] == ["2", "2", "2", "1"], row  # studies, SR in PACS, SC in PACS, skipped
    (skip,) = [line for line in result.output.splitlines() if "clinic-A skipped a study:" in line]
    assert "skipped" in skip.split(":", 1)[1] and "CT" in skip, skip
