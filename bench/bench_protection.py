"""What protection costs: AUC and measured upload bytes per clinic per round on the pneumonia benchmark.

Six simulated clinics (``hub.training.datasets``, combined skew), the calibration CNN (93 k parameters) with
GroupNorm (BatchNorm's running variances do not survive noise or sparsification: a noisy or partial delta
can drive a variance negative),
FedAvg through ``hub.training.simulation.run_federation`` — the same strategy and codec path as real nodes —
with each protection switched on in turn:

- ``plain``: fp32 deltas, weighted FedAvg (the reference);
- ``topk`` / ``topk_int8`` / ``int8`` / ``fp16``: each clinic runs the node's ``ProtectionPipeline`` with
  that codec and error feedback; bytes are the encoded npz payload the pipeline produced, the hub decodes it;
- ``dp_eps{1,4,8}``: central DP at the hub (``DifferentialPrivacy``: clip, unweighted mean, Gaussian noise),
  σ calibrated by the shared accountant so that the whole run spends ε at δ = 1e-5;
- ``secagg``: every round runs the full secure-aggregation protocol (keys, Shamir shares, masked inputs,
  unmasking) with the node client and hub server; bytes are every message a clinic sends plus its masked
  payload; the hub learns only the sum (so the mean is unweighted);
- ``poison_*``: clinic A sends its update sign-flipped and scaled ×10, aggregated by plain FedAvg, the
  coordinate-wise median, the trimmed mean (β = 0.2), the norm filter (unweighted, ``normfilter``, or
  FedAvg's weights, ``normfilterw``), the norm bound (``normbound``: clip every update to the median norm)
  and the norm bound then the trimmed mean (``normboundtrim``).
- ``flip_fedavg``: clinic A sends its update sign-flipped at its own norm (a lie the norm filter cannot see),
  aggregated by plain FedAvg.
- ``pair_*``: clinics C and D collude, each sending its update sign-flipped and scaled ×10.
- ``inflate_*``: clinic F, the smallest, claims 100× the images it trained on and sends its honest update.
- ``stall_*``: clinic F claims 1,000× its images and sends its update ×0.01: a free rider whose weight
  freezes the mean.
- ``lie10_*``: clinic C claims 10× its images and sends its honest update: a lie too small to read.
- ``*_audited``: FedAvg without the updates the hub's node-by-node reading names (``robust=audited``).
- ``clean_*``: the same robust reductions without a poisoned clinic (what robustness costs on non-IID
  clinics by itself).
- ``light_plain`` / ``light_dp_eps{1,4,8}``: the light learner's ``head_delta`` federation (the
  ``light_head`` method of ``bench fl``: a student trained by the two large clinics, its backbone frozen,
  the node's own numpy learner on every clinic, shared head averaged, personal heads kept) with and
  without DP at the node: each clinic's ``ProtectionPipeline`` clips its head delta and adds Gaussian
  noise calibrated by the accountant so that the whole run spends ε at δ = 1e-5 for the clinic (one
  clinic's data is the neighbour: user-level, local DP). The clip is ``--dp-clip`` (0: the median norm of
  the plain light run), or chosen from ``--light-clip-grid`` on the validation splits of ``--tune-seeds``
  (seeds that are not reported; the test split is read only by the reported runs).
- ``light_unshared``: the same, but every clinic's head delta is replaced by zeros, so the shared head
  stays the student's head and only the personal heads learn: what the federation of the head adds.
- ``without_A`` (or any clinic's name): plain FedAvg over the five other clinics, that clinic left out: the
  best a reduction that (rightly) ignores everything the attacker sends can do.

Every configuration but ``secagg`` (where the hub holds only the sum) also reads each round's updates node
by node as ``fedclinic-hub rounds updates`` does (``hub.fl.update_audit``): which clinics it names, in how
many rounds, which the norm filter would drop, the honest clinics' lowest ``keeps`` and ``agreement``, and
the attackers' range of each (every clinic's figures per round are in the JSON rows).

AUC: the final global model on each clinic's own (profiled) test set, mean over clinics and over the four
small clinics C–F; beside it the same on each clinic's validation split (``harness.flbench.datasets``: the
clinic's share of the validation split at its label mix, rendered with its profile). Also times the hub's
side of secure aggregation at 20 nodes on a vector of the CNN's size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_protection.py --seeds 0,1,2 --rounds 5 \\
        --json out/bench-protection.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_node.protection import ProtectionPipeline, SecAggClient
from edge_node.protocol.accountant import GaussianRelease, epsilon_of, noise_multiplier_for
from edge_node.protocol.compression import layout_of
from edge_node.protocol.protection import CompressionKind, ProtectionSpec
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.updates import UpdateKind
from harness.flbench.datasets import CLINICS, SMALL_CLINICS, build_bench_data
from harness.flbench.frozen_student import FrozenStudent, binary_task
from harness.flbench.light_clinic import LightClinic
from harness.flbench.methods import evaluate, validation_aucs
from harness.flbench.scoring import selection_key
from hub.fl.aggregate import unweighted_mean
from hub.fl.fedavg import FedAvg
from hub.fl.privacy import DifferentialPrivacy
from hub.fl.registry import make_strategy
from hub.fl.robust import Robust, WrappedStrategy
from hub.fl.secagg import SecAggServer
from hub.fl.strategy import ClientResult, ClientTask, Params, Strategy
from hub.fl.update_audit import audit_updates
from hub.fl.validation import l2_norm
from hub.models.fl_cnn import fl_cnn
from hub.models.student import student_cnn_s
from hub.training.learners import (
    LocalConfig,
    SupervisedLearner,
    load_params,
    predict,
    to_params,
    train_local,
)
from hub.training.simulation import OnResults, run_federation

log = logging.getLogger("bench_protection")

#: What a run without ``--configs`` measures: the first table of docs/benchmarks.md "Protection".
CONFIGS = (
    "plain",
    "topk",
    "int8",
    "fp16",
    "dp_eps1",
    "dp_eps4",
    "dp_eps8",
    "secagg",
    "poison_fedavg",
    "poison_median",
    "poison_trimmed",
    "poison_normfilter",
    "clean_median",
    "clean_trimmed",
    "clean_normfilter",
)
#: Asked for by name (``--configs``): the later rows, each with its own command in the docs.
MORE_CONFIGS = (
    "topk_int8",
    "poison_normfilterw",
    "poison_normbound",
    "poison_normboundtrim",
    "clean_normfilterw",
    "clean_normbound",
    "clean_normboundtrim",
    *(f"without_{c}" for c in CLINICS),
    "flip_fedavg",
    "flip_normfilterw",
    "poison_audited",
    "flip_audited",
    "clean_audited",
    "pair_fedavg",
    "pair_audited",
    "pair_normfilterw",
    "inflate_fedavg",
    "inflate_audited",
    "stall_fedavg",
    "stall_audited",
    "lie10_fedavg",
    "lie10_audited",
    "light_plain",
    "light_dp_eps1",
    "light_dp_eps4",
    "light_dp_eps8",
    "light_unshared",
)
POISONED = "A"


@dataclasses.dataclass(frozen=True)
class Attack:
    """Who attacks, what each attacker multiplies its update by, and by how much it inflates the image
    count it claims (FedAvg's weight)."""

    attackers: tuple[str, ...]
    scale: float
    claims: float = 1.0


#: A sign-flipped and scaled ×10 (``poison_*``); A sign-flipped at its own norm (``flip_*``); two small
#: clinics colluding, each sign-flipped and scaled ×10 (``pair_*``); the smallest clinic claiming 100× its
#: images and sending its honest update (``inflate_*``: a lie about the count alone); the smallest clinic
#: claiming 1,000× its images and sending its update ×0.01 (``stall_*``: a free rider whose weight freezes
#: the mean); the largest small clinic claiming 10× its images with its honest update (``lie10_*``: a lie
#: inside the honest spread of update lengths).
ATTACKS: dict[str, Attack] = {
    "poison": Attack((POISONED,), -10.0),
    "flip": Attack((POISONED,), -1.0),
    "pair": Attack(("C", "D"), -10.0),
    "inflate": Attack(("F",), 1.0, claims=100.0),
    "stall": Attack(("F",), 0.01, claims=1000.0),
    "lie10": Attack(("C",), 1.0, claims=10.0),
}
NO_ATTACK = Attack((), 1.0)
#: Round → clinic → (the dense update the hub aggregates, the images the clinic says it trained on).
UpdatesLog = dict[int, dict[str, tuple[Params, int]]]


def recorder(log: UpdatesLog) -> OnResults:
    """Keeps each round's answers in ``log`` as the strategy is about to aggregate them."""

    def record(rnd: int, kind: str, results: Sequence[ClientResult]) -> None:
        log[rnd] = {r.client_id: (r.update, r.num_examples) for r in results}

    return record


DELTA = 1e-5


class MeteredLearner:
    """A clinic whose update goes through the node's protection before it leaves; counts the bytes."""

    def __init__(
        self,
        inner: SupervisedLearner | LightClinic,
        spec: ProtectionSpec | None,
        bytes_log: dict[str, list[int]],
        *,
        scale: float = 1.0,
        claims: float = 1.0,
        unshared: bool = False,
    ) -> None:
        self.inner = inner
        self.client_id = inner.client_id
        self.spec = spec
        self.pipeline = ProtectionPipeline(rng=np.random.default_rng(0))
        self.bytes_log = bytes_log
        self.scale = scale
        self.claims = claims
        self.unshared = unshared
        self.norms: list[float] = []
        self.sigmas: list[float] = []  # the noise multiplier of every noised release

    def fit(self, task: ClientTask) -> ClientResult:
        result = self.inner.fit(task)
        update = result.update
        if self.unshared:  # nothing of the update is federated: the hub averages zeros
            update = {n: np.zeros_like(a) for n, a in update.items()}
        if self.scale != 1.0:  # the attacker's update (ATTACKS)
            update = {
                n: (self.scale * a).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in update.items()
            }
        self.norms.append(l2_norm(update))
        if self.spec is None:
            self.bytes_log[self.client_id].append(len(encode_tensors(update)))
            dense = update
        else:
            protected = self.pipeline.protect(update, self.spec)
            self.bytes_log[self.client_id].append(protected.payload_bytes)
            if protected.noise_multiplier is not None:
                self.sigmas.append(protected.noise_multiplier)
            compressor = self.spec.compressor()
            wire = decode_tensors(protected.payload)  # what the hub receives
            dense = wire if compressor is None else compressor.decompress(wire, layout_of(update))
        examples = round(self.claims * result.num_examples)  # the count the hub is told (ATTACKS)
        return ClientResult(result.client_id, result.round, examples, dense, result.metrics)

    def state(self) -> Params:
        return self.inner.state()

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.restore(state)


class SecureMean:
    """A reducer that runs one full secure-aggregation round over the clinics' updates.

    Each update is masked by its clinic's client (clip → mask through the node pipeline); the hub's server
    sees the signed messages and masked vectors only and returns the sum, divided by K here. Integer
    tensors (BN batch counters) are not private and are averaged in the clear.
    """

    def __init__(self, clip_norm: float, bytes_log: dict[str, list[int]]) -> None:
        self.clip_norm = clip_norm
        self.bytes_log = bytes_log
        self.hub_seconds: list[float] = []
        self.round = 0
        self.keys = {c: Ed25519PrivateKey.generate() for c in CLINICS}

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        self.round += 1
        ids = list(CLINICS)[: len(updates)]
        layout = layout_of(updates[0])
        total, hub_s, sent = secure_sum(
            dict(zip(ids, updates, strict=True)), layout, self.clip_norm, self.keys, f"bench-{self.round}"
        )
        self.hub_seconds.append(hub_s)
        for cid, b in sent.items():
            self.bytes_log[cid].append(b)
        ints = {n: a for n, a in updates[0].items() if a.dtype.kind != "f"}
        out: Params = {n: (v / len(updates)).astype(layout[n].dtype) for n, v in total.items()}
        if ints:
            out.update(unweighted_mean([{n: u[n] for n in ints} for u in updates]))
        return out


class SecureAggregation(WrappedStrategy):
    """``inner`` (FedAvg) with its mean replaced by a ``SecureMean`` round: the hub learns only the sum."""

    name = "secure_mean"

    def __init__(self, inner: Strategy, mean: SecureMean) -> None:
        super().__init__(inner)
        self.mean = mean

    def reduce(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        return self.mean(updates, weights)


def secure_sum(
    updates: Mapping[str, Params],
    layout: Mapping[str, Any],
    clip_norm: float,
    keys: Mapping[str, Ed25519PrivateKey],
    task_id: str,
) -> tuple[dict[str, np.ndarray], float, dict[str, int]]:
    """(sum, seconds of hub work, bytes each node sent) of one secure-aggregation round."""
    ids = list(updates)
    pubs = {c: keys[c].public_key() for c in ids}
    threshold = len(ids) // 2 + 1
    hub_s = 0.0
    sent = dict.fromkeys(ids, 0)

    def hub(fn: Any, *args: Any) -> Any:
        nonlocal hub_s
        t0 = time.perf_counter()
        out = fn(*args)
        hub_s += time.perf_counter() - t0
        return out

    server = hub(
        lambda: SecAggServer(task_id=task_id, round=1, node_keys=pubs, threshold=threshold, layout=layout)
    )
    clients = {
        c: SecAggClient(c, keys[c], pubs, task_id=task_id, round=1, threshold=threshold, layout=layout)
        for c in ids
    }
    for c, cl in clients.items():
        advertised = cl.advertise()
        sent[c] += len(advertised.model_dump_json())
        hub(server.receive_advertise, advertised)
    key_list = hub(server.key_list)
    for c, cl in clients.items():
        shares = cl.share_keys(key_list)
        sent[c] += len(shares.model_dump_json())
        hub(server.receive_shares, shares)
    share_list = hub(server.share_list)
    spec = ProtectionSpec(cohort_size=len(ids), clip_norm=clip_norm, secure_aggregation=True)
    for c, cl in clients.items():
        cl.receive_shares(share_list)
        protected = ProtectionPipeline().protect(updates[c], spec, masker=cl.mask)
        masked = cl.masked_input(protected.payload)
        sent[c] += len(masked.model_dump_json()) + protected.payload_bytes
        hub(server.receive_masked, masked, protected.payload)
    request = hub(server.unmask_request)
    for c in request.survivors:
        unmasked = clients[c].unmask(request)
        sent[c] += len(unmasked.model_dump_json())
        hub(server.receive_unmask, unmasked)
    total = hub(server.sum)
    return total, hub_s, sent


def _clinic_aucs(res: Mapping[str, Any]) -> dict[str, float]:
    """Mean test and validation AUC over the clinics and over the small ones, from ``evaluate``'s result."""
    test = {c: res["clinics"][c]["auc"] for c in CLINICS}
    val = {c: res["clinics"][c]["val_auc"] for c in CLINICS}
    return {
        "mean_clinic_auc": float(np.mean(list(test.values()))),
        "small_clinic_auc": float(np.mean([test[c] for c in SMALL_CLINICS])),
        "mean_clinic_val_auc": float(np.nanmean(list(val.values()))),
        "small_clinic_val_auc": float(np.nanmean([val[c] for c in SMALL_CLINICS])),
        "unseen_auc": float(res["unseen"]["auc"]),
    }


def _global_auc(data: Any, params: Params) -> dict[str, float]:
    model = fl_cnn(norm="group")
    load_params(model, params)
    model.eval()
    return _clinic_aucs(
        evaluate(data, dict.fromkeys(CLINICS, lambda x: predict(model, x)), lambda x: predict(model, x))
    )


def run_config(name: str, data: Any, seed: int, args: argparse.Namespace, clip: float) -> dict[str, Any]:
    """One configuration on one seed's clinics."""
    torch.manual_seed(seed)
    init = fl_cnn(norm="group")
    cfg = LocalConfig(epochs=1, lr=1e-3, batch_size=64)
    bytes_log: dict[str, list[int]] = {c: [] for c in CLINICS}
    spec: ProtectionSpec | None = None
    if name in ("topk", "int8", "fp16", "topk_int8"):
        spec = ProtectionSpec(
            cohort_size=len(CLINICS), compression=CompressionKind(name), topk_fraction=args.topk
        )
    strategy: Strategy = FedAvg()
    extra: dict[str, Any] = {}
    reducer: SecureMean | None = None
    if name.startswith("dp_eps"):
        eps = float(name.removeprefix("dp_eps"))
        sigma = noise_multiplier_for(eps, DELTA, rounds=args.rounds)
        strategy = DifferentialPrivacy(
            FedAvg(), clip_norm=clip, noise_multiplier=sigma, delta=DELTA, seed=seed
        )
        extra.update(noise_multiplier=sigma, clip_norm=clip)
    elif name.endswith("_median"):
        strategy = Robust(FedAvg(), "median")
    elif name.endswith("_trimmed"):
        strategy = Robust(FedAvg(), "trimmed_mean", beta=0.2)
    elif name.endswith("_normfilter"):
        strategy = Robust(FedAvg(), "norm_filter")
    elif name.endswith("_normfilterw"):
        strategy = Robust(FedAvg(), "norm_filter_weighted")
    elif name.endswith("_audited"):
        strategy = Robust(FedAvg(), "audited")
    elif name.endswith("_normbound"):
        strategy = Robust(FedAvg(), "norm_bound")
    elif name.endswith("_normboundtrim"):
        strategy = Robust(FedAvg(), "norm_bound_trimmed", beta=0.2)
    elif name == "secagg":
        reducer = SecureMean(clip_norm=args.secagg_clip, bytes_log=bytes_log)
        strategy = SecureAggregation(strategy, reducer)
    # Under secure aggregation the bytes are those of the masked round (SecureMean logs them), not the
    # simulation's in-process copy of the dense update.
    learner_log = {c: [] for c in CLINICS} if reducer is not None else bytes_log
    # Under secure aggregation the hub never holds one clinic's update: nothing to read node by node.
    updates_log: UpdatesLog | None = {} if reducer is None else None
    attack = ATTACKS.get(name.split("_", 1)[0], NO_ATTACK)
    learners = {}
    for k, c in enumerate(CLINICS):
        if name == f"without_{c}":
            continue
        model = fl_cnn(norm="group")
        model.load_state_dict(init.state_dict())
        inner = SupervisedLearner(c, model, data.clinics[c], cfg, seed * 100 + k)
        hostile = c in attack.attackers
        learners[c] = MeteredLearner(
            inner,
            spec,
            learner_log,
            scale=attack.scale if hostile else 1.0,
            claims=attack.claims if hostile else 1.0,
        )
    strategy.initialize(to_params(init), list(learners))
    t0 = time.perf_counter()
    run = run_federation(
        strategy, learners, args.rounds, on_results=None if updates_log is None else recorder(updates_log)
    )
    seconds = time.perf_counter() - t0
    failures = [f for r in run.rounds for f in r.failures]
    if isinstance(strategy, DifferentialPrivacy):
        extra["epsilon_spent"] = strategy.epsilon()
    if reducer is not None:
        extra["hub_seconds_per_round"] = float(np.mean(reducer.hub_seconds))
    per_clinic_bytes = {c: float(np.mean(b)) for c, b in bytes_log.items() if b}
    return {
        "config": name,
        "seed": seed,
        **_global_auc(data, strategy.global_params),
        "bytes_per_clinic_round": float(np.mean(list(per_clinic_bytes.values()))),
        # an fp32 update of this model as an uncompressed npz: what "fp32 FedAvg" sends without deflate
        "raw_fp32_bytes": len(encode_tensors(to_params(init), compress=False)),
        "median_update_norm": float(np.median([n for lr in learners.values() for n in lr.norms])),
        "failures": failures,
        "seconds": seconds,
        **({"audit": audit_summary(updates_log, attack.attackers)} if updates_log else {}),
        **extra,
    }


def audit_summary(log: UpdatesLog, attackers: Sequence[str]) -> dict[str, Any]:
    """What the hub's node-by-node reading of every round says: the rounds each clinic is named in, the
    rounds the norm filter would drop it in, and every clinic's figures per round (``nodes``)."""
    audits = [audit_updates(log[r]) for r in sorted(log)]
    named: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for audit in audits:
        for node, _ in audit.named():
            named[node.node_id] = named.get(node.node_id, 0) + 1
        for node in audit.dropped():
            dropped[node.node_id] = dropped.get(node.node_id, 0) + 1
    return {
        "rounds": len(audits),
        "attackers": list(attackers),
        "named": named,
        "norm_filter_drops": dropped,
        "nodes": [
            {"round": r, **dataclasses.asdict(n)}
            for r, a in zip(sorted(log), audits, strict=True)
            for n in a.nodes
        ],
    }


class LightSetup:
    """One seed's frozen student and its clinics' embeddings, shared by the light configurations."""

    def __init__(self, data: Any, seed: int, rounds: int) -> None:
        torch.manual_seed(seed)
        student = student_cnn_s()
        large = [c for c in CLINICS if c not in SMALL_CLINICS]
        x = torch.cat([data.clinics[c].train_x for c in large])
        y = torch.cat([data.clinics[c].train_y for c in large])
        # as the light_head method: the large clinics train the student for as many epochs as rounds
        pre = LocalConfig(epochs=rounds, lr=1e-3, batch_size=64)
        train_local(student, x, y, pre, torch.Generator().manual_seed(seed * 100))
        self.start = to_params(student)
        self.frozen = FrozenStudent(student, x[:2])
        self.train = {c: self.frozen.logits_and_embedding(data.clinics[c].train_x) for c in CLINICS}
        self.labels = {c: data.clinics[c].train_y.numpy().astype(np.int64).reshape(-1) for c in CLINICS}


def run_light(
    name: str,
    data: Any,
    seed: int,
    args: argparse.Namespace,
    setup: LightSetup,
    clip: float,
    *,
    test: bool = True,
) -> dict[str, Any]:
    """The light learner's head_delta federation, plain or with the node's clip + noise.

    ``test=False`` scores the clinics on their validation splits only (a tuning run: the test split is not
    read); the row then has no test AUCs.
    """
    head = setup.frozen.head
    spec: ProtectionSpec | None = None
    extra: dict[str, Any] = {}
    if name.startswith("light_dp_eps"):
        eps = float(name.removeprefix("light_dp_eps"))
        sigma = noise_multiplier_for(eps, DELTA, rounds=args.rounds)
        # the node states ε per round: the ε of one release at this σ (R of them compose to ≤ eps)
        per_round = epsilon_of([GaussianRelease(sigma)], DELTA)
        spec = ProtectionSpec(
            kind=UpdateKind.HEAD_DELTA,
            cohort_size=len(CLINICS),
            clip_norm=clip,
            epsilon=per_round,
            delta=DELTA,
        )
        extra.update(epsilon_per_round=per_round, clip_norm=clip)
    strategy = make_strategy(
        "head_avg", head=f"{head.weight.name},{head.bias.name}", client_config={"seed": seed}
    )
    bytes_log: dict[str, list[int]] = {c: [] for c in CLINICS}
    clinics: dict[str, LightClinic] = {}
    learners: dict[str, MeteredLearner] = {}
    updates_log: UpdatesLog = {}
    for c in CLINICS:
        logits, emb = setup.train[c]
        clinics[c] = LightClinic(c, head, binary_task(), logits, emb, setup.labels[c])
        learners[c] = MeteredLearner(clinics[c], spec, bytes_log, unshared=name == "light_unshared")
        learners[c].pipeline = ProtectionPipeline(rng=np.random.default_rng(seed * 100 + len(learners)))
    strategy.initialize(setup.start, list(CLINICS))
    t0 = time.perf_counter()
    run = run_federation(strategy, learners, args.rounds, on_results=recorder(updates_log))
    seconds = time.perf_counter() - t0
    shared = strategy.global_params
    w = np.asarray(shared[head.weight.name], dtype=np.float64)  # (K, D)
    b = np.asarray(shared[head.bias.name], dtype=np.float64)  # (K,)

    def served(clinic: LightClinic) -> Any:
        def scores(x01: torch.Tensor) -> np.ndarray:
            emb = setup.frozen.logits_and_embedding(x01)[1].astype(np.float64)
            return (emb @ w.T + b + clinic.personal_logits(emb))[:, 0]

        return scores

    def shared_only(x01: torch.Tensor) -> np.ndarray:
        return (setup.frozen.logits_and_embedding(x01)[1].astype(np.float64) @ w.T + b)[:, 0]

    if test:
        scores = _clinic_aucs(evaluate(data, {c: served(clinics[c]) for c in CLINICS}, shared_only))
        # the shared head alone on every clinic: what the federated (and noised) part carries by itself
        alone = evaluate(data, dict.fromkeys(CLINICS, shared_only), shared_only)
        extra["shared_head_auc"] = float(np.mean([alone["clinics"][c]["auc"] for c in CLINICS]))
    else:
        val = validation_aucs(data, {c: served(clinics[c]) for c in CLINICS})
        scores = {
            "mean_clinic_val_auc": float(np.nanmean(list(val.values()))),
            "small_clinic_val_auc": float(np.nanmean([val[c] for c in SMALL_CLINICS])),
        }
    sigmas = [s for lr in learners.values() for s in lr.sigmas]
    if sigmas:  # what one clinic spent over the run, from the σ its pipeline actually used
        per_clinic = [GaussianRelease(s) for s in learners[CLINICS[-1]].sigmas]
        extra.update(noise_multiplier=float(np.mean(sigmas)), epsilon_spent=epsilon_of(per_clinic, DELTA))
    return {
        "config": name,
        "seed": seed,
        **scores,
        "bytes_per_clinic_round": float(np.mean([np.mean(v) for v in bytes_log.values() if v])),
        "raw_fp32_bytes": len(encode_tensors({k: v for k, v in shared.items()}, compress=False)),
        "median_update_norm": float(np.median([n for lr in learners.values() for n in lr.norms])),
        "head_params": int(w.size + b.size),
        "failures": [f for r in run.rounds for f in r.failures],
        "seconds": seconds,
        # light_unshared sends zeros: nothing to read
        **({"audit": audit_summary(updates_log, ())} if name != "light_unshared" else {}),
        **extra,
    }


def secagg_hub_time(nodes: int, length: int, repeats: int) -> list[float]:
    """Seconds of hub work per round at ``nodes`` nodes for a vector of ``length`` floats."""
    rng = np.random.default_rng(0)
    ids = [f"n{i:02d}" for i in range(nodes)]
    keys = {c: Ed25519PrivateKey.generate() for c in ids}
    layout = layout_of({"w": np.zeros(length, dtype=np.float32)})
    out = []
    for r in range(repeats):
        updates = {c: {"w": rng.normal(0, 0.01, length).astype(np.float32)} for c in ids}
        _, hub_s, _ = secure_sum(updates, layout, 10.0, keys, f"time-{r}")
        out.append(hub_s)
    return out


#: In a clip grid: "clip at the median head-delta norm of the same seed's ``light_plain`` run".
MEDIAN = "median"


def parse_clip_grid(text: str) -> list[str]:
    """``"0.01,0.05,median"`` → ``["0.01", "0.05", "median"]``: each a positive number or ``median``."""
    grid = [g.strip() for g in text.split(",") if g.strip()]
    for g in grid:
        if g != MEDIAN and not (_is_number(g) and float(g) > 0):
            raise ValueError(f"clip grid entry {g!r} is neither a positive number nor {MEDIAN!r}")
    if not grid:
        raise ValueError("empty clip grid")
    return grid


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def clip_value(rule: str, plain_norm: float | None) -> float:
    """The clip a grid entry stands for on one seed (``median`` needs that seed's plain run)."""
    if rule != MEDIAN:
        return float(rule)
    if plain_norm is None:
        raise ValueError("clip 'median' needs light_plain to run first on the same seed")
    return plain_norm


def bench_data(seed: int, args: argparse.Namespace) -> Any:
    """One seed's clinics at the run's sizes (train, validation and test split per clinic)."""
    return build_bench_data(
        "pneumonia",
        "combined",
        seed,
        max_train_per_clinic=args.train_per_clinic,
        max_test=args.test,
        public_size=16,
    )


def best_on_validation(scores: Mapping[str, Mapping[str, float]], grid: Sequence[str]) -> str:
    """The grid entry with the best small-clinic validation AUC; a tie goes to the better all-clinic
    validation AUC, then to the earlier entry. Compared at 1e-9, so that a tie is not decided by a float's
    last digit."""
    return max(
        grid,  # max keeps the first of equal keys
        key=lambda g: selection_key(scores[g]["small_clinic_val_auc"], scores[g]["mean_clinic_val_auc"]),
    )


def choose_light_clips(
    dp_configs: Sequence[str], grid: Sequence[str], tune_seeds: Sequence[int], args: argparse.Namespace
) -> dict[str, Any]:
    """The node-side DP clip of each ``light_dp_eps*`` configuration, chosen on validation.

    On every tuning seed: ``light_plain`` (for the ``median`` rule), then every configuration at every
    grid entry, each scored by its clinics' validation AUCs only (no test split is read). Each
    configuration (each ε) gets the entry with the best small-clinic validation AUC averaged over the
    tuning seeds (``best_on_validation``).
    """
    rows: list[dict[str, Any]] = []
    for seed in tune_seeds:
        data = bench_data(seed, args)
        setup = LightSetup(data, seed, args.rounds)
        plain = run_light("light_plain", data, seed, args, setup, 1.0, test=False)
        rows.append({**plain, "clip_rule": None})
        log.warning("tune seed %d light_plain val small %.3f", seed, plain["small_clinic_val_auc"])
        for name in dp_configs:
            for rule in grid:
                clip = clip_value(rule, plain["median_update_norm"])
                row = run_light(name, data, seed, args, setup, clip, test=False)
                rows.append({**row, "clip_rule": rule})
                log.warning(
                    "tune seed %d %s clip %s (%.4g): val small %.3f, val mean %.3f",
                    seed, name, rule, clip, row["small_clinic_val_auc"], row["mean_clinic_val_auc"],
                )  # fmt: skip
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    chosen: dict[str, str] = {}
    for name in dp_configs:
        scores[name] = {}
        for rule in grid:
            rs = [r for r in rows if r["config"] == name and r["clip_rule"] == rule]
            scores[name][rule] = {
                "small_clinic_val_auc": float(np.mean([r["small_clinic_val_auc"] for r in rs])),
                "mean_clinic_val_auc": float(np.mean([r["mean_clinic_val_auc"] for r in rs])),
                "clips": [r["clip_norm"] for r in rs],
                "per_seed_small_val_auc": [r["small_clinic_val_auc"] for r in rs],
            }
        chosen[name] = best_on_validation(scores[name], grid)
    return {
        "tune_seeds": list(tune_seeds),
        "grid": list(grid),
        "chosen": chosen,
        "scores": scores,
        "rows": rows,
    }


def selection_table(selection: Mapping[str, Any]) -> str:
    """Markdown: small-clinic validation AUC (mean over tuning seeds) of every grid entry, chosen in bold."""
    grid = selection["grid"]
    lines = [
        "| config | " + " | ".join(f"C = {g}" for g in grid) + " | chosen |",
        "|---" * (len(grid) + 2) + "|",
    ]
    for name, by in selection["scores"].items():
        cells = [
            f"**{by[g]['small_clinic_val_auc']:.3f}**"
            if g == selection["chosen"][name]
            else f"{by[g]['small_clinic_val_auc']:.3f}"
            for g in grid
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {selection['chosen'][name]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--train-per-clinic", type=int, default=400)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--topk", type=float, default=0.01, help="top-k fraction")
    parser.add_argument(
        "--dp-clip", type=float, default=0.0, help="DP clip norm, central and light (0: median plain norm)"
    )
    parser.add_argument(
        "--light-clip-grid",
        default="",
        help="choose each light_dp_eps* clip from this grid on validation (numbers and/or 'median'), "
        "on the --tune-seeds; overrides --dp-clip for those configurations",
    )
    parser.add_argument(
        "--tune-seeds", default="100", help="seeds the clip is chosen on (none of them may be reported)"
    )
    parser.add_argument("--secagg-clip", type=float, default=100.0, help="node clip before masking")
    parser.add_argument("--secagg-nodes", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS) - set(MORE_CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS + MORE_CONFIGS)}")
    light_dp = [c for c in configs if c.startswith("light_dp_eps")]
    selection: dict[str, Any] | None = None
    if args.light_clip_grid:
        try:
            grid = parse_clip_grid(args.light_clip_grid)
        except ValueError as exc:
            parser.error(str(exc))
        tune_seeds = [int(s) for s in args.tune_seeds.split(",")]
        if set(tune_seeds) & set(seeds):
            parser.error(f"tuning seeds {sorted(set(tune_seeds) & set(seeds))} are also reported seeds")
        if not light_dp:
            parser.error("--light-clip-grid chooses the clip of light_dp_eps* configurations: none asked for")
        if MEDIAN in grid and (
            "light_plain" not in configs
            or configs.index("light_plain") > min(configs.index(c) for c in light_dp)
        ):
            parser.error("clip 'median' needs light_plain before the light_dp_eps* configurations")
        selection = choose_light_clips(light_dp, grid, tune_seeds, args)
        print(selection_table(selection), flush=True)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        data = bench_data(seed, args)
        clip = args.dp_clip
        light_clip = args.dp_clip
        plain_norm: float | None = None
        setup: LightSetup | None = None
        for name in configs:
            if name.startswith("light_"):
                setup = setup or LightSetup(data, seed, args.rounds)
                if selection is not None and name in selection["chosen"]:
                    rule = selection["chosen"][name]
                    row = run_light(name, data, seed, args, setup, clip_value(rule, plain_norm))
                    row["clip_rule"] = rule
                else:
                    row = run_light(name, data, seed, args, setup, light_clip or 1.0)
                if name == "light_plain":
                    plain_norm = row["median_update_norm"]
                    if not args.dp_clip:
                        light_clip = plain_norm
            else:
                row = run_config(name, data, seed, args, clip or 1.0)
                if name == "plain" and not args.dp_clip:
                    clip = row["median_update_norm"]  # DP clips at the median norm of the plain run
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "failures"}), flush=True)
    timing = secagg_hub_time(
        args.secagg_nodes, sum(a.size for a in to_params(fl_cnn(norm="group")).values()), 3
    )
    summary = {"hub_seconds_secagg_nodes": args.secagg_nodes, "hub_seconds": timing}
    print(json.dumps(summary))
    if selection is not None:
        print(selection_table(selection))
    print(summarise(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"rows": rows, "secagg_timing": summary, "clip_selection": selection, "args": vars(args)},
                default=str,
            )
        )
    return 0


