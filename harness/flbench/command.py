"""`fedclinic-lab bench fl`: the federated simulation of six clinics and an unseen one, every method."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.flbench.benchmark import BenchSpec, parse_methods, report_from_cache, run_benchmark
from harness.flbench.methods import BenchConfig
from harness.flbench.results import Record
from hub.commands.output import FormatOption, OutputFormat, emit

app = typer.Typer(help="Benchmarks of the hub's training code.", no_args_is_help=True)
log = logging.getLogger(__name__)

# The choices are written out (not computed) so that mypy and completion see them; a test checks them
# against TASKS and SKEWS.


class Task(str, enum.Enum):
    """A benchmark task (``harness.flbench.datasets.TASKS``)."""

    pneumonia = "pneumonia"
    breast = "breast"


class Skew(str, enum.Enum):
    """Which heterogeneity the clinics get (``harness.flbench.datasets.SKEWS``)."""

    combined = "combined"
    quantity = "quantity"
    label = "label"
    feature = "feature"
    none = "none"


class RichBenchProgress:
    """One bar for the whole run (method × seed) and one for the rounds of the current method."""

    def __init__(self, progress: Progress, console: Console, total_runs: int) -> None:
        self.progress = progress
        self.console = console
        self.overall: TaskID = progress.add_task("bench fl", total=total_runs)
        self.current: TaskID | None = None

    def start(self, method: str, seed: int, total_rounds: int) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.current = self.progress.add_task(f"{method} seed {seed}", total=total_rounds)

    def advance(self, rnd: int) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=rnd)

    def finish(self, method: str, seed: int, record: Record, cached: bool) -> None:
        self.progress.advance(self.overall)
        tag = " (cached)" if cached else ""
        self.console.log(
            f"{method:<17} seed {seed}{tag}: small4 AUC {record['small4_auc']:.3f}"
            f"  worst {record['worst_auc']:.3f}"
            f"  unseen {record['unseen']['auc']:.3f}  {record['wall_s']:.0f}s"
        )


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise typer.BadParameter("--seeds needs at least one seed")
    return seeds


@app.command("fl")
def fl(
    task: Annotated[Task, typer.Option(help="Benchmark task.")] = Task.pneumonia,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds; each changes partition, noise, init.")
    ] = "0,1,2,3,4",
    methods: Annotated[str, typer.Option(help="'all' or a comma list, e.g. fedavg,hsl,fedhelp.")] = "all",
    rounds: Annotated[
        int, typer.Option(min=1, help="Federated rounds (local/central: rounds × epochs epochs).")
    ] = 12,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    skew: Annotated[Skew, typer.Option(help="Heterogeneity between the clinics.")] = Skew.combined,
    out: Annotated[
        Path, typer.Option(help="Output folder: results.json, results.md, auc.png, cache/.")
    ] = Path("runs/bench-fl"),
    quick: Annotated[
        bool, typer.Option(help="CI mode: seed 0, 2 rounds, capped data; every method.")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Reuse finished (method, seed) results and round checkpoints.")
    ] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 1,
    report_only: Annotated[
        bool, typer.Option(help="Only rebuild results.json/.md/auc.png from finished runs in --out.")
    ] = False,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Federated simulation of six clinics (two hospitals, four small clinics) plus an unseen clinic."""
    try:
        method_names = parse_methods(methods)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    torch.set_num_threads(threads)
    seed_list = _seeds(seeds)
    cfg = BenchConfig(rounds=rounds, local_epochs=local_epochs)
    if quick:
        seed_list = seed_list[:1]
        cfg = BenchConfig(rounds=min(rounds, 2), local_epochs=1, distill_epochs=1, distill_min_steps=0)
    spec = BenchSpec(
        task=task.value, skew=skew.value, seeds=seed_list, methods=method_names, cfg=cfg, quick=quick
    )
    console = Console(stderr=True)
    if report_only:
        try:
            results = report_from_cache(spec, out)
        except FileNotFoundError as exc:
            raise typer.BadParameter(str(exc)) from None
        _report(results, f"bench fl {task.value} ({skew.value}) from {out}", output)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        sink = RichBenchProgress(progress, console, len(seed_list) * len(method_names))
        results = run_benchmark(spec, out, resume=resume, progress=sink)
    _report(results, f"bench fl {task.value} ({skew.value}), seeds {list(seed_list)}", output)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'auc.png'}")


def _report(results: dict[str, Any], title: str, output: OutputFormat) -> None:
    """The summary table, or with ``--format json`` the whole results document on stdout."""
    emit(output, results, lambda console: print_summary(results, title, console))


def print_summary(results: dict[str, Any], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("method", "small4 AUC", "worst AUC", "unseen AUC", "KB/clinic/round"):
        table.add_column(col)
    for name, s in results["methods"].items():
        kb = s.get("mean_bytes_per_client_round")
        table.add_row(
            name,
            f"{s['small4_auc']['mean']:.3f}",
            f"{s['worst_auc']['mean']:.3f}",
            f"{s['unseen']['auc']['mean']:.3f}",
            f"{kb / 1024:.0f}" if kb else "–",
        )
    (console or Console()).print(table)
