"""`fedclinic-lab bench fl`: the federated simulation of a clinics file and unseen clinics, every method."""

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
from harness.flbench.methods import PFEDNET_GRAPHS, PFEDNET_PERSONAL, BenchConfig
from harness.flbench.results import Record
from harness.flbench.setting import DEFAULT_PANEL, DEFAULT_SETTING, load_panel, load_setting
from hub.commands.output import FormatOption, OutputFormat, emit

app = typer.Typer(help="Benchmarks of the hub's training code.", no_args_is_help=True)
log = logging.getLogger(__name__)

# The choices are written out (not computed) so that mypy and completion see them; a test checks them
# against TASKS and SKEWS.


class Task(str, enum.Enum):
    """A benchmark task (``harness.flbench.datasets.TASKS``)."""

    pneumonia = "pneumonia"
    breast = "breast"
    retina = "retina"


class Skew(str, enum.Enum):
    """Which heterogeneity the clinics get (``harness.flbench.datasets.SKEWS``)."""

    combined = "combined"
    quantity = "quantity"
    label = "label"
    feature = "feature"
    none = "none"


class RoundChoice(str, enum.Enum):
    """What chooses the round a one-model method keeps: every validation image through each clinic's
    scanner, or each clinic's own validation images (the runs before session 28)."""

    whole = "whole"
    own = "own"


