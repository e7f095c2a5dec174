"""The benchmark's methods: train on one seed's clinics, report per-clinic and unseen metrics."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from harness.flbench.adapt import adapt_norms
from harness.flbench.datasets import LARGE_CLINICS, SMALL_CLINICS, TASKS, BenchData
from harness.flbench.ditto import DittoLearner
from harness.flbench.envelope_rates import Embedder, envelope_rates, feature_embedder
from harness.flbench.finetune import fine_tune
from harness.flbench.frozen_student import FrozenStudent, bench_task, primary_scores
from harness.flbench.light_clinic import LightClinic
from harness.flbench.public_corpus import BenchFoundation
from harness.flbench.scoring import (
    METRICS,
    Predictor,
    finite_mean,
    selection_key,
    threshold_metrics,
    validation_threshold,
)
from harness.flbench.steps import one_time_work
from harness.flbench.stress import stress_validation
from harness.flbench.tail import TailMean
from harness.flbench.tta import tta_predictor
from hub.fl.aggregate import weighted_mean
from hub.fl.compress import TopKCompressor
from hub.fl.fedbn import is_norm_buffer
from hub.fl.pfednet import PERSONAL_PARTS, PFedNet
from hub.fl.registry import make_strategy
from hub.fl.strategy import Params, Strategy
from hub.models.fedhelp_nets import fedhelp_small
from hub.models.fl_cnn import Norm, fl_cnn
from hub.models.hsl_mmoe import Fusion, HslMmoe
from hub.models.hsl_mmoe import hsl_mmoe as build_hsl
from hub.models.student import student_cnn_s
from hub.training.distill import count_params, distill_student, save_student
from hub.training.fedhelp_kd import RankSign
from hub.training.fedhelp_train import FedHelpLargeLearner, FedHelpSmallLearner, fedhelp_learner
from hub.training.foundation import stored_soft_labels
from hub.training.hsl_train import (
    HslLearner,
    HslStepsLearner,
    anchor_choices,
    anchored,
    predict_self_paired,
)
from hub.training.learners import (
    LocalConfig,
    SupervisedLearner,
    load_params,
    predict,
    to_params,
    train_local,
)
from hub.training.pfednet_train import PFedNetLearner
from hub.training.simulation import ClientLearner, OnResults, RoundCheckpoint, run_federation

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
OnRound = Callable[[int], None]


@dataclass(frozen=True)
class BenchConfig:
    """One budget for every method: ``rounds`` × ``local_epochs`` passes (local/central: that many epochs).

    ``augment`` is the track: True gives every method (baselines included) the same training augmentation,
    False gives none to any; the ``*_aug`` references always augment.
    """

    rounds: int = 12
    augment: bool = True
    #: Top-k uplink compression (fraction kept, with error feedback) on every federated method; 1 = none.
    topk: float = 1.0
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    fedprox_mu: float = 0.01
    pfednet_lam: float = 10.0
    pfednet_eta: float = 0.01
    #: pFedNet's personal part (``PFEDNET_PERSONAL``) and the sketches of its graph (``PFEDNET_GRAPHS``).
    pfednet_personal: str = "head_norm"
    pfednet_graph: str = "labels+features"
    #: pFedNet's differentially sparse upload of the shared part (γ of hub.fl.differential_sparsity; 0 = off).
    pfednet_gamma: float = 0.0
    #: FedHelp's dual KD: proxy→large KL and ranking weights, large→proxy KD weight, and the small clinics'
    #: foundation-head KD weight (0 = the ablation without the foundation head).
    fedhelp_kl_weight: float = 0.1
    fedhelp_rank_weight: float = 0.2
    fedhelp_kd_weight: float = 1.0
    fedhelp_fm_weight: float = 1.0
    #: Whether `fedhelp` also distils its hub student (the distillation table; off saves CPU).
    fedhelp_distill: bool = True
    #: The foundation teachers' budget: at most this many corpus images and epochs per teacher.
    fedhelp_foundation_max_train: int = 2000
    fedhelp_foundation_epochs: int = 12
    #: HSL's shared-anchor loss weight (the primary task keeps 0.5) and its fusion (hub.models.hsl_mmoe).
    hsl_anchor_weight: float = 0.5
    hsl_fusion: str = "softmax"
    #: Weight of the agreement term across augmented views (hub.training.learners.view_loss) in the
    #: ``*_cons`` methods, which always augment.
    consistency: float = 12.0
    #: The ``*_ft`` methods' local fine-tuning: fresh Adam at this rate, epochs chosen per clinic on its
    #: validation loss from ``harness.flbench.finetune.FINETUNE_EPOCHS``.
    finetune_lr: float = 3e-4
    #: The ``ditto_*`` methods' pull of each clinic's personal model toward the global one (λ) and the
    #: personal model's SGD step (η), chosen on the design seeds' validation splits (docs/benchmarks.md).
    ditto_lam: float = 100.0
    ditto_lr: float = 0.01
    #: The ``*_tail`` methods deploy the mean of the models of the last this-many rounds
    #: (``harness.flbench.tail``) instead of one round's.
    tail_rounds: int = 4
    #: The ``*_sam`` methods' clinics train with sharpness-aware minimisation of this radius ρ
    #: (``hub.training.sam``), chosen on the design seeds' validation splits (docs/benchmarks.md).
    sam_rho: float = 0.02
    #: Which validation reading chooses the round a method with one deployable model keeps (``BestRound``):
    #: "whole", every validation image through each clinic's scanner; "own", each clinic's own validation
    #: images only (6-10 at a small breast clinic; the runs before session 28).
    round_choice: str = "whole"
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
    #: Upload bytes per clinic of the last federation's statistics rounds (reported apart from training).
    stats_bytes: dict[str, float] = field(default_factory=dict)
    #: Sees each round's answers before the strategy aggregates them (``run_federation``'s ``on_results``).
    on_results: OnResults | None = None


def _scores(
    predictor: Predictor,
    val: tuple[torch.Tensor, torch.Tensor],
    tests: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, dict[str, float]]:
    """Threshold from ``val`` (Youden's J), then each test set scored once at that threshold."""
    val_logits = predictor(val[0]) if len(val[1]) else np.zeros(0)
    thr = validation_threshold(val[1].numpy(), val_logits)
    val_auc = threshold_metrics(val[1].numpy(), val_logits, thr)["auc"] if len(val[1]) else math.nan
    out = {}
    for name, (x, y) in tests.items():
        out[name] = {**threshold_metrics(y.numpy(), predictor(x), thr), "val_auc": val_auc, "threshold": thr}
    return out


def _mean_metrics(each: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in each])) for k in each[0]}


