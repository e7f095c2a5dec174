"""``fedclinic-learn WORKDIR``: the torch learner a node runs out of process for ``weights_delta`` tasks, and
for ``kept_tensors`` tasks (the tensors of its model that a strategy never sent, e.g. FedBN's normalisation
tensors, as its last training round left them in ``private/``).

It reads the files the node's external learner writes (task.json, params.npz, train.npz; docs/learners.md),
builds the model the task's config names from the registry, fits it with the very learner classes the
simulation (``bench fl``) uses, and writes update.npz + result.json. Everything a clinic keeps for itself
between rounds (a FedHelp large client's private model, the proxy's public head, the learner's random
state) lives in WORKDIR/private/ and is never part of the update.

Task config keys (besides the learner's own: epochs, lr, batch_size, weight_decay, augment, mu, consistency,
randconv, sam_rho, FedHelp's role, rank_weight, rank_margin, and pFedNet's personal and differential_gamma):
``model`` (registry name of the shared model; default ``fl_cnn``, ``fedhelp_small`` for FedHelp),
``model.<arg>`` (its factory arguments, e.g. ``model.norm``),
``large_model`` (a FedHelp large client's private model, default ``fedhelp_large``), ``kl_weight`` (proxy →
large KL weight, 0.1) and ``seed`` (model initialisation and shuffling; default 0). A FedHelp small client
trains toward the foundation soft labels of the public set the hub shipped once (params ``public/x``,
``public/soft_labels``), an HSL client on its anchor labels (``public/y``); the learner keeps the public set
in WORKDIR/public.npz for later rounds.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import torch
import typer

from edge_node.protocol.durable_file import write_bytes_durably, write_text_durably
from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.updates import UpdateKind
from hub.fl.strategy import ClientResult, ClientTask, Config, Params
from hub.models.fedhelp_nets import FedHelpSmall
from hub.models.hsl_mmoe import HslMmoe
from hub.models.registry import create_model, get_data_config
from hub.training.datasets import NORM_MEAN, NORM_STD, ClinicData
from hub.training.fedhelp_train import fedhelp_learner
from hub.training.hsl_train import HslLearner
from hub.training.learners import LocalConfig, SupervisedLearner
from hub.training.pfednet_train import PFedNetLearner

__all__ = ["LearnerInputError", "NodeTask", "PublicSet", "build_learner", "clinic_data", "learn", "main"]

log = logging.getLogger(__name__)

STATE_FILE = "state.npz"
#: Beside the learner's state: the hub's number of the round that last trained it (what ``kept_tensors``
#: answers come from).
TRAINED_ROUND = "__trained_round__"
#: FedHelp's public set as last shipped (public data: kept beside, not inside, private/).
PUBLIC_FILE = "public.npz"
#: Task params under this prefix are the public set, not model tensors (the hub's ``rounds start --public``).
PUBLIC_PREFIX = "public/"
#: A node's learner has one client id: its updates are named by the hub, not by it.
CLIENT_ID = "node"


class LearnerInputError(ValueError):
    """The work directory does not hold what the contract says (the message says what)."""


class NodeLearner(Protocol):
    def fit(self, task: ClientTask) -> ClientResult: ...

    def state(self) -> Params: ...

    def restore(self, state: Mapping[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class NodeTask:
    """What the node handed over: the task, its params, and the clinic's labeled images."""

    kind: UpdateKind
    round: int
    strategy: str
    config: Config
    expected: dict[str, tuple[tuple[int, ...], np.dtype[Any]]]
    params: Params
    data: ClinicData

    @classmethod
    def read(cls, workdir: Path) -> NodeTask:
        try:
            doc = json.loads((workdir / "task.json").read_text())
            params = decode_tensors((workdir / "params.npz").read_bytes())
            train = decode_tensors((workdir / "train.npz").read_bytes())
        except (OSError, ValueError, EncodingError) as exc:
            raise LearnerInputError(f"cannot read the task in {workdir}: {exc}") from exc
        try:
            kind = UpdateKind(doc["kind"])
            expected = {
                e["name"]: (tuple(int(d) for d in e["shape"]), np.dtype(e["dtype"])) for e in doc["expected"]
            }
            x, y = train["x"], train["y"]
        except (KeyError, TypeError, ValueError) as exc:
            raise LearnerInputError(f"task.json or train.npz does not follow the contract: {exc}") from exc
        if x.dtype != np.float32 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (x.shape[0],):
            raise LearnerInputError(
                f"train.npz needs x float32 (N, C, H, W) and y int64 (N,); got {x.dtype} {list(x.shape)} and "
                f"{y.dtype} {list(y.shape)}"
            )
        if not set(np.unique(y).tolist()) <= {0, 1}:
            raise LearnerInputError("the torch learner trains binary tasks: labels must be 0 or 1")
        mean, std = train.get("mean", np.array([NORM_MEAN])), train.get("std", np.array([NORM_STD]))
        if (
            mean.ndim != 1
            or mean.shape != std.shape
            or mean.shape[0] not in (1, x.shape[1])
            or not np.all(np.isfinite(mean))
            or not np.all(std > 0)
        ):
            raise LearnerInputError(
                "train.npz's mean and std must be (C,) or (1,) with std > 0; "
                f"got {mean.tolist()} / {std.tolist()}"
            )
        return cls(
            kind=kind,
            round=int(doc["round"]),
            strategy=str(doc.get("strategy", "")),
            config=dict(doc.get("config", {})),
            expected=expected,
            params=params,
            data=clinic_data(x, y, mean, std),
        )


