"""Each node's part in a federated envelope, read from its own answers to the two envelope rounds.

The hub sums the nodes' answers; it also keeps each one (the envelope rounds take no secure aggregation).
Before ``fedclinic-hub envelope build`` signs an envelope, this module reads them node by node:

* a node that counted distances without having sent sums (it refused round one) had its images measured
  against envelopes fitted without any of them: its counts are taken out of the threshold;
* for every other node, how many distances it counted against how many images it summed (they differ when
  it analysed images between the rounds, or when it made counts up), each part's threshold without its
  counts, and how much wider each part's fit is with its sums than without them (the geometric mean of
  the shrunk covariance's spread over all directions, ``det(Σ)^(1/2D)``): a node whose answers alone move
  either far is named, so that the operator looks at it before the nodes take the envelope (and reruns
  both rounds without it, ``envelope start --exclude-node``, if need be). An honest clinic unlike the
  others moves them too; a federation of two or three nodes moves them most (docs/envelope.md has the
  figures).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_node.protocol.envelope_moments import MomentSums, histogram_quantile
from edge_node.protocol.envelope_rounds import (
    EMBEDDING,
    INTENSITY,
    MIN_FITTED,
    PARTS,
    EnvelopeRounds,
    added_up,
    part_sums,
)
from edge_node.protocol.manifest import InputEnvelope

__all__ = ["INFLUENCE_WARNING", "AnswerAudit", "NodeInfluence", "audit_answers", "thresholds_of"]

#: A node whose answers alone move a part's threshold or its fit's spread by this factor (up, or down by
#: its inverse) is named.
INFLUENCE_WARNING = 1.5


@dataclass(frozen=True)
class NodeInfluence:
    """One node of both rounds: the images it summed, the distances it counted, and each part's threshold
    without its counts (None when the others' counts are too few, or put the quantile beyond the
    histogram)."""

    node_id: str
    images: int
    counted: int
    threshold_without: dict[str, float | None]
    #: Per part, the fit's spread with its sums over the spread without them (None when the others' images
    #: are too few to fit).
    widens: dict[str, float | None]

    def moves(self, thresholds: Mapping[str, float]) -> dict[str, float | None]:
        """Per part, the envelope's threshold (``thresholds``) over the threshold without its counts; None
        where none can be read without them."""
        return {
            part: None if without is None else thresholds[part] / without
            for part, without in self.threshold_without.items()
        }


@dataclass(frozen=True)
class AnswerAudit:
    """The histograms the envelope's thresholds are read from, and what the nodes' answers showed."""

    histograms: dict[str, np.ndarray]
    #: Nodes that counted distances but sent no sums: their counts are not in ``histograms``.
    without_sums: list[str]
    influence: list[NodeInfluence]

    def strong(self, thresholds: Mapping[str, float]) -> list[tuple[str, str, float]]:
        """``(node, part, factor)`` for each node whose counts move a part's threshold by at least
        ``INFLUENCE_WARNING`` (the factor is with / without; ``inf`` when without it none can be read). A
        lone node is the whole envelope: there is nothing to compare it with, and nothing is named."""
        out: list[tuple[str, str, float]] = []
        if len(self.influence) < 2:
            return out
        for node in self.influence:
            for part, moved in node.moves(thresholds).items():
                factor = float("inf") if moved is None else moved
                if _far(factor):
                    out.append((node.node_id, part, factor))
        return out

    def widening(self) -> list[tuple[str, str, float]]:
        """``(node, part, factor)`` for each node whose sums change a part's fit's spread by at least
        ``INFLUENCE_WARNING`` (with / without)."""
        return [
            (node.node_id, part, factor)
            for node in self.influence
            for part, factor in node.widens.items()
            if factor is not None and _far(factor)
        ]

    def named(self, thresholds: Mapping[str, float]) -> list[str]:
        """The nodes ``strong`` or ``widening`` names, each once, in id order."""
        return sorted({n for n, _, _ in self.strong(thresholds)} | {n for n, _, _ in self.widening()})


def thresholds_of(envelope: InputEnvelope) -> dict[str, float]:
    """A federated envelope's thresholds per part (the rounds always fit both)."""
    if envelope.intensity is None:
        raise ValueError("a federated envelope has a grey-value part")
    return {EMBEDDING: envelope.threshold, INTENSITY: envelope.intensity.threshold}


def _far(factor: float) -> bool:
    return factor >= INFLUENCE_WARNING or factor <= 1.0 / INFLUENCE_WARNING


def _spread(sums: MomentSums) -> float | None:
    """The shrunk covariance's geometric-mean standard deviation; None over too few images."""
    if sums.n < MIN_FITTED:
        return None
    _, cov, _ = sums.shrunk()
    sign, logdet = np.linalg.slogdet(cov)
    return float(np.exp(logdet / (2 * sums.dim))) if sign > 0 else None


def _widens(mine: Mapping[str, MomentSums], everyone: Mapping[str, MomentSums]) -> dict[str, float | None]:
    """Per part, the spread of the fit over everyone's sums over that without ``mine``."""
    out: dict[str, float | None] = {}
    for part in PARTS:
        with_it, without = _spread(everyone[part]), _spread(everyone[part] - mine[part])
        out[part] = None if with_it is None or not without else with_it / without
    return out


def _threshold(counts: np.ndarray, dim: int, quantile: float) -> float | None:
    try:
        return histogram_quantile(counts, dim, quantile)
    except ValueError:
        return None


def audit_answers(
    moments: Mapping[str, Mapping[str, np.ndarray]],
    histograms: Mapping[str, Mapping[str, np.ndarray]],
    rounds: EnvelopeRounds,
    quantile: float,
) -> AnswerAudit:
    """Read each node's answers: ``moments`` and ``histograms`` map node ids to what each sent in round one
    and round two. The histograms returned sum the counts of the nodes that sent sums."""
    without_sums = sorted(set(histograms) - set(moments))
    both = sorted(set(histograms) & set(moments))
    kept = {node: histograms[node] for node in both}
    # Each node's sums over all its folds, and everyone's (the nodes of round one, as the fit has them).
    node_sums = {
        n: {part: MomentSums.total(part_sums(part, m)) for part in PARTS} for n, m in moments.items()
    }
    everyone = (
        {part: MomentSums.total([sums[part] for sums in node_sums.values()]) for part in PARTS}
        if both
        else {}
    )
    total = added_up(list(kept.values())) if kept else {}
    influence = []
    for node in both:
        without: dict[str, float | None] = {}
        for part in PARTS:
            rest = total[f"{part}/histogram"] - kept[node][f"{part}/histogram"]
            without[part] = _threshold(rest, rounds.dims[part], quantile) if rest.sum() > 0 else None
        counted = int(np.asarray(kept[node][f"{PARTS[0]}/histogram"]).sum())
        images = int(node_sums[node][PARTS[0]].n)
        influence.append(NodeInfluence(node, images, counted, without, _widens(node_sums[node], everyone)))
    return AnswerAudit(total, without_sums, influence)
