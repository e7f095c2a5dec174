"""The study life cycle: the transition table is total where it must be, prints, and refuses bad events."""

from __future__ import annotations

import pytest

from edge_node.state.lifecycle import TRANSITIONS, StudyEvent, StudyState, format_transitions, next_state


def test_transition_table_is_total_for_instances_and_prints() -> None:
    # Every state accepts a new instance: the listener must never be refused by the state machine.
    for state in StudyState:
        assert (state, StudyEvent.INSTANCE) in TRANSITIONS
    text = format_transitions()
    assert text.count("\n") + 1 == len(TRANSITIONS)
    assert "processing --recover---> queued" in text
    with pytest.raises(ValueError, match="not allowed"):
        next_state(StudyState.DONE, StudyEvent.CLAIM)