def clinic_data(
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray | float = NORM_MEAN,
    std: np.ndarray | float = NORM_STD,
) -> ClinicData:
    """The node's inputs (preprocessed as for inference, (x − mean) / std) as the learners' [0, 1] images.

    The learners augment in [0, 1] and normalise themselves, so the inference normalisation is undone here:
    with the ``mean`` and ``std`` the node says its inputs carry (per channel, or one for all), else the
    learners' own.
    """
    channels = np.asarray(x).shape[1]  # x: (N, C, H, W)
    m = np.resize(np.asarray(mean, dtype=np.float32), channels).reshape(1, channels, 1, 1)
    sd = np.resize(np.asarray(std, dtype=np.float32), channels).reshape(1, channels, 1, 1)
    x01 = torch.from_numpy(np.asarray(x, dtype=np.float32) * sd + m)  # (N, C, H, W)
    labels = torch.from_numpy(np.asarray(y).astype(np.float32))  # (N,)
    empty = x01[:0]
    return ClinicData("node", x01, labels, empty, labels[:0])


def _model_args(config: Config) -> dict[str, Any]:
    return {k.removeprefix("model."): v for k, v in config.items() if k.startswith("model.")}


def _model_name(config: Config, strategy: str) -> str:
    default = "hsl_mmoe" if strategy == "hsl" else "fedhelp_small" if "role" in config else "fl_cnn"
    return str(config.get("model", default))


def _check_normalisation(name: str) -> None:
    """The node's inputs come normalised as the bundle says; the learners undo and redo (x − 0.5) / 0.25."""
    try:
        data_config = get_data_config(name)
    except KeyError as exc:
        raise LearnerInputError(str(exc)) from exc
    if tuple(data_config.mean) != (NORM_MEAN,) or tuple(data_config.std) != (NORM_STD,):
        raise LearnerInputError(
            f"model {name} normalises with mean {data_config.mean} / std {data_config.std}; the torch "
            f"learner trains models normalised with ({NORM_MEAN},) / ({NORM_STD},)"
        )


@dataclass(frozen=True)
class PublicSet:
    """The public images in [0, 1] (N, C, H, W) with FedHelp's one-time foundation soft labels (N, K)
    and/or HSL's anchor labels (N,)."""

    x01: torch.Tensor
    soft_labels: torch.Tensor | None
    labels: torch.Tensor | None

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PublicSet:
        """From the shipped arrays (``x`` preprocessed as for inference, like train.npz)."""
        x, soft, y = arrays.get("x"), arrays.get("soft_labels"), arrays.get("y")
        if x is None or x.ndim != 4 or (soft is None and y is None):
            raise LearnerInputError("the public set needs x (N, C, H, W) with soft_labels or y")
        if any(a is not None and len(a) != len(x) for a in (soft, y)):
            raise LearnerInputError("the public set's labels do not match its images")
        return cls(
            clinic_data(x, np.zeros(len(x), np.int64)).train_x,
            None if soft is None else torch.from_numpy(np.asarray(soft, dtype=np.float32)),
            None if y is None else torch.from_numpy(np.asarray(y, dtype=np.float32)),
        )


def _public_set(workdir: Path, params: Params) -> PublicSet | None:
    """The public set shipped with this task (kept for later rounds), else the one kept from before."""
    path = workdir / PUBLIC_FILE
    shipped = {k.removeprefix(PUBLIC_PREFIX): v for k, v in params.items() if k.startswith(PUBLIC_PREFIX)}
    if shipped:
        public = PublicSet.from_arrays(shipped)
        write_bytes_durably(path, encode_tensors(shipped, compress=False))
        return public
    if path.is_file():
        return PublicSet.from_arrays(decode_tensors(path.read_bytes()))
    return None