def clinic_scores(data: BenchData, per_clinic: Mapping[str, Predictor]) -> dict[str, dict[str, float]]:
    """Each clinic's model on its own test set at the threshold its own validation split chooses; where the
    data has it, also on the whole test split through the clinic's scanner (``BenchData.whole_test_x``), at
    the same threshold, as ``auc_whole``, ``bacc_whole``, ``sens_whole`` and ``spec_whole``; and its AUC on
    the whole validation split through its scanner (``BenchData.whole_val_x``) as ``val_auc_whole``."""
    out = {}
    for c in data.names:
        tests = {"test": (data.clinics[c].test_x, data.clinics[c].test_y)}
        if c in data.whole_test_x:
            tests["whole"] = (data.whole_test_x[c], data.unseen_y)
        scored = _scores(per_clinic[c], (data.clinics[c].val_x, data.clinics[c].val_y), tests)
        whole = {f"{k}_whole": scored["whole"][k] for k in METRICS} if "whole" in scored else {}
        out[c] = {**scored["test"], **whole}
    for c, auc in whole_validation_aucs(data, per_clinic).items():
        out[c]["val_auc_whole"] = auc
    return out


def evaluate(
    data: BenchData,
    per_clinic: Mapping[str, Predictor],
    unseen: Predictor | list[Predictor],
    adapted: Mapping[str, Predictor] | None = None,
    embed: Embedder | None = None,
) -> dict[str, Any]:
    """Each clinic's model on its own test set (its prevalence, its profile) at a threshold chosen on its own
    validation split; the unseen clinic and the panel at a threshold chosen on the pooled validation split.

    A list for ``unseen`` (local-only) scores every model there and reports the mean of their metrics.
    ``adapted`` gives an unseen clinic ("unseen", "panel/<name>") a model of its own (adapted to its
    unlabeled images, ``BenchData.adapt_x``) in place of ``unseen``. ``embed`` (a method with one deployable
    model) adds how many test images of each clinic fall outside that model's input envelope (``envelope``).
    ``stress_val``: each clinic's model on its own validation images pushed past the augmentation
    (``harness.flbench.stress``), what a choice that should favour robust models may look at.
    """
    clinics = clinic_scores(data, per_clinic)
    tests = {"unseen": (data.unseen_x, data.unseen_y)}
    tests.update({f"panel/{n}": (x, data.unseen_y) for n, x in data.panel.items()})
    pooled = data.pooled_val()
    runs = [_scores(p, pooled, tests) for p in (unseen if isinstance(unseen, list) else [unseen])]
    merged = {name: _mean_metrics([r[name] for r in runs]) for name in tests}
    for name, own in (adapted or {}).items():
        merged[name] = _scores(own, pooled, {name: tests[name]})[name]
    result: dict[str, Any] = {
        "clinics": clinics,
        "small": list(data.small),
        "unseen": merged["unseen"],
        "stress_val": stress_validation(data, per_clinic),
    }
    panel = {n: merged[f"panel/{n}"] for n in data.panel}
    if panel:
        result["panel"] = panel
        result["panel_mean"] = {k: float(np.mean([m[k] for m in panel.values()])) for k in METRICS}
    if embed is not None:
        result["envelope"] = envelope_rates(data, embed)
    return result


def validation_aucs(data: BenchData, per_clinic: Mapping[str, Predictor]) -> dict[str, float]:
    """Each given clinic's validation AUC (NaN where its split is empty); no test split is read.

    What a choice made on validation (a round, a clip, a hyper-parameter) may look at.
    """
    return {
        c: threshold_metrics(data.clinics[c].val_y.numpy(), predictor(data.clinics[c].val_x), 0.0)["auc"]
        if len(data.clinics[c].val_y)
        else math.nan
        for c, predictor in per_clinic.items()
    }


def whole_validation_aucs(data: BenchData, per_clinic: Mapping[str, Predictor]) -> dict[str, float]:
    """Each given clinic's AUC on the whole validation split through its scanner (``BenchData.whole_val_x``);
    empty where the data has no such rendering. No test split is read."""
    if data.whole_val_y is None:
        return {}
    y = data.whole_val_y.numpy()
    return {
        c: threshold_metrics(y, predictor(data.whole_val_x[c]), 0.0)["auc"]
        for c, predictor in per_clinic.items()
        if c in data.whole_val_x
    }


class BestRound:
    """Keeps the round whose model has the best mean small-clinic validation AUC, a tie (to 1e-9) going to
    the best mean validation AUC over all clinics; the test split plays no part. Methods with one deployable
    global model (FedAvg, FedProx, the central model, HSL) report that round; the others report their last.

    ``on_whole`` (``BenchConfig.round_choice`` "whole") reads those AUCs on the whole validation split
    through each clinic's scanner (``BenchData.whole_val_x``); otherwise on each clinic's own validation
    images, 6–10 at a small clinic, whose AUC is often 1.0 from the first round on (hence the tie-break)
    and so noisy that on breast a round-1 model was kept on two seeds of ten (session 28).

    The kept round's validation AUC is a maximum over rounds, optimistic by construction; the last round's,
    also recorded, is a single reading like every last-round method's, and is what a choice between
    methods compares (``harness.flbench.results.best_ours``)."""

    def __init__(self, data: BenchData, initial: Params, on_whole: bool = False) -> None:
        self.data = data
        self.on_whole = on_whole and data.whole_val_y is not None
        self.round = 0
        self.score: tuple[float, float] = (-math.inf, -math.inf)
        self.last: tuple[float, float] = (math.nan, math.nan)
        self.last_whole: tuple[float, float] = (math.nan, math.nan)
        self.params: Params = dict(initial)

    def _means(self, aucs: Mapping[str, float]) -> tuple[float, float]:
        return finite_mean([aucs[c] for c in self.data.small if c in aucs]), finite_mean(list(aucs.values()))

    def offer(self, rnd: int, params: Params, predictor: Predictor) -> None:
        every = dict.fromkeys(self.data.names, predictor)
        aucs = validation_aucs(self.data, every)
        self.last = self._means(aucs)
        self.last_whole = self._means(whole_validation_aucs(self.data, every))
        score = selection_key(*(self.last_whole if self.on_whole else self.last))
        if score > self.score:
            self.round, self.score, self.params = rnd, score, params

    def extra(self) -> dict[str, float]:
        return {
            "best_round": float(self.round),
            "best_round_val_auc": self.score[0],
            "best_round_all_val_auc": self.score[1],
            "last_round_val_auc": self.last[0],
            "last_round_all_val_auc": self.last[1],
            # The same round on the whole validation split through each clinic's scanner (NaN without it).
            "last_round_val_auc_whole": self.last_whole[0],
            "last_round_all_val_auc_whole": self.last_whole[1],
        }


def _seeded(seed: int, build: Callable[[], M]) -> M:
    torch.manual_seed(seed)
    return build()


def _predictor(model: nn.Module) -> Predictor:
    return lambda x: predict(model, x)


def _local_cfg(ctx: MethodContext, **kw: Any) -> LocalConfig:
    return LocalConfig(epochs=ctx.cfg.local_epochs, lr=ctx.cfg.lr, batch_size=ctx.cfg.batch_size, **kw)


def _rho(ctx: MethodContext, sam: bool) -> float:
    """SAM's radius for a method: the config's ``sam_rho`` for the ``*_sam`` methods, 0 (plain steps) else."""
    return ctx.cfg.sam_rho if sam else 0.0