def _reference(name: str) -> str:
    """The configuration a row's Δ is paired against: the light learner's own plain run, or ``plain``."""
    return "light_plain" if name.startswith("light_") else "plain"


def paired_delta(rows: Sequence[Mapping[str, Any]], name: str, key: str) -> dict[int, float]:
    """Seed → ``key`` of ``name`` minus that of its reference on the same seed (seeds that ran both)."""
    ref = {r["seed"]: r[key] for r in rows if r["config"] == _reference(name)}
    return {r["seed"]: r[key] - ref[r["seed"]] for r in rows if r["config"] == name and r["seed"] in ref}


def summarise(rows: list[dict[str, Any]]) -> str:
    """A markdown table: mean (range) over seeds per configuration, test and validation AUC, and Δ paired
    by seed against the reference (``plain``, or ``light_plain`` for the light rows), mean ± sd."""
    lines = [
        "| config | clip | ε spent | mean clinic AUC | Δ vs ref | small clinics AUC | Δ small | "
        "val mean clinic AUC | val small clinics AUC | bytes / clinic / round | fewer than plain npz "
        "| fewer than raw fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = [r["bytes_per_clinic_round"] for r in rows if r["config"] == "plain"]
    base = statistics.mean(plain) if plain else float("nan")
    per_seed: list[str] = []
    for name in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == name]

        def fmt(key: str, rs: list[dict[str, Any]] = rs) -> str:
            vals = [r[key] for r in rs]
            return f"{statistics.mean(vals):.3f} ({min(vals):.3f}–{max(vals):.3f})"

        def delta(key: str, name: str = name) -> str:
            d = list(paired_delta(rows, name, key).values())
            if not d or name == _reference(name):
                return "—"
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            return f"{statistics.mean(d):+.3f} ± {sd:.3f}"

        clips = sorted({r["clip_norm"] for r in rs if "clip_norm" in r})
        clip = ", ".join(f"{c:.4g}" for c in clips) or "—"
        eps = [r["epsilon_spent"] for r in rs if "epsilon_spent" in r]
        spent = f"{statistics.mean(eps):.2f}" if eps else "—"
        b = statistics.mean(r["bytes_per_clinic_round"] for r in rs)
        raw = rs[0]["raw_fp32_bytes"]
        lines.append(
            f"| {name} | {clip} | {spent} | {fmt('mean_clinic_auc')} | {delta('mean_clinic_auc')} "
            f"| {fmt('small_clinic_auc')} | {delta('small_clinic_auc')} | {fmt('mean_clinic_val_auc')} "
            f"| {fmt('small_clinic_val_auc')} | {b:,.0f} | {base / b:.1f}× | {raw / b:.1f}× |"
        )
        d = paired_delta(rows, name, "small_clinic_auc")
        if d and name != _reference(name):
            per_seed.append(f"{name}: " + ", ".join(f"seed {s} {v:+.3f}" for s, v in d.items()))
    if per_seed:
        lines += ["", "Δ small clinics, per seed:", *per_seed]
    audited = [r for r in rows if "audit" in r]
    if audited:
        lines += ["", audit_table(audited)]
    return "\n".join(lines)


