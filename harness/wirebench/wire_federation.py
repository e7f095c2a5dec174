"""``light_head`` over the wire: a real hub and one real edge node per benchmark clinic, driven by the CLIs.

The hub (``fedclinic-hub init`` + ``serve``: HTTPS on loopback, SQLite) exports the method's starting student
as a signed bundle; each clinic's node installs it, imports its training images as a labeled DICOM archive,
enrolls with a join code and serves. ``fedclinic-hub rounds start --strategy head_avg`` then runs the same
rounds with the same task config as the simulation (the first round from the student, the next ones from the
hub's own state after the last). The final shared head comes from the hub (``models from-round``), each
clinic's personal head from its node, and both are scored with the benchmark's own ``evaluate``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_node.protocol.tensors import encode_tensors
from harness.demo.hub import HUB_BIN, HubError, HubService
from harness.flbench.datasets import BenchData
from harness.flbench.frozen_student import FrozenStudent, binary_task
from harness.flbench.light_clinic import LightClinic
from harness.flbench.methods import BenchConfig, evaluate
from harness.flbench.scoring import Predictor
from harness.wirebench.site import WireSite
from harness.wirebench.student import light_student, save_student
from hub.training.checkpoint import load_checkpoint
from hub.training.learners import to_params

__all__ = ["WireOutcome", "export_signed", "hub_cli", "run_light_head_wire", "run_rounds"]

Step = Callable[[str], None]


@dataclass
class WireOutcome:
    """What the wire run produced: the benchmark's raw result, and the tensors for a bitwise comparison."""

    raw: dict[str, Any]
    shared: dict[str, np.ndarray]
    personal: dict[str, tuple[np.ndarray, np.ndarray]]
    seconds: dict[str, float] = field(default_factory=dict)


