"""The benchmark's methods: train on one seed's clinics, report per-clinic and unseen metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.flbench.datasets import CLINICS, LARGE_CLINICS, SMALL_CLINICS, TASKS, BenchData
from hub.fl.aggregate import unweighted_mean, weighted_mean
from hub.fl.registry import make_strategy
from hub.fl.strategy import Params, Strategy
from hub.models.fedhelp_nets import fedhelp_small
from hub.models.fl_cnn import Norm, fl_cnn
from hub.models.hsl_mmoe import hsl_mmoe
from hub.training.distill import count_params, distill_student, save_student
from hub.training.fedhelp_kd import RankSign
from hub.training.fedhelp_train import FedHelpLargeLearner, FedHelpSmallLearner, fedhelp_learner
from hub.training.foundation import stored_soft_labels
from hub.training.hsl_train import HslLearner, anchor_choices, anchored, predict_self_paired
from hub.training.learners import (
    LocalConfig,
    SupervisedLearner,
    binary_metrics,
    load_params,
    predict,
    to_params,
    train_local,
)
from hub.training.pfednet_train import PFedNetLearner, is_personal_tensor
from hub.training.simulation import ClientLearner, RoundCheckpoint, run_federation

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], np.ndarray]
OnRound = Callable[[int], None]


@dataclass(frozen=True)
class BenchConfig:
    """One budget for every method: ``rounds`` × ``local_epochs`` passes (local/central: that many epochs)."""

    rounds: int = 12
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    fedprox_mu: float = 0.01
    pfednet_lam: float = 10.0
    pfednet_eta: float = 0.01
    fedhelp_kl_weight: float = 0.1
    distill_epochs: int = 10
    #: At least this many distillation steps (BreastMNIST's transfer set is small: 10 epochs are 130 steps).
    distill_min_steps: int = 1000


@dataclass
class MethodContext:
    """Where a method may keep files (round checkpoints, soft labels) and how it reports progress."""

    cfg: BenchConfig
    out_dir: Path
    seed: int
    on_round: OnRound | None = None
    checkpoint: RoundCheckpoint | None = None


def evaluate(
    data: BenchData, per_clinic: Mapping[str, Predictor], unseen: Predictor | list[Predictor]
) -> dict[str, Any]:
    """AUC and balanced accuracy of each clinic's model on its own profiled test set and the unseen clinic.

    A list for ``unseen`` (local-only) scores every model there and reports the mean of their metrics.
    """
    clinics = {
        c: binary_metrics(data.clinics[c].test_y, per_clinic[c](data.clinics[c].test_x)) for c in CLINICS
    }
    if isinstance(unseen, list):
        each = [binary_metrics(data.unseen_y, p(data.unseen_x)) for p in unseen]
        unseen_m = {k: float(np.mean([m[k] for m in each])) for k in ("auc", "bacc")}
    else:
        unseen_m = binary_metrics(data.unseen_y, unseen(data.unseen_x))
    return {"clinics": clinics, "unseen": unseen_m}


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def _predictor(model: nn.Module) -> Predictor:
    return lambda x: predict(model, x)


def _local_cfg(ctx: MethodContext, **kw: Any) -> LocalConfig:
    return LocalConfig(epochs=ctx.cfg.local_epochs, lr=ctx.cfg.lr, batch_size=ctx.cfg.batch_size, **kw)


def _run(
    strategy: Strategy, learners: Mapping[str, ClientLearner], rounds: int, ctx: MethodContext
) -> dict[str, float]:
    run = run_federation(strategy, learners, rounds, checkpoint=ctx.checkpoint, on_round=ctx.on_round)
    failures = [f for r in run.rounds for f in r.failures]
    if failures:
        log.warning("%s: %d clinic failures: %s", strategy.name, len(failures), failures[:3])
    return run.bytes_per_client_round()


# -- baselines without federation -------------------------------------------------------------------------


def run_local(
    data: BenchData, ctx: MethodContext, *, augment: bool = False, norm: Norm = "batch"
) -> dict[str, Any]:
    """Each clinic alone for rounds × local_epochs epochs; unseen = mean over the six local models."""
    cfg = _local_cfg(ctx, augment=augment)
    cfg = LocalConfig(**{**cfg.__dict__, "epochs": ctx.cfg.rounds * ctx.cfg.local_epochs})
    models: dict[str, nn.Module] = {}
    for k, c in enumerate(CLINICS):
        model = _seeded(ctx.seed, lambda: fl_cnn(norm=norm))
        train_local(
            model,
            data.clinics[c].train_x,
            data.clinics[c].train_y,
            cfg,
            torch.Generator().manual_seed(ctx.seed * 100 + k),
        )
        models[c] = model
        if ctx.on_round is not None:
            ctx.on_round(round((k + 1) * ctx.cfg.rounds / len(CLINICS)))
    return evaluate(
        data, {c: _predictor(m) for c, m in models.items()}, [_predictor(m) for m in models.values()]
    )


def run_central(
    data: BenchData, ctx: MethodContext, *, augment: bool = False, norm: Norm = "batch"
) -> dict[str, Any]:
    """All clinics' rendered data pooled (the upper bound that moves raw data), same number of epochs."""
    x, y = data.pooled_train()
    model = _seeded(ctx.seed, lambda: fl_cnn(norm=norm))
    gen = torch.Generator().manual_seed(ctx.seed * 100)
    cfg = _local_cfg(ctx, augment=augment)
    for rnd in range(1, ctx.cfg.rounds + 1):  # a fresh Adam per "round", like the federated methods
        train_local(model, x, y, cfg, gen)
        if ctx.on_round is not None:
            ctx.on_round(rnd)
    p = _predictor(model)
    return evaluate(data, dict.fromkeys(CLINICS, p), p)


