"""Carrying a strategy's state across rounds and restarts, behind one small adapter.

A strategy that offers ``state_dict()`` / ``load_state_dict()`` is saved and restored through them;
otherwise its state is its global tensors, which ``initialize`` restores. The round controller persists
``save_strategy`` output with each round and calls ``restore_strategy`` before planning or aggregating.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hub.fl.strategy import Params, Strategy

__all__ = ["restore_strategy", "save_strategy"]


def save_strategy(strategy: Strategy) -> Params:
    """The tensors that let ``restore_strategy`` rebuild this strategy's state."""
    state_dict = getattr(strategy, "state_dict", None)
    if callable(state_dict):
        state = state_dict()
        if isinstance(state, dict) and all(isinstance(v, np.ndarray) for v in state.values()):
            return {str(k): v for k, v in state.items()}
    return dict(strategy.global_params)


def restore_strategy(strategy: Strategy, state: Params, nodes: Sequence[str]) -> None:
    strategy.initialize(state, list(nodes))
    load = getattr(strategy, "load_state_dict", None)
    # Only a saved strategy state names its strategy; starting tensors may also hold tensors the strategy
    # leaves to the clients (FedHelp's public head), which are no saved state.
    if callable(load) and "strategy" in state and set(state) - set(strategy.global_params):
        load(state)
