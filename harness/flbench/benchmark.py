"""`bench fl` orchestration: seeds × methods, cached per (method, seed), round checkpoints, final reports."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_node.protocol.durable_file import write_text_durably
from harness.flbench.datasets import BenchData, build_bench_data
from harness.flbench.methods import METHODS, BenchConfig, MethodContext
from harness.flbench.packages import package_versions
from harness.flbench.plots import plot_auc
from harness.flbench.results import Record, build_results, finalize_record, render_markdown
from harness.flbench.setting import DEFAULT_PANEL, DEFAULT_SETTING, load_panel, load_setting
from harness.flbench.steps import StepCounter
from hub.training.simulation import RoundCheckpoint

log = logging.getLogger(__name__)

#: Caps that keep `--quick` (CI) well under three minutes on one CPU thread.
QUICK_TRAIN_PER_CLINIC, QUICK_TEST, QUICK_PUBLIC = 160, 160, 96


class BenchProgress(Protocol):
    """What the runner reports; the CLI draws rich progress bars from it."""

    def start(self, method: str, seed: int, total_rounds: int) -> None: ...

    def advance(self, rnd: int) -> None: ...

    def finish(self, method: str, seed: int, record: Record, cached: bool) -> None: ...


@dataclass(frozen=True)
class BenchSpec:
    """Everything that defines a benchmark run (stored with every cached record)."""

    task: str
    skew: str = "combined"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = tuple(METHODS)
    cfg: BenchConfig = field(default_factory=BenchConfig)
    quick: bool = False
    strength: float = 1.0
    #: The clinics file and the unseen-panel file (TOML; harness/flbench/clinics/).
    clinics_file: Path = DEFAULT_SETTING
    panel_file: Path = DEFAULT_PANEL

    @property
    def track(self) -> str:
        return "aug" if self.cfg.augment else "none"

    def record_config(self) -> dict[str, Any]:
        """The settings a cached record must match to be reused on --resume (the files by content)."""
        return {
            "task": self.task,
            "skew": self.skew,
            "quick": self.quick,
            "strength": self.strength,
            "clinics_sha256": _sha256(self.clinics_file),
            "panel_sha256": _sha256(self.panel_file),
            **asdict(self.cfg),
        }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: Settings that only one family of methods reads: (key prefix, the method-name prefix that reads it).
#: A cached record stays valid when only another family's settings changed.
_FAMILY_SETTINGS: tuple[tuple[str, str], ...] = (
    ("distill_", "fedhelp"),
    ("fedhelp_", "fedhelp"),
    ("hsl_", "hsl"),
    ("pfednet_", "pfednet"),
    ("fedprox_", "fedprox"),
    ("ditto_", "ditto"),
)


#: Settings added after records were made, with the value those records were made with.
_BEFORE_THE_SETTING: dict[str, Any] = {"round_choice": "own"}


def same_settings(
    method: str, cached: dict[str, Any] | None, config: dict[str, Any], keeps_round: bool = True
) -> bool:
    """Whether a cached record was run with these settings; a family's own settings (distillation and
    FedHelp's, HSL's, pFedNet's, FedProx's) only matter to that family's methods, the local fine-tuning's
    only to the ``*_ft`` methods, tail averaging's only to the ``*_tail`` methods, SAM's only to the
    ``*_sam`` methods, and ``round_choice`` only to a record that kept a round (``keeps_round``: its
    ``extra`` has ``best_round``). A record made before a setting existed was made with the value in
    ``_BEFORE_THE_SETTING``."""
    if cached is None:
        return False
    cached = {**{k: v for k, v in _BEFORE_THE_SETTING.items() if k in config}, **cached}

    def read_by_method(key: str) -> bool:
        if key.startswith("finetune_"):  # the local fine-tuning's settings: the *_ft methods'
            return method.endswith("_ft")
        if key.startswith("tail_"):  # tail averaging's: the *_tail methods'
            return method.endswith("_tail")
        if key.startswith("sam_"):  # sharpness-aware minimisation's: the *_sam methods'
            return method.endswith("_sam")
        if key == "round_choice":
            return keeps_round
        return all(method.startswith(family) for prefix, family in _FAMILY_SETTINGS if key.startswith(prefix))

    def relevant(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if read_by_method(k)}

    return relevant(cached) == relevant(config)


def _keeps_round(record: dict[str, Any]) -> bool:
    return "best_round" in record.get("extra", {})


def parse_methods(text: str) -> tuple[str, ...]:
    """'all' or a comma list of method names, validated."""
    if text.strip() == "all":
        return tuple(METHODS)
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown}; choose 'all' or from {', '.join(METHODS)}")
    return names


def total_rounds(method: str, cfg: BenchConfig) -> int:
    """Progress units of one (method, seed): pFedNet has its stats round in front."""
    return cfg.rounds + (1 if method.startswith("pfednet") else 0)


def _write_json(path: Path, doc: Any) -> None:
    write_text_durably(path, json.dumps(doc, indent=1, sort_keys=False, allow_nan=True))


def run_benchmark(
    spec: BenchSpec, out_dir: Path, *, resume: bool = False, progress: BenchProgress | None = None
) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out_dir``; returns the results.json document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir, ckpt_dir = out_dir / "cache", out_dir / "ckpt"
    cache_dir.mkdir(exist_ok=True)
    config = spec.record_config()
    setting, panel = load_setting(spec.clinics_file), load_panel(spec.panel_file)
    versions = package_versions()
    records: list[Record] = []
    t_start = time.perf_counter()
    for seed in spec.seeds:
        data: BenchData | None = None
        for method in spec.methods:
            cache = cache_dir / f"{method}__seed{seed}.json"
            if resume and cache.is_file():
                cached = json.loads(cache.read_text())
                if same_settings(method, cached.get("config"), config, _keeps_round(cached)):
                    records.append(cached)
                    if progress is not None:
                        progress.finish(method, seed, cached, cached=True)
                    continue
                log.info("cached %s seed %d was run with other settings; running it again", method, seed)
            if data is None:
                data = build_bench_data(
                    spec.task,
                    spec.skew,
                    seed,
                    strength=spec.strength,
                    max_train_per_clinic=QUICK_TRAIN_PER_CLINIC if spec.quick else None,
                    max_test=QUICK_TEST if spec.quick else None,
                    public_size=QUICK_PUBLIC if spec.quick else None,
                    setting=setting,
                    panel=panel,
                )
            ckpt = RoundCheckpoint(ckpt_dir / f"{method}__seed{seed}.npz")
            if not resume:
                ckpt.clear()
            if progress is not None:
                progress.start(method, seed, total_rounds(method, spec.cfg))
            ctx = MethodContext(
                spec.cfg, out_dir, seed, progress.advance if progress is not None else None, ckpt
            )
            t0 = time.perf_counter()
            with StepCounter().counting() as counter:
                raw = METHODS[method](data, ctx)
            record = finalize_record(
                method, seed, raw, time.perf_counter() - t0, config, counter.steps, counter.one_time_steps
            ) | {"packages": versions}
            _write_json(cache, record)
            ckpt.clear()
            records.append(record)
            log.info("%s seed %d: small AUC %.3f, worst %.3f, unseen %.3f, %d steps", method, seed,
                     record["small_auc"], record["worst_auc"], record["unseen"]["auc"],
                     record["steps"])  # fmt: skip
            if progress is not None:
                progress.finish(method, seed, record, cached=False)
    return write_reports(spec, out_dir, records, time.perf_counter() - t_start)


def report_from_cache(spec: BenchSpec, out_dir: Path) -> dict[str, Any]:
    """Rebuild the reports from the cached (method, seed) records alone; runs nothing, skips what is missing.

    This is how runs split over several processes (e.g. baselines and ablations) are merged into one report.
    """
    config = spec.record_config()
    records: list[Record] = []
    missing: list[str] = []
    for seed in spec.seeds:
        for method in spec.methods:
            cache = out_dir / "cache" / f"{method}__seed{seed}.json"
            cached = json.loads(cache.read_text()) if cache.is_file() else None
            if cached is not None and same_settings(
                method, cached.get("config"), config, _keeps_round(cached)
            ):
                records.append(cached)
            else:
                missing.append(f"{method}/seed{seed}")
    if not records:
        raise FileNotFoundError(f"no finished results with these settings under {out_dir / 'cache'}")
    if missing:
        log.warning("report leaves out %d unfinished runs: %s", len(missing), ", ".join(missing))
    seeds = tuple(s for s in spec.seeds if any(r["seed"] == s for r in records))
    methods = tuple(m for m in spec.methods if any(r["method"] == m for r in records))
    merged = BenchSpec(
        spec.task, spec.skew, seeds, methods, spec.cfg, spec.quick, spec.strength, spec.clinics_file,
        spec.panel_file,
    )  # fmt: skip
    return write_reports(merged, out_dir, records, 0.0)


def write_reports(spec: BenchSpec, out_dir: Path, records: Sequence[Record], wall_s: float) -> dict[str, Any]:
    """results.json, results.md and auc.png from the records."""
    meta = {
        "task": spec.task,
        "skew": spec.skew,
        "track": spec.track,
        "setting": load_setting(spec.clinics_file).name,
        "clinics_file": str(spec.clinics_file),
        "panel_file": str(spec.panel_file),
        "seeds": list(spec.seeds),
        "methods": list(spec.methods),
        "rounds": spec.cfg.rounds,
        "local_epochs": spec.cfg.local_epochs,
        "quick": spec.quick,
        "strength": spec.strength,
        "config": asdict(spec.cfg),
        "wall_s_this_invocation": wall_s,
    }
    results = build_results(records, meta)
    _write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(render_markdown(results))
    plot_auc(results, out_dir / "auc.png")
    return results