# -- weight-averaging baselines -------------------------------------------------------------------------


def run_averaging(
    data: BenchData, ctx: MethodContext, strategy_name: str, *, augment: bool = False, norm: Norm = "batch"
) -> dict[str, Any]:
    """FedAvg / FedProx / FedBN on the calibration CNN; FedBN evaluates each clinic with its own norms."""
    init = _seeded(ctx.seed, lambda: fl_cnn(norm=norm))
    settings: dict[str, Any] = {"client_config": {"augment": augment}}
    if strategy_name == "fedprox":
        settings["mu"] = ctx.cfg.fedprox_mu
    strategy = make_strategy(strategy_name, **settings)
    learners: dict[str, SupervisedLearner] = {}
    for k, c in enumerate(CLINICS):
        model = fl_cnn(norm=norm)
        model.load_state_dict(init.state_dict())
        learners[c] = SupervisedLearner(
            c, model, data.clinics[c], _local_cfg(ctx, augment=augment), ctx.seed * 100 + k
        )
    strategy.initialize(to_params(init), list(CLINICS))
    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx)
    shared = strategy.global_params
    per_clinic: dict[str, Predictor] = {}
    for c, learner in learners.items():
        load_params(learner.model, shared)  # FedBN: the clinic keeps its own norm tensors
        per_clinic[c] = _predictor(learner.model)
    global_model = fl_cnn(norm=norm)
    local_names = [n for n in to_params(init) if n not in shared]
    if local_names:
        # The unseen clinic has no norms of its own: sample-weighted mean of the clinics' (calibration §1).
        norms = [{n: to_params(learners[c].model)[n] for n in local_names} for c in CLINICS]
        load_params(global_model, weighted_mean(norms, [data.clinics[c].n_train for c in CLINICS]))
    load_params(global_model, shared)
    result = evaluate(data, per_clinic, _predictor(global_model))
    result["bytes_per_client_round"] = bytes_up
    return result


# -- fedclinic strategies -------------------------------------------------------------------------------


def run_hsl(data: BenchData, ctx: MethodContext) -> dict[str, Any]:
    """HSL: two-task MMoE, shared anchor task on the public set, every tensor averaged unweighted."""
    init = _seeded(ctx.seed, hsl_mmoe)
    cfg = _local_cfg(ctx, augment=True, weight_decay=1e-4)  # AdamW lr 1e-3, wd 1e-4 (Core_HSL, §1.4)
    strategy = make_strategy("hsl", client_config={"augment": True})
    learners = {}
    for k, c in enumerate(CLINICS):
        model = hsl_mmoe()
        model.load_state_dict(init.state_dict())
        learners[c] = HslLearner(
            c, model, data.clinics[c], data.public_x, data.public_y, cfg, ctx.seed * 100 + k
        )
    strategy.initialize(to_params(init), list(CLINICS))
    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx)
    net = hsl_mmoe()
    load_params(net, strategy.global_params)  # the last round's averaged model (no model selection, like all)
    net.eval()
    choices = anchor_choices(data.public_x, data.public_y)
    deploy = anchored(net, choices["mean"])
    result = evaluate(data, dict.fromkeys(CLINICS, _predictor(deploy)), _predictor(deploy))
    stability: dict[str, dict[str, float]] = {}
    for name, anchor in choices.items():
        m = evaluate(
            data, dict.fromkeys(CLINICS, _predictor(anchored(net, anchor))), _predictor(anchored(net, anchor))
        )
        stability[name] = {
            "mean_clinic_auc": float(np.mean([m["clinics"][c]["auc"] for c in CLINICS])),
            "unseen_auc": m["unseen"]["auc"],
        }
    self_paired = evaluate(
        data,
        dict.fromkeys(CLINICS, lambda x: predict_self_paired(net, x)),
        lambda x: predict_self_paired(net, x),
    )
    means = [s["mean_clinic_auc"] for s in stability.values()]
    result["bytes_per_client_round"] = bytes_up
    result["extra"] = {
        "deploy_anchor": "mean",
        "anchor_auc": stability,
        "anchor_auc_spread": float(max(means) - min(means)),
        "self_paired_mean_clinic_auc": float(np.mean([self_paired["clinics"][c]["auc"] for c in CLINICS])),
        "params": count_params(net),
    }
    return result