def build_learner(
    config: Config, data: ClinicData, seed: int, public: PublicSet | None = None, *, strategy: str = ""
) -> NodeLearner:
    """The simulation's learner for ``strategy`` and the role in ``config``, its models initialised under
    ``seed``."""
    default = LocalConfig.from_task(config, LocalConfig())
    role = config.get("role")
    torch.manual_seed(seed)
    if isinstance(role, str):
        model = create_model(_model_name(config, strategy), **_model_args(config))
        if not isinstance(model, FedHelpSmall):
            raise LearnerInputError(f"a FedHelp task needs a FedHelp small model, not {type(model).__name__}")
        if role == "small" and (public is None or public.soft_labels is None):
            raise LearnerInputError(
                "the FedHelp small role needs the public set and its foundation soft labels, which this "
                "node has not received (the hub ships them with a round started with --public)"
            )
        return fedhelp_learner(
            role,
            CLIENT_ID,
            model,
            data,
            default,
            seed,
            large_model=str(config.get("large_model", "fedhelp_large")),
            kl_weight=float(config.get("kl_weight", 0.1)),
            public_x=public.x01 if public is not None else None,
            soft_labels=public.soft_labels if public is not None else None,
        )
    if strategy == "hsl":
        if public is None or public.labels is None:
            raise LearnerInputError(
                "HSL needs the public anchor set with its labels, which this node has not received "
                "(the hub ships it with a round started with --public)"
            )
        mmoe = create_model(_model_name(config, strategy), **_model_args(config))
        if not isinstance(mmoe, HslMmoe):
            raise LearnerInputError(f"an HSL task needs the two-task MMoE, not {type(mmoe).__name__}")
        return HslLearner(CLIENT_ID, mmoe, data, public.x01, public.labels, default, seed)
    model = create_model(_model_name(config, strategy), **_model_args(config))
    if strategy == "pfednet":  # its shared part may travel differentially sparse (the task says)
        return PFedNetLearner(CLIENT_ID, model, data, default, seed)
    return SupervisedLearner(CLIENT_ID, model, data, default, seed)


def _check_update(update: Params, expected: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> Params:
    missing = sorted(set(expected) - set(update))
    if missing:
        raise LearnerInputError(f"the model has no tensors {missing[:5]} that the task expects")
    out: Params = {}
    for name, (shape, dtype) in expected.items():
        arr = np.asarray(update[name])
        if arr.shape != shape:
            raise LearnerInputError(f"{name!r} has shape {list(arr.shape)}, the task expects {list(shape)}")
        out[name] = arr.astype(dtype, copy=False)
    return out


def learn(workdir: Path) -> ClientResult:
    """Answer the task in ``workdir``: fit, write update.npz and result.json, keep private/ for next time."""
    task = NodeTask.read(workdir)
    if task.kind is UpdateKind.KEPT_TENSORS:
        return _kept(workdir, task)
    if task.kind is not UpdateKind.WEIGHTS_DELTA:
        raise LearnerInputError(
            f"the torch learner answers weights_delta and kept_tensors, not {task.kind.value}"
        )
    _check_normalisation(_model_name(task.config, task.strategy))
    private = workdir / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    public = _public_set(workdir, task.params)
    params = {k: v for k, v in task.params.items() if not k.startswith(PUBLIC_PREFIX)}
    seed = int(task.config.get("seed", 0))
    learner = build_learner(task.config, task.data, seed, public, strategy=task.strategy)
    state_path = private / STATE_FILE
    if state_path.is_file():
        learner.restore(
            {k: v for k, v in decode_tensors(state_path.read_bytes()).items() if k != TRAINED_ROUND}
        )
    client_task = ClientTask(CLIENT_ID, task.round, task.kind, params, task.config)
    result = learner.fit(client_task)
    update = _check_update(result.update, task.expected)
    state = {**learner.state(), TRAINED_ROUND: np.array(task.round, dtype=np.int64)}
    write_bytes_durably(state_path, encode_tensors(state, compress=False))
    _write_answer(workdir, update, result.num_examples, result.metrics)
    return result


def _write_answer(workdir: Path, update: Params, num_examples: int, metrics: Mapping[str, float]) -> None:
    """update.npz and result.json, as the node's external learner reads them (its finite metrics only)."""
    write_bytes_durably(workdir / "update.npz", encode_tensors(update, compress=False))
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    write_text_durably(workdir / "result.json", json.dumps({"num_examples": num_examples, "metrics": finite}))


def _kept(workdir: Path, task: NodeTask) -> ClientResult:
    """Answer a kept_tensors task: the expected tensors as this node's learner holds them after its last
    training round (``private/state.npz``), e.g. the normalisation tensors FedBN never sent."""
    state_path = workdir / "private" / STATE_FILE
    if not state_path.is_file():
        raise LearnerInputError("this node's learner has trained no round yet, so it keeps no tensors")
    state = decode_tensors(state_path.read_bytes())
    missing = sorted(set(task.expected) - set(state))
    if missing:
        raise LearnerInputError(f"this node's learner keeps no tensors {missing[:5]} (is it the same model?)")
    update = _check_update(state, task.expected)
    # Which round left them: the hub tells an operator whose tensors are older than the round deployed.
    metrics = {"trained_round": float(state[TRAINED_ROUND])} if TRAINED_ROUND in state else {}
    _write_answer(workdir, update, task.data.n_train, metrics)
    return ClientResult(CLIENT_ID, task.round, task.data.n_train, update, metrics)


app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0] if __doc__ else None)


@app.command()
def run(
    workdir: Annotated[Path, typer.Argument(help="The node's learner work directory.", file_okay=False)],
) -> None:
    """Train on the task in WORKDIR and write its update (the node runs this; docs/learners.md)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = learn(workdir)
    except (LearnerInputError, KeyError) as exc:
        typer.echo(f"fedclinic-learn: {exc}", err=True)
        raise typer.Exit(2) from None
    log.info("round %d: trained on %d examples", result.round, result.num_examples)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
