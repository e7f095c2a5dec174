"""The round life cycle as data: open → collecting → aggregating → published | failed."""

from __future__ import annotations

from edge_node.protocol.wire import RoundState

__all__ = ["TERMINAL", "TRANSITIONS", "IllegalTransition", "check_transition", "transition_table"]

#: (from, to) → when it happens. Anything not listed is refused.
TRANSITIONS: dict[tuple[RoundState, RoundState], str] = {
    (RoundState.OPEN, RoundState.COLLECTING): "tasks were issued to the round's nodes",
    (RoundState.OPEN, RoundState.FAILED): "cancelled before tasks were issued",
    (RoundState.COLLECTING, RoundState.AGGREGATING): "every node answered, or the deadline passed with ≥ k",
    (RoundState.COLLECTING, RoundState.FAILED): "deadline passed with fewer than k results, or cancelled",
    (RoundState.AGGREGATING, RoundState.PUBLISHED): "the aggregate was stored as the round's result",
    (RoundState.AGGREGATING, RoundState.FAILED): "the strategy kept the model or could not aggregate",
}

TERMINAL = frozenset({RoundState.PUBLISHED, RoundState.FAILED})


class IllegalTransition(ValueError):
    """A state change the table does not allow."""


def check_transition(current: RoundState, target: RoundState) -> None:
    if (current, target) not in TRANSITIONS:
        raise IllegalTransition(f"a round cannot go from {current.value} to {target.value}")


def transition_table() -> list[tuple[str, str, str]]:
    """Rows (from, to, when) in life-cycle order, for printing."""
    return [(a.value, b.value, why) for (a, b), why in TRANSITIONS.items()]