def run_fedhelp(
    data: BenchData, ctx: MethodContext, *, rank_sign: RankSign = "agree", distill: bool = True
) -> dict[str, Any]:
    """FedHelp: roles by data volume, dual KD at the large hospitals, FM soft labels at the small clinics."""
    soft = stored_soft_labels(ctx.out_dir / f"foundation-{data.task}.npz", data.public_x, data.public_y)
    soft_t = torch.from_numpy(soft)
    init = _seeded(ctx.seed, lambda: fedhelp_small(public_classes=soft.shape[1]))
    sizes = {c: data.clinics[c].n_train for c in CLINICS}
    large_ids = sorted(sizes, key=lambda c: -sizes[c])[:2]  # top 2 by data volume (§2.1)
    strategy = make_strategy("fedhelp", large_clients=large_ids, client_config={"augment": True})
    cfg = _local_cfg(ctx, augment=True)
    learners: dict[str, FedHelpLargeLearner | FedHelpSmallLearner] = {}
    for k, c in enumerate(CLINICS):
        small = fedhelp_small(public_classes=soft.shape[1])
        small.load_state_dict(init.state_dict())
        learners[c] = fedhelp_learner(
            "large" if c in large_ids else "small",
            c,
            small,
            data.clinics[c],
            cfg,
            ctx.seed * 100 + k,
            kl_weight=ctx.cfg.fedhelp_kl_weight,
            rank_sign=rank_sign,
            public_x=data.public_x,
            soft_labels=soft_t,
        )
    # The large hospitals' learners, largest first (the first one hosts the distillation).
    hospitals = [h for c in large_ids if isinstance(h := learners[c], FedHelpLargeLearner)]
    strategy.initialize(to_params(init), list(CLINICS))
    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx)
    global_small = fedhelp_small(public_classes=soft.shape[1])
    load_params(global_small, strategy.global_params)
    g = _predictor(global_small)
    # Small clinics use the global small model; large hospitals their private large model (§2.5).
    per_clinic = {c: (learners[c].predict if c in large_ids else g) for c in CLINICS}
    result = evaluate(data, per_clinic, g)
    result["bytes_per_client_round"] = bytes_up
    proxy_view = evaluate(data, dict.fromkeys(CLINICS, g), g)
    result["extra"] = {
        "large_clients": large_ids,
        "rank_sign": rank_sign,
        "global_small_auc": {c: proxy_view["clinics"][c]["auc"] for c in CLINICS},
        "small_model_params": count_params(global_small),
        "large_model_params": count_params(hospitals[0].large),
    }
    if distill:
        result["extra"]["distill"] = _distill(data, ctx, hospitals[0])
    return result


