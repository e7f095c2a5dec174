"""`fedclinic-lab demo`: a hub and four clinics as separate processes, from the first model to the table."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from harness.demo.cohort import DATASET, build_cohort
from harness.demo.federation import ClinicOutcome, Federation, running_federation
from harness.demo.student import train_public_student
from hub.commands.export_bundle import build_bundle


@dataclass(frozen=True)
class DemoSize:
    """How much data flows: hospitals' studies are capped so that the PACS traffic fits the time budget."""

    max_studies: int  # per hospital (the small clinics send all theirs: tens)
    held_out: int  # per clinic, sent before and after the rounds
    student_epochs: int
    rounds: int


FULL = DemoSize(max_studies=200, held_out=200, student_epochs=12, rounds=3)
QUICK = DemoSize(max_studies=40, held_out=60, student_epochs=6, rounds=1)


def _auc(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def outcome_table(outcomes: Sequence[ClinicOutcome]) -> Table:
    table = Table(title="the federation: each clinic's held-out studies through its PACS, before and after")
    columns = (
        "clinic",
        "role",
        "studies processed",
        "held-out",
        "AUC before",
        "AUC after",
        "update bytes sent",
        "rounds joined",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("clinic", "role") else "right")
    for o in outcomes:
        table.add_row(
            o.site.name,
            "hospital" if o.site.hospital else "small clinic",
            str(o.studies_processed),
            str(len(o.before)),
            _auc(o.auc_before),
            _auc(o.auc_after),
            f"{o.update_bytes:,}",
            str(o.rounds_joined),
        )
    return table


def _collect_updates(fed: Federation, outcomes: dict[str, ClinicOutcome]) -> None:
    processed = fed.processed()
    for name, rows in fed.updates().items():
        sent = [r for r in rows if r["state"] == "sent"]
        outcomes[name].update_bytes = sum(int(r["payload_bytes"]) for r in sent)
        outcomes[name].rounds_joined = len({r["round"] for r in sent})
        outcomes[name].studies_processed = processed[name]


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Scratch folder; wiped at the start.")] = Path(
        "build/demo"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="Fewer studies and epochs (CI).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Partition, profiles and training seed.")] = 0,
) -> None:
    """A hub and four clinic nodes with their own Orthanc PACS, as separate processes on this machine.

    Hub up (HTTPS, SQLite) → clinics enroll with join codes → the first student, trained at the hub on public
    data only, is published → every node pulls and verifies it → each PACS sends its studies and gets SRs back
    → held-out studies measure each clinic's AUC → federated rounds over the wire → the table.
    """
    size = QUICK if quick else FULL
    torch.set_num_threads(1)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Piped into a log (CI, `make demo | tee`), rich would wrap the tables at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    started = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    workdir = workdir.resolve()

    console.print(
        Rule("0. data: two hospitals and two small clinics, partitioned and profiled as in bench fl")
    )
    cohort = build_cohort(seed, max_studies=size.max_studies, held_out=size.held_out)
    for site in cohort.sites:
        console.print(
            f"{site.name}: {len(site.studies)} studies in its PACS "
            f"({int(site.study_labels.sum())} pneumonia), {len(site.held_out)} held-out"
        )

    with running_federation(workdir / "federation", cohort.sites, on_step=console.print) as fed:
        console.print(Rule(f"1. hub: the first student, trained on public data only ({DATASET} val split)"))
        checkpoint = train_public_student(
            cohort.public_images,
            cohort.public_labels,
            workdir / "runs" / "student-1",
            dataset=DATASET,
            epochs=size.student_epochs,
            seed=seed,
            console=console,
        )
        bundle = workdir / "bundles" / "pneumonia-1.0.0"
        report = build_bundle(
            checkpoint, fed.hub.data_dir / "keys" / "hub.key", bundle, model_version="1.0.0", int8=False
        )
        console.print(f"signed bundle, ONNX parity max |diff| {report.parity.max_abs_diff:.1e}")

        console.print(Rule("2. hub: fedclinic-hub models publish; every node pulls, verifies and serves it"))
        fed.hub.publish(bundle)
        with console.status("waiting for the four nodes to serve 1.0.0"):
            fed.wait_all_serving("1.0.0")
        console.print("all four nodes serve 1.0.0 (fedclinic-edge status)")

        outcomes = {s.name: ClinicOutcome(s) for s in cohort.sites}
        console.print(
            Rule("3. clinics: each PACS sends its studies, then its held-out studies; SRs come back")
        )
        with console.status("PACS → node → SR back in the PACS, four clinics at once"):
            for name, sent in fed.send("own", workdir / "studies").items():
                outcomes[name].own = sent
            for name, sent in fed.send("held-out", workdir / "studies").items():
                outcomes[name].before = sent
        for o in outcomes.values():
            console.print(f"{o.site.name}: held-out AUC with 1.0.0 {_auc(o.auc_before)}")

        console.print(Rule(f"4. hub: {size.rounds} round(s) over the wire"))
        for r in range(size.rounds):
            started_round = fed.hub.start_round(
                "stats", "--config", "num_classes=2", "-k", str(len(cohort.sites)), "--deadline", "120"
            )
            done = fed.hub.wait_round(started_round["round_id"], timeout=180)
            console.print(
                f"round {r + 1} ({done['strategy']}): {done['state']}, "
                f"{done['accepted']} of {len(done['nodes'])} updates accepted"
            )
        _collect_updates(fed, outcomes)

    console.print(outcome_table(list(outcomes.values())))
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {workdir}")