def _client_config(local: LocalConfig) -> dict[str, Any]:
    """What every clinic's task carries for its torch learner, from the clinics' ``local`` settings:
    augmentation, and the agreement term's weight, the random convolutions and SAM's radius when they are
    on."""
    return {
        "augment": local.augment,
        **({"consistency": local.consistency} if local.consistency > 0 else {}),
        **({"randconv": True} if local.randconv else {}),
        **({"sam_rho": local.sam_rho} if local.sam_rho > 0 else {}),
    }


def _run(
    strategy: Strategy,
    learners: Mapping[str, ClientLearner],
    rounds: int,
    ctx: MethodContext,
    on_round: OnRound | None = None,
    resumable: bool = True,
) -> dict[str, float]:
    """Run the federation; training-round upload bytes per clinic (stats rounds go to ``ctx.stats_bytes``).

    ``on_round`` (default ``ctx.on_round``) is called after every round, e.g. to score it on validation.
    ``resumable=False`` runs without the round checkpoint: a resumed run replays its finished rounds with
    the restored model, which a tail mean must not take for theirs.
    """
    compressor = TopKCompressor(ctx.cfg.topk) if ctx.cfg.topk < 1.0 else None
    run = run_federation(
        strategy,
        learners,
        rounds,
        checkpoint=ctx.checkpoint if resumable else None,
        on_round=on_round or ctx.on_round,
        compressor=compressor,
        on_results=ctx.on_results,
    )
    failures = [f for r in run.rounds for f in r.failures]
    if failures:
        log.warning("%s: %d clinic failures: %s", strategy.name, len(failures), failures[:3])
    ctx.stats_bytes = run.stats_bytes_per_client_round()
    return run.bytes_per_client_round()


# -- baselines without federation -------------------------------------------------------------------------


def run_local(
    data: BenchData, ctx: MethodContext, *, augment: bool | None = None, norm: Norm = "batch"
) -> dict[str, Any]:
    """Each clinic alone for rounds × local_epochs epochs; unseen = mean over the local models."""
    cfg = _local_cfg(ctx, augment=ctx.cfg.augment if augment is None else augment)
    cfg = LocalConfig(**{**cfg.__dict__, "epochs": ctx.cfg.rounds * ctx.cfg.local_epochs})
    models: dict[str, nn.Module] = {}
    for k, c in enumerate(data.names):
        model = _seeded(ctx.seed, lambda: fl_cnn(norm=norm, num_outputs=data.spec.num_outputs))
        train_local(
            model,
            data.clinics[c].train_x,
            data.clinics[c].train_y,
            cfg,
            torch.Generator().manual_seed(ctx.seed * 100 + k),
        )
        models[c] = model
        if ctx.on_round is not None:
            ctx.on_round(round((k + 1) * ctx.cfg.rounds / len(data.names)))
    return evaluate(
        data, {c: _predictor(m) for c, m in models.items()}, [_predictor(m) for m in models.values()]
    )


def run_central(
    data: BenchData,
    ctx: MethodContext,
    *,
    augment: bool | None = None,
    norm: Norm = "batch",
    consistency: float = 0.0,
    randconv: bool = False,
) -> dict[str, Any]:
    """All clinics' rendered data pooled (the upper bound that moves raw data), same number of epochs."""
    x, y = data.pooled_train()
    model = _seeded(ctx.seed, lambda: fl_cnn(norm=norm, num_outputs=data.spec.num_outputs))
    gen = torch.Generator().manual_seed(ctx.seed * 100)
    augment = ctx.cfg.augment if augment is None else augment
    cfg = _local_cfg(ctx, augment=augment, consistency=consistency, randconv=randconv)
    best = BestRound(data, to_params(model), ctx.cfg.round_choice == "whole")
    for rnd in range(1, ctx.cfg.rounds + 1):  # a fresh Adam per "round", like the federated methods
        train_local(model, x, y, cfg, gen)
        best.offer(rnd, to_params(model), _predictor(model))
        if ctx.on_round is not None:
            ctx.on_round(rnd)
    load_params(model, best.params)
    p = _predictor(model)
    result = evaluate(data, dict.fromkeys(data.names, p), p, embed=feature_embedder(model))
    result["extra"] = best.extra()
    return result


# -- weight-averaging baselines -------------------------------------------------------------------------


def _clinics_mean(learners: Mapping[str, SupervisedLearner], data: BenchData, names: list[str]) -> Params:
    """The tensors ``names`` each clinic kept for itself, sample-weighted over the clinics: what an unseen
    clinic, which has none of its own, takes (calibration §1)."""
    held = [{n: to_params(learners[c].model)[n] for n in names} for c in data.names]
    return weighted_mean(held, [data.clinics[c].n_train for c in data.names])


