"""The ``kept_tensors`` collection: each node sends the tensors a strategy left at it, so that the
federation's model can be deployed.

FedBN never sends the normalisation tensors (each node keeps its own), and pFedNet on BatchNorm keeps the
running statistics at each node (``PFedNet(local="norm_buffers")``). The round's aggregate then lacks them,
and a student built from it alone would carry its starting model's: on the benchmark's chest X-rays that
cost FedBN 0.04–0.05 AUC on the clinics' mean and 0.10 at one clinic (docs/benchmarks.md, "Deploying
FedBN"). This round asks every node's torch learner for its own copy of those tensors, as its last training
round left them. The aggregate holds their example-weighted mean under the tensors' own names (the model a
clinic that did not train gets, as the benchmark scores an unseen clinic) and each node's copy under
``node/<node id>/<name>`` (``models from-round --kept-from M --node NODE`` builds that node's own model).
The mean is the one the strategies use (``hub.fl.aggregate.weighted_mean``: integers, such as BatchNorm's
step counter, rounded). ``robust=median`` (``--config robust=median``) takes the coordinate-wise median of the
answers instead, their example counts ignored: one node of three or more can then no longer pull the mean an
unseen clinic gets, at the price of the example weighting (with two nodes the median is their plain mean).
Each node's own copy is kept either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_node.protocol.updates import UpdateKind
from hub.fl.aggregate import coordinate_median, weighted_mean
from hub.fl.errors import StrategyConfigError
from hub.fl.fedbn import KEPT_AT_NODES
from hub.fl.strategy import ClientFailure, ClientResult, Params
from hub.fl.validation import TensorSpec, spec_of
from hub.rounds.plan import PlannedTask, RoundPlan

__all__ = ["NODE_PREFIX", "KeptTensorsCollection", "answered", "mean_part", "node_part", "trained_rounds"]

#: Each node's own copy in the aggregate: ``node/<node id>/<tensor name>``.
NODE_PREFIX = "node/"
#: How many nodes answered (in the aggregate beside the tensors).
NODES = "nodes"
#: The round that last trained each node's learner, as it said: ``trained_round/<node id>`` (absent if not).
TRAINED_PREFIX = "trained_round/"


def node_part(aggregate: Mapping[str, np.ndarray], node_id: str) -> Params:
    """One node's kept tensors out of a ``kept_tensors`` round's aggregate (empty if it did not answer)."""
    prefix = f"{NODE_PREFIX}{node_id}/"
    return {k.removeprefix(prefix): v for k, v in aggregate.items() if k.startswith(prefix)}


def answered(aggregate: Mapping[str, np.ndarray]) -> list[str]:
    """The ids of the nodes whose copies a ``kept_tensors`` round's aggregate holds."""
    return sorted(
        {k.removeprefix(NODE_PREFIX).split("/", 1)[0] for k in aggregate if k.startswith(NODE_PREFIX)}
    )


def mean_part(aggregate: Mapping[str, np.ndarray]) -> Params:
    """The nodes' example-weighted mean out of a ``kept_tensors`` round's aggregate."""
    return {
        k: v for k, v in aggregate.items() if not k.startswith((NODE_PREFIX, TRAINED_PREFIX)) and k != NODES
    }


def trained_rounds(aggregate: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The round that last trained each answering node's learner, by node id (those that said)."""
    return {
        k.removeprefix(TRAINED_PREFIX): int(v) for k, v in aggregate.items() if k.startswith(TRAINED_PREFIX)
    }


#: What a kept_tensors round's config may say: which tensors, and the robust reduction of the nodes' mean.
SETTINGS = frozenset({"kept", "robust"})
#: The one robust reduction of the nodes' copies (``robust=median``).
MEDIAN = "median"


def _kept(config: Mapping[str, Any]) -> str:
    unknown = sorted(set(config) - SETTINGS)
    if unknown:
        raise StrategyConfigError(f"kept_tensors: unknown settings {unknown}; it takes {sorted(SETTINGS)}")
    robust = config.get("robust")
    if robust is not None and robust != MEDIAN:
        raise StrategyConfigError(f"kept_tensors: robust={robust!r}; the nodes' copies reduce by {MEDIAN!r}")
    kept = config.get("kept", "norm_tensors")
    if kept not in KEPT_AT_NODES:
        raise StrategyConfigError(f"kept_tensors: kept={kept!r}; choose one of {sorted(KEPT_AT_NODES)}")
    return str(kept)


class KeptTensorsCollection(RoundPlan):
    """Each node sends its own copy of the tensors ``kept`` picks out of the starting model (``--model``: the
    student's tensors, for their names, shapes and dtypes; nothing of it is sent)."""

    kind = UpdateKind.KEPT_TENSORS
    name = "kept_tensors"

    def __init__(self, config: Mapping[str, Any], start: Params) -> None:
        self.kept = _kept(config)
        self.robust = config.get("robust") == MEDIAN
        picked = {n: a for n, a in start.items() if KEPT_AT_NODES[self.kept](n)}
        if not picked:
            raise StrategyConfigError(
                f"the {len(start)} tensors of --model hold none that {self.kept} picks: a kept_tensors round "
                "needs the student's tensors as --model"
            )
        self.expected: dict[str, TensorSpec] = spec_of(picked)

    def tasks(self, number: int, nodes: Sequence[str]) -> list[PlannedTask]:
        return [PlannedTask(node, {}, dict(self.expected), {"kept": self.kept}) for node in nodes]

    def aggregate(
        self, number: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> tuple[Params | None, str | None]:
        if not results:
            return None, "no node sent what it kept"
        copies = [{n: r.update[n] for n in self.expected} for r in results]
        if self.robust:
            mean = coordinate_median(copies)
        else:
            weights = [max(r.num_examples, 0) for r in results]
            mean = weighted_mean(copies, weights if sum(weights) > 0 else [1] * len(results))
        out: Params = {n: np.asarray(a) for n, a in mean.items()}  # a 0-d mean comes back a numpy scalar
        for r in results:
            out.update({f"{NODE_PREFIX}{r.client_id}/{n}": np.asarray(a) for n, a in r.update.items()})
            trained = float(r.metrics.get("trained_round", math.nan))
            if 0 <= trained < 2**31 and trained.is_integer():  # a node's word: anything else is not a round
                out[f"{TRAINED_PREFIX}{r.client_id}"] = np.array(int(trained), dtype=np.int64)
        out[NODES] = np.array(len(results), dtype=np.int64)
        return out, None
