"""The privacy floor a clinic sets in its own config, and the check that refuses a task below it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_node.protocol.protection import ProtectionSpec
from edge_node.protocol.updates import UpdateKind

__all__ = ["PrivacyFloor"]


class PrivacyFloor(BaseModel):
    """Minimum protection this clinic accepts; the hub cannot lower it.

    ``max_epsilon_per_round`` / ``max_epsilon_total`` at ``delta`` (None: no limit; a limit also means a
    round without noise is refused, its ε being unbounded). ``min_cohort``: the fewest nodes a round may
    ask, so that one clinic's update is never alone in a sum. ``require_secure_aggregation``: refuse plain
    rounds. ``allowed_kinds``: which update kinds may leave the clinic.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_epsilon_per_round: float | None = Field(default=None, gt=0)
    max_epsilon_total: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    min_cohort: int = Field(default=3, ge=1)
    require_secure_aggregation: bool = False
    allowed_kinds: frozenset[UpdateKind] = frozenset(UpdateKind)

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyFloor:
        per, total = self.max_epsilon_per_round, self.max_epsilon_total
        if per is not None and total is not None and per > total:
            raise ValueError(f"max_epsilon_per_round ({per}) cannot exceed max_epsilon_total ({total})")
        return self

    @property
    def needs_noise(self) -> bool:
        """Whether every update must carry calibrated noise (some ε limit is set)."""
        return self.max_epsilon_per_round is not None or self.max_epsilon_total is not None

    def refusal(self, spec: ProtectionSpec) -> str | None:
        """Why this clinic refuses a round with this protection, in plain words; None if it accepts it."""
        if spec.kind not in self.allowed_kinds:
            allowed = ", ".join(sorted(k.value for k in self.allowed_kinds)) or "none"
            return f"this clinic does not send {spec.kind.value} updates (allowed: {allowed})"
        if spec.cohort_size < self.min_cohort:
            return (
                f"the round asks {spec.cohort_size} clinics but this clinic takes part only in rounds "
                f"of at least {self.min_cohort}"
            )
        if self.require_secure_aggregation and not spec.secure_aggregation:
            return "this clinic sends updates only under secure aggregation, and this round is plain"
        if spec.noise_shares > 1 and spec.noise_shares < self.min_cohort:
            return (
                f"the round splits its noise over a secure-aggregation threshold of {spec.noise_shares} "
                f"clinics, fewer than this clinic's minimum of {self.min_cohort} per sum"
            )
        if self.needs_noise and spec.epsilon is None:
            return "this clinic sends only differentially private updates, and this round adds no noise"
        if spec.delta > self.delta:
            return f"the round's delta {spec.delta:g} is larger than this clinic's limit {self.delta:g}"
        limit = self.max_epsilon_per_round
        if limit is not None and spec.epsilon is not None and spec.epsilon > limit:
            return f"the round spends epsilon {spec.epsilon:g}, more than this clinic's {limit:g} per round"
        return None
