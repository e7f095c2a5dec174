"""pFedNet-style personalisation (docs/algorithms.md §3): shared part by FedAvg, personal parts fused.

Client n's model is w_n = (x, z_n): the shared tensors x are averaged like FedAvg (sample-weighted); the
personal tensors z_n (by default the classifier head) stay per client and are updated at the server by the
proximal step

    Z = argmin_Z (1/N)⟨G, Z⟩ + λ‖ZQ‖_{1,2} + (1/2η)‖Z − Z_t‖²_F,        Z = [z_1 … z_N]  (d2, N)

where Q (N, |E|) is the incidence matrix of the client similarity graph (``hub.fl.graph``), so the
group lasso Σ_(i,j)∈E ‖z_i − z_j‖₂ pulls similar clients' personal parts together (fusing them) while λ
sets how much. Solved by scaled ADMM with the split W = ZQ, dual Ω, penalty ρ:

    Z ← [Z_t − ηG/N + η(ρW + Ω)Qᵀ] · (I + ηρQQᵀ)^{-1}     (the inverse from one eigendecomposition of QQᵀ)
    W_m ← max(0, 1 − λ/(ρ‖v_m‖)) v_m,  v_m = (ZQ − Ω/ρ)_m   (group soft-threshold per edge)
    Ω ← Ω + ρ(W − ZQ)

Gradient convention: a client uploads the delta of all its tensors, ``local_after − params_sent``. For the
personal part the server reads the delta as one gradient step of size η: z_local − z_t = −η·G_n, so
G_n = −delta_n/η. With λ = 0 the step is exactly Z_t − ηG/N = Z_t + delta/N (set ``mean_gradient=False``
to drop the 1/N of the objective, giving Z_t + delta). Clients that did not answer have G_n = 0 and still
take part in the fusion. The graph comes from ``edges`` (pairs of client ids) or, if none is given, from a
first ``stats`` round: its tasks ask each client for the tensors named in ``graph_keys`` and its
``aggregate`` builds the kNN graph and returns None (no model change).

With ``differential_gamma`` > 0 the clinics upload their shared part differentially sparse
(``hub.fl.differential_sparsity``, §3.5): tasks carry the γ, and the strategy adds each clinic's sparse
change to what it held for that clinic before averaging.

Over the wire (``fedclinic-hub rounds start --strategy pfednet``) every setting is a scalar: the personal
part is named (``personal``: one of ``PERSONAL_PARTS``, sent with every task so that a clinic splits its
update the same way), the sketch keys are comma-separated text, and the stats tasks say which tensors they
expect (``stats_specs``: a node's sketch of its training set, ``edge_node.protocol.sketch``). The model a
round publishes (``published_params``) is the shared part with the clinics' mean personal part: what a
clinic that did not train gets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from edge_node.protocol.sketch import FEATURE_MEAN, STATS_OF, TRAINING_SET, feature_mean_size
from edge_node.protocol.updates import UpdateKind
from hub.fl.aggregate import unweighted_mean
from hub.fl.averaging import DeltaAveraging, apply_delta, copy_params
from hub.fl.differential_sparsity import DifferentialAssembler
from hub.fl.errors import StrategyConfigError
from hub.fl.fedbn import KEPT_AT_NODES
from hub.fl.graph import LABEL_COUNTS, SimilarityGraph, incidence_matrix, similarity_graph
from hub.fl.state import innermost, pack_params, read_json, unpack_params
from hub.fl.strategy import (
    Capability,
    ClientFailure,
    ClientResult,
    ClientTask,
    Config,
    Params,
    Reducer,
    RoundRecord,
    StateDict,
)
from hub.fl.validation import TensorSpec

__all__ = [
    "PERSONAL_PARTS",
    "FusionRecord",
    "PFedNet",
    "first_block_personal",
    "group_soft_threshold",
    "is_head_or_norm_tensor",
    "is_head_tensor",
    "last_block_personal",
    "personal_part",
    "proximal_personal_step",
]

logger = logging.getLogger(__name__)

_HEAD_PREFIXES = ("fc", "classifier", "head")


def is_head_tensor(name: str) -> bool:
    """Default personal part: tensors of a top-level ``fc``, ``classifier`` or ``head`` module."""
    return name.split(".", 1)[0] in _HEAD_PREFIXES


def is_head_or_norm_tensor(name: str) -> bool:
    """The classifier head (``head.*``) and the normalisation layers' affine parameters (``*.norm.*``)."""
    return name.startswith("head.") or ".norm." in name


