"""``bench fl``'s pFedNet over the wire: a real hub and one edge node per clinic, each training with the torch
learner on its clinic's images imported as labeled DICOM.

The hub (``fedclinic-hub init`` + ``serve``: HTTPS on loopback, SQLite) exports the method's starting model
(``fl_cnn`` on the method's GroupNorm or BatchNorm, the method's seed) as a signed bundle; each clinic's node
installs it, imports its training images as a labeled archive (8-bit pixels, the dataset's modality), enrolls
with a join code and serves with ``[learning] torch_command`` set. ``fedclinic-hub rounds start --strategy
pfednet`` with the method's settings then runs the sketch round (from ``--model``) and the same training
rounds as the simulation, each from the state the last one left; on BatchNorm a ``kept_tensors`` round then
collects each node's running statistics, which never left it. The clinics' models come back through the
product's own command: ``models from-round N --node NAME`` (the shared part with that clinic's personal part,
and on BatchNorm with ``--kept-from`` its own statistics) and ``models from-round N`` (what an unseen clinic
is sent: the shared part with the clinics' mean personal part and mean statistics), and all are scored with
the benchmark's ``evaluate``.

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
from hub.fl.aggregate import weighted_mean
from hub.fl.pfednet import PFedNet
from hub.fl.registry import make_strategy
from hub.fl.strategy import Params
from hub.models.fl_cnn import FL_BENCH_28, Norm, fl_cnn
from hub.training.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint
from hub.training.learners import LocalConfig, load_params, predict, to_params
from hub.training.node_learner import clinic_data
from hub.training.pfednet_train import PFedNetLearner
from hub.training.simulation import run_federation

__all__ = [
    "PFEDNET_WIRE",
    "PFedNetReplay",
    "PFedNetWire",
    "WireMethod",
    "replay_pfednet",
    "round_settings",
    "run_pfednet_wire",
]

Step = Callable[[str], None]


@dataclass(frozen=True)
class WireMethod:
    """A ``bench fl`` pFedNet method as rounds: its CNN's normalisation and its clinics' training options. On
    BatchNorm the running statistics stay at each node (``local=norm_buffers``), as ``run_pfednet`` keeps
    them at each clinic, and a ``kept_tensors`` round collects them before the models are built."""

    norm: Norm
    options: Callable[[BenchConfig], dict[str, Any]]


def _plain(cfg: BenchConfig) -> dict[str, Any]:
    return {"augment": cfg.augment}


def _cons(cfg: BenchConfig) -> dict[str, Any]:
    return {"augment": True, "consistency": cfg.consistency}


def _rc_cons(cfg: BenchConfig) -> dict[str, Any]:
    return {"augment": True, "consistency": cfg.consistency, "randconv": True}


#: The ``bench fl`` pFedNet methods that run over the wire.
PFEDNET_WIRE: dict[str, WireMethod] = {
    "pfednet": WireMethod("group", _plain),
    "pfednet_cons": WireMethod("group", _cons),
    "pfednet_rc_cons": WireMethod("group", _rc_cons),
    "pfednet_bn": WireMethod("batch", _plain),
    "pfednet_bn_cons": WireMethod("batch", _cons),
    "pfednet_bn_rc_cons": WireMethod("batch", _rc_cons),
}
#: What a BatchNorm method's nodes keep: the running statistics (``hub.fl.fedbn.KEPT_AT_NODES``).
KEPT = "norm_buffers"
#: The DICOM modality each benchmark dataset's images are stored as (what the exported bundle accepts).
MODALITY = {"pneumoniamnist": "CR", "breastmnist": "US"}


def node_seed(seed: int) -> int:
    """The seed every node's learner gets from the task (the simulation's clinic 0 has this one)."""
    return seed * 100


def round_settings(method: str, data: BenchData, cfg: BenchConfig, seed: int) -> dict[str, Any]:
    """``run_pfednet``'s strategy settings and its clinics' task config (``client.*``) as round settings."""
    if method not in PFEDNET_WIRE:
        raise ValueError(f"{method!r} does not run over the wire; choose from {sorted(PFEDNET_WIRE)}")
    wired = PFEDNET_WIRE[method]
    client = {
        "model": "fl_cnn",
        "model.norm": wired.norm,
        "model.num_outputs": data.spec.num_outputs,
        "epochs": cfg.local_epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": node_seed(seed),
        **wired.options(cfg),
    }
    return {
        **({"local": KEPT} if wired.norm == "batch" else {}),
        "personal": cfg.pfednet_personal,
        "graph_keys": ",".join(PFEDNET_GRAPHS[cfg.pfednet_graph]),
        "graph_k": 2,
        "lam": cfg.pfednet_lam,
        "eta": cfg.pfednet_eta,
        "mean_gradient": False,
        "num_classes": max(2, data.spec.num_classes),
        **{f"client.{k}": v for k, v in client.items()},
    }


def starting_model(data: BenchData, seed: int, norm: Norm = "group") -> torch.nn.Module:
    """``run_pfednet``'s initial model: ``fl_cnn`` on ``norm`` under the method's seed."""
    torch.manual_seed(seed)
    return fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)


def save_start(path: Path, model: torch.nn.Module, data: BenchData, seed: int, norm: Norm = "group") -> Path:
    """The starting model as the checkpoint the hub exports and ``models from-round`` updates."""
    dataset = data.spec.primary
    config = CheckpointConfig(
        model_name="fl_cnn",
        model_config={"norm": norm, "num_outputs": data.spec.num_outputs},
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


def _predictor(params: Mapping[str, np.ndarray], data: BenchData, norm: Norm) -> Predictor:
    model = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
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
    norm = PFEDNET_WIRE[method].norm
    start_model = starting_model(data, seed, norm)
    checkpoint = save_start(work / "start", start_model, data, seed, norm)
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
        kept: tuple[str, ...] = ()
        if norm == "batch":  # the running statistics stayed at the nodes: collect them to build the models
            (collected,) = run_rounds(
                hub, "kept_tensors", 1, start, ("--config", f"kept={json.dumps(KEPT)}", *common[-4:]),
                round_timeout, f"seed {seed} (kept tensors)", on_step,
            )  # fmt: skip
            kept = ("--kept-from", str(collected))
        seconds["rounds"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        last = str(numbers[-1])
        version = f"1.0.{cfg.rounds}"
        made = hub.cli_json(
            "models", "from-round", last, *kept, "--student", str(checkpoint),
            "--out", str(work / "published"), "--model-version", version, "--no-int8",
        )  # fmt: skip
        published = _params(Path(made["checkpoint"]))
        per_clinic: dict[str, dict[str, np.ndarray]] = {}
        for name in data.names:
            made = hub.cli_json(
                "models", "from-round", last, *kept, "--node", name, "--student", str(checkpoint),
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

    raw = evaluate(
        data,
        {c: _predictor(p, data, norm) for c, p in per_clinic.items()},
        _predictor(published, data, norm),
    )
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


@dataclass
class PFedNetReplay:
    """The wire's rounds replayed in process: the strategy and each node's learner, by node id."""

    strategy: PFedNet
    learners: dict[str, PFedNetLearner]

    def _kept(self, node_id: str) -> Params:
        """What the node kept for itself (BatchNorm's statistics; nothing on GroupNorm)."""
        sent = self.strategy.params_for(node_id)
        return {n: a for n, a in to_params(self.learners[node_id].model).items() if n not in sent}

    def clinic_params(self, node_id: str) -> Params:
        """The model ``models from-round --node`` builds for the node (with ``--kept-from`` on BatchNorm)."""
        return {**self._kept(node_id), **self.strategy.params_for(node_id)}

    def published_params(self) -> Params:
        """The model plain ``models from-round`` builds: the shared part, the mean personal part and the
        nodes' example-weighted mean of what they kept, as a ``kept_tensors`` round averages it."""
        nodes = sorted(self.learners)
        kept = [self._kept(n) for n in nodes]
        mean = weighted_mean(kept, [self.learners[n].data.n_train for n in nodes]) if kept[0] else {}
        return {**{n: np.asarray(a) for n, a in mean.items()}, **self.strategy.published_params()}


def replay_pfednet(
    method: str,
    data: BenchData,
    cfg: BenchConfig,
    seed: int,
    wire: PFedNetWire,
) -> PFedNetReplay:
    """The wire's rounds in process: the benchmark's strategy and learners, on what each node trained on, with
    the node's seed, each clinic under its node id (the hub's strategy lists them by id). Its state, and the
    models built from it, must be the hub's, tensor for tensor."""
    settings = round_settings(method, data, cfg, seed)
    client = {k.removeprefix("client."): v for k, v in settings.items() if k.startswith("client.")}
    strategy = make_strategy(
        "pfednet",
        **{k: v for k, v in settings.items() if not k.startswith("client.")},
        client_config=client,
    )
    assert isinstance(strategy, PFedNet)
    norm = PFEDNET_WIRE[method].norm
    start = to_params(starting_model(data, seed, norm))
    strategy.initialize(start, sorted(wire.node_ids.values()))
    local = LocalConfig.from_task(client, LocalConfig())
    learners = {}
    for clinic, (x, y, mean, std) in node_training_sets(data, wire.archives, wire.bundle).items():
        model = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
        node = wire.node_ids[clinic]
        learners[node] = PFedNetLearner(node, model, clinic_data(x, y, mean, std), local, node_seed(seed))
    run_federation(strategy, learners, cfg.rounds + 1)
    return PFedNetReplay(strategy, learners)