def run_averaging(
    data: BenchData,
    ctx: MethodContext,
    strategy_name: str,
    *,
    augment: bool | None = None,
    norm: Norm = "batch",
    adabn: bool = False,
    consistency: float = 0.0,
    randconv: bool = False,
    finetune: bool = False,
    ditto: bool = False,
    tail: bool = False,
    tta: bool = False,
    sam: bool = False,
) -> dict[str, Any]:
    """FedAvg / FedProx / FedBN on the calibration CNN; FedBN evaluates each clinic with its own norms.

    ``adabn``: each unseen clinic re-estimates the BatchNorm statistics on its own unlabeled images
    (``adapt_norms``) before it predicts; the clinics that trained are scored as without it.
    ``consistency``: the clinics' training adds the agreement term across augmented views (needs augment);
    ``randconv``: every augmented view also passes through random convolutions (needs augment).
    ``finetune``: each clinic then fine-tunes its model locally (``harness.flbench.finetune``); the unseen
    clinics keep the federation's model.
    ``ditto``: each clinic also trains a personal model pulled toward the global one (λ and SGD step η: the
    config's ``ditto_lam``, ``ditto_lr``; ``harness.flbench.ditto``) and is scored with it; the unseen
    clinics take the global model.
    ``tail``: the deployed model is the mean of the global models of the last ``tail_rounds`` rounds
    (``harness.flbench.tail``) instead of the round kept on validation.
    ``tta``: every clinic and unseen scanner reads the deployed model's mean logit over the image and
    augmented views of it (``harness.flbench.tta``); the round is kept on plain readings as without it.
    ``sam``: the clinics train with sharpness-aware minimisation of radius ``sam_rho`` (``hub.training.sam``).
    """
    augment = ctx.cfg.augment if augment is None else augment
    rho = _rho(ctx, sam)
    local = _local_cfg(ctx, augment=augment, consistency=consistency, randconv=randconv, sam_rho=rho)
    init = _seeded(ctx.seed, lambda: fl_cnn(norm=norm, num_outputs=data.spec.num_outputs))
    settings: dict[str, Any] = {"client_config": _client_config(local)}
    if strategy_name == "fedprox":
        settings["mu"] = ctx.cfg.fedprox_mu
    strategy = make_strategy(strategy_name, **settings)
    learners: dict[str, SupervisedLearner] = {}
    for k, c in enumerate(data.names):
        model = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
        model.load_state_dict(init.state_dict())
        seed = ctx.seed * 100 + k
        if ditto:
            personal = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
            personal.load_state_dict(init.state_dict())
            lam, lr = ctx.cfg.ditto_lam, ctx.cfg.ditto_lr
            learners[c] = DittoLearner(c, model, personal, data.clinics[c], local, seed, lam, lr)
        else:
            learners[c] = SupervisedLearner(c, model, data.clinics[c], local, seed)
    strategy.initialize(to_params(init), list(data.names))
    # One global model (every tensor shared): keep its best round on validation. FedBN's clinics keep
    # their own norms, so it has no single model to choose: it reports its last round.
    selectable = set(strategy.global_params) == set(to_params(init))
    if tail and not selectable:
        raise ValueError(f"{strategy_name}: tail averaging needs one global model (every tensor shared)")
    best = BestRound(data, to_params(init), ctx.cfg.round_choice == "whole")
    tail_mean = TailMean(ctx.cfg.rounds, ctx.cfg.tail_rounds) if tail else None

    def score_round(rnd: int) -> None:
        if ctx.on_round is not None:
            ctx.on_round(rnd)
        if selectable:
            candidate = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
            params = strategy.global_params
            load_params(candidate, params)
            best.offer(rnd, params, _predictor(candidate))
        if tail_mean is not None:
            tail_mean.offer(rnd, strategy.global_params)

    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx, on_round=score_round, resumable=not tail)
    shared = best.params if selectable else strategy.global_params
    if tail_mean is not None:
        shared = tail_mean.mean()
    reader = tta_predictor if tta else _predictor
    per_clinic: dict[str, Predictor] = {}
    for c, learner in learners.items():
        load_params(learner.model, shared)  # FedBN: the clinic keeps its own norm tensors
        per_clinic[c] = reader(learner.model)
    global_model = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
    local_names = [n for n in to_params(init) if n not in shared]
    if local_names:  # FedBN's norms
        load_params(global_model, _clinics_mean(learners, data, local_names))
    load_params(global_model, shared)
    adapted: dict[str, Predictor] | None = None
    if adabn:
        adapted = {n: _predictor(adapt_norms(global_model, x)) for n, x in data.adapt_x.items()}
    tuned: dict[str, Any] = {}
    if finetune:
        models = {c: learner.model for c, learner in learners.items()}
        per_clinic, tuned = _fine_tuned(data, ctx, models, local)
    if ditto:  # the clinics predict with their personal models; the global model's AUC at each is kept too
        on_global = clinic_scores(data, per_clinic)
        personal_models = {c: ln.personal for c, ln in learners.items() if isinstance(ln, DittoLearner)}
        per_clinic = {c: _predictor(m) for c, m in personal_models.items()}
        global_auc = {c: m["auc"] for c, m in on_global.items()}
        tuned = {"ditto_lam": ctx.cfg.ditto_lam, "ditto_lr": ctx.cfg.ditto_lr, "global_auc": global_auc}
    # One deployable model (every tensor shared, none fine-tuned): its input envelope, as its bundle would
    # carry it.
    embed = feature_embedder(global_model) if selectable and not (adabn or finetune or ditto) else None
    result = evaluate(data, per_clinic, reader(global_model), adapted, embed=embed)
    result["bytes_per_client_round"] = bytes_up
    kept = _kept_worth(data, init, shared, global_model, norm) if local_names else {}
    if tail_mean is not None:
        # The rounds' own readings stay (best_round: the round validation would have kept instead).
        tuned = {**tuned, "tail_rounds": tail_mean.rounds, "tail_distances": tail_mean.distances()}
    if selectable or tuned or kept:
        result["extra"] = {**(best.extra() if selectable else {}), **tuned, **kept}
    return result


def _kept_worth(
    data: BenchData, init: nn.Module, shared: Params, mean_model: nn.Module, norm: Norm
) -> dict[str, Any]:
    """What the norms FedBN's clinics kept are worth (``bench/bench_fedbn_deploy.py``): every clinic scored
    with the clinics' mean norms (``mean_model``: what ``models from-round --kept-from M`` builds) and with
    the starting model's under the shared tensors (the aggregate alone, a student built without a
    ``kept_tensors`` round), and the unseen clinic with the latter."""
    start = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
    start.load_state_dict(init.state_dict())
    load_params(start, shared)
    with_mean = clinic_scores(data, dict.fromkeys(data.names, _predictor(mean_model)))
    with_start = clinic_scores(data, dict.fromkeys(data.names, _predictor(start)))
    unseen = _scores(_predictor(start), data.pooled_val(), {"unseen": (data.unseen_x, data.unseen_y)})
    return {
        "mean_norms_auc": {c: m["auc"] for c, m in with_mean.items()},
        "start_norms_auc": {c: m["auc"] for c, m in with_start.items()},
        "start_norms_unseen_auc": unseen["unseen"]["auc"],
    }


def _fine_tuned(
    data: BenchData, ctx: MethodContext, models: Mapping[str, nn.Module], local: LocalConfig
) -> tuple[dict[str, Predictor], dict[str, Any]]:
    return fine_tune(data, models, local, ctx.cfg.finetune_lr, ctx.seed, lambda pcs: clinic_scores(data, pcs))


# -- fedclinic strategies -------------------------------------------------------------------------------


def _fusion(name: str) -> Fusion:
    if name not in ("softmax", "concat"):
        raise ValueError(f"unknown HSL fusion {name!r}; choose 'softmax' or 'concat'")
    return "softmax" if name == "softmax" else "concat"


