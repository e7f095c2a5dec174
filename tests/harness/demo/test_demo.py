"""`fedclinic-lab demo`: it reads results from the PACS and asks the node, as an operator would."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from harness.cli import app
from harness.demo.clinic import table_rows
from harness.demo.command import QUICK
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
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (apt-get install orthanc)")
def test_quick_demo_no_clinic_gets_worse_and_the_small_clinics_improve(
    tmp_path: Path, shared_data: Path
) -> None:
    """Must-show 5, the quick demo as CI runs it (the default: FedHelp rounds of the hospitals with torch,
    then head rounds of the small clinics with the light learner): labels through each node's page, the
    next students swapped in; no clinic's held-out AUC goes down and each small clinic's goes up."""
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), "--quick"])
    assert result.exit_code == 0, result.output
    print(result.output)  # the demo's table in the CI log
    refit, _, outcome = result.output.partition("the federation: each clinic's held-out studies")
    rows = {cells[0]: cells for cells in table_rows(outcome)}
    assert sorted(rows) == ["clinic-C", "clinic-D", "hospital-A", "hospital-B"], result.output
    sizes = {
        line.split(":")[0]: int(line.split(": ")[1].split()[0])
        for line in result.output.splitlines()
        if "studies in its PACS" in line
    }
    for name, (_, role, processed, labels, held_out, before, after, outside, sent, joined) in rows.items():
        assert role == ("hospital" if name.startswith("hospital") else "small clinic")
        # Every study each PACS sent (its own, the held-out ones before and after) came back as an SR.
        assert int(held_out) == QUICK.held_out
        assert int(processed) == sizes[name] + 2 * QUICK.held_out, rows[name]
        # The clinician page took a label for the confirmed share of the clinic's own studies.
        assert int(labels) == math.ceil(QUICK.labeled * sizes[name])
        # The final student's SRs say which held-out images lay outside its input envelope: PneumoniaMNIST
        # test images like its validation images, so few (up to 2 % by chance, a little more on this test
        # split; docs/envelope.md).
        n_outside, of = outside.split(" of ")
        assert int(of) == QUICK.held_out and int(n_outside) <= 0.1 * QUICK.held_out, rows[name]
        # Each node answered every round over the wire; the bytes are those `fedclinic-edge updates` lists.
        assert int(joined) == QUICK.rounds and int(sent.replace(",", "")) > 0
        # Must-show 5: no clinic gets worse, and the small clinics improve.
        assert float(after) >= float(before), rows[name]
        if role == "small clinic":
            assert float(after) > float(before), rows[name]
    # The hospitals' FedHelp rounds made student 1.1.0, the small clinics' head rounds 1.2.0: both signed.
    for version in ("1.1.0", "1.2.0"):
        assert (workdir / "students" / version / "bundle" / "manifest.sig").is_file()
    assert "fedhelp, weights_delta" in result.output and "head_avg, head_delta" in result.output
    # Then the federation refitted 1.2.0's input envelope on the held-out images the four nodes analysed
    # with it (each node's 120; the round's sums and counts only), and every node serves it as 1.2.1.
    parts = {cells[0]: cells for cells in table_rows(refit.split("input envelope of 1.2.1")[-1])}
    assert sorted(parts) == ["embedding", "intensity"], refit[-3000:]
    for _, hub_images, _, federation_images, threshold in parts.values():
        assert int(federation_images) == 4 * QUICK.held_out and float(threshold) > 0
        assert int(hub_images) > 0
    assert (workdir / "bundles" / "pneumonia-1.2.1" / "manifest.sig").is_file()
    assert "all four nodes serve 1.2.1" in result.output
