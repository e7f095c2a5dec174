"""Carrying a strategy's state across rounds and restarts, behind one small adapter.

A strategy that keeps a part of the model per client (``Capability.PERSONAL_STATE``: pFedNet's personal
parts and its similarity graph) is saved whole through ``state_dict()``, as arrays (``hub.fl.state``), and
restored through ``load_state_dict()``; the state it saved names its clients, and a later round may take
only those. Any other strategy's state is its global tensors, which ``initialize`` restores for the round's
nodes. The round controller persists ``save_strategy`` output with each round and calls
``restore_strategy`` before planning or aggregating.
"""

from __future__ import annotations

from collections.abc import Sequence

from hub.fl.errors import StrategyConfigError
from hub.fl.state import innermost, is_saved_state, read_json, state_from_arrays, state_to_arrays
from hub.fl.strategy import Capability, Params, Strategy

__all__ = ["restore_strategy", "save_strategy"]


def _keeps_personal_state(strategy: Strategy) -> bool:
    return Capability.PERSONAL_STATE in getattr(strategy, "capabilities", Capability(0))


def save_strategy(strategy: Strategy) -> Params:
    """The tensors that let ``restore_strategy`` rebuild this strategy's state."""
    state_dict = getattr(strategy, "state_dict", None)
    if _keeps_personal_state(strategy) and callable(state_dict):
        return state_to_arrays(state_dict())
    return dict(strategy.global_params)


def restore_strategy(strategy: Strategy, state: Params, nodes: Sequence[str]) -> None:
    """``strategy`` as ``save_strategy`` left it, for a round of ``nodes``; starting tensors (a model, and
    tensors the strategy leaves to the clients such as FedHelp's public head) initialise it instead."""
    if not is_saved_state(state):
        strategy.initialize(state, list(nodes))
        return
    saved = state_from_arrays(state)
    load = getattr(strategy, "load_state_dict", None)
    if not callable(load):
        raise StrategyConfigError(f"{strategy.name} cannot load a saved state")
    clients = read_json(innermost(saved), "clients", list[str])  # inside a wrapper, if there is one
    joined = sorted(set(nodes) - set(clients))
    if joined:
        raise StrategyConfigError(
            f"{strategy.name} keeps a part per node and nodes {joined} were not among its nodes when its "
            f"state was saved: start the strategy anew (rounds start --model) to include them"
        )
    load(saved)
