"""`fedclinic-lab demo`: the whole product on real data, from training to results in the clinics' PACS."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.rule import Rule

from export.signing import create_keypair
from harness.demo.clinic import BundleFiles
from harness.demo.run import DATASET, deploy_and_run, results_table, skipped_lines
from harness.flbench.benchmark import BenchSpec, run_benchmark
from harness.flbench.command import RichBenchProgress, print_summary
from harness.flbench.methods import BenchConfig
from hub.commands.export_bundle import build_bundle
from hub.training.supervised import TrainConfig, train_supervised

#: The federation the demo simulates: every strategy on the same six clinics, one seed, a short budget.
DEMO_METHODS = ("local", "central", "fedavg", "fedbn", "hsl", "fedhelp", "pfednet")


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Scratch folder; wiped at the start.")] = Path(
        "build/demo"
    ),
    clinics: Annotated[
        int, typer.Option("--clinics", min=1, max=6, help="Clinic nodes, each with its PACS.")
    ] = 3,
    studies: Annotated[int, typer.Option("--studies", min=2, help="CR studies each PACS sends.")] = 12,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Student training epochs.")] = 8,
    rounds: Annotated[
        int, typer.Option("--rounds", min=0, help="Federated rounds (0 skips the federation).")
    ] = 4,
) -> None:
    """Train and sign a student, deploy it to clinic nodes with their own Orthanc PACS, show the results."""
    torch.set_num_threads(1)
    # The demo talks to Orthanc's REST API many times a second; its request log is noise here.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Piped into a log (CI, `make demo | tee`), rich would wrap the tables at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 140)
    started = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    if rounds:
        console.print(
            Rule("0. federation: six clinics (two hospitals, four small clinics) + an unseen clinic")
        )
        spec = BenchSpec(
            task="pneumonia",
            seeds=(0,),
            methods=DEMO_METHODS,
            cfg=BenchConfig(rounds=rounds, distill_epochs=2, distill_min_steps=0),
        )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            sink = RichBenchProgress(progress, console, len(DEMO_METHODS))
            results = run_benchmark(spec, workdir / "federation", progress=sink)
        print_summary(
            results, f"federated strategies on PneumoniaMNIST, combined skew, {rounds} rounds", console
        )

    console.print(Rule("1. hub: signing keys"))
    private_key, public_key = create_keypair(workdir / "keys")
    console.print(f"hub key pair in {private_key.parent} (clinics trust only {public_key.name})")

    console.print(Rule(f"2. hub: train the student on {DATASET}"))
    run = train_supervised(
        TrainConfig(model="student_cnn_s", dataset=DATASET, epochs=epochs),
        workdir / "runs" / "student",
        console=console,
    )

    console.print(Rule("3. hub: export a signed bundle (ONNX parity-checked, int8 gated on AUC)"))
    bundle_dir = workdir / "bundles" / "pneumonia-1.0.0"
    report = build_bundle(run.best_path, private_key, bundle_dir, model_version="1.0.0")
    console.print(
        f"parity max |diff| {report.parity.max_abs_diff:.1e}; test AUC fp32 {report.fp32_auc:.4f}; "
        f"shipped: {', '.join(report.shipped)}"
    )

    console.print(Rule(f"4. clinics: {clinics} edge nodes, each with its own Orthanc PACS"))
    reports = deploy_and_run(
        BundleFiles(bundle_dir, public_key),
        workdir / "clinics",
        clinics=clinics,
        studies_per_clinic=studies,
        console=console,
    )
    console.print(results_table(reports))
    for line in skipped_lines(reports):
        console.print(line)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {workdir}")
