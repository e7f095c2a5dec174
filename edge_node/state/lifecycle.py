"""The study life cycle as data: states, events, the transition table and the rule that applies it."""

from __future__ import annotations

import enum

__all__ = ["TRANSITIONS", "StudyEvent", "StudyState", "format_transitions", "next_state"]


class StudyState(str, enum.Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class StudyEvent(str, enum.Enum):
    INSTANCE = "instance"  # an instance of the study was spooled
    COMPLETE = "complete"  # the association that sent it was released
    CLAIM = "claim"  # the worker took it (queued, or received and quiet for quiet_seconds)
    DONE = "done"  # analysis finished with results
    SKIPPED = "skipped"  # analysis declined the study (wrong modality, ...) and said why
    FAILED = "failed"  # analysis raised
    STALE = "stale"  # a run finished but instances arrived while it ran: the study must run again
    RECOVER = "recover"  # the node restarted and found the study in processing
    GIVE_UP = "give_up"  # ... and the node had died in max_run_attempts runs of it: set aside


S, E = StudyState, StudyEvent

#: The study life cycle. Rule for late instances: an instance arriving after a study was processed sends it
#: back to RECEIVED, and the study is processed again *as a whole* (all its instances, old and new) once it
#: is complete again; the new run's results supersede the earlier ones. An instance arriving *during* a run
#: bumps the study's revision; the run still finishes and records its outcome, then the study goes back to
#: RECEIVED (STALE) instead of a final state.
TRANSITIONS: dict[tuple[StudyState, StudyEvent], StudyState] = {
    (S.RECEIVED, E.INSTANCE): S.RECEIVED,
    (S.RECEIVED, E.COMPLETE): S.QUEUED,
    (S.RECEIVED, E.CLAIM): S.PROCESSING,
    (S.QUEUED, E.INSTANCE): S.RECEIVED,
    (S.QUEUED, E.COMPLETE): S.QUEUED,
    (S.QUEUED, E.CLAIM): S.PROCESSING,
    (S.PROCESSING, E.INSTANCE): S.PROCESSING,
    (S.PROCESSING, E.COMPLETE): S.PROCESSING,
    (S.PROCESSING, E.DONE): S.DONE,
    (S.PROCESSING, E.SKIPPED): S.SKIPPED,
    (S.PROCESSING, E.FAILED): S.FAILED,
    (S.PROCESSING, E.STALE): S.RECEIVED,
    (S.PROCESSING, E.RECOVER): S.QUEUED,
    (S.PROCESSING, E.GIVE_UP): S.FAILED,
    (S.DONE, E.INSTANCE): S.RECEIVED,
    (S.SKIPPED, E.INSTANCE): S.RECEIVED,
    (S.FAILED, E.INSTANCE): S.RECEIVED,
    (S.DONE, E.COMPLETE): S.DONE,
    (S.SKIPPED, E.COMPLETE): S.SKIPPED,
    (S.FAILED, E.COMPLETE): S.FAILED,
}


def next_state(state: StudyState, event: StudyEvent) -> StudyState:
    """The state after ``event``; a pair missing from TRANSITIONS is a bug and raises ValueError."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"study event {event.value!r} is not allowed in state {state.value!r}") from None


def format_transitions() -> str:
    """The transition table as aligned text (``fedclinic-edge states`` prints it)."""
    width = max(len(s.value) for s in StudyState)
    ev_width = max(len(e.value) for e in StudyEvent)
    return "\n".join(
        f"{src.value:<{width}} --{ev.value:-<{ev_width}}--> {dst.value}"
        for (src, ev), dst in TRANSITIONS.items()
    )