def _conv_block_prefix(names: Sequence[str], which: int) -> str:
    """``features.<i>.`` of the model's ``which``-th conv block (0 the first, −1 the last) among ``names``."""
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("features.") and ".conv." in n})
    if not blocks:
        raise StrategyConfigError("no features.<i>.conv tensor among the names: not an fl_cnn-style model")
    return f"features.{blocks[which]}."


def last_block_personal(names: Sequence[str]) -> Callable[[str], bool]:
    """``is_head_or_norm_tensor``'s tensors plus the last conv block of ``features`` (the highest-numbered
    ``features.<i>.conv`` among ``names``, the model's tensor names)."""
    prefix = _conv_block_prefix(names, -1)
    return lambda name: is_head_or_norm_tensor(name) or name.startswith(prefix)


def first_block_personal(names: Sequence[str]) -> Callable[[str], bool]:
    """``is_head_or_norm_tensor``'s tensors plus the first conv block of ``features`` (the lowest-numbered
    ``features.<i>.conv`` among ``names``): the filters that meet a scanner's grey values, blur and noise
    first, kept at the clinic (lower layers local, as LG-FedAvg keeps them)."""
    prefix = _conv_block_prefix(names, 0)
    return lambda name: is_head_or_norm_tensor(name) or name.startswith(prefix)


#: The personal parts a round can name: the head alone, the head with the normalisation affines, or those
#: with the first or the last conv block. Each maps the model's tensor names to the predicate.
PERSONAL_PARTS: dict[str, Callable[[Sequence[str]], Callable[[str], bool]]] = {
    "head": lambda names: is_head_tensor,
    "head_norm": lambda names: is_head_or_norm_tensor,
    "first_block": first_block_personal,
    "last_block": last_block_personal,
}


def personal_part(name: str, names: Sequence[str]) -> Callable[[str], bool]:
    """The predicate of the personal part called ``name`` for a model with these tensor names."""
    factory = PERSONAL_PARTS.get(name)
    if factory is None:
        raise StrategyConfigError(f"pfednet: personal part {name!r}; choose one of {sorted(PERSONAL_PARTS)}")
    return factory(names)


def _unresolved(name: str) -> bool:
    raise StrategyConfigError("pfednet: the personal part is resolved by initialize; call it first")


def group_soft_threshold(v: np.ndarray, tau: float) -> np.ndarray:
    """Column-wise prox of τ‖·‖₂: each column m becomes max(0, 1 − τ/‖v_m‖) v_m (zero stays zero)."""
    norms = np.linalg.norm(v, axis=0)  # (|E|,)
    scale = np.where(norms > tau, 1.0 - tau / np.where(norms > 0, norms, 1.0), 0.0)
    return v * scale[None, :]


def proximal_personal_step(
    g: np.ndarray,
    z_t: np.ndarray,
    q: np.ndarray,
    *,
    lam: float,
    eta: float,
    rho: float = 1.0,
    iterations: int = 200,
    tol: float = 1e-12,
    mean_gradient: bool = True,
) -> np.ndarray:
    """argmin_Z (1/N)⟨G,Z⟩ + λ‖ZQ‖_{1,2} + (1/2η)‖Z − Z_t‖²_F by scaled ADMM (see the module docstring).

    ``g``, ``z_t``: (d2, N); ``q``: (N, |E|). Stops after ``iterations`` or when the primal and dual
    residuals (Frobenius) both fall below ``tol``. λ = 0 (or no edges) returns Z_t − ηG/N exactly.
    """
    if g.shape != z_t.shape or q.shape[0] != z_t.shape[1]:
        raise StrategyConfigError(f"shapes disagree: G {g.shape}, Z_t {z_t.shape}, Q {q.shape}")
    if lam < 0 or eta <= 0 or rho <= 0 or iterations < 1:
        raise StrategyConfigError(
            f"need lam >= 0, eta > 0, rho > 0, iterations >= 1; got {lam}, {eta}, {rho}"
        )
    n = z_t.shape[1]
    base = z_t - eta * (g / n if mean_gradient else g)  # (d2, N): the unregularised step
    if lam == 0 or q.shape[1] == 0:
        return base
    sigma, p = np.linalg.eigh(q @ q.T)  # QQᵀ = P diag(σ) Pᵀ, symmetric PSD
    inverse = (p * (1.0 / (1.0 + eta * rho * sigma))) @ p.T  # (I + ηρQQᵀ)^{-1}, (N, N)
    w = z_t @ q  # (d2, |E|)
    omega = np.zeros_like(w)
    z = base
    for _ in range(iterations):
        z = (base + eta * (rho * w + omega) @ q.T) @ inverse
        zq = z @ q
        w_prev = w
        w = group_soft_threshold(zq - omega / rho, lam / rho)
        omega = omega + rho * (w - zq)
        primal = float(np.linalg.norm(w - zq))
        dual = rho * float(np.linalg.norm((w - w_prev) @ q.T))
        if primal < tol and dual < tol:
            break
    return z


