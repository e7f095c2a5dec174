"""PrivacyGate: the one door an update passes to leave the clinic (floor, then ledger, then protection)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_node.protection.errors import TaskRefused
from edge_node.protection.floor import PrivacyFloor
from edge_node.protection.ledger import PrivacyLedger
from edge_node.protection.pipeline import Masker, ProtectedUpdate, ProtectionPipeline
from edge_node.protection.residual import ResidualStore
from edge_node.protocol.protection import ProtectionSpec

__all__ = ["PrivacyGate"]

logger = logging.getLogger(__name__)


class PrivacyGate:
    """The clinic's floor and ledger in front of its protection pipeline.

    ``refusal(spec)`` answers before any work is done (the reason the hub records); ``release`` protects
    the update and charges the ledger in one step, refusing again if the budget ran out meanwhile.
    """

    def __init__(self, floor: PrivacyFloor, ledger: PrivacyLedger, pipeline: ProtectionPipeline) -> None:
        self.floor = floor
        self.ledger = ledger
        self.pipeline = pipeline

    @classmethod
    def in_data_dir(cls, floor: PrivacyFloor, data_dir: Path) -> PrivacyGate:
        """A gate whose ledger and compression residuals live under the node's data directory."""
        pipeline = ProtectionPipeline(residuals=ResidualStore.in_data_dir(data_dir))
        return cls(floor, PrivacyLedger.in_data_dir(data_dir, delta=floor.delta), pipeline)

    def refusal(self, spec: ProtectionSpec) -> str | None:
        """Why the clinic refuses a round under ``spec`` (floor first, then budget); None if it accepts."""
        reason = self.floor.refusal(spec)
        if reason is not None:
            return reason
        limit = self.floor.max_epsilon_total
        if limit is not None:
            total = self.ledger.would_spend(self.pipeline.noise_multiplier(spec), spec.sampling_rate)
            if total > limit:
                return (
                    f"this round would bring the clinic's privacy spent to epsilon {total:.3g} "
                    f"(delta {self.floor.delta:g}), over its budget of {limit:g}"
                )
        return None

    def release(
        self,
        task_id: str,
        round: int,
        update: Mapping[str, np.ndarray],
        spec: ProtectionSpec,
        *,
        masker: Masker | None = None,
    ) -> ProtectedUpdate:
        """The protected update of this task, charged to the ledger; TaskRefused if it may not leave."""
        reason = self.refusal(spec)
        if reason is not None:
            logger.info("round %d refused: %s", round, reason)
            raise TaskRefused(reason)
        protected = self.pipeline.protect(update, spec, masker=masker)
        self.ledger.charge(
            task_id,
            round=round,
            kind=spec.kind.value,
            noise_multiplier=protected.noise_multiplier,
            sampling_rate=spec.sampling_rate,
            epsilon=protected.epsilon,
            delta=spec.delta,
            payload_bytes=protected.payload_bytes,
            max_total=self.floor.max_epsilon_total,
        )
        return protected