def hub_cli(hub: HubService, *args: str, timeout: float = 900.0) -> Any:
    """A ``fedclinic-hub`` command that takes no --data-dir (export), with the hub's environment; its JSON."""
    done = subprocess.run(
        [str(HUB_BIN), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=hub.env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise HubError(f"fedclinic-hub {args[0]} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


def export_signed(hub: HubService, checkpoint: Path, out: Path, model_id: str) -> Path:
    """``fedclinic-hub export`` of ``checkpoint`` as version 1.0.0, signed with the hub's key, no int8."""
    hub_cli(
        hub, "export", "--checkpoint", str(checkpoint), "--key", str(hub.data_dir / "keys" / "hub.key"),
        "--out", str(out), "--model-version", "1.0.0", "--model-id", model_id, "--no-int8",
    )  # fmt: skip
    return out


def run_rounds(
    hub: HubService,
    strategy: str,
    count: int,
    start: Path,
    settings: Sequence[str],
    timeout: float,
    label: str,
    on_step: Step,
) -> list[int]:
    """``count`` rounds of ``strategy`` with ``settings``, the first from ``start`` (npz), each next one from
    the state the last left; each must publish (HubError otherwise). Returns the hub's round numbers."""
    numbers: list[int] = []
    for rnd in range(1, count + 1):
        first = ("--model", str(start)) if rnd == 1 else ()
        started = hub.start_round(strategy, *first, *settings)
        info = hub.wait_round(str(started["round_id"]), timeout)
        if info["state"] != "published":
            raise HubError(f"round {rnd} ended {info['state']}: {info}")
        numbers.append(int(started["round"]))
        on_step(f"{label}: round {rnd}/{count} published")
    return numbers


def run_light_head_wire(
    data: BenchData,
    cfg: BenchConfig,
    seed: int,
    work: Path,
    *,
    round_timeout: float = 900.0,
    on_step: Step = lambda _: None,
) -> WireOutcome:
    """Run ``light_head`` for one seed over the wire in ``work``; every process is stopped on the way out."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    student = light_student(data, cfg, seed)
    large = [c for c in data.names if c not in data.small]
    frozen_student = FrozenStudent(student, torch.cat([data.clinics[c].train_x for c in large])[:2])
    head = frozen_student.head
    checkpoint = save_student(work / "student", student, seed)
    seconds["student"] = time.perf_counter() - t0

    hub = HubService(work / "hub").init()
    sites: dict[str, WireSite] = {}
    try:
        t1 = time.perf_counter()
        bundle = export_signed(hub, checkpoint, work / "bundle", f"wirebench-seed{seed}")
        on_step(f"seed {seed}: student exported and signed by the hub")
        hub.start()
        on_step(f"seed {seed}: hub serving on {hub.url}")

        def prepare(name: str) -> int:
            site = WireSite.create(name, work / "nodes" / name, hub.data_dir / "keys" / "hub.pub")
            sites[name] = site
            site.install(bundle)
            count = len(site.import_labels(data.clinics[name].train_x, data.clinics[name].train_y))
            site.enroll(hub)
            site.start()
            return count

        with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: more would only queue
            counts = dict(zip(data.names, pool.map(prepare, data.names), strict=True))
        on_step(f"seed {seed}: {len(sites)} nodes serving, labeled studies {counts}")
        seconds["setup"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        start = work / "start.npz"
        start.write_bytes(encode_tensors(to_params(student)))
        common = (
            "--config", f"head={head.weight.name},{head.bias.name}", "--config", f"client.seed={seed}",
            "-k", str(len(data.names)), "--deadline", str(round_timeout),
        )  # fmt: skip
        numbers = run_rounds(
            hub, "head_avg", cfg.rounds, start, common, round_timeout, f"seed {seed}", on_step
        )
        seconds["rounds"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        hub.cli_json(
            "models", "from-round", str(numbers[-1]), "--student", str(checkpoint), "--out",
            str(work / "final"), "--model-version", f"1.0.{cfg.rounds}", "--no-int8",
        )  # fmt: skip
        final = load_checkpoint(work / "final" / "checkpoint").build_model()
        final_params = to_params(final)
        shared = {n: final_params[n] for n in (head.weight.name, head.bias.name)}
        personal: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        bytes_up: dict[str, float] = {}
        for name, site in sites.items():
            held = site.personal_head()
            if held is None:
                raise HubError(f"{name}: the node holds no personal head after {cfg.rounds} rounds")
            personal[name] = (held.weight, held.bias)
            sent = site.update_bytes()
            bytes_up[name] = float(np.mean([sent[n] for n in numbers if n in sent])) if sent else 0.0
        seconds["read_back"] = time.perf_counter() - t3
    finally:
        with ThreadPoolExecutor(max_workers=max(1, len(sites))) as pool:
            list(pool.map(WireSite.stop, sites.values()))
        hub.stop()

    raw = score_light_head(data, frozen_student, shared, personal)
    raw["bytes_per_client_round"] = bytes_up
    seconds["total"] = time.perf_counter() - t0
    return WireOutcome(raw, shared, personal, seconds)


def score_light_head(
    data: BenchData,
    frozen: FrozenStudent,
    shared: dict[str, np.ndarray],
    personal: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """``run_light_head``'s scoring: a clinic by shared + its personal head, the unseen clinics by shared."""
    head = frozen.head
    w = np.asarray(shared[head.weight.name], dtype=np.float64)  # (K, D)
    b = np.asarray(shared[head.bias.name], dtype=np.float64)  # (K,)
    clinics: dict[str, LightClinic] = {}
    for name in data.names:
        clinic = LightClinic(name, head, binary_task(), np.zeros((0, 1)), np.zeros((0, 1)), np.zeros(0))
        clinic.restore({"personal.weight": personal[name][0], "personal.bias": personal[name][1]})
        clinics[name] = clinic

    def shared_logits(x01: torch.Tensor) -> np.ndarray:
        return np.asarray(frozen.logits_and_embedding(x01)[1], dtype=np.float64) @ w.T + b  # (N, K)

    def served(clinic: LightClinic) -> Predictor:
        def scores(x01: torch.Tensor) -> np.ndarray:
            emb = frozen.logits_and_embedding(x01)[1]
            return (shared_logits(x01) + clinic.personal_logits(emb))[:, 0]

        return scores

    return evaluate(data, {c: served(clinics[c]) for c in data.names}, lambda x: shared_logits(x)[:, 0])