def _spread(z: np.ndarray, i: int) -> float:
    """‖z_i − mean_n z_n‖ for the columns of ``z`` (d2, N)."""
    return float(np.linalg.norm(z[:, i] - z.mean(axis=1)))


@dataclass(frozen=True)
class FusionRecord:
    """One personal step, per client id: how far the fusion moved its personal part (‖fused − unfused‖),
    and its distance from the clients' mean before (unfused) and after the fusion."""

    shift: dict[str, float]
    unfused_spread: dict[str, float]
    fused_spread: dict[str, float]


class PFedNet(DeltaAveraging):
    """Shared tensors by sample-weighted FedAvg; personal tensors per client by the graph-fused proximal step.

    ``personal`` picks the personal tensors: a name of ``PERSONAL_PARTS`` (default ``"head"``), resolved
    against the model's tensor names and sent with every task as ``personal``, or any predicate (then the
    clinics are not told, and the differentially sparse upload is refused). ``lam``, ``eta``, ``rho`` and
    ``admm_iterations`` are λ, η, ρ and the ADMM iteration count (defaults: the deep-model values of §3.4).
    ``edges``: the similarity graph as pairs of client ids; without it the first round is a ``stats``
    round (see the module docstring) whose graph is a ``graph_k``-NN graph over ``graph_keys`` (a sequence, or
    comma-separated text); its tasks expect ``label_counts`` of ``num_classes`` classes and ``feature_mean``
    of images with ``input_channels`` channels (``stats_specs``).
    ``local`` picks tensors that stay on each client as in FedBN (never sent, never uploaded, never fused),
    e.g. BatchNorm's running statistics (``hub.fl.fedbn.is_norm_buffer``): statistics of a clinic's own
    images, which no proximal step should move. A tensor both local and personal is local. Over the wire it
    is a name of ``hub.fl.fedbn.KEPT_AT_NODES`` (``norm_buffers``), so that rounds can carry it.
    """

    name = "pfednet"
    update_kind = UpdateKind.WEIGHTS_DELTA
    capabilities = Capability.REPLACEABLE_MEAN | Capability.PERSONAL_STATE

    def __init__(
        self,
        *,
        personal: Callable[[str], bool] | str = "head",
        lam: float = 72.0,
        eta: float = 0.01,
        rho: float = 1.0,
        admm_iterations: int = 200,
        mean_gradient: bool = True,
        edges: Sequence[tuple[str, str]] | None = None,
        graph_k: int = 3,
        graph_keys: Sequence[str] | str = (LABEL_COUNTS,),
        num_classes: int = 2,
        input_channels: int = 1,
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        client_config: Config | None = None,
        differential_gamma: float = 0.0,
        local: Callable[[str], bool] | str | None = None,
    ) -> None:
        if isinstance(local, str):
            if local not in KEPT_AT_NODES:
                raise StrategyConfigError(f"pfednet: local={local!r}; choose one of {sorted(KEPT_AT_NODES)}")
            local = KEPT_AT_NODES[local]
        if lam < 0 or eta <= 0 or rho <= 0 or admm_iterations < 1 or graph_k < 1 or differential_gamma < 0:
            raise StrategyConfigError(
                "pfednet: need lam >= 0, eta > 0, rho > 0, admm_iterations >= 1, graph_k >= 1, "
                "differential_gamma >= 0"
            )
        if num_classes < 2 or input_channels < 1:
            raise StrategyConfigError("pfednet: need num_classes >= 2 and input_channels >= 1")
        if isinstance(personal, str):
            if personal not in PERSONAL_PARTS:
                raise StrategyConfigError(
                    f"pfednet: personal part {personal!r}; choose one of {sorted(PERSONAL_PARTS)}"
                )
            client_config = {**(client_config or {}), "personal": personal}
        elif differential_gamma > 0:
            raise StrategyConfigError(
                "pfednet: the differentially sparse upload needs the personal part by name (one of "
                f"{sorted(PERSONAL_PARTS)}), so that every clinic leaves the same tensors out of it"
            )
        if differential_gamma > 0:
            client_config = {**(client_config or {}), "differential_gamma": float(differential_gamma)}
        super().__init__(
            weighted=True,
            server_lr=server_lr,
            max_norm=max_norm,
            min_results=min_results,
            local=local,
            client_config=client_config,
        )
        self.differential_gamma = float(differential_gamma)
        self._assembler = DifferentialAssembler()
        self.personal_name = personal if isinstance(personal, str) else None
        # A named part is resolved against the model's tensor names in ``initialize``.
        self.is_personal: Callable[[str], bool] = _unresolved if isinstance(personal, str) else personal
        self.lam, self.eta, self.rho = float(lam), float(eta), float(rho)
        self.admm_iterations = admm_iterations
        self.mean_gradient = mean_gradient
        self.graph_k = graph_k
        keys = graph_keys.split(",") if isinstance(graph_keys, str) else list(graph_keys)
        self.graph_keys = tuple(k.strip() for k in keys if k.strip())
        if not self.graph_keys:
            raise StrategyConfigError("pfednet: graph_keys names no sketch tensor")
        self.num_classes, self.input_channels = num_classes, input_channels
        self._edge_ids = None if edges is None else [(a, b) for a, b in edges]
        self.graph: SimilarityGraph | None = None
        self._personal: dict[str, Params] = {}
        self._personal_names: tuple[str, ...] = ()
        self._stats_rounds: set[int] = set()
        #: The last training round's personal step (None before the first); not part of the state.
        self.last_fusion: FusionRecord | None = None

    # -- state --------------------------------------------------------------------------------------------

    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        if self.personal_name is not None:
            self.is_personal = personal_part(self.personal_name, list(params))
        personal = {n: a for n, a in params.items() if self.is_personal(n) and self.shares(n)}
        if not personal:
            raise StrategyConfigError(
                "pfednet: no tensor is personal; check the personal part against the names"
            )
        bad = sorted(n for n, a in personal.items() if a.dtype.kind != "f")
        if bad:
            raise StrategyConfigError(f"pfednet: personal tensors must be floating point, not {bad}")
        super().initialize({n: a for n, a in params.items() if n not in personal}, clients)
        self._personal_names = tuple(sorted(personal))
        self._personal = {cid: copy_params(personal) for cid in clients}
        self._stats_rounds.clear()
        self._assembler = DifferentialAssembler()
        self.graph = None
        if self._edge_ids is not None:
            self.set_graph(self._edge_ids)

    def set_graph(self, edges: Sequence[tuple[str, str]], distances: np.ndarray | None = None) -> None:
        """Use this similarity graph (pairs of client ids, undirected; ``distances`` only for the record)."""
        index = {cid: i for i, cid in enumerate(self._clients)}
        unknown = sorted({c for e in edges for c in e} - index.keys())
        if unknown:
            raise StrategyConfigError(f"pfednet: graph edges name unknown clients {unknown}")
        pairs = sorted({(min(index[a], index[b]), max(index[a], index[b])) for a, b in edges})
        n = len(self._clients)
        self.graph = SimilarityGraph(tuple(pairs), incidence_matrix(pairs, n), distances)

    def state_dict(self) -> StateDict:
        state = super().state_dict()
        state["personal_names"] = list(self._personal_names)
        state["stats_rounds"] = sorted(self._stats_rounds)
        state["graph_edges"] = None if self.graph is None else [list(e) for e in self.graph.edges]
        if self.graph is not None and self.graph.distances is not None:
            state["graph/distances"] = self.graph.distances.copy()
        for i, cid in enumerate(self._clients):
            state.update(pack_params(f"personal/{i}/", self._personal[cid]))
            state.update(pack_params(f"differential/{i}/", self._assembler.reference.get(cid, {})))
        return state

    def load_state_dict(self, state: StateDict) -> None:
        super().load_state_dict(state)
        self._personal_names = tuple(read_json(state, "personal_names", list[str]))
        self._stats_rounds = set(read_json(state, "stats_rounds", list[int]))
        personal: dict[str, Params] = {}
        for i, cid in enumerate(self._clients):
            part = unpack_params(state, f"personal/{i}/")
            if sorted(part) != sorted(self._personal_names):
                raise StrategyConfigError(
                    f"pfednet: the state's personal tensors of client {cid!r} are incomplete"
                )
            personal[cid] = part
        self._personal = personal
        if self.personal_name is not None:  # a named part, resolved against the saved model's names
            names = [*self.global_params, *self._personal_names]
            self.is_personal = personal_part(self.personal_name, names)
            if sorted(n for n in names if self.is_personal(n)) != sorted(self._personal_names):
                raise StrategyConfigError(
                    f"pfednet: the state's personal tensors are not the {self.personal_name!r} part"
                )
        self._assembler = DifferentialAssembler()
        for i, cid in enumerate(self._clients):
            held = unpack_params(state, f"differential/{i}/")
            if held:
                self._assembler.reference[cid] = held
        edges: list[tuple[int, int]] | None = read_json(state, "graph_edges", list[tuple[int, int]] | None)
        self.graph = None
        if edges is not None:
            distances = state.get("graph/distances")
            self.graph = SimilarityGraph(
                tuple(edges),
                incidence_matrix(edges, len(self._clients)),
                distances.copy() if isinstance(distances, np.ndarray) else None,
            )

    @property
    def next_round_kind(self) -> UpdateKind:
        """What the next round asks for: the sketches (``stats``) until the graph exists, then training."""
        return UpdateKind.STATS if self.graph is None else self.update_kind

    def published_params(self) -> Params:
        """The model a round publishes: the shared tensors with the clients' unweighted mean personal part
        (what a clinic without a personal part of its own, one that did not train, is served)."""
        return {**self.global_params, **unweighted_mean([self._personal[c] for c in self._clients])}

    def stats_specs(self) -> dict[str, TensorSpec]:
        """What a stats task expects back: the sketch tensors named in ``graph_keys``."""
        specs = {
            LABEL_COUNTS: TensorSpec((self.num_classes,), np.dtype(np.int64)),
            FEATURE_MEAN: TensorSpec((feature_mean_size(self.input_channels),), np.dtype(np.float32)),
        }
        unknown = sorted(set(self.graph_keys) - specs.keys())
        if unknown:
            raise StrategyConfigError(
                f"pfednet: no node computes the sketch tensors {unknown}; graph_keys may name {sorted(specs)}"
            )
        return {key: specs[key] for key in self.graph_keys}

    @staticmethod
    def personal_in_state(state: StateDict, client_id: str) -> Params:
        """The personal part of ``client_id`` in a state this strategy saved (``state_dict``), also inside a
        wrapper's state (robust aggregation)."""
        state = innermost(state)
        if "strategy" not in state or read_json(state, "strategy", str) != PFedNet.name:
            raise StrategyConfigError("not a pfednet state: it holds no personal parts")
        clients = read_json(state, "clients", list[str])
        if client_id not in clients:
            raise StrategyConfigError(f"pfednet: {client_id!r} is not among the state's clients {clients}")
        part = unpack_params(state, f"personal/{clients.index(client_id)}/")
        if not part:
            raise StrategyConfigError(f"pfednet: the state holds no personal part of {client_id!r}")
        return part

    def params_for(self, client_id: str) -> Params:
        if client_id not in self._personal:
            raise StrategyConfigError(f"pfednet: unknown client {client_id!r}; pass it to initialize")
        return {**self.global_params, **copy_params(self._personal[client_id])}

    # -- rounds -------------------------------------------------------------------------------------------

    def configure_round(self, rnd: int, clients: Sequence[str]) -> list[ClientTask]:
        if self.graph is not None:
            return super().configure_round(rnd, clients)
        self._stats_rounds.add(rnd)
        keys = ",".join(self.graph_keys)
        # ``stats_of``: the sketch describes what a clinic trains on (its labeled set), not what it analysed.
        config: Config = {"stats_keys": keys, STATS_OF: TRAINING_SET}
        return [ClientTask(cid, rnd, UpdateKind.STATS, {}, dict(config)) for cid in clients]

    def aggregate_with(
        self,
        rnd: int,
        results: Sequence[ClientResult],
        failures: Sequence[ClientFailure],
        mean: Reducer,
    ) -> Params | None:
        # A stats round builds the graph whichever mean a wrapper brings: there is nothing to average.
        if rnd in self._stats_rounds:
            self._build_graph(rnd, results, failures)
            return None
        if self.differential_gamma > 0:
            results = [self._assembled(r) for r in results]
        return super().aggregate_with(rnd, results, failures, mean)

    def _assembled(self, res: ClientResult) -> ClientResult:
        """The clinic's shared-part update rebuilt from its sparse change (personal tensors come whole)."""
        shared = {n: a for n, a in res.update.items() if not self.is_personal(n)}
        return replace(res, update={**res.update, **self._assembler.decode(res.client_id, shared)})

    def _build_graph(
        self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> None:
        rejected: list[ClientFailure] = []
        sketches: dict[str, Params] = {}
        for res in results:
            problem = self._stats_problem(res, rnd, sketches)
            if problem is None:
                sketches[res.client_id] = res.update
            else:
                rejected.append(ClientFailure(res.client_id, rnd, problem))
        order = [cid for cid in self._clients if cid in sketches]
        sub = similarity_graph([sketches[c] for c in order], self.graph_k, self.graph_keys)
        pos = [self._clients.index(c) for c in order]
        dist = np.full((len(self._clients),) * 2, np.nan)  # (N, N), NaN where a client sent no sketch
        if sub.distances is not None:
            dist[np.ix_(pos, pos)] = sub.distances
        self.set_graph([(order[i], order[j]) for i, j in sub.edges], distances=dist)
        if len(order) < 2:
            logger.warning(
                "round %d: %d usable sketches; the graph has no edges, so no fusion", rnd, len(order)
            )
        logger.info("round %d: similarity graph over %d clients, %d edges", rnd, len(order), len(sub.edges))
        self._stats_rounds.discard(rnd)
        self._history.append(RoundRecord(rnd, tuple(order), (*failures, *rejected), {}, applied=False))

    def _stats_problem(self, res: ClientResult, rnd: int, accepted: dict[str, Params]) -> str | None:
        if res.round != rnd:
            return f"result is for round {res.round}, the open round is {rnd}"
        if res.client_id not in self._personal:
            return "unknown client"
        if res.client_id in accepted:
            return "duplicate result for this client in the round"
        for key in self.graph_keys:
            arr = res.update.get(key)
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
                return f"stats update lacks a numeric {key!r}"
            if not np.all(np.isfinite(arr)):
                return f"stats tensor {key!r} contains NaN or Inf"
            if accepted:
                ref = next(iter(accepted.values()))[key]
                if arr.shape != ref.shape:
                    return f"stats tensor {key!r} has shape {arr.shape}, others have {ref.shape}"
        return None

    def _fold(self, rnd: int, accepted: Sequence[ClientResult], mean: Reducer) -> None:
        shared = [{n: a for n, a in r.update.items() if n not in self._personal_names} for r in accepted]
        mean_delta = mean(shared, self.weights(accepted))
        self._global = apply_delta(self._state(), mean_delta, self.server_lr)
        self._personal_step(accepted)

    def _personal_step(self, accepted: Sequence[ClientResult]) -> None:
        if self.graph is None:
            raise StrategyConfigError("pfednet: no similarity graph; run the stats round or call set_graph")
        clients = self._clients
        z_t = np.stack([self._flatten(self._personal[c]) for c in clients], axis=1)  # (d2, N)
        g = np.zeros_like(z_t)
        column = {cid: i for i, cid in enumerate(clients)}
        for res in accepted:
            delta = self._flatten({n: res.update[n] for n in self._personal_names})
            g[:, column[res.client_id]] = -delta / self.eta  # G_n = −delta_n / η
        base = z_t - self.eta * (g / len(clients) if self.mean_gradient else g)
        z = proximal_personal_step(
            g,
            z_t,
            self.graph.incidence,
            lam=self.lam,
            eta=self.eta,
            rho=self.rho,
            iterations=self.admm_iterations,
            mean_gradient=self.mean_gradient,
        )
        # What the fusion did this round: each client's ‖fused − unfused‖ (0 when λ = 0) and its spread.
        self.last_fusion = FusionRecord(
            shift={cid: float(np.linalg.norm(z[:, i] - base[:, i])) for cid, i in column.items()},
            unfused_spread={cid: _spread(base, i) for cid, i in column.items()},
            fused_spread={cid: _spread(z, i) for cid, i in column.items()},
        )
        for cid, i in column.items():
            self._personal[cid] = self._unflatten(z[:, i], self._personal[cid])

    def _flatten(self, params: Params) -> np.ndarray:
        return np.concatenate([params[n].astype(np.float64).ravel() for n in self._personal_names])

    def _unflatten(self, vec: np.ndarray, like: Params) -> Params:
        out: Params = {}
        offset = 0
        for name in self._personal_names:
            ref = like[name]
            out[name] = vec[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype)
            offset += ref.size
        return out
