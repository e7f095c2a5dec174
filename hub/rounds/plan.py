"""Round plans: what each node is asked for and how the answers are folded, for any kind of round.

``StrategyPlan`` drives a ``hub.fl`` strategy (weights or head deltas). ``StatsCollection`` and
``LogitsCollection`` are collection rounds that need no training on the node: class counts of the node's
predictions, and soft outputs on public anchor inputs that the task ships (ONNX forward only). The two
envelope rounds (``hub.rounds.envelope_plans``) and ``kept_tensors`` (``hub.rounds.kept_plans``: what a
strategy left at each node) are collections too.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_node.protocol.updates import UpdateKind
from hub.fl.errors import FlError, StrategyConfigError
from hub.fl.registry import make_strategy
from hub.fl.strategy import ClientFailure, ClientResult, ClientTask, Config, Params, Strategy
from hub.fl.validation import TensorSpec, spec_of
from hub.rounds.strategy_state import restore_strategy, save_strategy

__all__ = [
    "COLLECTIONS",
    "LARGE_CLIENTS",
    "PUBLIC_PREFIX",
    "LogitsCollection",
    "PlannedTask",
    "RoundPlan",
    "StatsCollection",
    "StrategyPlan",
    "build_plan",
]


@dataclass(frozen=True)
class PlannedTask:
    node_id: str
    params: Params
    expected: dict[str, TensorSpec]
    config: dict[str, float | int | str | bool] = field(default_factory=dict)


class RoundPlan(ABC):
    """One round's logic: tasks out, results in, an aggregate (or None and why) out."""

    kind: UpdateKind
    name: str
    max_norm: float | None = None

    @abstractmethod
    def tasks(self, number: int, nodes: Sequence[str]) -> list[PlannedTask]: ...

    def state(self) -> Params | None:
        """What the next round of this strategy starts from (None: collections carry no state)."""
        return None

    @abstractmethod
    def aggregate(
        self, number: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> tuple[Params | None, str | None]:
        """The aggregate, or None with the reason the round keeps the previous model."""


class StrategyPlan(RoundPlan):
    """A ``hub.fl`` strategy's round. ``public``: the public set (``public/x``) with FedHelp's foundation
    soft labels (``public/soft_labels``) or HSL's anchor labels (``public/y``), shipped with this round's
    tasks of FedHelp small clients and HSL clients only; nodes keep it, so the operator ships it once
    (never part of what a node sends back)."""

    def __init__(
        self, strategy: Strategy, start: Params, nodes: Sequence[str], public: Params | None = None
    ) -> None:
        self.strategy = strategy
        self.name = strategy.name
        self.max_norm = getattr(strategy, "max_norm", None)
        self.public = _checked_public(public or {})
        restore_strategy(strategy, start, nodes)
        # A strategy whose rounds differ in kind (pFedNet's sketch round first) says what comes next, so that
        # the round's protection is checked against what its nodes will send.
        self.kind = getattr(strategy, "next_round_kind", strategy.update_kind)

    def tasks(self, number: int, nodes: Sequence[str]) -> list[PlannedTask]:
        out = []
        for task in self.strategy.configure_round(number, nodes):
            self.kind = task.kind
            config = {k: v for k, v in task.config.items() if isinstance(v, (bool, int, float, str))}
            params = task.params
            if self.public and _takes_public(self.name, config):
                params = {**task.params, **self.public}  # expected stays the strategy's tensors only
            out.append(PlannedTask(task.client_id, params, self._expected(task), config))
        return out

    def _expected(self, task: ClientTask) -> dict[str, TensorSpec]:
        """A training task expects back the tensors it sent; a stats task the strategy's sketch."""
        if task.kind is not UpdateKind.STATS:
            return spec_of(task.params)
        specs = getattr(self.strategy, "stats_specs", None)
        if not callable(specs):
            raise StrategyConfigError(f"{self.name} asks for stats but does not say which tensors it expects")
        expected: dict[str, TensorSpec] = specs()
        return expected

    def _published(self) -> Params:
        """The model the round publishes (a personalising strategy's shared part, mean personal part)."""
        published = getattr(self.strategy, "published_params", None)
        return dict(published()) if callable(published) else dict(self.strategy.global_params)

    def aggregate(
        self, number: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> tuple[Params | None, str | None]:
        try:
            new = self.strategy.aggregate(number, results, failures)
        except FlError as exc:
            return None, f"aggregation failed: {exc}"
        history = self.strategy.history
        if new is None and self.kind is UpdateKind.STATS and history and history[-1].rnd == number:
            # A strategy's stats round (pFedNet's similarity graph) changes its state, not the model: the
            # round publishes the model as it stands with that state, which the next round starts from. A
            # graph needs two sketches (one, if only one node took part).
            sketches = len(history[-1].accepted)
            if sketches >= min(2, len(results) + len(failures)):
                return self._published(), None
            reasons = "; ".join(f"{f.client_id}: {f.reason}" for f in history[-1].failures)
            return (
                None,
                f"{sketches} usable sketch(es), the similarity graph needs 2 ({reasons or 'none sent'})",
            )
        if new is None:
            reasons = "; ".join(f"{f.client_id}: {f.reason}" for f in history[-1].failures) if history else ""
            return None, f"the strategy kept the model ({reasons or 'too few usable results'})"
        return self._published(), None

    def state(self) -> Params | None:
        return save_strategy(self.strategy)


def _num_classes(config: Mapping[str, Any]) -> int:
    value = config.get("num_classes")
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000:
        raise StrategyConfigError("this round needs config num_classes, an integer from 1 to 100000")
    return value


class StatsCollection(RoundPlan):
    """Each node sends ``label_counts`` (num_classes,) int64 of its predictions; the hub sums them."""

    kind = UpdateKind.STATS
    name = "stats"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.num_classes = _num_classes(config)

    def tasks(self, number: int, nodes: Sequence[str]) -> list[PlannedTask]:
        expected = {"label_counts": TensorSpec((self.num_classes,), np.dtype(np.int64))}
        return [PlannedTask(n, {}, expected, {"num_classes": self.num_classes}) for n in nodes]

    def aggregate(
        self, number: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> tuple[Params | None, str | None]:
        # Negative counts are refused at intake (hub.rounds.answer_checks).
        total = np.sum([r.update["label_counts"] for r in results], axis=0, dtype=np.int64)
        return {
            "label_counts": np.asarray(total, dtype=np.int64),
            "nodes": np.array(len(results), dtype=np.int64),
        }, None


class LogitsCollection(RoundPlan):
    """Each node sends its model's ``logits`` (N, num_classes) float32 on the task's public ``inputs``.

    The aggregate is their example-weighted mean (FedMD-style consensus soft labels for distillation).
    """

    kind = UpdateKind.PUBLIC_LOGITS
    name = "public_logits"

    def __init__(self, config: Mapping[str, Any], start: Params) -> None:
        self.num_classes = _num_classes(config)
        inputs = start.get("inputs")
        if inputs is None or inputs.dtype != np.float32 or inputs.ndim < 2 or inputs.shape[0] == 0:
            raise StrategyConfigError(
                "a public_logits round needs a model artifact with float32 'inputs' (N, ...)"
            )
        self.inputs = inputs  # (N, C, H, W): the public anchor set every node scores identically

    def tasks(self, number: int, nodes: Sequence[str]) -> list[PlannedTask]:
        n = int(self.inputs.shape[0])
        expected = {"logits": TensorSpec((n, self.num_classes), np.dtype(np.float32))}
        return [
            PlannedTask(node, {"inputs": self.inputs}, expected, {"num_classes": self.num_classes})
            for node in nodes
        ]

    def aggregate(
        self, number: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> tuple[Params | None, str | None]:
        weights = np.array([max(r.num_examples, 0) for r in results], dtype=np.float64)
        if weights.sum() == 0:
            weights = np.ones(len(results))
        stack = np.stack([r.update["logits"].astype(np.float64) for r in results])  # (K, N, classes)
        mean = np.tensordot(weights / weights.sum(), stack, axes=1).astype(np.float32)  # (N, classes)
        return {"logits": mean}, None


COLLECTIONS = frozenset({"stats", "public_logits", "envelope_moments", "envelope_distances", "kept_tensors"})
#: Starting tensors under this prefix are FedHelp's public set, not model tensors (``rounds start --public``).
PUBLIC_PREFIX = "public/"


def _checked_public(public: Params) -> Params:
    """``public/x`` float32 (N, C, H, W) preprocessed as for inference, with ``public/soft_labels`` float32
    (N, K) class probabilities (FedHelp's foundation soft labels) and/or ``public/y`` float32 (N,) labels in
    {0, 1} (HSL's shared anchor task)."""
    if not public:
        return {}
    names = {PUBLIC_PREFIX + n for n in ("x", "soft_labels", "y")}
    x = public.get(PUBLIC_PREFIX + "x")
    soft, y = public.get(PUBLIC_PREFIX + "soft_labels"), public.get(PUBLIC_PREFIX + "y")
    if x is None or (soft is None and y is None) or set(public) - names:
        raise StrategyConfigError(
            f"the public set needs {PUBLIC_PREFIX}x with {PUBLIC_PREFIX}soft_labels and/or "
            f"{PUBLIC_PREFIX}y, got {sorted(public)}"
        )
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[0] == 0:
        raise StrategyConfigError("public x must be float32 (N, C, H, W) with N > 0")
    if soft is not None:
        if soft.dtype != np.float32 or soft.shape[:1] != x.shape[:1] or soft.ndim != 2:
            raise StrategyConfigError(f"public soft_labels must be float32 ({x.shape[0]}, K)")
        if not np.allclose(soft.sum(axis=1), 1.0, atol=1e-3) or np.any(soft < 0):
            raise StrategyConfigError("public soft labels must be class probabilities (rows summing to 1)")
    if y is not None and (y.dtype != np.float32 or y.shape != x.shape[:1] or not np.isin(y, (0, 1)).all()):
        raise StrategyConfigError(f"public y must be float32 ({x.shape[0]},) labels in {{0, 1}}")
    return dict(public)


#: Who gets the public set: FedHelp's small clients, and every HSL client (its shared anchor task).
def _takes_public(strategy: str, config: Mapping[str, Any]) -> bool:
    return config.get("role") == "small" or strategy == "hsl"


#: FedHelp's setting naming the nodes that take the large-client role (``rounds start --large``).
LARGE_CLIENTS = "large_clients"


def _check_consistency(client: Mapping[str, Any]) -> None:
    """``client.consistency`` (the agreement term across augmented views) is a weight ≥ 0 that needs
    ``client.augment=true``: refused here, before a node would refuse every task of the round."""
    if "consistency" not in client:
        return
    weight = client["consistency"]
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < math.inf:
        raise StrategyConfigError(f"client.consistency must be a number from 0, got {weight!r}")
    if weight > 0 and client.get("augment") is not True:
        raise StrategyConfigError(
            "client.consistency compares augmented views: add --config client.augment=true"
        )


def _check_sam_rho(client: Mapping[str, Any]) -> None:
    """``client.sam_rho`` (sharpness-aware minimisation's radius, ``hub.training.sam``) is a number ≥ 0:
    refused here, before a node would refuse every task of the round."""
    if "sam_rho" not in client:
        return
    rho = client["sam_rho"]
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0 <= rho < math.inf:
        raise StrategyConfigError(f"client.sam_rho must be a number from 0, got {rho!r}")


def _check_randconv(client: Mapping[str, Any]) -> None:
    """``client.randconv`` (random convolutions in every augmented view) is true or false and, when true,
    needs ``client.augment=true``: refused here, before a node would refuse every task of the round."""
    if "randconv" not in client:
        return
    if not isinstance(client["randconv"], bool):
        raise StrategyConfigError(f"client.randconv must be true or false, got {client['randconv']!r}")
    if client["randconv"] and client.get("augment") is not True:
        raise StrategyConfigError(
            "client.randconv is a stage of the augmentation: add --config client.augment=true"
        )


def build_plan(strategy: str, config: Mapping[str, Any], start: Params, nodes: Sequence[str]) -> RoundPlan:
    """The plan for a round: a collection by name, else the ``hub.fl`` strategy with these settings.

    Strategy settings are the strategy's own keyword arguments; keys ``client.<name>`` become its
    ``client_config`` (sent to every node with the task). ``large_clients`` may be comma-separated text.
    """
    if strategy == "stats":
        return StatsCollection(config)
    if strategy == "public_logits":
        return LogitsCollection(config, start)
    if strategy == "envelope_moments":
        from hub.rounds.envelope_plans import EnvelopeMoments

        return EnvelopeMoments(config)
    if strategy == "envelope_distances":
        from hub.rounds.envelope_plans import EnvelopeDistances

        return EnvelopeDistances(config, start)
    if strategy == "kept_tensors":
        from hub.rounds.kept_plans import KeptTensorsCollection

        return KeptTensorsCollection(config, start)
    kwargs: dict[str, Any] = {k: v for k, v in config.items() if not k.startswith("client.")}
    if isinstance(kwargs.get(LARGE_CLIENTS), str):
        # Round configs hold scalars: FedHelp's large clients travel as comma-separated node ids.
        kwargs[LARGE_CLIENTS] = [n for n in kwargs[LARGE_CLIENTS].split(",") if n]
    client: Config = {k.removeprefix("client."): v for k, v in config.items() if k.startswith("client.")}
    _check_consistency(client)
    _check_randconv(client)
    _check_sam_rho(client)
    if client:
        kwargs["client_config"] = client
    built = make_strategy(strategy, **kwargs)
    model = {k: v for k, v in start.items() if not k.startswith(PUBLIC_PREFIX)}
    public = {k: v for k, v in start.items() if k.startswith(PUBLIC_PREFIX)}
    if not model:
        raise StrategyConfigError(f"a {strategy} round needs starting tensors: pass a model artifact")
    return StrategyPlan(built, model, nodes, public)
