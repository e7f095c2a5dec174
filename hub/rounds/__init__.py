"""Federated rounds over real nodes: the life cycle table, round plans, and the persistent controller."""

from hub.rounds.controller import RoundController
from hub.rounds.lifecycle import TRANSITIONS, check_transition, transition_table
from hub.rounds.plan import RoundPlan, build_plan

__all__ = [
    "TRANSITIONS",
    "RoundController",
    "RoundPlan",
    "build_plan",
    "check_transition",
    "transition_table",
]