def run_hsl(
    data: BenchData, ctx: MethodContext, *, anchor_weight: float | None = None, fusion: str | None = None
) -> dict[str, Any]:
    """HSL: two-task MMoE, shared anchor task on the public set, every tensor averaged unweighted.

    ``anchor_weight`` / ``fusion`` override the config's (the ablations: weight 0 is HSL without its anchor).
    """
    sat_weight = ctx.cfg.hsl_anchor_weight if anchor_weight is None else anchor_weight
    how = _fusion(ctx.cfg.hsl_fusion if fusion is None else fusion)

    def hsl_mmoe() -> HslMmoe:
        return build_hsl(fusion=how, num_outputs=data.spec.num_outputs)

    init = _seeded(ctx.seed, hsl_mmoe)
    aug = ctx.cfg.augment
    cfg = _local_cfg(ctx, augment=aug, weight_decay=1e-4)  # AdamW lr 1e-3, wd 1e-4 (Core_HSL, §1.4)
    strategy = make_strategy("hsl", sat_weight=sat_weight, client_config={"augment": aug})
    learners = {}
    for k, c in enumerate(data.names):
        model = hsl_mmoe()
        model.load_state_dict(init.state_dict())
        learners[c] = HslLearner(
            c, model, data.clinics[c], data.public_x, data.public_y, cfg, ctx.seed * 100 + k
        )
    strategy.initialize(to_params(init), list(data.names))
    choices = anchor_choices(data.public_x, data.public_y)
    best = BestRound(data, to_params(init), ctx.cfg.round_choice == "whole")

    def score_round(rnd: int) -> None:
        # The bench keeps HSL's best round on validation (BestRound), never on test, as for every
        # method with one deployable model; the product hands on the last round (docs/algorithms.md
        # §1.5), and product_round_* in the record scores that one.
        if ctx.on_round is not None:
            ctx.on_round(rnd)
        candidate = hsl_mmoe()
        params = strategy.global_params
        load_params(candidate, params)
        best.offer(rnd, params, _predictor(anchored(candidate.eval(), choices["mean"])))

    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx, on_round=score_round)
    net = hsl_mmoe()
    load_params(net, best.params)  # the round with the best small-clinic validation AUC
    net.eval()
    deploy = anchored(net, choices["mean"])
    result = evaluate(data, dict.fromkeys(data.names, _predictor(deploy)), _predictor(deploy))
    stability: dict[str, dict[str, float]] = {}
    for name, anchor in choices.items():
        m = evaluate(
            data,
            dict.fromkeys(data.names, _predictor(anchored(net, anchor))),
            _predictor(anchored(net, anchor)),
        )
        stability[name] = {
            "mean_clinic_auc": float(np.mean([m["clinics"][c]["auc"] for c in data.names])),
            "unseen_auc": m["unseen"]["auc"],
        }
    self_paired = evaluate(
        data,
        dict.fromkeys(data.names, lambda x: predict_self_paired(net, x)),
        lambda x: predict_self_paired(net, x),
    )
    means = [s["mean_clinic_auc"] for s in stability.values()]
    result["bytes_per_client_round"] = bytes_up
    result["extra"] = {
        "deploy_anchor": "mean",
        "anchor_weight": sat_weight,
        "fusion": how,
        **best.extra(),
        **_product_choice(data, strategy, hsl_mmoe(), choices["mean"], ctx.cfg.rounds),
        "anchor_auc": stability,
        "anchor_auc_spread": float(max(means) - min(means)),
        "self_paired_mean_clinic_auc": float(np.mean([self_paired["clinics"][c]["auc"] for c in data.names])),
        "params": count_params(net),
    }
    return result


def _product_choice(
    data: BenchData, strategy: Strategy, net: HslMmoe, anchor: torch.Tensor, rounds: int
) -> dict[str, float]:
    """What the product's HSL deploys, scored as the bench's choice is: the last round's averaged model, as
    for every strategy in ``hub.fl`` (the bench's own choice reads the whole validation split, which no
    federation has)."""
    load_params(net, strategy.global_params)
    deploy = _predictor(anchored(net.eval(), anchor))
    scored = evaluate(data, dict.fromkeys(data.names, deploy), deploy)
    aucs = {c: float(m["auc"]) for c, m in scored["clinics"].items()}
    return {
        "product_round": float(rounds),
        "product_round_small_auc": finite_mean([aucs[c] for c in data.small]),
        "product_round_worst_auc": min(aucs.values()),
        "product_round_panel_auc": float(scored.get("panel_mean", {}).get("auc", math.nan)),
    }


def run_fedavg_hsl_steps(data: BenchData, ctx: MethodContext) -> dict[str, Any]:
    """FedAvg's GroupNorm CNN trained with HSL's loop and averaging, without the anchor task or the MMoE.

    Each clinic takes max(n, |public set|) class-balanced items per epoch (AdamW, wd 1e-4) and the mean is
    unweighted, as in HSL; the bench keeps its best round on validation (BestRound), as for HSL's.
    """
    init = _seeded(ctx.seed, lambda: fl_cnn(norm="group", num_outputs=data.spec.num_outputs))
    aug = ctx.cfg.augment
    cfg = _local_cfg(ctx, augment=aug, weight_decay=1e-4)
    strategy = make_strategy("hsl", client_config={"augment": aug})
    learners: dict[str, HslStepsLearner] = {}
    for k, c in enumerate(data.names):
        model = fl_cnn(norm="group", num_outputs=data.spec.num_outputs)
        model.load_state_dict(init.state_dict())
        learners[c] = HslStepsLearner(c, model, data.clinics[c], len(data.public_y), cfg, ctx.seed * 100 + k)
    strategy.initialize(to_params(init), list(data.names))
    best = BestRound(data, to_params(init), ctx.cfg.round_choice == "whole")

    def score_round(rnd: int) -> None:
        if ctx.on_round is not None:
            ctx.on_round(rnd)
        candidate = fl_cnn(norm="group", num_outputs=data.spec.num_outputs)
        params = strategy.global_params
        load_params(candidate, params)
        best.offer(rnd, params, _predictor(candidate))

    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx, on_round=score_round)
    model = fl_cnn(norm="group", num_outputs=data.spec.num_outputs)
    load_params(model, best.params)
    p = _predictor(model)
    result = evaluate(data, dict.fromkeys(data.names, p), p, embed=feature_embedder(model))
    result["bytes_per_client_round"] = bytes_up
    result["extra"] = best.extra()
    return result


def foundation_soft_labels(data: BenchData, ctx: MethodContext) -> tuple[np.ndarray, dict[str, Any]]:
    """The public set's foundation soft labels (computed once per out dir and public set) and their quality
    on the public set, held out (harness.flbench.public_corpus)."""
    stem = f"foundation-corpus-{data.task}-{len(data.public_y)}"
    quality_path = ctx.out_dir / f"{stem}.json"
    provider = BenchFoundation(
        data.task,
        len(data.public_y),
        quality_path,
        max_train=ctx.cfg.fedhelp_foundation_max_train,
        max_epochs=ctx.cfg.fedhelp_foundation_epochs,
    )
    with one_time_work():  # trained once per out dir, shared by every FedHelp run in it
        soft = stored_soft_labels(ctx.out_dir / f"{stem}.npz", data.public_x, data.public_y, provider)
    quality = json.loads(quality_path.read_text()) if quality_path.is_file() else {}
    return soft, quality


