"""The simulation runner: in-process clinics driven through the same Strategy and update codec as real nodes.

Per round: ``strategy.configure_round`` → each clinic's learner fits its task → the result is encoded
exactly as a node uploads it (``hub.fl.codec.encode_result``: envelope + npz bytes, counted per clinic) →
decoded and checked at the "hub" (``decode_or_failure``) → ``strategy.aggregate(results, failures)``.
A learner that raises becomes a ``ClientFailure`` with the reason and the round goes on with the others.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from hub.fl.codec import UploadLedger, decode_or_failure, encode_result
from hub.fl.strategy import ClientFailure, ClientResult, ClientTask, Params, Strategy

log = logging.getLogger(__name__)


class ClientLearner(Protocol):
    """A simulated clinic: answers a task, and can save/restore its private state for resuming."""

    client_id: str

    def fit(self, task: ClientTask) -> ClientResult: ...

    def state(self) -> Params: ...

    def restore(self, state: Mapping[str, np.ndarray]) -> None: ...


@dataclass
class RoundLog:
    """What one simulated round cost and who failed."""

    rnd: int
    bytes_up: dict[str, int]
    failures: list[str]
    seconds: float
    applied: bool


@dataclass
class FederationRun:
    """The outcome of a simulated federation (round logs; the learners hold the trained models)."""

    rounds: list[RoundLog] = field(default_factory=list)

    def bytes_per_client_round(self) -> dict[str, float]:
        """Mean uploaded bytes per clinic per round (rounds in which the clinic uploaded)."""
        per: dict[str, list[int]] = {}
        for r in self.rounds:
            for cid, b in r.bytes_up.items():
                per.setdefault(cid, []).append(b)
        return {cid: float(np.mean(v)) for cid, v in per.items()}

    def to_json(self) -> list[dict[str, object]]:
        return [r.__dict__ for r in self.rounds]


class RoundCheckpoint:
    """Per-round checkpoint of a simulated federation: strategy state + every learner's state, npz + json.

    Written atomically (temp file, then rename); ``load`` returns None when there is nothing to resume.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(
        self, rnd: int, strategy: Strategy, learners: Mapping[str, ClientLearner], run: FederationRun
    ) -> None:
        arrays: dict[str, np.ndarray] = {f"global/{k}": v for k, v in strategy_state(strategy).items()}
        for cid, learner in learners.items():
            arrays.update({f"client/{cid}/{k}": v for k, v in learner.state().items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(self.path)
        meta = self.path.with_suffix(".json")
        meta_tmp = meta.with_suffix(".tmp")
        meta_tmp.write_text(json.dumps({"round": rnd, "rounds": run.to_json()}))
        meta_tmp.replace(meta)

    def load(self) -> tuple[int, Params, dict[str, Params], FederationRun] | None:
        meta = self.path.with_suffix(".json")
        if not (self.path.is_file() and meta.is_file()):
            return None
        info = json.loads(meta.read_text())
        strategy_params: Params = {}
        clients: dict[str, Params] = {}
        with np.load(self.path, allow_pickle=False) as npz:
            for key in npz.files:
                if key.startswith("global/"):
                    strategy_params[key[len("global/") :]] = npz[key]
                else:
                    _, cid, name = key.split("/", 2)
                    clients.setdefault(cid, {})[name] = npz[key]
        run = FederationRun([RoundLog(**r) for r in info["rounds"]])
        return int(info["round"]), strategy_params, clients, run

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".json").unlink(missing_ok=True)


def strategy_state(strategy: Strategy) -> Params:
    """What the runner must save to resume this strategy (its own ``state()`` when it has one)."""
    getter = getattr(strategy, "state_dict", None)
    if callable(getter):
        state: Params = getter()
        return state
    return strategy.global_params


def restore_strategy(strategy: Strategy, saved: Params, clients: Sequence[str]) -> None:
    loader = getattr(strategy, "load_state_dict", None)
    if callable(loader):
        loader(saved)
    else:
        strategy.initialize(saved, clients)


def server_state_is_global(strategy: Strategy, clients: Sequence[str]) -> bool:
    """True when the server keeps nothing per client beyond ``global_params``: a round checkpoint suffices.

    pFedNet keeps each client's personal part at the server and has no public way to set it again, so its
    runs resume per finished (method, seed) instead of per round.
    """
    if callable(getattr(strategy, "load_state_dict", None)):
        return True
    shared = set(strategy.global_params)
    return all(set(strategy.params_for(cid)) == shared for cid in clients)


def run_federation(
    strategy: Strategy,
    learners: Mapping[str, ClientLearner],
    rounds: int,
    *,
    checkpoint: RoundCheckpoint | None = None,
    on_round: Callable[[int], None] | None = None,
) -> FederationRun:
    """Run ``rounds`` rounds (1-based) of ``strategy``; resumes from ``checkpoint`` if present.

    The strategy must already be ``initialize``-d with the starting model.
    """
    clients = list(learners)
    run = FederationRun()
    start = 1
    if checkpoint is not None and not server_state_is_global(strategy, clients):
        log.info("%s keeps per-client state at the server: no round checkpoints", strategy.name)
        checkpoint = None
    if checkpoint is not None and (saved := checkpoint.load()) is not None:
        done, strategy_params, client_states, run = saved
        restore_strategy(strategy, strategy_params, clients)
        for cid, state in client_states.items():
            learners[cid].restore(state)
        start = done + 1
        log.info("resumed %s after round %d", strategy.name, done)
        for rnd in range(1, start):
            if on_round is not None:
                on_round(rnd)
    for rnd in range(start, rounds + 1):
        t0 = time.perf_counter()
        ledger = UploadLedger()
        results: list[ClientResult] = []
        failures: list[ClientFailure] = []
        for task in strategy.configure_round(rnd, clients):
            try:
                result = learners[task.client_id].fit(task)
                envelope, payload = encode_result(result, task.kind)
            except Exception as exc:  # a broken clinic must not stop the round
                log.warning("round %d: clinic %s failed: %s", rnd, task.client_id, exc)
                failures.append(ClientFailure(task.client_id, rnd, f"{type(exc).__name__}: {exc}"))
                continue
            ledger.record(envelope)
            decoded = decode_or_failure(envelope, payload)
            if isinstance(decoded, ClientResult):
                results.append(decoded)
            else:
                failures.append(decoded)
        new = strategy.aggregate(rnd, results, failures)
        bytes_up = {cid: b for (cid, _), b in ledger.per_client_round().items()}
        run.rounds.append(
            RoundLog(
                rnd,
                bytes_up,
                [f"{f.client_id}: {f.reason}" for f in failures],
                time.perf_counter() - t0,
                new is not None,
            )
        )
        if checkpoint is not None:
            checkpoint.save(rnd, strategy, learners, run)
        if on_round is not None:
            on_round(rnd)
    return run
