"""Each node's update in a training round, read one by one against the others'.

A hub that aggregates plain updates holds every node's update until it averages them. ``fedclinic-hub
rounds updates`` reads them node by node, so that the operator sees a hostile or broken node before the
next round starts from what it made:

* **keeps**: the cosine between the round's FedAvg mean and that mean without the node. Near 1 for a node
  that leaves the round's direction as the others make it; a node alone able to turn the mean round
  (below ``TURNS``, 0) is named. A large hospital honestly holding most images moves it most (measured
  down to 0.33 at 71 % of the images), never round.
* **agreement**: the median of the node's cosines with each other node's update; scale-free, and one loud
  node cannot move it. Honest updates of a round are nearly orthogonal (their cosines lie around 0, down to
  −0.66 at a small clinic with its own label mix), so this alone names nobody; where two or more nodes each
  pull the mean more than 60° (``keeps`` below ``CONTESTED``), the one that agrees least with the others is
  named, as two large nodes of which one lies leave both below it.
* **norm over the median**, and whether the norm filter (``robust=norm_filter``) keeps the update, by the
  filter's own rule (``within_norm_filter``). It names nobody: the largest honest clinic's update is up to
  six times the median on the six-clinic benchmark, and the filter drops it.
* **norm for its size**: the norm over √(images the node claims), against the round's median of the same.
  A clinic with more images takes more steps and sends a longer update; for its size, honest updates lay
  between 0.30× and 2.8× of the median on the benchmark, a ×10 update at 4× or more. A node ``factor`` (3)
  times too long for its size is named. Claiming more images to make room for a long update makes the
  node's weight in the mean larger, which the ``keeps`` test reads. A node whose update is ``SHORT`` (a
  quarter) as long as the round's for its size, or shorter, is named too: it claims at least sixteen times
  the images its update shows. A count lie buys weight in FedAvg's mean without turning it, and a free rider
  that claims many images and sends next to nothing freezes the mean; neither moves ``keeps`` (on the
  benchmark: the smallest clinic claiming 100× its images read 0.12–0.28×, one claiming 1,000× and sending
  its update ×0.01 read 0.00×).
* **share**: the part of the round's images the node says it trained on, its weight under FedAvg.

Nobody is named in a round of fewer than ``MIN_NODES`` (three) nodes: with two, the reading cannot tell
which of them is off. The figures are in docs/benchmarks.md ("One hostile node in a training round").
Under secure aggregation the hub holds only the sum, and there is nothing to read node by node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hub.fl.aggregate import NORM_FILTER_FACTOR, within_norm_filter
from hub.fl.errors import AggregationError
from hub.fl.strategy import Params
from hub.fl.validation import l2_norm

__all__ = ["CONTESTED", "MIN_NODES", "SHORT", "TURNS", "NodeUpdate", "UpdateAudit", "audit_updates"]

#: A node whose update alone leaves the round's mean at a cosine below this with the mean without it
#: turns the round round, and is named.
TURNS = 0.0
#: Two or more nodes each of which alone leaves the round's mean at a cosine below this (60°) pull it
#: apart: of those, the one that agrees least with the other nodes is named.
CONTESTED = 0.5
#: An update this many times as long as the round's for the images its node claims, or shorter, is named:
#: the node claims at least 1/SHORT² (16) times the images its update shows.
SHORT = 0.25
#: Fewer nodes than this, and the reading cannot tell which of them is off: nobody is named.
MIN_NODES = 3


@dataclass(frozen=True)
class NodeUpdate:
    """One node's update, against the round's other updates."""

    node_id: str
    #: The images the node says it trained on (FedAvg's weight).
    examples: float
    #: Its share of the round's images.
    share: float
    #: Joint L2 norm over the update's float tensors.
    norm: float
    #: ``norm`` over the median norm of the round's updates (None when the median is 0).
    norm_ratio: float | None
    #: The median of its cosines with each other node's update (None for a node alone, or an update of
    #: zeros): scale-free, and one loud node cannot move it.
    agreement: float | None
    #: The cosine between the round's FedAvg mean and that mean without this node (None for a node alone,
    #: or when either is all zeros): near 1 when the node leaves the round's direction as the others make
    #: it, below 0 when it turns it round.
    keeps: float | None
    #: Whether the norm filter, at the audit's factor, keeps it.
    within_filter: bool
    #: Its norm over √(images it claims), over the round's median of the same (None when it claims none):
    #: how long the update is for the node's size. A clinic with more images takes more steps and sends a
    #: longer update honestly; one whose update is ``factor`` times too long for its size is named, and so
    #: is one whose update is ``SHORT`` as long or shorter (it claims more images than its update shows).
    norm_for_size: float | None


@dataclass(frozen=True)
class UpdateAudit:
    """Every node's update of one round, in node order, and the norm filter's factor it was read with."""

    nodes: list[NodeUpdate]
    factor: float

    def named(self, *, sizes: bool = True) -> list[tuple[NodeUpdate, str]]:
        """The nodes to look at, each with why: any node that alone turns the round's mean round, or whose
        update is ``factor`` times too long or ``SHORT`` as long or shorter for the images it claims; and
        where several nodes each pull the mean more than 60°, the one that agrees least with the others.
        None in a round of fewer than ``MIN_NODES`` nodes. ``sizes=False`` leaves the two length rules out
        (where the nodes clipped their updates, a long honest update reads short for its size)."""
        if len(self.nodes) < MIN_NODES:
            return []
        out = []
        for n in self.left_out(sizes=sizes):
            reasons = []
            if self._turns(n):
                reasons.append(
                    f"without it the round's mean would point the other way (cosine {n.keeps:+.2f} between "
                    "the mean with and without it)"
                )
            if sizes and self._too_long(n):
                reasons.append(
                    f"its update is {n.norm_for_size:.1f}× as long as the round's for the images it claims "
                    f"(norm over √images, against the round's median; named from {self.factor:g}×)"
                )
            if sizes and self._too_short(n):
                reasons.append(
                    f"its update is {n.norm_for_size:.2f}× as long as the round's for the {n.examples:g} "
                    f"images it claims, which give it {n.share:.0%} of the round's weight: it claims far "
                    f"more images than its update shows (named from {SHORT:g}× down)"
                )
            out.append((n, "; ".join(reasons)))
        pulling = [n for n in self.nodes if n.keeps is not None and n.keeps < CONTESTED]
        if len(pulling) >= 2:
            least = min(pulling, key=lambda n: math.inf if n.agreement is None else n.agreement)
            if all(least is not n for n, _ in out):
                others = ", ".join(n.node_id for n in pulling if n is not least)
                out.append(
                    (
                        least,
                        f"it and {others} each pull the round's mean more than 60° (cosine below "
                        f"{CONTESTED:g}), and it agrees least with the other nodes (median cosine "
                        f"{_signed(least.agreement)})",
                    )
                )
        return out

    def left_out(self, *, sizes: bool = True) -> list[NodeUpdate]:
        """What ``robust=audited`` leaves out: the nodes that alone turn the round's mean round (``keeps``
        below ``TURNS``) or whose update is ``factor`` times too long or ``SHORT`` as long or shorter for
        their size (``sizes=False``: only the first); none in a round of fewer than ``MIN_NODES`` nodes."""
        if len(self.nodes) < MIN_NODES:
            return []
        return [
            n for n in self.nodes if self._turns(n) or (sizes and (self._too_long(n) or self._too_short(n)))
        ]

    @staticmethod
    def _turns(n: NodeUpdate) -> bool:
        return n.keeps is not None and n.keeps < TURNS

    def _too_long(self, n: NodeUpdate) -> bool:
        return n.norm_for_size is not None and n.norm_for_size >= self.factor

    @staticmethod
    def _too_short(n: NodeUpdate) -> bool:
        return n.norm_for_size is not None and n.norm_for_size <= SHORT

    def dropped(self) -> list[NodeUpdate]:
        """The updates a norm filter at the audit's factor leaves out."""
        return [n for n in self.nodes if not n.within_filter]