def run_fedhelp(
    data: BenchData,
    ctx: MethodContext,
    *,
    rank_sign: RankSign = "agree",
    distill: bool = True,
    fm_weight: float | None = None,
    rank_weight: float | None = None,
) -> dict[str, Any]:
    """FedHelp: roles by data volume, dual KD at the large hospitals, FM soft labels at the small clinics.

    ``fm_weight`` / ``rank_weight`` override the config's (the ablations: 0 drops the foundation head's KD
    at the small clinics / the ranking term of the reverse KD).
    """
    soft, quality = foundation_soft_labels(data, ctx)
    fm = ctx.cfg.fedhelp_fm_weight if fm_weight is None else fm_weight
    rank = ctx.cfg.fedhelp_rank_weight if rank_weight is None else rank_weight
    soft_t = torch.from_numpy(soft)
    init = _seeded(
        ctx.seed, lambda: fedhelp_small(public_classes=soft.shape[1], num_outputs=data.spec.num_outputs)
    )
    sizes = {c: data.clinics[c].n_train for c in data.names}
    large_ids = sorted(sizes, key=lambda c: -sizes[c])[:2]  # top 2 by data volume (§2.1)
    strategy = make_strategy(
        "fedhelp", large_clients=large_ids, rank_weight=rank, client_config={"augment": ctx.cfg.augment}
    )
    cfg = _local_cfg(ctx, augment=ctx.cfg.augment)
    learners: dict[str, FedHelpLargeLearner | FedHelpSmallLearner] = {}
    for k, c in enumerate(data.names):
        small = fedhelp_small(public_classes=soft.shape[1], num_outputs=data.spec.num_outputs)
        small.load_state_dict(init.state_dict())
        learners[c] = fedhelp_learner(
            "large" if c in large_ids else "small",
            c,
            small,
            data.clinics[c],
            cfg,
            ctx.seed * 100 + k,
            kl_weight=ctx.cfg.fedhelp_kl_weight,
            kd_weight=ctx.cfg.fedhelp_kd_weight,
            fm_weight=fm,
            rank_sign=rank_sign,
            public_x=data.public_x,
            soft_labels=soft_t,
        )
    # The large hospitals' learners, largest first (the first one hosts the distillation).
    hospitals = [h for c in large_ids if isinstance(h := learners[c], FedHelpLargeLearner)]
    strategy.initialize(to_params(init), list(data.names))
    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx)
    global_small = fedhelp_small(public_classes=soft.shape[1], num_outputs=data.spec.num_outputs)
    load_params(global_small, strategy.global_params)
    g = _predictor(global_small)
    # Small clinics use the global small model; large hospitals their private large model (§2.5).
    per_clinic = {c: (learners[c].predict if c in large_ids else g) for c in data.names}
    result = evaluate(data, per_clinic, g)
    result["bytes_per_client_round"] = bytes_up
    proxy_view = evaluate(data, dict.fromkeys(data.names, g), g)
    result["extra"] = {
        "large_clients": large_ids,
        "rank_sign": rank_sign,
        "fm_weight": fm,
        "rank_weight": rank,
        "kd_weight": ctx.cfg.fedhelp_kd_weight,
        "kl_weight": ctx.cfg.fedhelp_kl_weight,
        "foundation": quality.get("quality_held_out", {}),
        "global_small_auc": {c: proxy_view["clinics"][c]["auc"] for c in data.names},
        "small_model_params": count_params(global_small),
        "large_model_params": count_params(hospitals[0].large),
    }
    if distill and ctx.cfg.fedhelp_distill:
        result["extra"]["distill"] = _distill(data, ctx, hospitals[0])
    return result


def _distill(data: BenchData, ctx: MethodContext, hospital: FedHelpLargeLearner) -> dict[str, Any]:
    """Hub at the large hospital: its private large model → compact student (its images + public set)."""
    teacher = hospital.large.eval()
    transfer = torch.cat([hospital.data.train_x, data.public_x])
    t0 = time.perf_counter()
    student = distill_student(
        teacher,
        transfer,
        epochs=ctx.cfg.distill_epochs,
        min_steps=ctx.cfg.distill_min_steps,
        seed=ctx.seed,
        num_outputs=data.spec.num_outputs,
    )
    t_eval = evaluate(data, dict.fromkeys(data.names, _predictor(teacher)), _predictor(teacher))
    s_eval = evaluate(data, dict.fromkeys(data.names, _predictor(student)), _predictor(student))
    t_mean = float(np.mean([t_eval["clinics"][c]["auc"] for c in data.names]))
    s_mean = float(np.mean([s_eval["clinics"][c]["auc"] for c in data.names]))
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


#: pFedNet's similarity-graph sketches: the label mix and the 4×4 mean image, or the mean image alone
#: (clinics alike in acquisition, whatever their label mix).
PFEDNET_GRAPHS: dict[str, tuple[str, ...]] = {
    "labels+features": ("label_counts", "feature_mean"),
    "features": ("feature_mean",),
}
#: pFedNet's personal parts: the head and norm affines (577 parameters), those plus the last conv block, or
#: the head alone (129; the norm affines then shared, averaged sample-weighted with the convolutions).
PFEDNET_PERSONAL: tuple[str, ...] = tuple(PERSONAL_PARTS)


def _is_batch_counter(name: str) -> bool:
    """BatchNorm's step counter: an integer no fusion can move, kept at each clinic."""
    return name.rsplit(".", 1)[-1] == "num_batches_tracked"