class Track(str, enum.Enum):
    """Augmentation track: the same augmentation for every method, none for any, or both runs."""

    aug = "aug"
    none = "none"
    both = "both"


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
            f"{method:<17} seed {seed}{tag}: small AUC {record['small_auc']:.3f}"
            f"  worst {record['worst_auc']:.3f}"
            f"  unseen {record['unseen']['auc']:.3f}  {record['steps']} steps  {record['wall_s']:.0f}s"
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
    clinics: Annotated[
        Path, typer.Option(help="Clinics file (TOML): sizes, label skews, acquisition profiles.")
    ] = DEFAULT_SETTING,
    profiles: Annotated[
        Path, typer.Option(help="Unseen-clinic panel (TOML [profile.<name>] tables) scored by every method.")
    ] = DEFAULT_PANEL,
    topk: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Top-k uplink fraction kept (federated methods)."),
    ] = 1.0,
    pfednet_gamma: Annotated[
        float, typer.Option(min=0.0, help="pFedNet differentially sparse upload γ (0 = off).")
    ] = 0.0,
    pfednet_lam: Annotated[
        float, typer.Option(min=0.0, help="pFedNet graph-fusion λ (pfednet_nograph is λ = 0).")
    ] = 10.0,
    pfednet_personal: Annotated[
        str,
        typer.Option(
            help="pFedNet personal part: head_norm (head + norm affines), first_block, last_block or head."
        ),
    ] = "head_norm",
    pfednet_graph: Annotated[
        str, typer.Option(help="pFedNet graph sketches: labels+features or features (mean image only).")
    ] = "labels+features",
    fedhelp_kd_weight: Annotated[
        float, typer.Option(min=0.0, help="FedHelp large→proxy KD weight (the full soft labels).")
    ] = 1.0,
    fedhelp_kl_weight: Annotated[
        float, typer.Option(min=0.0, help="FedHelp proxy→large KL weight (the weak direction).")
    ] = 0.1,
    fedhelp_rank_weight: Annotated[
        float, typer.Option(min=0.0, help="FedHelp proxy→large ranking-hinge weight.")
    ] = 0.2,
    fedhelp_fm_weight: Annotated[
        float, typer.Option(min=0.0, help="FedHelp small clinics' foundation-head KD weight.")
    ] = 1.0,
    distill: Annotated[
        bool, typer.Option(help="fedhelp also distils the hub student (--no-distill saves CPU).")
    ] = True,
    hsl_anchor_weight: Annotated[
        float, typer.Option(min=0.0, help="HSL's shared-anchor loss weight (the primary task keeps 0.5).")
    ] = 0.5,
    consistency: Annotated[
        float, typer.Option(min=0.0, help="Weight of the agreement across augmented views (*_cons methods).")
    ] = 12.0,
    ditto_lam: Annotated[
        float, typer.Option(min=0.0, help="Ditto's pull of each personal model toward the global one (λ).")
    ] = 100.0,
    ditto_lr: Annotated[
        float, typer.Option(min=1e-9, help="Ditto's SGD step on each personal model (η).")
    ] = 0.01,
    sam_rho: Annotated[
        float, typer.Option(min=0.0, help="SAM's radius ρ at every clinic of the *_sam methods.")
    ] = 0.02,
    round_choice: Annotated[
        RoundChoice,
        typer.Option(
            help="The kept round of one-model methods, chosen on the whole validation split through each "
            "clinic's scanner, or on each clinic's own validation images (runs before session 28)."
        ),
    ] = RoundChoice.whole,
    track: Annotated[
        Track, typer.Option(help="aug: every method augments; none: no method does; both: two runs.")
    ] = Track.aug,
    report_only: Annotated[
        bool, typer.Option(help="Only rebuild results.json/.md/auc.png from finished runs in --out.")
    ] = False,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Federated simulation of the clinics file's clinics plus the unseen clinic and the unseen panel.

    Thresholds and the best-strategy choice use each clinic's validation split; the test split is read once.
    With ``--track both`` the two tracks go to OUT/track-aug and OUT/track-none.
    """
    if pfednet_personal not in PFEDNET_PERSONAL:
        raise typer.BadParameter(f"--pfednet-personal: choose from {', '.join(PFEDNET_PERSONAL)}")
    if pfednet_graph not in PFEDNET_GRAPHS:
        raise typer.BadParameter(f"--pfednet-graph: choose from {', '.join(PFEDNET_GRAPHS)}")
    try:
        method_names = parse_methods(methods)
        load_setting(clinics)
        load_panel(profiles)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    torch.set_num_threads(threads)
    seed_list = _seeds(seeds)
    if quick:
        seed_list = seed_list[:1]
    tracks = {"aug": [True], "none": [False], "both": [True, False]}[track.value]
    console = Console(stderr=True)
    done: dict[str, tuple[dict[str, Any], str]] = {}
    for augment in tracks:
        if topk <= 0.0:
            raise typer.BadParameter("--topk must be above 0 (1 sends every value)")
        weights: dict[str, Any] = {
            "fedhelp_kd_weight": fedhelp_kd_weight,
            "fedhelp_kl_weight": fedhelp_kl_weight,
            "fedhelp_rank_weight": fedhelp_rank_weight,
            "fedhelp_fm_weight": fedhelp_fm_weight,
            "hsl_anchor_weight": hsl_anchor_weight,
            "pfednet_lam": pfednet_lam,
            "pfednet_personal": pfednet_personal,
            "pfednet_graph": pfednet_graph,
            "fedhelp_distill": distill,
            "consistency": consistency,
            "ditto_lam": ditto_lam,
            "ditto_lr": ditto_lr,
            "sam_rho": sam_rho,
            "round_choice": round_choice.value,
        }
        cfg = BenchConfig(
            rounds=rounds, local_epochs=local_epochs, augment=augment, topk=topk, pfednet_gamma=pfednet_gamma,
            **weights,
        )  # fmt: skip
        if quick:
            cfg = BenchConfig(
                rounds=min(rounds, 2), local_epochs=1, distill_epochs=1, distill_min_steps=0, augment=augment,
                topk=topk, pfednet_gamma=pfednet_gamma, fedhelp_foundation_max_train=256,
                fedhelp_foundation_epochs=1, **weights,
            )  # fmt: skip
        spec = BenchSpec(
            task=task.value, skew=skew.value, seeds=seed_list, methods=method_names, cfg=cfg, quick=quick,
            clinics_file=clinics, panel_file=profiles,
        )  # fmt: skip
        where = out / f"track-{spec.track}" if len(tracks) > 1 else out
        title = f"bench fl {task.value} ({skew.value}, track {spec.track})"
        if report_only:
            try:
                done[spec.track] = report_from_cache(spec, where), f"{title} from {where}"
            except FileNotFoundError as exc:
                raise typer.BadParameter(str(exc)) from None
            continue
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            sink = RichBenchProgress(progress, console, len(seed_list) * len(method_names))
            results = run_benchmark(spec, where, resume=resume, progress=sink)
        done[spec.track] = results, f"{title}, seeds {list(seed_list)}"
        console.print(f"wrote {where / 'results.json'}, {where / 'results.md'}, {where / 'auc.png'}")
    # One JSON document whatever the tracks: a run's results, or {"tracks": {name: results}} for both.
    payload = (
        next(iter(done.values()))[0] if len(done) == 1 else {"tracks": {k: r for k, (r, _) in done.items()}}
    )

    def draw(console: Console) -> None:
        for results, title in done.values():
            print_summary(results, title, console)

    emit(output, payload, draw)


def print_summary(results: dict[str, Any], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    cols = (
        "method",
        "small AUC",
        "worst AUC",
        "unseen AUC",
        "panel AUC",
        "KB/clinic/round",
        "steps",
        "wall s",
    )
    for col in cols:
        table.add_column(col)
    for name, s in results["methods"].items():
        kb = s.get("mean_bytes_per_client_round")
        panel = s.get("panel_auc")
        table.add_row(
            name,
            f"{s['small_auc']['mean']:.3f}",
            f"{s['worst_auc']['mean']:.3f}",
            f"{s['unseen']['auc']['mean']:.3f}",
            f"{panel['mean']:.3f}" if panel else "–",
            f"{kb / 1024:.0f}" if kb else "–",
            f"{s['steps']['mean']:.0f}",
            f"{s['wall_s']['mean']:.0f}",
        )
    (console or Console()).print(table)
