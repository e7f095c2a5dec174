"""Simulation against the wire for one method and seeds: the benchmark's metrics side by side, and why they
differ.

Per seed: the benchmark data (``build_bench_data``, the six-clinic setting, combined skew); (a) ``bench fl``'s
own ``light_head`` (``METHODS``), (b) the same method over the wire (``wire_federation``). Both records go
through the benchmark's ``finalize_record``, so small-clinic, worst-clinic and unseen figures are computed by
one function. Two replays of the method's rounds (``replica``) explain a difference: on the float images
(must give the method's own AUCs, so it is the simulation) and on the 8-bit pixels a DICOM carries; the
final heads of each are compared with the wire's, tensor by tensor. For a pFedNet method (``PFEDNET_WIRE``,
either task) the wire is ``pfednet_wire``, and one replay takes out both ways it differs by design (the
node's one seed and its 8-bit pixels): every clinic's model and the published one must equal the hub's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.flbench.benchmark import QUICK_PUBLIC, QUICK_TEST, QUICK_TRAIN_PER_CLINIC
from harness.flbench.datasets import BenchData, build_bench_data
from harness.flbench.frozen_student import FrozenStudent
from harness.flbench.methods import METHODS, BenchConfig, MethodContext, evaluate
from harness.flbench.results import Record, finalize_record
from harness.flbench.setting import load_panel
from harness.wirebench.pfednet_wire import PFEDNET_WIRE, replay_pfednet, run_pfednet_wire
from harness.wirebench.replica import ReplicaRun, replay_light_head
from harness.wirebench.student import light_student
from harness.wirebench.wire_federation import WireOutcome, run_light_head_wire
from hub.training.learners import to_params

__all__ = ["METRIC_KEYS", "QUICK", "Caps", "SeedComparison", "compare_seed", "summarize"]

#: The figures compared, each read from a finalized benchmark record.
METRIC_KEYS: dict[str, Callable[[Record], float]] = {
    "small_auc": lambda r: float(r["small_auc"]),
    "worst_auc": lambda r: float(r["worst_auc"]),
    "unseen_auc": lambda r: float(r["unseen"]["auc"]),
    "panel_auc": lambda r: float(r["panel_mean"].get("auc", math.nan)),
}


@dataclass
class SeedComparison:
    seed: int
    sim: Record
    wire: Record
    #: Max |sim − wire| over the final shared head and over every personal head, for each replay.
    tensor_gap: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, float]]:
        return {k: {"sim": f(self.sim), "wire": f(self.wire)} for k, f in METRIC_KEYS.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "metrics": self.metrics(),
            "sim_bytes_per_client_round": self.sim["bytes_per_client_round"],
            "wire_bytes_per_client_round": self.wire["bytes_per_client_round"],
            "sim_clinic_auc": {c: m["auc"] for c, m in self.sim["clinics"].items()},
            "wire_clinic_auc": {c: m["auc"] for c, m in self.wire["clinics"].items()},
            "worst_clinic": {"sim": self.sim["worst_clinic"], "wire": self.wire["worst_clinic"]},
            "tensor_gap": self.tensor_gap,
            "seconds": self.seconds,
        }


def _gap(replay: ReplicaRun, wire: WireOutcome) -> dict[str, float]:
    shared = max(float(np.max(np.abs(replay.shared[n] - wire.shared[n]))) for n in wire.shared)
    personal = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for c in wire.personal
        for a, b in zip(replay.personal[c], wire.personal[c], strict=True)
    )
    return {"shared_head": shared, "personal_heads": personal}


@dataclass(frozen=True)
class Caps:
    """Size caps of the benchmark data (``build_bench_data``'s); None is the full benchmark."""

    train_per_clinic: int | None = None
    test: int | None = None
    public: int | None = None


#: ``bench fl --quick``'s caps.
QUICK = Caps(QUICK_TRAIN_PER_CLINIC, QUICK_TEST, QUICK_PUBLIC)


def compare_seed(
    seed: int,
    cfg: BenchConfig,
    work: Path,
    *,
    caps: Caps,
    method: str = "light_head",
    task: str = "pneumonia",
    on_step: Callable[[str], None] = lambda _: None,
) -> SeedComparison:
    """Sim and wire ``method`` (``light_head`` or a ``PFEDNET_WIRE`` method) for ``seed`` on the benchmark
    data of ``task`` under ``caps``."""
    data = build_bench_data(
        task, "combined", seed,
        max_train_per_clinic=caps.train_per_clinic, max_test=caps.test, public_size=caps.public,
        panel=load_panel(),
    )  # fmt: skip
    if method in PFEDNET_WIRE:
        return _compare_pfednet(method, data, seed, cfg, work, caps, on_step)
    if method != "light_head" or task != "pneumonia":
        raise ValueError(f"over the wire: light_head on pneumonia, or {sorted(PFEDNET_WIRE)}; not {method}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    sim_raw = METHODS["light_head"](data, MethodContext(cfg, work / "sim", seed))
    seconds["sim"] = time.perf_counter() - t0
    config = {"caps": caps.__dict__, "rounds": cfg.rounds, "local_epochs": cfg.local_epochs}
    sim = finalize_record("light_head", seed, sim_raw, seconds["sim"], config)
    on_step(f"seed {seed}: simulation done in {seconds['sim']:.0f} s")

    t1 = time.perf_counter()
    outcome = run_light_head_wire(data, cfg, seed, work / "wire", on_step=on_step)
    seconds["wire"] = time.perf_counter() - t1
    seconds.update({f"wire_{k}": v for k, v in outcome.seconds.items()})
    wire = finalize_record("light_head_wire", seed, outcome.raw, seconds["wire"], config)

    student = light_student(data, cfg, seed)
    large = [c for c in data.names if c not in data.small]
    frozen = FrozenStudent(student, torch.cat([data.clinics[c].train_x for c in large])[:2])
    start = to_params(student)
    gaps = {
        pixels: _gap(replay_light_head(data, frozen, start, cfg, seed, pixels), outcome)
        for pixels in ("float", "uint8")
    }
    initial = sim_raw["extra"]["initial_auc"]
    # The rebuilt student must be the method's: the same starting AUC at every clinic, to the bit.
    gaps["start"] = {"initial_auc_equal": float(initial == _initial_auc(data, frozen))}
    return SeedComparison(seed, sim, wire, gaps, seconds)


def _compare_pfednet(
    method: str,
    data: BenchData,
    seed: int,
    cfg: BenchConfig,
    work: Path,
    caps: Caps,
    on_step: Callable[[str], None],
) -> SeedComparison:
    """``bench fl``'s pFedNet method against the same over the wire; the wire's tensors against a replay of
    its rounds in process (the node's seed and inputs), which must be equal."""
    seconds: dict[str, float] = {}
    config = {"caps": caps.__dict__, "rounds": cfg.rounds, "local_epochs": cfg.local_epochs}
    t0 = time.perf_counter()
    sim_raw = METHODS[method](data, MethodContext(cfg, work / "sim", seed))
    seconds["sim"] = time.perf_counter() - t0
    sim = finalize_record(method, seed, sim_raw, seconds["sim"], config)
    on_step(f"seed {seed}: simulation done in {seconds['sim']:.0f} s")
    t1 = time.perf_counter()
    outcome = run_pfednet_wire(method, data, cfg, seed, work / "wire", on_step=on_step)
    seconds["wire"] = time.perf_counter() - t1
    seconds.update({f"wire_{k}": v for k, v in outcome.seconds.items()})
    wire = finalize_record(f"{method}_wire", seed, outcome.raw, seconds["wire"], config)
    replay = replay_pfednet(method, data, cfg, seed, outcome)

    def gap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
        return max(float(np.max(np.abs(np.asarray(a[n]) - np.asarray(b[n])))) for n in b)

    clinics = max(gap(replay.clinic_params(outcome.node_ids[c]), p) for c, p in outcome.per_clinic.items())
    gaps = {
        "uint8": {"clinic_models": clinics, "published": gap(replay.published_params(), outcome.published)}
    }
    return SeedComparison(seed, sim, wire, gaps, seconds)


def _initial_auc(data: BenchData, frozen: FrozenStudent) -> dict[str, float]:
    def own(x: torch.Tensor) -> np.ndarray:
        return frozen.logits_and_embedding(x)[0][:, 0].astype(np.float64)

    result = evaluate(data, dict.fromkeys(data.names, own), own)
    return {c: result["clinics"][c]["auc"] for c in data.names}


def summarize(rows: Sequence[SeedComparison]) -> dict[str, dict[str, float]]:
    """Mean over seeds of each metric for sim and wire, their mean difference, and the seed SD of the sim."""
    out: dict[str, dict[str, float]] = {}
    for key in METRIC_KEYS:
        sim = np.array([r.metrics()[key]["sim"] for r in rows])
        wire = np.array([r.metrics()[key]["wire"] for r in rows])
        out[key] = {
            "sim": float(np.mean(sim)),
            "wire": float(np.mean(wire)),
            "diff": float(np.mean(wire - sim)),
            "max_abs_diff": float(np.max(np.abs(wire - sim))),
            "sim_seed_sd": float(np.std(sim, ddof=1)) if len(sim) > 1 else math.nan,
        }
    return out