def audit_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per configuration, summed over seeds, the rounds in which the hub's reading names the
    attacker and honest clinics and the norm filter would drop them; the honest clinics' lowest ``keeps``
    and ``agreement`` and their range of ``norm_for_size`` (``hub.fl.update_audit``), and the attacker's
    range of each."""
    lines = [
        "| config | seeds × rounds | attacker named | honest named (clinic-rounds) | norm filter drops "
        "(clinic-rounds) | honest min keeps | honest min agreement | honest × for size | attacker keeps "
        "| attacker agreement | attacker × for size |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["config"] for r in rows):
        audits = [r["audit"] for r in rows if r["config"] == name]
        total = sum(a["rounds"] for a in audits)
        attackers = set(audits[0]["attackers"])
        nodes = [n for a in audits for n in a["nodes"]]
        honest = [n for n in nodes if n["node_id"] not in attackers]
        hostile = [n for n in nodes if n["node_id"] in attackers]
        hit = (
            ", ".join(
                f"{c} {sum(a['named'].get(c, 0) for a in audits)} of {total}" for c in sorted(attackers)
            )
            or "–"
        )

        def counted(key: str, audits: list[dict[str, Any]] = audits, attackers: set[str] = attackers) -> str:
            by: dict[str, int] = {}
            for a in audits:
                for c, k in a[key].items():
                    if key != "named" or c not in attackers:
                        by[c] = by.get(c, 0) + k
            marked = [f"{'*' if c in attackers else ''}{c} {k}" for c, k in sorted(by.items())]
            return ", ".join(marked) or "none"

        def extreme(key: str, nodes: list[dict[str, Any]] = honest) -> str:
            vals = [n[key] for n in nodes if n[key] is not None]
            return f"{min(vals):+.2f}" if vals else "–"

        def span(key: str, nodes: list[dict[str, Any]] = hostile, fmt: str = "{:+.2f}") -> str:
            return _span([n[key] for n in nodes if n[key] is not None], fmt)

        lines.append(
            f"| {name} | {total} | {hit} | {counted('named')} | {counted('norm_filter_drops')} "
            f"| {extreme('keeps')} | {extreme('agreement')} | {span('norm_for_size', honest, '{:.2f}')} "
            f"| {span('keeps')} | {span('agreement')} | {span('norm_for_size', hostile, '{:.2f}')} |"
        )
    return "\n".join(lines)


def _span(values: Sequence[float], fmt: str) -> str:
    return f"{fmt.format(min(values))} to {fmt.format(max(values))}" if values else "–"


if __name__ == "__main__":
    sys.exit(main())
