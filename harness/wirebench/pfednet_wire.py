"""``bench fl``'s pFedNet over the wire: a real hub and one edge node per clinic, each training with the torch
learner on its clinic's images imported as labeled DICOM.

The hub (``fedclinic-hub init`` + ``serve``: HTTPS on loopback, SQLite) exports the method's starting model
(``fl_cnn`` on GroupNorm, the method's seed) as a signed bundle; each clinic's node installs it, imports its
training images as a labeled archive (8-bit pixels, the dataset's modality), enrolls with a join code and
serves with ``[learning] torch_command`` set. ``fedclinic-hub rounds start --strategy pfednet`` with the
method's settings then runs the sketch round (from ``--model``) and the same training rounds as the
simulation, each from the state the last one left. The clinics' models come back through the product's own
command: ``models from-round N --node NAME`` (the shared part with that clinic's personal part) and ``models
from-round N`` (what an unseen clinic is sent: the shared part with the clinics' mean personal part), and all
are scored with the benchmark's ``evaluate``.

Two things differ from the simulation by design, and ``replay_pfednet`` takes both out to compare tensors: a
node's learner takes its seed from the task, the same for every node (the simulation seeds clinic k with
seed·100 + k), and it learns from what the DICOM carries, preprocessed by the node (the simulation from the
float renderings).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_node.learning.examples import training_set_from
from edge_node.learning.training_set import LabeledInstance
from edge_node.protocol.manifest import MANIFEST_FILE, load_manifest_dict, validate_manifest
from edge_node.protocol.tensors import encode_tensors
from harness.demo.hub import HubService
from harness.flbench.datasets import BenchData
from harness.flbench.methods import PFEDNET_GRAPHS, BenchConfig, evaluate
from harness.flbench.scoring import Predictor
from harness.wirebench.site import WireSite
from harness.wirebench.wire_federation import export_signed, run_rounds
from hub.data.dicomize import WrappedImage
from hub.data.medmnist import LABELS
from hub.fl.pfednet import PFedNet
from hub.fl.registry import make_strategy
from hub.models.fl_cnn import FL_BENCH_28, fl_cnn
from hub.training.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint
from hub.training.learners import LocalConfig, load_params, predict, to_params
from hub.training.node_learner import clinic_data
from hub.training.pfednet_train import PFedNetLearner
from hub.training.simulation import run_federation

__all__ = ["PFEDNET_WIRE", "PFedNetWire", "replay_pfednet", "round_settings", "run_pfednet_wire"]

Step = Callable[[str], None]

#: The ``bench fl`` pFedNet methods that run over the wire (GroupNorm): their clinics' training options.
PFEDNET_WIRE: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "pfednet": lambda cfg: {"augment": cfg.augment},
    "pfednet_cons": lambda cfg: {"augment": True, "consistency": cfg.consistency},
    "pfednet_rc_cons": lambda cfg: {"augment": True, "consistency": cfg.consistency, "randconv": True},
}
#: The DICOM modality each benchmark dataset's images are stored as (what the exported bundle accepts).
MODALITY = {"pneumoniamnist": "CR", "breastmnist": "US"}


def node_seed(seed: int) -> int:
    """The seed every node's learner gets from the task (the simulation's clinic 0 has this one)."""
    return seed * 100


def round_settings(method: str, data: BenchData, cfg: BenchConfig, seed: int) -> dict[str, Any]:
    """``run_pfednet``'s strategy settings and its clinics' task config (``client.*``) as round settings."""
    if method not in PFEDNET_WIRE:
        raise ValueError(f"{method!r} does not run over the wire; choose from {sorted(PFEDNET_WIRE)}")
    client = {
        "model": "fl_cnn",
        "model.norm": "group",
        "model.num_outputs": data.spec.num_outputs,
        "epochs": cfg.local_epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": node_seed(seed),
        **PFEDNET_WIRE[method](cfg),
    }
    return {
        "personal": cfg.pfednet_personal,
        "graph_keys": ",".join(PFEDNET_GRAPHS[cfg.pfednet_graph]),
        "graph_k": 2,
        "lam": cfg.pfednet_lam,
        "eta": cfg.pfednet_eta,
        "mean_gradient": False,
        "num_classes": max(2, data.spec.num_classes),
        **{f"client.{k}": v for k, v in client.items()},
    }


def starting_model(data: BenchData, seed: int) -> torch.nn.Module:
    """``run_pfednet``'s initial model: ``fl_cnn`` on GroupNorm under the method's seed."""
    torch.manual_seed(seed)
    return fl_cnn(norm="group", num_outputs=data.spec.num_outputs)


def save_start(path: Path, model: torch.nn.Module, data: BenchData, seed: int) -> Path:
    """The starting model as the checkpoint the hub exports and ``models from-round`` updates."""
    dataset = data.spec.primary
    config = CheckpointConfig(
        model_name="fl_cnn",
        model_config={"norm": "group", "num_outputs": data.spec.num_outputs},
        dataset=dataset,
        data_config=replace(FL_BENCH_28, labels=tuple(LABELS[dataset]), num_outputs=data.spec.num_outputs),
        epoch=0,
        train={"seed": seed, "source": "bench fl run_pfednet's initial model"},
    )
    return save_checkpoint(path, model, config)


@dataclass
class PFedNetWire:
    """What the wire run produced: the benchmark's raw result and, per clinic, the tensors of the model the
    hub made for it (``from-round --node``), the published model's, and what a replay needs (node ids, the
    imported instances, the bundle)."""

    raw: dict[str, Any]
    per_clinic: dict[str, dict[str, np.ndarray]]
    published: dict[str, np.ndarray]
    #: Each clinic's node id at the hub.
    node_ids: dict[str, str]
    #: The instances each node imported, in the order it learns from them.
    archives: dict[str, list[WrappedImage]]
    bundle: Path
    seconds: dict[str, float] = field(default_factory=dict)


def _config_args(settings: Mapping[str, Any]) -> list[str]:
    return [arg for k, v in settings.items() for arg in ("--config", f"{k}={json.dumps(v)}")]


def _params(checkpoint: Path) -> dict[str, np.ndarray]:
    return to_params(load_checkpoint(checkpoint).build_model())


def _predictor(params: Mapping[str, np.ndarray], data: BenchData) -> Predictor:
    model = fl_cnn(norm="group", num_outputs=data.spec.num_outputs)
    load_params(model, params)
    return lambda x: predict(model, x)


def run_pfednet_wire(
    method: str,
    data: BenchData,
    cfg: BenchConfig,
    seed: int,
    work: Path,
    *,
    round_timeout: float = 1800.0,
    on_step: Step = lambda _: None,
) -> PFedNetWire:
    """Run ``method`` for one seed over the wire in ``work``; every process is stopped on the way out."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    settings = round_settings(method, data, cfg, seed)
    start_model = starting_model(data, seed)
    checkpoint = save_start(work / "start", start_model, data, seed)
    dataset = data.spec.primary
    hub = HubService(work / "hub").init()
    sites: dict[str, WireSite] = {}
    archives: dict[str, list[WrappedImage]] = {}
    try:
        bundle = export_signed(hub, checkpoint, work / "bundle", f"wirebench-{method}-seed{seed}")
        hub.start()
        on_step(f"seed {seed}: hub serving on {hub.url}; {method}'s starting model exported and signed")
        learning = {"learning": {"torch_command": [sys.executable, "-m", "hub.training.node_learner"]}}

        def prepare(name: str) -> None:
            site = WireSite.create(name, work / "nodes" / name, hub.data_dir / "keys" / "hub.pub", learning)
            sites[name] = site
            site.install(bundle)
            clinic = data.clinics[name]
            archives[name] = site.import_labels(
                clinic.train_x, clinic.train_y, dataset=dataset, modality=MODALITY[dataset]
            )
            site.enroll(hub)
            site.start()

        with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: more would only queue
            list(pool.map(prepare, data.names))
        ids = hub.node_ids()
        seconds["setup"] = time.perf_counter() - t0
        on_step(f"seed {seed}: {len(sites)} nodes serving, {sum(map(len, archives.values()))} labeled images")

        t1 = time.perf_counter()
        start = work / "start.npz"
        start.write_bytes(encode_tensors(to_params(start_model)))
        common = (*_config_args(settings), "-k", str(len(data.names)), "--deadline", str(round_timeout))
        # The sketch round, then the training rounds.
        numbers = run_rounds(
            hub, "pfednet", cfg.rounds + 1, start, common, round_timeout, f"seed {seed}", on_step
        )
        seconds["rounds"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        last = str(numbers[-1])
        version = f"1.0.{cfg.rounds}"
        made = hub.cli_json(
            "models", "from-round", last, "--student", str(checkpoint), "--out", str(work / "published"),
            "--model-version", version, "--no-int8",
        )  # fmt: skip
        published = _params(Path(made["checkpoint"]))
        per_clinic: dict[str, dict[str, np.ndarray]] = {}
        for name in data.names:
            made = hub.cli_json(
                "models", "from-round", last, "--node", name, "--student", str(checkpoint),
                "--out", str(work / f"personal-{name}"), "--model-version", version, "--no-int8",
            )  # fmt: skip
            per_clinic[name] = _params(Path(made["checkpoint"]))
        training = set(numbers[1:])
        bytes_up: dict[str, float] = {}
        stats_bytes: dict[str, float] = {}
        for name, site in sites.items():
            sent = site.update_bytes()
            bytes_up[name] = float(np.mean([b for n, b in sent.items() if n in training]))
            stats_bytes[name] = float(sent.get(numbers[0], 0))
        seconds["read_back"] = time.perf_counter() - t2
    finally:
        with ThreadPoolExecutor(max_workers=max(1, len(sites))) as pool:
            list(pool.map(WireSite.stop, sites.values()))
        hub.stop()

    raw = evaluate(data, {c: _predictor(p, data) for c, p in per_clinic.items()}, _predictor(published, data))
    raw["bytes_per_client_round"] = bytes_up
    raw["stats_bytes_per_client_round"] = stats_bytes
    seconds["total"] = time.perf_counter() - t0
    return PFedNetWire(raw, per_clinic, published, ids, archives, bundle, seconds)


def node_training_sets(
    data: BenchData, archives: Mapping[str, Sequence[WrappedImage]], bundle: Path
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """What each node's learner trains on: its imported instances, preprocessed by the edge's own code as the
    installed bundle says, in import order; (x, y, mean, std) per clinic."""
    manifest = validate_manifest(load_manifest_dict((bundle / MANIFEST_FILE).read_bytes()))
    names = LABELS[data.spec.primary]
    out = {}
    for clinic, written in archives.items():
        labels = data.clinics[clinic].train_y.numpy().astype(np.int64).reshape(-1)
        instances = [
            LabeledInstance(
                w.sop_instance_uid, w.study_instance_uid, w.path, names[labels[w.index]], "import"
            )
            for w in written
        ]
        examples = training_set_from(
            instances, manifest.preprocessing, manifest.task, model_id=manifest.model_id
        )
        if examples.skipped:
            raise ValueError(f"{clinic}: the node's preprocessing skips {len(examples.skipped)} instances")
        ts = examples.training_set
        out[clinic] = (
            ts.x,
            ts.y,
            np.asarray(manifest.preprocessing.mean),
            np.asarray(manifest.preprocessing.std),
        )
    return out


def replay_pfednet(
    method: str,
    data: BenchData,
    cfg: BenchConfig,
    seed: int,
    wire: PFedNetWire,
) -> PFedNet:
    """The wire's rounds in process: the benchmark's strategy and learners, on what each node trained on, with
    the node's seed, each clinic under its node id (the hub's strategy lists them by id). Its state must be
    the hub's, tensor for tensor."""
    settings = round_settings(method, data, cfg, seed)
    client = {k.removeprefix("client."): v for k, v in settings.items() if k.startswith("client.")}
    strategy = make_strategy(
        "pfednet",
        **{k: v for k, v in settings.items() if not k.startswith("client.")},
        client_config=client,
    )
    assert isinstance(strategy, PFedNet)
    start = to_params(starting_model(data, seed))
    strategy.initialize(start, sorted(wire.node_ids.values()))
    local = LocalConfig.from_task(client, LocalConfig())
    learners = {}
    for clinic, (x, y, mean, std) in node_training_sets(data, wire.archives, wire.bundle).items():
        model = fl_cnn(norm="group", num_outputs=data.spec.num_outputs)
        node = wire.node_ids[clinic]
        learners[node] = PFedNetLearner(node, model, clinic_data(x, y, mean, std), local, node_seed(seed))
    run_federation(strategy, learners, cfg.rounds + 1)
    return strategy