def run_pfednet(
    data: BenchData,
    ctx: MethodContext,
    *,
    lam: float | None = None,
    personal: str | None = None,
    graph: str | None = None,
    norm: Norm = "group",
    fuse_statistics: bool = False,
    consistency: float = 0.0,
    randconv: bool = False,
    finetune: bool = False,
    tail: bool = False,
    tta: bool = False,
    sam: bool = False,
) -> dict[str, Any]:
    """pFedNet: shared extractor averaged; the personal part fused over the sketch graph (ADMM).

    ``lam``, ``personal`` and ``graph`` default to the config's ``pfednet_lam``, ``pfednet_personal`` and
    ``pfednet_graph``; ``lam=0`` is the ablation without the graph fusion (each clinic keeps its own
    personal part, the same rounds, data and seeds otherwise). ``norm="batch"``: the CNN normalises with
    BatchNorm, whose affine parameters are in the personal part (``head_norm``) and whose running
    statistics stay at each clinic as in FedBN; an unseen clinic takes the clinics' sample-weighted mean
    statistics, as FedBN's does. ``fuse_statistics``: the running means and variances join the personal
    part, so that the graph fuses them too (only the batch counter stays at each clinic).
    ``consistency`` > 0: the clinics augment, whatever the track, and add the agreement term across views;
    ``randconv`` likewise augments, with random convolutions in every augmented view. ``finetune``: each
    clinic then fine-tunes its model (shared and personal parts) locally (``harness.flbench.finetune``).
    ``tail``: each clinic's model (shared and personal parts) is the mean of its models of the last
    ``tail_rounds`` rounds (``harness.flbench.tail``), and the published model likewise. ``tta``: every
    model is read through test-time augmentation (``harness.flbench.tta``). ``sam``: the clinics train with
    sharpness-aware minimisation of radius ``sam_rho`` (``hub.training.sam``).
    """
    augment = ctx.cfg.augment or consistency > 0 or randconv
    rho = _rho(ctx, sam)
    local = _local_cfg(ctx, augment=augment, consistency=consistency, randconv=randconv, sam_rho=rho)
    lam = ctx.cfg.pfednet_lam if lam is None else lam
    personal = ctx.cfg.pfednet_personal if personal is None else personal
    graph_name = ctx.cfg.pfednet_graph if graph is None else graph
    if personal not in PFEDNET_PERSONAL or graph_name not in PFEDNET_GRAPHS:
        raise ValueError(
            f"pfednet: personal {personal!r} / graph {graph_name!r}; choose from {PFEDNET_PERSONAL} / "
            f"{tuple(PFEDNET_GRAPHS)}"
        )
    init = _seeded(ctx.seed, lambda: fl_cnn(norm=norm, num_outputs=data.spec.num_outputs))
    strategy = make_strategy(
        "pfednet",
        personal=personal,
        lam=lam,
        eta=ctx.cfg.pfednet_eta,
        mean_gradient=False,
        graph_k=2,
        graph_keys=PFEDNET_GRAPHS[graph_name],
        num_classes=max(2, data.spec.num_classes),
        client_config=_client_config(local),
        differential_gamma=ctx.cfg.pfednet_gamma,
        local=None if norm == "group" else (_is_batch_counter if fuse_statistics else is_norm_buffer),
    )
    assert isinstance(strategy, PFedNet)
    fusion: dict[str, dict[str, dict[str, float]]] = {}
    # Round 1 is the stats round (similarity graph); then the same R training rounds as the others.
    rounds = ctx.cfg.rounds + 1
    tails: dict[str, TailMean] = {}
    if tail:
        # never the stats round, whose models are the starting one
        n_tail = min(ctx.cfg.tail_rounds, ctx.cfg.rounds)
        tails = {c: TailMean(rounds, n_tail) for c in (*data.names, "published")}

    def record_fusion(rnd: int) -> None:
        if ctx.on_round is not None:
            ctx.on_round(rnd)
        for c, mean in tails.items():
            mean.offer(rnd, strategy.published_params() if c == "published" else strategy.params_for(c))
        last = getattr(strategy, "last_fusion", None)
        if last is not None:  # None in the stats round and in rounds replayed from a checkpoint
            fusion[str(rnd)] = {
                "shift": dict(last.shift),
                "unfused_spread": dict(last.unfused_spread),
                "fused_spread": dict(last.fused_spread),
            }

    learners: dict[str, PFedNetLearner] = {}
    for k, c in enumerate(data.names):
        model = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
        model.load_state_dict(init.state_dict())
        learners[c] = PFedNetLearner(
            c,
            model,
            data.clinics[c],
            local,
            ctx.seed * 100 + k,
        )
        learners[c].num_classes = data.spec.num_classes
    strategy.initialize(to_params(init), list(data.names))
    bytes_up = _run(strategy, learners, rounds, ctx, on_round=record_fusion, resumable=not tail)
    reader = tta_predictor if tta else _predictor
    per_clinic: dict[str, Predictor] = {}
    parts: list[Params] = []
    for c, learner in learners.items():
        params = tails[c].mean() if tail else strategy.params_for(c)
        load_params(learner.model, params)
        per_clinic[c] = reader(learner.model)
        parts.append({n: a for n, a in params.items() if strategy.is_personal(n)})
    global_model = fl_cnn(norm=norm, num_outputs=data.spec.num_outputs)
    local_names = [n for n in to_params(init) if n not in strategy.params_for(data.names[0])]
    if local_names:  # the BatchNorm statistics (or counter) each clinic kept
        load_params(global_model, _clinics_mean(learners, data, local_names))
    load_params(global_model, tails["published"].mean() if tail else strategy.published_params())
    published_tail = tails.get("published")
    tuned: dict[str, Any] = (
        {"tail_rounds": published_tail.rounds, "tail_distances": published_tail.distances()}
        if published_tail is not None
        else {}
    )
    if finetune:
        per_clinic, tuned = _fine_tuned(data, ctx, {c: lr.model for c, lr in learners.items()}, local)
    result = evaluate(data, per_clinic, reader(global_model))
    # What personalisation buys: every clinic scored with the clinics' mean personal part instead of its own.
    with_mean = evaluate(data, dict.fromkeys(data.names, reader(global_model)), reader(global_model))
    result["bytes_per_client_round"] = bytes_up
    result["stats_bytes_per_client_round"] = ctx.stats_bytes
    graph = getattr(strategy, "graph", None)
    result["extra"] = {
        "graph_edges": [[data.names[i], data.names[j]] for i, j in graph.edges] if graph is not None else [],
        "lam": lam,
        "personal": personal,
        "norm": norm,
        "graph": graph_name,
        "personal_params": int(sum(a.size for a in parts[0].values())),
        # Per training round (by number), per clinic: ‖fused − unfused‖ of the personal part and its distance
        # from the clinics' mean before and after the fusion (hub.fl.pfednet.FusionRecord).
        "fusion": fusion,
        "mean_personal_auc": {c: m["auc"] for c, m in with_mean["clinics"].items()},
        "mean_personal_val_auc": {c: m["val_auc"] for c, m in with_mean["clinics"].items()},
        **tuned,
        "differential_gamma": ctx.cfg.pfednet_gamma,
        "differential_groups_zeroed": float(
            np.mean(
                [
                    lr.sparsifier.last.groups_zeroed / max(1, lr.sparsifier.last.groups)
                    for lr in learners.values()
                    if lr.sparsifier is not None
                ]
                or [0.0]
            )
        ),
    }
    return result


