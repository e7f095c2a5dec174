"""The two collection rounds that fit a bundle's input envelope on the nodes' own images.

``envelope_moments`` asks each node for the per-fold sums of its analysed images' features and adds them up;
``envelope_distances`` starts from that sum, sends each node the envelopes fitted without each fold and adds
up the nodes' histograms of held-out distances. ``fedclinic-hub envelope build`` turns both aggregates into
the envelope of a new signed bundle. The arithmetic is ``edge_node.protocol.envelope_rounds``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_node.protocol.envelope_rounds import EnvelopeRounds, added_up, held_out_params
from edge_node.protocol.updates import UpdateKind
from hub.fl.errors import StrategyConfigError
from hub.fl.strategy import ClientFailure, ClientResult, Params
from hub.fl.validation import TensorSpec
from hub.rounds.plan import PlannedTask, RoundPlan

__all__ = ["ENVELOPE_ROUNDS", "EnvelopeDistances", "EnvelopeMoments", "rounds_of"]

ENVELOPE_ROUNDS = frozenset({"envelope_moments", "envelope_distances"})


def rounds_of(config: Mapping[str, Any]) -> EnvelopeRounds:
    try:
        return EnvelopeRounds.from_config(config)
    except ValueError as exc:
        raise StrategyConfigError(f"envelope round: {exc}") from exc


def _config(rounds: EnvelopeRounds) -> dict[str, float | int | str | bool]:
    return dict(rounds.to_config())


class EnvelopeMoments(RoundPlan):
    """Round one: each node sends the sums of each fold of its images' features; the hub adds them up. An
    answer with a fold of fewer than ``MIN_FOLD_IMAGES`` images is refused at intake (nodes never send
    one; ``hub.rounds.answer_checks``)."""

    kind = UpdateKind.ENVELOPE_MOMENTS
    name = "envelope_moments"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.rounds = rounds_of(config)

    def tasks(self, number: int, nodes: Sequence[str]) -> list[PlannedTask]:
        expected = {n: TensorSpec(s, np.dtype(np.float64)) for n, s in self.rounds.moment_shapes().items()}
        return [PlannedTask(node, {}, expected, _config(self.rounds)) for node in nodes]

    def aggregate(
        self, number: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> tuple[Params | None, str | None]:
        if not results:
            return None, "no node sent its sums"
        total = added_up([r.update for r in results])
        total["nodes"] = np.array(len(results), dtype=np.int64)
        return total, None


class EnvelopeDistances(RoundPlan):
    """Round two: each node gets, per fold, the envelope fitted on round one's sums without that fold, and
    sends the histogram of its images' held-out distances; the hub adds the histograms up."""

    kind = UpdateKind.ENVELOPE_DISTANCES
    name = "envelope_distances"

    def __init__(self, config: Mapping[str, Any], start: Params) -> None:
        self.rounds = rounds_of(config)
        shapes = self.rounds.moment_shapes()
        if any(name not in start or start[name].shape != shape for name, shape in shapes.items()):
            raise StrategyConfigError(
                "an envelope_distances round starts from an envelope_moments round's aggregate of the same "
                "bundle and folds (`fedclinic-hub envelope threshold --round N`)"
            )
        try:
            self.params = held_out_params(start, self.rounds)
        except ValueError as exc:
            raise StrategyConfigError(f"envelope round: {exc}") from exc

    def tasks(self, number: int, nodes: Sequence[str]) -> list[PlannedTask]:
        expected = {n: TensorSpec(s, np.dtype(np.int64)) for n, s in self.rounds.histogram_shapes().items()}
        return [PlannedTask(node, self.params, expected, _config(self.rounds)) for node in nodes]

    def aggregate(
        self, number: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]
    ) -> tuple[Params | None, str | None]:
        if not results:
            return None, "no node sent its counts"
        total = added_up([r.update for r in results])
        total["nodes"] = np.array(len(results), dtype=np.int64)
        return total, None