def _signed(value: float | None) -> str:
    return "none" if value is None else f"{value:+.2f}"


def _flat(update: Params) -> np.ndarray:
    floats = [update[k].astype(np.float64).ravel() for k in sorted(update) if update[k].dtype.kind == "f"]
    return np.concatenate(floats) if floats else np.zeros(0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return None
    return float(a @ b) / (na * nb)


def audit_updates(
    updates: Mapping[str, tuple[Params, float]], *, factor: float = NORM_FILTER_FACTOR
) -> UpdateAudit:
    """Read each node's update (node id → (dense update, images it trained on)) against the others'.

    The updates must agree in tensor names and shapes, as the round's intake made sure they do.
    """
    if not updates:
        raise AggregationError("no updates to read")
    ids = sorted(updates)
    flats = [_flat(updates[i][0]) for i in ids]
    if len({f.shape for f in flats}) > 1:
        raise AggregationError("the updates differ in size: they are not answers to the same round")
    norms = [l2_norm(updates[i][0]) for i in ids]
    if not all(math.isfinite(n) for n in norms):
        raise AggregationError("an update has non-finite values")
    keep = within_norm_filter(norms, factor)
    median = float(np.median(norms))
    per_image = {
        i: n / math.sqrt(updates[i][1]) for i, n in zip(ids, norms, strict=True) if updates[i][1] > 0
    }
    median_per_image = float(np.median(list(per_image.values()))) if per_image else 0.0
    weights = np.array([float(updates[i][1]) for i in ids])
    if not weights.sum() > 0:
        weights = np.ones(len(ids))  # as FedAvg: no examples claimed, every node alike
    stacked = np.stack(flats)
    weighted = weights @ stacked
    # Every pairwise cosine from one Gram matrix; an update of zeros has none.
    gram = stacked @ stacked.T
    lengths = np.sqrt(np.diag(gram))
    out = []
    for k, node_id in enumerate(ids):
        others = [j for j in range(len(ids)) if j != k]
        pairs = [
            float(gram[k, j] / (lengths[k] * lengths[j])) for j in others if lengths[k] > 0 and lengths[j] > 0
        ]
        rest = weights.sum() - weights[k]
        keeps = (
            _cosine(weighted / weights.sum(), (weighted - weights[k] * flats[k]) / rest)
            if others and rest > 0
            else None
        )
        out.append(
            NodeUpdate(
                node_id=node_id,
                examples=updates[node_id][1],
                share=float(weights[k] / weights.sum()),
                norm=norms[k],
                norm_ratio=norms[k] / median if median > 0 else None,
                agreement=float(np.median(pairs)) if pairs else None,
                keeps=keeps,
                within_filter=keep[k],
                norm_for_size=(
                    per_image[node_id] / median_per_image
                    if node_id in per_image and median_per_image > 0
                    else None
                ),
            )
        )
    return UpdateAudit(out, factor)