def run_light_head(data: BenchData, ctx: MethodContext) -> dict[str, Any]:
    """Light learner (numpy, the node's own code): shared head averaged (head_avg), personal heads kept.

    The starting student is trained by the two large hospitals (pooled, rounds × local_epochs epochs): the
    model a federation would publish before small clinics join. Its backbone is then frozen; every clinic
    trains a shared and a personal head on its embedding exactly as a node does. A clinic is scored by what
    a node serves after the rounds (final shared head + its personal head); the unseen clinic by the shared
    head alone.
    """
    torch.manual_seed(ctx.seed)
    student = student_cnn_s(num_outputs=data.spec.num_outputs)
    large = [c for c in data.names if c not in data.small]
    x = torch.cat([data.clinics[c].train_x for c in large])
    y = torch.cat([data.clinics[c].train_y for c in large])
    pre = LocalConfig(
        epochs=ctx.cfg.rounds * ctx.cfg.local_epochs, lr=ctx.cfg.lr, batch_size=ctx.cfg.batch_size
    )
    train_local(student, x, y, pre, torch.Generator().manual_seed(ctx.seed * 100))
    frozen = FrozenStudent(student, x[:2])
    head = frozen.head
    strategy = make_strategy(
        "head_avg", head=f"{head.weight.name},{head.bias.name}", client_config={"seed": ctx.seed}
    )
    learners: dict[str, LightClinic] = {}
    for c in data.names:
        logits, emb = frozen.logits_and_embedding(data.clinics[c].train_x)
        y_c = data.clinics[c].train_y.numpy().astype(np.int64).reshape(-1)
        learners[c] = LightClinic(c, head, bench_task(data.spec.num_classes), logits, emb, y_c)
    start = to_params(student)
    strategy.initialize(start, list(data.names))
    bytes_up = _run(strategy, learners, ctx.cfg.rounds, ctx)
    shared = strategy.global_params
    w = np.asarray(shared[head.weight.name], dtype=np.float64)  # (K, D)
    b = np.asarray(shared[head.bias.name], dtype=np.float64)  # (K,)

    def shared_logits(x01: torch.Tensor) -> np.ndarray:
        return np.asarray(frozen.logits_and_embedding(x01)[1], dtype=np.float64) @ w.T + b  # (N, K)

    def served(clinic: LightClinic) -> Predictor:
        def scores(x01: torch.Tensor) -> np.ndarray:
            emb = frozen.logits_and_embedding(x01)[1]
            return primary_scores(shared_logits(x01) + clinic.personal_logits(emb))

        return scores

    result = evaluate(
        data, {c: served(learners[c]) for c in data.names}, lambda x: primary_scores(shared_logits(x))
    )
    initial = evaluate(
        data,
        dict.fromkeys(data.names, lambda x: primary_scores(frozen.logits_and_embedding(x)[0])),
        lambda x: primary_scores(frozen.logits_and_embedding(x)[0]),
    )
    shared_only = evaluate(
        data,
        dict.fromkeys(data.names, lambda x: primary_scores(shared_logits(x))),
        lambda x: primary_scores(shared_logits(x)),
    )
    result["bytes_per_client_round"] = bytes_up
    result["extra"] = {
        "initial_auc": {c: initial["clinics"][c]["auc"] for c in data.names},
        "shared_head_auc": {c: shared_only["clinics"][c]["auc"] for c in data.names},
        "personal_heads": sorted(c for c, clinic in learners.items() if clinic.personal is not None),
        "student_params": count_params(student),
        "head_params": int(w.size + b.size),
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
    # The unseen clinics re-estimate BatchNorm statistics on their own unlabeled images (AdaBN).
    "fedbn_adabn": lambda d, c: run_averaging(d, c, "fedbn", adabn=True),
    "fedavg_adabn": lambda d, c: run_averaging(d, c, "fedavg", adabn=True),
    "hsl": run_hsl,
    "fedhelp": run_fedhelp,
    "pfednet": run_pfednet,
    # pFedNet's ablation: λ = 0, no graph fusion (each clinic keeps its own personal part).
    "pfednet_nograph": lambda d, c: run_pfednet(d, c, lam=0.0),
    # pFedNet on BatchNorm: the affine parameters personal and fused, the running statistics each clinic's
    # own (FedBN's lever, which beats pooled training on breast); and its ablation without the fusion.
    "pfednet_bn": lambda d, c: run_pfednet(d, c, norm="batch"),
    "pfednet_bn_nograph": lambda d, c: run_pfednet(d, c, lam=0.0, norm="batch"),
    "pfednet_bnstats": lambda d, c: run_pfednet(d, c, norm="batch", fuse_statistics=True),
    "light_head": run_light_head,
    "local_aug": lambda d, c: run_local(d, c, augment=True, norm="group"),
    "fedavg_aug": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group"),
    "fedavg_aug_ft": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group", finetune=True),
    "central_aug": lambda d, c: run_central(d, c, augment=True, norm="group"),
    # Ditto: FedAvg whose clinics predict with personal models pulled toward the global one (λ ditto_lam).
    "ditto_aug": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group", ditto=True),
    # The agreement term across augmented views (hub.training.learners.view_loss), weight ``consistency``:
    # on the plain references and on the two pFedNet variants (always augmented).
    "fedavg_aug_cons": lambda d, c: run_averaging(
        d, c, "fedavg", augment=True, norm="group", consistency=c.cfg.consistency
    ),
    "central_aug_cons": lambda d, c: run_central(
        d, c, augment=True, norm="group", consistency=c.cfg.consistency
    ),
    "pfednet_cons": lambda d, c: run_pfednet(d, c, consistency=c.cfg.consistency),
    "pfednet_bn_cons": lambda d, c: run_pfednet(d, c, norm="batch", consistency=c.cfg.consistency),
    # Random convolutions in every augmented view (hub.training.augment.RandomConvolution), alone and with
    # the agreement term; and on pFedNet (GroupNorm and BatchNorm) with the term.
    "fedavg_aug_rc": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group", randconv=True),
    "fedavg_aug_rc_cons": lambda d, c: run_averaging(
        d, c, "fedavg", augment=True, norm="group", consistency=c.cfg.consistency, randconv=True
    ),
    "central_aug_rc_cons": lambda d, c: run_central(
        d, c, augment=True, norm="group", consistency=c.cfg.consistency, randconv=True
    ),
    "ditto_rc_cons": lambda d, c: run_averaging(
        d, c, "fedavg", augment=True, norm="group", consistency=c.cfg.consistency, randconv=True, ditto=True
    ),
    "pfednet_rc_cons": lambda d, c: run_pfednet(d, c, consistency=c.cfg.consistency, randconv=True),
    "pfednet_rc_cons_ft": lambda d, c: run_pfednet(
        d, c, consistency=c.cfg.consistency, randconv=True, finetune=True
    ),
    "pfednet_bn_rc_cons": lambda d, c: run_pfednet(
        d, c, norm="batch", consistency=c.cfg.consistency, randconv=True
    ),
    # Tail averaging (harness.flbench.tail): the mean of the last tail_rounds rounds' models deployed.
    "fedavg_aug_tail": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group", tail=True),
    "fedavg_aug_rc_cons_tail": lambda d, c: run_averaging(
        d, c, "fedavg", augment=True, norm="group", consistency=c.cfg.consistency, randconv=True, tail=True
    ),
    "pfednet_rc_cons_tail": lambda d, c: run_pfednet(
        d, c, consistency=c.cfg.consistency, randconv=True, tail=True
    ),
    # Test-time augmentation (harness.flbench.tta): the same training, every model read over augmented views.
    "fedavg_aug_tta": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group", tta=True),
    "fedavg_aug_rc_cons_tta": lambda d, c: run_averaging(
        d, c, "fedavg", augment=True, norm="group", consistency=c.cfg.consistency, randconv=True, tta=True
    ),
    "pfednet_rc_cons_tta": lambda d, c: run_pfednet(
        d, c, consistency=c.cfg.consistency, randconv=True, tta=True
    ),
    # Sharpness-aware minimisation (hub.training.sam) at every clinic, radius sam_rho: FedSAM.
    "fedavg_aug_sam": lambda d, c: run_averaging(d, c, "fedavg", augment=True, norm="group", sam=True),
    "fedavg_aug_rc_cons_sam": lambda d, c: run_averaging(
        d, c, "fedavg", augment=True, norm="group", consistency=c.cfg.consistency, randconv=True, sam=True
    ),
    "pfednet_rc_cons_sam": lambda d, c: run_pfednet(
        d, c, consistency=c.cfg.consistency, randconv=True, sam=True
    ),
    "fedhelp_snapshot": lambda d, c: run_fedhelp(d, c, rank_sign="snapshot", distill=False),
    # FedHelp's ablations: without the foundation head's KD at the small clinics, without the ranking term.
    "fedhelp_nofm": lambda d, c: run_fedhelp(d, c, fm_weight=0.0, distill=False),
    "fedhelp_norank": lambda d, c: run_fedhelp(d, c, rank_weight=0.0, distill=False),
    # HSL's ablations: without the anchor task (its loss weight 0), with the fusion softmax removed, and
    # plain FedAvg given HSL's sampling, steps and unweighted mean.
    "hsl_noanchor": lambda d, c: run_hsl(d, c, anchor_weight=0.0),
    "hsl_concat": lambda d, c: run_hsl(d, c, fusion="concat"),
    "hsl_concat_noanchor": lambda d, c: run_hsl(d, c, fusion="concat", anchor_weight=0.0),
    "fedavg_hslsteps": run_fedavg_hsl_steps,
}
__all__ = [
    "LARGE_CLINICS",
    "METHODS",
    "SMALL_CLINICS",
    "BenchConfig",
    "MethodContext",
    "evaluate",
]