def _distill(data: BenchData, ctx: MethodContext, hospital: FedHelpLargeLearner) -> dict[str, Any]:
    """Hub at the large hospital: its private large model → compact student (its images + public set)."""
    teacher = hospital.large.eval()
    transfer = torch.cat([hospital.data.train_x, data.public_x])
    t0 = time.perf_counter()
    student = distill_student(
        teacher, transfer, epochs=ctx.cfg.distill_epochs, min_steps=ctx.cfg.distill_min_steps, seed=ctx.seed
    )
    t_eval = evaluate(data, dict.fromkeys(CLINICS, _predictor(teacher)), _predictor(teacher))
    s_eval = evaluate(data, dict.fromkeys(CLINICS, _predictor(student)), _predictor(student))
    t_mean = float(np.mean([t_eval["clinics"][c]["auc"] for c in CLINICS]))
    s_mean = float(np.mean([s_eval["clinics"][c]["auc"] for c in CLINICS]))
    path = save_student(
        ctx.out_dir / "students" / f"{data.task}-seed{ctx.seed}",
        student,
        TASKS[data.task].primary,
        {"student_mean_clinic_auc": s_mean, "student_unseen_auc": s_eval["unseen"]["auc"]},
        source=f"bench fl distillation, task {data.task}",
    )
    return {
        "checkpoint": str(path.relative_to(ctx.out_dir)),
        "teacher": f"fedhelp_large@{hospital.client_id}",
        "teacher_params": count_params(teacher),
        "student_params": count_params(student),
        "teacher_mean_clinic_auc": t_mean,
        "student_mean_clinic_auc": s_mean,
        "teacher_unseen_auc": t_eval["unseen"]["auc"],
        "student_unseen_auc": s_eval["unseen"]["auc"],
        "gap": t_mean - s_mean,
        "seconds": time.perf_counter() - t0,
    }


def run_pfednet(data: BenchData, ctx: MethodContext) -> dict[str, Any]:
    """pFedNet: shared extractor averaged; personal head + norm affines fused over the sketch graph (ADMM)."""
    init = _seeded(ctx.seed, lambda: fl_cnn(norm="group"))
    strategy = make_strategy(
        "pfednet",
        is_personal=is_personal_tensor,
        lam=ctx.cfg.pfednet_lam,
        eta=ctx.cfg.pfednet_eta,
        mean_gradient=False,
        graph_k=2,
        graph_keys=("label_counts", "feature_mean"),
        client_config={"augment": True},
    )
    learners: dict[str, PFedNetLearner] = {}
    for k, c in enumerate(CLINICS):
        model = fl_cnn(norm="group")
        model.load_state_dict(init.state_dict())
        learners[c] = PFedNetLearner(
            c, model, data.clinics[c], _local_cfg(ctx, augment=True), ctx.seed * 100 + k
        )
    strategy.initialize(to_params(init), list(CLINICS))
    # Round 1 is the stats round (similarity graph); then the same R training rounds as the others.
    bytes_up = _run(strategy, learners, ctx.cfg.rounds + 1, ctx)
    per_clinic: dict[str, Predictor] = {}
    personal: list[Params] = []
    for c, learner in learners.items():
        params = strategy.params_for(c)
        load_params(learner.model, params)
        per_clinic[c] = _predictor(learner.model)
        personal.append({n: a for n, a in params.items() if is_personal_tensor(n)})
    global_model = fl_cnn(norm="group")
    load_params(global_model, {**strategy.global_params, **unweighted_mean(personal)})
    result = evaluate(data, per_clinic, _predictor(global_model))
    result["bytes_per_client_round"] = bytes_up
    graph = getattr(strategy, "graph", None)
    result["extra"] = {
        "graph_edges": [[CLINICS[i], CLINICS[j]] for i, j in graph.edges] if graph is not None else []
    }
    return result


MethodFn = Callable[[BenchData, MethodContext], dict[str, Any]]

#: Every method of `bench fl --methods all`, in run order. "_aug" rows are ablations of the levers alone.
METHODS: dict[str, MethodFn] = {
    "local": run_local,
    "central": run_central,
    "fedavg": lambda d, c: run_averaging(d, c, "fedavg"),
    "fedprox": lambda d, c: run_averaging(d, c, "fedprox"),
    "fedbn": lambda d, c: run_averaging(d, c, "fedbn"),
    "hsl": run_hsl,
    "fedhelp": run_fedhelp,
    "pfednet": run_pfednet,
    "fedavg_aug": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group"),
    "central_aug": lambda d, c: run_central(d, c, augment=True, norm="group"),
    "fedhelp_snapshot": lambda d, c: run_fedhelp(d, c, rank_sign="snapshot", distill=False),
}
BASELINES: tuple[str, ...] = ("local", "central", "fedavg", "fedprox", "fedbn")
OURS: tuple[str, ...] = ("hsl", "fedhelp", "pfednet")
FEDERATED: frozenset[str] = frozenset(set(METHODS) - {"local", "central", "central_aug"})
__all__ = [
    "BASELINES",
    "FEDERATED",
    "LARGE_CLINICS",
    "METHODS",
    "OURS",
    "SMALL_CLINICS",
    "BenchConfig",
    "MethodContext",
    "evaluate",
]
